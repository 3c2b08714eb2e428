"""``ckptkit.inspect``: open any checkpoint and describe it, safely and without tensor bytes."""

from __future__ import annotations

import os
from ckptkit import formats
from ckptkit.storage.location import LocalLocation, Location, locate
from ckptkit.errors import naming
from ckptkit.summary import CheckpointInfo, summarise


def inspect(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe the checkpoint at ``path`` without running code from it.

    The format is detected by content.  Pickle data is interpreted by a restricted reader that
    never imports or calls anything the file names; tensor bytes are never read.

    Args:
        path: a checkpoint file, a SavedModel directory, a TF checkpoint prefix/directory, a
            sharded Hugging Face checkpoint (its directory or ``*.index.json``) or a PyTorch
            DCP directory.

    Returns:
        The checkpoint's :class:`CheckpointInfo` (``.to_dict()`` is ``ckpt inspect --json``).

    Raises:
        NotFoundError: ``path`` does not exist.
        FormatError: not a format ckptkit reads.
        IntegrityError: truncated or corrupt.

    Example:
        >>> info = ckptkit.inspect("thinker_best.pt")   # doctest: +SKIP
        >>> info.groups[0].name, info.metadata["step"]    # doctest: +SKIP
        ('model', 210000)
    """
    target = locate(path)  # one location for sniffing and reading: its first read is shared
    with naming(target):
        raw = formats.detect(target).read_info(target)
    # A folder URL (HTTP cannot list it) counts as its index and shards, as the index does.
    folder_url = raw.format == "hf-sharded" and not target.is_file() and not target.is_dir()
    size = target.child(raw.details["index"]).size() if folder_url else _size(target)
    if raw.format == "hf-sharded" and (folder_url or target.is_file()):
        size += sum(int(s.get("size") or 0) for s in raw.details.get("shards", ()))
    return summarise(raw, str(target), size)


def _size(path: Location) -> int:
    if path.is_file():
        return path.size()
    if path.is_dir():
        return _tree_size(path)
    # A TF checkpoint prefix: the index and its shards.
    prefix = path.name + "."
    return sum(e.size or 0 for e in path.parent().list()
               if not e.is_dir and e.name.startswith(prefix))


def _tree_size(directory: Location, depth: int = 0) -> int:
    if isinstance(directory, LocalLocation):
        # rglob does not descend into linked folders: a link loop cannot make this endless.
        return sum(p.stat().st_size for p in directory.path.rglob("*") if p.is_file())
    total = 0
    for entry in directory.list():
        if entry.is_dir and depth < _MAX_DEPTH:
            total += _tree_size(directory.child(entry.name), depth + 1)
        elif not entry.is_dir:
            total += entry.size or 0
    return total


#: Folder levels counted below a remote checkpoint directory (object stores have no links,
#: but a listing that claims endless nesting must not make the count endless).
_MAX_DEPTH = 16
