"""PyTorch Distributed Checkpoint (DCP) directories, read without torch.

``torch.distributed.checkpoint.save`` (FSDP, FSDP2, torchtitan, torchtune) writes one
directory: ``.metadata``, a pickle of DCP's dataclasses, and data files ``__<rank>_<n>.distcp``.
``.metadata`` holds ``Metadata(state_dict_metadata, planner_data, storage_data, ...)``:

- ``state_dict_metadata``: flattened name -> ``TensorStorageMetadata(properties, size,
  chunks)`` (global shape and dtype; ``chunks`` are ``ChunkStorageMetadata(offsets, sizes)``
  that tile it) or ``BytesStorageMetadata()`` for any other value (a step, a string...);
- ``planner_data``: flattened name -> the path of keys in the saved state dict;
- ``storage_data``: ``MetadataIndex(fqn, offset, index)`` -> ``_StorageInfo(relative_path,
  offset, length, transform_descriptors)``: where each chunk or item is stored.

The pickle is read by the restricted unpickler: these classes are data records
(``data/pickle_allowlist.toml``), recorded and never constructed.  Each stored item is what
the writing torch version's ``FileSystemWriter`` wrote: a whole ``torch.save`` file per tensor
chunk and per bytes item (the default, read with the torch zip reader on its byte range), or,
with ``SerializationFormat.SAFETENSORS``, the file's tensors in one safetensors blob after its
bytes items; told apart by content (a zip starts with ``PK``).
Items DCP stored through stream transforms (``stream.zstd/1``) are listed, not decoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkit.errors import CkptkitError, IntegrityError, UsageError
from ckptkit.formats import tensor_hooks
from ckptkit.model import (ByteSpan, Chunk, Opaque, Problem, RawCheckpoint, SafetyReport,
                           TensorRef, checked_shape, itemsize)
from ckptkit.pickles.pickle_globals import DType
from ckptkit.pickles.unpickler import Findings, read_pickle
from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.storage.location import LocalLocation, local_path, locate

FORMAT = "torch-dcp"
METADATA = ".metadata"
_MARK = b"torch.distributed.checkpoint"
_DATA_FILE = re.compile(r"__(?P<rank>\d+)_(?P<n>\d+)\.distcp$")
#: Bytes items larger than this are listed, not read, by inspect (a step or a string is tiny).
MAX_ITEM = 1 << 20


def root_of(path: Path) -> Path:
    """The checkpoint directory of ``path`` (the directory, or the ``.metadata`` in it)."""
    path = local_path(path)
    return path.parent if path.name == METADATA and not path.is_dir() else path


def sniff(path: Path) -> bool:
    """A directory whose ``.metadata`` is DCP's, or one holding ``__R_N.distcp`` files and
    no ``.metadata`` (a save that never finished: reading it says so)."""
    if not isinstance(locate(path), LocalLocation):
        return False  # read from local directories only
    path = local_path(path)
    root = root_of(path)
    meta = root / METADATA
    try:
        if not meta.exists():
            return root.is_dir() and any(_DATA_FILE.fullmatch(e.name)
                                         for e in locate(root).list() if not e.is_dir)
        head = locate(meta).read(0, 4096) if meta.is_file() else b""
    except OSError:
        return False
    return head[:1] == b"\x80" and _MARK in head


@dataclass(frozen=True)
class Entry:
    """One name of the saved state dict: a tensor (dtype, global shape, chunks) or a bytes
    item (``dtype`` None, one stored span)."""

    fqn: str
    path: tuple[Any, ...]
    dtype: str | None
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Metadata:
    root: Path
    entries: tuple[Entry, ...]
    files: tuple[str, ...]
    version: str | None
    findings: Findings


def _state(obj: Any, what: str) -> Any:
    if not isinstance(obj, Opaque):
        raise IntegrityError(f"{what} is {type(obj).__name__}, not a DCP record",
                             hint="The .metadata file is corrupt or not DCP's")
    return obj.state


def read_metadata(path: Path) -> Metadata:
    """Parse ``.metadata`` into entries whose chunks know their files and byte ranges.

    Raises:
        IntegrityError: the pickle is broken, or its records are not DCP's.
    """
    path = local_path(path)
    root = root_of(path)
    meta = root / METADATA
    where = locate(meta)
    if not where.is_file():
        raise IntegrityError(f"{root}: .distcp data files but no {METADATA} (DCP writes it "
                             "last: the save did not finish)", path=str(root),
                             hint="Use an earlier checkpoint, or save this one again")
    findings = Findings()
    with budget.reading(meta):
        top = read_pickle(where.read(0, where.size()), findings, what=f"{meta}",
                          location=METADATA)
    if not (isinstance(top, Opaque) and top.qualname.endswith(".Metadata")
            and isinstance(top.state, dict)):
        raise IntegrityError(f"{meta}: holds no DCP Metadata record", path=str(meta))
    state = top.state
    described, places = state.get("state_dict_metadata"), state.get("storage_data")
    planner = state.get("planner_data") if isinstance(state.get("planner_data"), dict) else {}
    if not isinstance(described, dict) or not isinstance(places, dict):
        raise IntegrityError(f"{meta}: DCP Metadata without state_dict_metadata/storage_data",
                             path=str(meta))
    spans: dict[tuple[str, tuple[int, ...] | None], tuple[ByteSpan, tuple[str, ...]]] = {}
    files: list[str] = []
    for key, info in places.items():
        index, stored = _state(key, f"{meta}: a storage key"), _state(info, f"{meta}: storage")
        if not isinstance(index, dict) or not isinstance(stored, dict):
            raise IntegrityError(f"{meta}: storage table holds something else than DCP records",
                                 path=str(meta))
        relative, offset, length = (stored.get("relative_path"), stored.get("offset"),
                                    stored.get("length"))
        fqn = str(index.get("fqn"))
        if not (isinstance(relative, str) and isinstance(offset, int) and isinstance(length, int)
                and offset >= 0 and length >= 0):
            raise IntegrityError(f"{meta}: item {fqn!r} has no valid place", path=str(meta))
        if "/" in relative or "\\" in relative or relative in ("", ".", ".."):
            raise IntegrityError(f"{meta}: item {fqn!r} is stored in {relative!r}, outside the "
                                 "checkpoint", hint="The file is corrupt or crafted; do not "
                                 "load it", path=str(meta))
        if relative not in files:
            files.append(relative)
        chunk_at = index.get("offset")
        at = tuple(chunk_at) if isinstance(chunk_at, (tuple, list)) else None
        transforms = tuple(str(t) for t in stored.get("transform_descriptors") or ())
        spans[(fqn, at)] = (ByteSpan(str(root / relative), offset, length), transforms)
    entries = []
    for fqn, record in described.items():
        fqn = str(fqn)
        keys = planner.get(fqn)
        path = (tuple(k if isinstance(k, (str, int)) else str(k) for k in keys)
                if isinstance(keys, (tuple, list)) and keys else tuple(fqn.split(".")))
        what = f"{meta}: entry {fqn!r}"
        if isinstance(record, Opaque) and record.qualname.endswith("BytesStorageMetadata"):
            place = spans.get((fqn, None))
            chunks = () if place is None else (Chunk((), (), place[0], place[1], fqn),)
            entries.append(Entry(fqn, path, None, (), chunks))
            continue
        body = _state(record, what)
        if not isinstance(body, dict):
            raise IntegrityError(f"{what} is not a tensor or bytes record", path=str(meta))
        dtype = _dtype(body.get("properties"), what)
        shape = checked_shape(body.get("size"), what, dtype)
        chunks = []
        for number, piece in enumerate(body.get("chunks") or ()):
            geometry = _state(piece, what)
            if not isinstance(geometry, dict):
                raise IntegrityError(f"{what}: chunk {number} is malformed", path=str(meta))
            offsets = checked_shape(geometry.get("offsets"), f"{what} chunk {number}")
            sizes = checked_shape(geometry.get("sizes"), f"{what} chunk {number}", dtype)
            place = spans.get((fqn, offsets))
            if place is None:
                raise IntegrityError(f"{what}: chunk at {list(offsets)} has no stored place in "
                                     "the storage table", path=str(meta))
            chunks.append(Chunk(offsets, sizes, place[0], place[1], fqn))
        entries.append(Entry(fqn, path, dtype, shape, tuple(chunks)))
    version = state.get("version")
    return Metadata(root, tuple(entries), tuple(files),
                    version if isinstance(version, str) else None, findings)


def _dtype(properties: Any, what: str) -> str:
    state = properties.state if isinstance(properties, Opaque) else None
    # TensorProperties pickles as a tuple (dtype, layout, ...) since torch 2.1, a dict before.
    value = state[0] if isinstance(state, tuple) and state else (
        state.get("dtype") if isinstance(state, dict) else None)
    if not isinstance(value, DType) or itemsize(value.name) == 0:
        raise IntegrityError(f"{what} has no tensor dtype ckptkit knows ({value!r})")
    return value.name


def _listed(node: Any) -> Any:
    """Dicts keyed 0..n-1 back into the lists DCP flattened (``param_groups``)."""
    if not isinstance(node, dict):
        return node
    node = {k: _listed(v) for k, v in node.items()}
    if node and all(type(k) is int for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node


def _insert(tree: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
    """Put ``value`` at ``path``; integer keys of DCP's flattening were list positions, kept
    here as dict keys (a list would need every position present)."""
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


@metered
def read_info(path: Path) -> RawCheckpoint:
    path = local_path(path)
    meta = read_metadata(path)
    findings = meta.findings
    tree: dict[Any, Any] = {}
    tensors = []
    per_file: dict[str, list[int]] = {f: [0, 0] for f in meta.files}
    ends: dict[str, int] = {}
    for entry in meta.entries:
        for chunk in entry.chunks:
            ends[chunk.file] = max(ends.get(chunk.file, 0), chunk.span.offset + chunk.span.length)
    for name in meta.files:  # before any item is read, so a short file gets one clear error
        _check_extent(meta.root / name, ends.get(name, 0))
    for entry in meta.entries:
        for chunk in entry.chunks:
            stats = per_file.setdefault(chunk.file, [0, 0])
            stats[0] += 1
            stats[1] += chunk.span.length
        if entry.dtype is None:
            _insert(tree, entry.path, _bytes_item(entry, findings))
            continue
        files = {c.file for c in entry.chunks}
        ref = TensorRef(entry.dtype, entry.shape, chunks=entry.chunks,
                        file=files.pop() if len(files) == 1 else None)
        _insert(tree, entry.path, ref)
        tensors.append((entry.path, ref))
    tree = _listed(tree)
    ranks = {int(m["rank"]) for f in per_file if (m := _DATA_FILE.fullmatch(f))}
    details: dict[str, Any] = {
        "num_shards": len(per_file), "world_size": max(ranks) + 1 if ranks else None,
        "dcp_version": meta.version,
        "shards": [{"file": f, "items": n, "bytes": b, "size": _size(meta.root / f)}
                   for f, (n, b) in sorted(per_file.items())],
        "bytes_items": sum(1 for e in meta.entries if e.dtype is None)}
    details.update(findings.details())
    safety = SafetyReport(tuple(sorted(findings.objects)), tuple(sorted(findings.unsafe)),
                          findings.pickles)
    return RawCheckpoint(FORMAT, tree, tuple(tensors), safety, details)


def _check_extent(path: Path, end: int) -> None:
    """Inspect reads no data, but a missing or short data file is one stat away."""
    size = _size(path)
    if size is None:
        raise IntegrityError(f"{path}: DCP data file missing (.metadata stores items in it)",
                             hint="`ckpt verify` lists every problem", path=str(path))
    if end > size:
        raise IntegrityError(f"{path}: truncated: .metadata places items up to byte {end}, "
                             f"the file has {size}", hint="`ckpt verify` lists every problem",
                             path=str(path))


def _size(path: Path) -> int | None:
    try:
        return locate(path).size()
    except CkptkitError:
        return None


def _bytes_item(entry: Entry, findings: Findings) -> Any:
    """A bytes item's value, read with the restricted reader (DCP unpickles it with
    ``torch.load(weights_only=False)``, so anything it would run is reported as unsafe)."""
    if not entry.chunks:
        return Opaque("torch.distributed.checkpoint bytes item", state={"stored": "nowhere"})
    span, transforms = entry.chunks[0].span, entry.chunks[0].transforms
    if transforms or span.length > MAX_ITEM:
        return Opaque("torch.distributed.checkpoint bytes item",
                      state={"file": entry.chunks[0].file, "bytes": span.length,
                             "transforms": list(transforms)})
    from ckptkit.formats.torch_zip import TorchArchive

    try:
        with TorchArchive(Path(span.path), f"DCP item {entry.fqn!r}",
                          window=(span.offset, span.length)) as archive:
            value = archive.read_object("data.pkl", "data")
            findings.merge(archive.findings, f"{entry.chunks[0].file} item {entry.fqn!r}")
            return value
    except FileNotFoundError:
        raise IntegrityError(f"{span.path}: DCP data file missing (item {entry.fqn!r})",
                             hint="`ckpt verify` lists every problem", path=span.path) from None


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """The saved state dict, each tensor consolidated from its chunks (one at a time):
    ``numpy`` arrays, or ``torch`` tensors (bytes items as read, never unpickled by torch)."""
    path = local_path(path)
    from ckptkit.formats import torch_common

    raw = read_info(path)
    if framework not in ("numpy", "torch"):
        raise UsageError(f"{path}: cannot load a DCP checkpoint as {framework!r}",
                         hint="Use framework='numpy' or framework='torch'")
    if not unsafe:
        torch_common.refuse_unsafe(path, raw)
    from ckptkit.formats.tensor_io import read_tensor  # gathers chunked tensors

    convert = (lambda ref: torch_common.to_torch(read_tensor(ref), ref.dtype)) \
        if framework == "torch" else read_tensor
    return _map(raw.tree, convert)


def _map(tree: Any, convert: Any) -> Any:
    if isinstance(tree, TensorRef):
        return convert(tree)
    if isinstance(tree, dict):
        return {k: _map(v, convert) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v, convert) for v in tree)
    return tree


def _assemble(ref: TensorRef) -> Any:
    from ckptkit.formats.dcp_chunks import assemble

    return assemble(ref)


tensor_hooks.chunk_reader = _assemble


def verify(path: Path, *, hashes: bool = False) -> list[Problem]:
    """Every chunk's byte range inside its file, chunks tiling each tensor exactly, every
    data file present, no stray ``.distcp`` files."""
    path = local_path(path)
    root = root_of(path)
    with budget.reading(root):
        return _verify(root, hashes)


def _verify(root: Path, hashes: bool) -> list[Problem]:
    from ckptkit.formats.dcp_chunks import tiling_problem
    from ckptkit.formats.completeness import hash_problems

    if not (root / METADATA).exists():
        return [Problem(str(root / METADATA), "missing-metadata",
                        ".distcp data files without .metadata (the save did not finish)")]
    try:
        meta = read_metadata(root)
    except CkptkitError as exc:
        return [Problem(str(root / METADATA), "unreadable", exc.message)]
    problems: list[Problem] = []
    sizes: dict[str, int | None] = {f: _size(root / f) for f in meta.files}
    for name, size in sizes.items():
        if size is None:
            problems.append(Problem(str(root / name), "missing-shard",
                                    "data file missing; .metadata stores items in it"))
    for entry in meta.entries:
        for chunk in entry.chunks:
            size = sizes.get(chunk.file)
            end = chunk.span.offset + chunk.span.length
            if size is not None and end > size:
                problems.append(Problem(
                    chunk.span.path, "truncated",
                    f"{_label(entry, chunk)} needs bytes {chunk.span.offset}-{end}, the file "
                    f"has {size}"))
        if entry.dtype is None:
            if not entry.chunks:
                problems.append(Problem(str(root / METADATA), "missing-item",
                                        f"item {entry.fqn!r} has no stored place"))
            continue
        tiling = tiling_problem(entry.fqn, entry.shape, entry.chunks)
        if tiling:
            problems.append(Problem(str(root / METADATA), "not-tiled", tiling))
    for item in locate(root).list():
        if not item.is_dir and _DATA_FILE.fullmatch(item.name) and item.name not in sizes:
            problems.append(Problem(str(root / item.name), "stray-shard",
                                    ".distcp file .metadata does not name (from another save?)"))
    if hashes:
        for name, size in sizes.items():
            if size is not None:
                problems.extend(hash_problems(root / name))
    return problems


def _label(entry: Entry, chunk: Chunk) -> str:
    if entry.dtype is None:
        return f"item {entry.fqn!r}"
    return f"chunk {list(chunk.offsets)} of {entry.fqn!r}"


__all__ = ["load", "read_info", "read_metadata", "sniff", "verify"]
