"""Hugging Face sharded checkpoints: ``model.safetensors.index.json`` (or
``pytorch_model.bin.index.json``) plus the shards it names, read as one checkpoint.

The index is JSON: ``{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}``.  Each
shard is an ordinary safetensors or ``torch.save`` zip file, read by its own reader (headers
and pickles only); the result is one tree whose tensors each know their shard
(:attr:`~ckptkit.model.TensorRef.file`).  The checkpoint is the directory or the index file.

``transformers`` and ``huggingface_hub`` trust the index: a missing shard or a tensor the
index names but no shard holds shows up later as a missing-keys warning, or as random
weights.  Here the index and the shards must agree, or reading stops with an IntegrityError;
:func:`verify` lists every disagreement instead.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ckptkit.errors import CkptkitError, IntegrityError, UsageError
from ckptkit.model import Problem, RawCheckpoint, SafetyReport, TensorRef
from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.storage.location import LocalLocation, Location, local_path, locate
from ckptkit.tree import join

FORMAT = "hf-sharded"
#: Index names, preferred first when a directory holds both.
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Shard names as huggingface_hub and transformers write them.
SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<n>\d{5})-of-(?P<total>\d{5})(?P<ext>\.[A-Za-z]+)$")
_SNIFF = 64 << 10
#: Shard headers read at once: remote shards cost a round trip each, so a repository of 72
#: shards costs about five round trips instead of 72; bounded, so a store is not flooded.
WORKERS = 16
_T = TypeVar("_T")


def _is_remote(loc: Location) -> bool:
    return not isinstance(loc, LocalLocation)


def _is_folder_url(loc: Location) -> bool:
    """A remote location naming a folder: it ends with ``/``, or is not a ``.json`` file."""
    url = str(getattr(loc, "url", loc))
    return url.endswith("/") or not loc.name.endswith(".json")


def find_index(path: Path | Location) -> Location | None:
    """The index file of ``path``: itself when it is one, else the one inside the directory.

    A remote folder is not listed (HTTP cannot list): the index is looked up by its names."""
    loc = locate(path)
    if isinstance(loc, LocalLocation):
        if loc.path.is_dir():
            for name in INDEXES:
                if (loc.path / name).is_file():
                    return LocalLocation(loc.path / name)
            return None
        return loc if loc.path.is_file() else None
    if not _is_folder_url(loc):
        return loc if loc.is_file() else None
    for name in INDEXES:
        candidate = loc.child(name)
        if candidate.is_file():
            return candidate
    return None


def sniff(path: Path | Location) -> bool:
    loc = locate(path)
    if _is_remote(loc) and not (loc.name.endswith(".index.json") or
                                str(getattr(loc, "url", "")).endswith("/")):
        return False  # any other remote file: no requests spent guessing at index names
    index = find_index(loc)
    if index is None:
        return False
    try:
        head = index.read(0, _SNIFF)
    except (OSError, CkptkitError):
        return False
    return head.lstrip()[:1] == b"{" and b'"weight_map"' in head


@dataclass(frozen=True)
class Index:
    """A parsed index: where it is, its metadata, and tensor -> shard in the index's order."""

    path: Location
    metadata: dict[str, Any]
    weight_map: dict[str, str]

    @property
    def root(self) -> Location:
        return self.path.parent()

    def shard(self, name: str) -> Location:
        return self.root.child(name)

    def shards(self) -> list[str]:
        """Shard names in the order the index first names them, then sorted."""
        return sorted(set(self.weight_map.values()))


def read_index(path: Path | Location) -> Index:
    """The index of the checkpoint at ``path`` (a directory or the index file).

    Raises:
        IntegrityError: not JSON, no ``weight_map`` of names to shard file names, or a shard
            name that leaves the directory.
    """
    index = find_index(path)
    if index is None:
        raise IntegrityError(f"{path}: no {' or '.join(INDEXES)} here", path=str(path))
    size = index.size()
    budget.current().check("header", size, "the shard index")
    try:
        data = json.loads(index.read(0, size))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{index}: shard index is not valid JSON ({exc})",
                             hint="The file is corrupt; re-download or re-save it",
                             path=str(index)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise IntegrityError(f"{index}: shard index has no weight_map of tensor names to files",
                             hint="The file is corrupt", path=str(index))
    for shard in set(weight_map.values()):
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise IntegrityError(f"{index}: shard index names {shard!r}, outside the checkpoint "
                                 "directory", hint="The index is corrupt or crafted; do not "
                                 "load it", path=str(index))
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return Index(index, metadata, weight_map)


