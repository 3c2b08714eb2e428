"""Checkpoint directories ``ckpt scan`` reads as one unit, and the files that belong to one.

- **SavedModel** (``saved_model.pb``): its format reader (protobufs, no pickles).
- **PyTorch Distributed Checkpoint** (DCP, written by ``torch.distributed.checkpoint.save``,
  FSDP, torchtitan, torchtune): ``.metadata`` is a pickle of DCP's dataclasses, loaded with
  ``pickle.load``; every item it lists is a ``torch.save`` file at an offset of a ``.distcp``
  file, loaded with ``torch.load`` (``weights_only=False`` for items that are not tensors).
  All of them are read, each as its loader reads it.
  Tensor items written with ``SerializationFormat.SAFETENSORS`` are a safetensors blob, no
  pickle.  Directories are recognised as the DCP reader recognises them
  (:func:`ckptkit.formats.torch_dcp.sniff`): data files without ``.metadata`` are a save that
  never finished, reported as such rather than scanned as loose files.
- **Orbax** step or item directories (``_CHECKPOINT_METADATA``, ``_METADATA``): JSON metadata
  and TensorStore arrays, no pickles by design; any file inside that could hold one is scanned.
- **Hugging Face sharded** checkpoints: the index (``model.safetensors.index.json``,
  ``pytorch_model.bin.index.json``) is the unit, and every shard it names is scanned as part of
  it (each as a file of its own format); the shards are not listed again on their own.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable

from ckptkit.scan import archive_members
from ckptkit.pickles import plain_pickle
from ckptkit.errors import CkptkitError, IntegrityError, NotFoundError
from ckptkit.storage.location import LocalLocation, locate
from ckptkit.formats import ziparchive
from ckptkit.model import Opaque
from ckptkit.pickles.unpickler import MAX_STATIC_SCAN, Findings, is_binary_pickle, read_pickle

#: Unit kind -> the format a scan result names.
FORMATS = {"savedmodel": "savedmodel", "dcp": "torch-dcp", "orbax": "orbax",
           "hf-sharded": "hf-sharded"}
_DCP = "torch.distributed.checkpoint."


def unit_kind(path: Path) -> str | None:
    """``savedmodel``, ``dcp``, ``orbax``, or None for a folder that is not one checkpoint;
    ``hf-sharded`` for a shard index file."""
    from ckptkit.formats import hf_sharded, torch_dcp

    loc = locate(path)
    if loc.is_file():
        # Remote indexes are scanned as files: the shard walk below reads local folders.
        return "hf-sharded" if (isinstance(loc, LocalLocation) and loc.name in
                                hf_sharded.INDEXES and hf_sharded.sniff(path)) else None
    if not loc.is_dir():
        return None
    if loc.child("saved_model.pb").is_file():
        return "savedmodel"
    if torch_dcp.sniff(path):
        return "dcp"
    if loc.child("_CHECKPOINT_METADATA").is_file() or loc.child("_METADATA").is_file():
        return "orbax"
    return None


def sharded_members(folder: Path) -> set[str]:
    """Names of the shards an index in ``folder`` names (scanned through their index)."""
    from ckptkit.formats import hf_sharded

    names: set[str] = set()
    for index in hf_sharded.INDEXES:
        if (folder / index).is_file() and hf_sharded.sniff(folder / index):
            try:
                names |= set(hf_sharded.read_index(folder / index).weight_map.values())
            except CkptkitError:
                pass  # a broken index is scanned (and reported) itself; its shards as files
    return names


def part_of_a_tf_checkpoint(path: Path) -> bool:
    """Data shards and the ``checkpoint`` state file: scanned once, through the index."""
    loc = locate(path)
    if loc.name == "checkpoint":
        return any(e.name.endswith(".index") for e in loc.parent().list())
    if ".data-" not in loc.name:
        return False
    prefix = loc.name.split(".data-", 1)[0]
    return loc.sibling(prefix + ".index").is_file()


def scan_unit(root: Path, kind: str, scan_member: Callable[[Path, str], Any]
              ) -> tuple[Findings, str]:
    """Findings and a note for a DCP or Orbax directory.

    Raises:
        IntegrityError: the unit cannot be read (an UnsafePickleError when its metadata
            pickle is broken and names dangerous callables as well).
    """
    if kind == "dcp":
        return _scan_dcp(root, scan_member)
    if kind == "hf-sharded":
        return _scan_sharded(root, scan_member)
    findings = Findings()
    files, vetted = _files(root), 0
    for path in files:
        if _could_hold_pickles(path):
            _absorb(findings, scan_member(path, str(path)), "")
        else:
            vetted += 1
    scanned = len(files) - vetted
    note = (f"Orbax checkpoint: {len(files)} file(s), JSON metadata and TensorStore data"
            + (f"; {scanned} file(s) that could hold pickles scanned" if scanned else
               ", no pickles"))
    return findings, note


def _scan_sharded(index: Path, scan_member: Callable[[Path, str], Any]
                  ) -> tuple[Findings, str]:
    from ckptkit.formats import hf_sharded

    findings = Findings()
    parsed = hf_sharded.read_index(index)
    shards = parsed.shards()
    for shard in shards:
        path = index.parent / shard
        if not path.is_file():
            raise IntegrityError(f"{path}: shard missing (named by {index.name})",
                                 hint="`ckpt verify` lists every problem", path=str(path))
        _absorb(findings, scan_member(path, str(path)), f"{shard}: ")
    return findings, f"sharded checkpoint: {index.name} and {len(shards)} shard(s) scanned"


def _scan_dcp(root: Path, scan_member: Callable[[Path, str], Any]) -> tuple[Findings, str]:
    findings = Findings()
    if not locate(root / ".metadata").is_file():
        raise IntegrityError(f"{root}: .distcp data files but no .metadata (DCP writes it "
                             "last: the save did not finish)", path=str(root))
    with locate(root / ".metadata").open() as fh:
        metadata = read_pickle(fh, findings, what=f"DCP metadata {root / '.metadata'}",
                               location=".metadata")
    items = _storage_items(metadata)
    kinds = _item_kinds(metadata)
    used: set[str] = set()
    unvetted = 0
    for fqn, info in items:
        relative, offset, length = info.get("relative_path"), info.get("offset"), info.get(
            "length")
        if not (isinstance(relative, str) and isinstance(offset, int) and isinstance(length, int)
                and offset >= 0 and length >= 0):
            raise IntegrityError(f"{root}: .metadata lists item {fqn!r} with no valid place")
        if os.sep in relative or "/" in relative or relative in ("", ".", ".."):
            # DCP joins this to the checkpoint folder: it could make torch.load read any file.
            findings.location = ".metadata"
            findings.flag(f"DCP item {fqn!r} stored in {relative!r}, outside the checkpoint",
                          "_StorageInfo")
            continue
        loads_code = kinds.get(fqn) != "tensor"  # torch.load(weights_only=False) loads it
        where = f"{relative} at byte {offset} ({kinds.get(fqn, 'item')} {fqn!r})"
        used.add(relative)
        if info.get("transform_descriptors"):
            # Compressed or otherwise transformed: not read back here.
            _not_read(findings, where, f"stored through {info['transform_descriptors']}",
                      loads_code)
            unvetted += 1
            continue
        problem = _read_item(root / relative, offset, length, where, findings,
                             tensor=not loads_code)
        if problem:
            _not_read(findings, where, problem, loads_code)
    others = [p for p in _files(root) if p.name != ".metadata"
              and not (p.parent == root and p.name in used)]
    for path in others:
        if _could_hold_pickles(path):
            _absorb(findings, scan_member(path, str(path)), f"{path.relative_to(root)}: ")
    note = (f"PyTorch DCP checkpoint: .metadata and {len(items) - unvetted} item(s) in "
            f"{len(used)} file(s) read as torch.load reads them"
            + (f"; {unvetted} item(s) stored through transforms not read" if unvetted else ""))
    return findings, note


def _storage_items(metadata: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(fqn, storage info)`` for each entry of ``Metadata.storage_data``."""
    state = metadata.state if isinstance(metadata, Opaque) else None
    storage = state.get("storage_data") if isinstance(state, dict) else None
    if not isinstance(storage, dict):
        raise IntegrityError(".metadata holds no DCP storage table (not a DCP checkpoint?)")
    items = []
    for index, info in storage.items():
        key = index.state if isinstance(index, Opaque) else None
        where = info.state if isinstance(info, Opaque) else None
        if not (isinstance(key, dict) and isinstance(where, dict)):
            raise IntegrityError(".metadata's storage table holds something else than "
                                 "DCP records")
        items.append((str(key.get("fqn"))[:200], where))
    return items


