"""``ckptkit.inspect``: open any checkpoint and describe it, safely and without tensor bytes."""

from __future__ import annotations

import os
from pathlib import Path

from ckptkit import formats
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
    target = Path(path)
    with naming(target):
        raw = formats.detect(target).read_info(target)
    size = _size(target)
    if raw.format == "hf-sharded" and target.is_file():  # the index file names the checkpoint
        size += sum(int(s.get("size") or 0) for s in raw.details.get("shards", ()))
    return summarise(raw, str(target), size)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    # A TF checkpoint prefix: the index and its shards.
    return sum(p.stat().st_size for p in path.parent.glob(path.name + ".*") if p.is_file())