def read_shard(path: Path | Location) -> RawCheckpoint:
    """One shard's structure (safetensors header or torch pickle), no tensor bytes."""
    from ckptkit import formats

    loc = locate(path)
    reader = formats.detect(loc)
    if reader.FORMAT not in ("safetensors", "torch-zip", "torch-legacy"):
        raise IntegrityError(f"{loc}: a shard must be safetensors or a torch.save file, this "
                             f"is {reader.FORMAT}", path=str(loc))
    if reader.FORMAT != "safetensors" and _is_remote(loc):
        raise UsageError(f"{loc}: .bin shards of a sharded checkpoint are read from a local "
                         "directory only", hint="Download the checkpoint's directory first "
                         "(or mount it); safetensors shards are read over URLs")
    return reader.read_info(loc)


def each_shard(index: Index, work: Callable[[str, Location], _T]) -> list[_T]:
    """``work(name, location)`` for every shard, in :meth:`Index.shards` order, a few at once
    (each in the caller's context, so the open reading budget is the one charged)."""
    names = index.shards()
    jobs = [(name, index.shard(name)) for name in names]
    if len(jobs) < 2:
        return [work(name, loc) for name, loc in jobs]
    with ThreadPoolExecutor(max_workers=min(WORKERS, len(jobs)),
                            thread_name_prefix="ckptkit-shard") as pool:
        futures = [pool.submit(contextvars.copy_context().run, work, name, loc)
                   for name, loc in jobs]
        return [future.result() for future in futures]


def shard_tensors(raw: RawCheckpoint) -> list[tuple[str, TensorRef]]:
    """A shard's tensors by their state-dict names."""
    return [(name if isinstance(name, str) else join(name, raw.separator), ref)
            for name, ref in raw.tensors]


def _shard_info(name: str, file: Location) -> tuple[Location, RawCheckpoint | None]:
    """A shard's structure, or None when it is missing (its existence check is its first read
    when remote: the head it fetches holds a safetensors header)."""
    if not file.is_file():
        return file, None
    with budget.reading(file):
        return file, read_shard(file)


@metered
def read_info(path: Path | Location) -> RawCheckpoint:
    index = read_index(path)
    tree: dict[str, Any] = {}
    tensors: list[tuple[tuple[str], TensorRef]] = []
    safety = SafetyReport()
    shards = []
    unindexed: list[str] = []
    formats_seen = set()
    unsafe_details: dict[str, dict[str, str]] = {}
    for shard, (file, raw) in zip(index.shards(), each_shard(index, _shard_info)):
        wanted = {k for k, v in index.weight_map.items() if v == shard}
        if raw is None:
            raise IntegrityError(f"{file}: shard missing (the index names {len(wanted)} "
                                 f"tensor(s) in it)", hint="Re-download the checkpoint; "
                                 "`ckpt verify` lists every problem", path=str(file))
        formats_seen.add(raw.format)
        safety = safety.merged(raw.safety)
        for key in ("unsafe_via", "unsafe_where"):
            for qualname, value in (raw.details.get(key) or {}).items():
                found = unsafe_details.setdefault(key, {})
                found.setdefault(qualname, f"{shard}: {value}" if key == "unsafe_where"
                                 else value)
        held = shard_tensors(raw)
        names = {name for name, _ in held}
        absent = sorted(wanted - names)
        if absent:
            raise IntegrityError(
                f"{file}: the index names tensor {absent[0]!r} in this shard, but it does not "
                f"hold it" + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""),
                hint="The index and shards disagree; `ckpt verify` lists every problem",
                path=str(file))
        size = 0
        for name, ref in held:
            if name in tree:
                continue  # also in an earlier shard: verify reports it; the first one counts
            if name not in index.weight_map:
                unindexed.append(name)
            ref = _placed(ref, shard)
            tree[name] = ref
            tensors.append(((name,), ref))
            size += ref.nbytes
        shards.append({"file": shard, "format": raw.format, "size": file.size(),
                       "tensors": len(held), "tensor_bytes": size})
    details: dict[str, Any] = {
        "index": index.path.name, "num_shards": len(shards), "shards": shards,
        "shard_format": "/".join(sorted(formats_seen)), "metadata": dict(index.metadata)}
    if unindexed:
        details["unindexed_tensors"] = unindexed[:20]
    details.update(unsafe_details)
    return RawCheckpoint(FORMAT, tree, tuple(tensors), safety, details)