def _item_kinds(metadata: Any) -> dict[str, str]:
    state = metadata.state if isinstance(metadata.state, dict) else {}
    described = state.get("state_dict_metadata")
    kinds = {}
    for fqn, record in (described.items() if isinstance(described, dict) else ()):
        if isinstance(record, Opaque):
            kinds[str(fqn)] = "tensor" if record.qualname.endswith("TensorStorageMetadata") \
                else "object"
    return kinds


def _not_read(findings: Findings, where: str, why: str, loads_code: bool) -> None:
    """An item ckptkit cannot read: unsafe when DCP loads it with weights_only=False (what
    is not read cannot pass as safe), not vetted when it is a tensor (weights_only=True)."""
    if loads_code:
        findings.location = ".metadata"
        findings.flag(f"DCP item {where} that ckptkit cannot read ({why[:150]})",
                      "_StorageInfo")
    else:
        findings.objects.add(f"<DCP tensor item {where} not read: {why[:150]}>")


def _read_item(path: Path, offset: int, length: int, where: str, findings: Findings, *,
               tensor: bool = False) -> str | None:
    """One item: a torch.save file at ``offset`` in ``path``, read for its pickles (or, for a
    ``tensor`` chunk, a safetensors blob); why it cannot be read, or None."""
    from ckptkit.formats import embedded

    loc = locate(path)
    try:
        size = loc.size()
    except (OSError, NotFoundError) as exc:
        raise IntegrityError(f"{path}: a DCP data file .metadata names is missing ({exc})",
                             path=str(path)) from exc
    if offset + length > size:
        raise IntegrityError(f"{path}: DCP item at bytes {offset}-{offset + length} runs past "
                             f"the end of the {size}-byte file", path=str(path))
    with locate(path).open() as fh:
        fh.seek(offset)
        head = fh.read(9)  # a blob's header starts here, whatever the item's own length
        window = ziparchive.Window(fh, offset, length)
        if head[:4] != ziparchive.ZIP_MAGIC and head[8:9] == b"{" and tensor:
            # SerializationFormat.SAFETENSORS: the file's tensors are one safetensors blob
            # (JSON header, raw elements), no pickle; what DCP would run on it is
            # torch.load(weights_only=True), which runs no code.
            return None
        if head[:4] != ziparchive.ZIP_MAGIC:
            if length > MAX_STATIC_SCAN:
                return f"{length} bytes that are not a torch zip"
            return embedded.read_embedded_torch_file(window.read(length), findings, where)
        try:
            records = zipfile.ZipFile(window)
            for info in records.infolist():
                if info.filename.endswith(".pkl"):
                    data, _crc_ok = ziparchive.read_record(window, info, length)
                    read_pickle(data, findings, what=f"{where}: {info.filename}",
                                location=f"{where}: {info.filename}")
        except (*ziparchive.ZIP_ERRORS, ValueError) as exc:
            raise IntegrityError(f"{path}: DCP item {where} is not a readable torch file "
                                 f"({exc})", path=str(path)) from exc
    return None


def _files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root):  # links to folders are not followed
        dirs.sort()
        found.extend(Path(folder) / n for n in sorted(names))
    return found


def _could_hold_pickles(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        head = locate(path).read(0, archive_members.HEAD)
    except (OSError, CkptkitError):
        return False
    return (is_binary_pickle(head) or plain_pickle.is_npy(path) or plain_pickle.sniff(path)
            or archive_members.could_hold_pickles(head, path.name))


def _absorb(findings: Findings, result: Any, within: str) -> None:
    from ckptkit.scan.scan_members import absorb

    absorb(findings, result, within)
    if getattr(result, "verdict", None) == "unreadable":
        findings.objects.add(f"<{result.path} unreadable: {result.note[:100]}>")