def _placed(ref: TensorRef, shard: str) -> TensorRef:
    from dataclasses import replace

    return replace(ref, file=shard)


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: one dict of arrays; ``torch``: one state dict (safetensors shards through
    the safetensors reader, ``.bin`` shards through ``torch.load(weights_only=True)``)."""
    path = local_path(path)
    from ckptkit.formats import safetensors, torch_common
    from ckptkit.formats.tensor_io import read_tensor

    raw = read_info(path)
    if framework == "numpy":
        return {name: read_tensor(ref) for (name,), ref in raw.tensors}
    if framework != "torch":
        raise UsageError(f"{path}: cannot load a sharded checkpoint as {framework!r}",
                         hint="Use framework='numpy' or framework='torch'")
    if not unsafe:
        torch_common.refuse_unsafe(path, raw)
    root = local_path(find_index(path)).parent  # type: ignore[arg-type]
    state: dict[str, Any] = {}
    for shard in raw.details["shards"]:
        file = root / shard["file"]
        module = safetensors if shard["format"] == "safetensors" else None
        part = (module.load(file, "torch") if module is not None else
                torch_common.load(file, "torch", unsafe=unsafe, reader=read_shard))
        for name, value in part.items():
            state.setdefault(name, value)
    return state


def _shard_check(name: str, file: Location, hashes: bool
                 ) -> tuple[list[Problem], RawCheckpoint | None] | None:
    """One shard's problems and structure; None when it is missing."""
    from ckptkit.formats.completeness import file_problems, hash_problems

    if not file.is_file():
        return None
    broken = file_problems(file.path if isinstance(file, LocalLocation) else file)  # type: ignore[arg-type]
    if broken:
        return broken, None
    try:
        with budget.reading(file):
            raw = read_shard(file)
    except CkptkitError as exc:
        return [Problem(str(file), "unreadable", exc.message)], None
    # Expected hashes come from a local hub cache (its blob names): a URL has none to compare.
    local = file.path if isinstance(file, LocalLocation) else None
    return (hash_problems(local) if hashes and local is not None else []), raw


def verify(path: Path | Location, *, hashes: bool = False) -> list[Problem]:
    """Everything wrong between the index and its shards, each problem naming its file.

    ``metadata.total_size`` is not checked: writers compute it differently (storages or
    tensors, buffers or not), so published checkpoints disagree with their own tensors by a
    few KiB without anything being missing."""
    try:
        index = read_index(path)
    except CkptkitError as exc:
        return [Problem(str(find_index(path) or path), "unreadable", exc.message)]
    problems: list[Problem] = []
    missing: set[str] = set()
    found: dict[str, list[str]] = {}
    checked = each_shard(index, lambda name, file: _shard_check(name, file, hashes))
    for shard, outcome in zip(index.shards(), checked):
        file = index.shard(shard)
        if outcome is None:
            missing.add(shard)
            wanted = sorted(k for k, v in index.weight_map.items() if v == shard)
            problems.append(Problem(str(file), "missing-shard",
                                    f"shard missing; the index names {len(wanted)} tensor(s) "
                                    f"in it ({_few(wanted)})"))
            continue
        found_problems, raw = outcome
        if raw is None:
            problems.extend(found_problems)
            continue
        for name, _ref in shard_tensors(raw):
            found.setdefault(name, []).append(shard)
        problems.extend(found_problems)
    root = index.root
    for name, shard in index.weight_map.items():
        holders = found.get(name, [])
        if shard in missing or any(p.file == str(root.child(shard)) for p in problems):
            continue
        if shard not in holders:
            where = (f"; it is in {', '.join(holders)}" if holders else "; no shard holds it")
            problems.append(Problem(str(root.child(shard)), "missing-tensor",
                                    f"the index names tensor {name!r} in this shard{where}"))
    for name, holders in found.items():
        if len(holders) > 1:
            problems.append(Problem(str(root.child(holders[1])), "duplicate",
                                    f"tensor {name!r} is in {len(holders)} shards: "
                                    f"{', '.join(holders)}"))
        if name not in index.weight_map:
            problems.append(Problem(str(root.child(holders[0])), "stray-tensor",
                                    f"tensor {name!r} is in this shard but not in the index"))
    problems.extend(_stray_shards(index))
    return problems


def _stray_shards(index: Index) -> list[Problem]:
    """Files named like this index's shards that it does not name (left from another save)."""
    named = set(index.weight_map.values())
    patterns = {(m["stem"], m["ext"]) for s in named if (m := SHARD_NAME.match(s))}
    stray = []
    try:
        entries = index.root.list()
    except CkptkitError:
        return []  # HTTP has no listings: left-over shards cannot be seen there
    for entry in entries:
        match = SHARD_NAME.match(entry.name)
        if (not entry.is_dir and entry.name not in named and match
                and (match["stem"], match["ext"]) in patterns):
            stray.append(Problem(str(index.root.child(entry.name)), "stray-shard",
                                 "shard file the index does not name (from another save?)"))
    return stray


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f", ... {len(names) - 3} more" if len(names) > 3 else "")
