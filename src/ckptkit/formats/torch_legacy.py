"""PyTorch legacy checkpoints (before 1.6, or ``_use_new_zipfile_serialization=False``).

Five pickles back to back (magic number, protocol version, system info, the object, the sorted
list of storage keys), then for each key an int64 element count and the raw storage bytes.
Jukebox's ``.pth.tar`` priors are such files.  Every pickle is interpreted by the restricted
reader, not only the first, and the storage table is walked with seeks, not reads.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from ckptkit.storage.budget import metered
from ckptkit.errors import CkptkitError, FormatError, IntegrityError
from ckptkit.storage.location import Location, locate
from ckptkit.model import ByteSpan, RawCheckpoint, SafetyReport, itemsize
from ckptkit.pickles.pickle_globals import StorageRef, StorageType
from ckptkit.pickles.pickle_tree import Resolver
from ckptkit.tree import iter_tensors
from ckptkit.pickles.unpickler import Findings, UnsafePickleError, is_binary_pickle, read_pickle

FORMAT = "torch-legacy"
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


#: The first pickle ``torch.save`` writes: the magic number as a 10-byte LONG1.
MAGIC_OPERAND = b"\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")
#: How far into the file the magic number is looked for (a payload may sit before it).
MAGIC_WINDOW = 64 << 10


def sniff(path: Path | Location) -> bool:
    # A binary pickle stream that carries torch's magic number near its start, not only one
    # whose first pickle is exactly it: torch.load runs whatever the first pickle says
    # before it compares the magic, so a payload there is read (and reported) as part of a
    # torch file.  Pickles without the magic are plain pickles (formats.pickle_file).
    path = locate(path)
    try:
        # Two bytes first: most files are not pickles, and a remote file costs a request.
        head = path.read(0, 2)
        if is_binary_pickle(head):
            head = path.read(0, MAGIC_WINDOW)
    except (OSError, CkptkitError):
        return False
    if not is_binary_pickle(head) or MAGIC_OPERAND not in head:
        return False
    return not _complete_safetensors(path)


def _complete_safetensors(path: Location) -> bool:
    """True for a file that reads completely as safetensors.

    Its little-endian header length puts 0x80 0x02-0x05 first whenever the header is 0x280 to
    0x5FF bytes long (modulo 64 KiB).  Such a file is left to that reader only when it passes
    every check of it (a JSON header whose tensors tile the rest of the file exactly): a
    pickle that runs cannot also be that.
    """
    from ckptkit.formats import safetensors

    if not safetensors.sniff(path):
        return False
    try:
        safetensors.read_info(path)
    except CkptkitError:
        return False
    return True


@metered
def read_info(path: Path | Location) -> RawCheckpoint:
    findings = Findings()
    try:
        return _read(path, findings)
    except IntegrityError as exc:
        # A stream that is both malformed and names dangerous callables is reported as unsafe:
        # torch.load runs every one of the five pickles before it checks anything.
        if findings.unsafe and not isinstance(exc, UnsafePickleError):
            raise UnsafePickleError(f"{path}: {exc.message}; it also calls "
                                    f"{', '.join(sorted(findings.unsafe))}",
                                    findings=findings) from exc
        raise


def _read(path: Path | Location, findings: Findings) -> RawCheckpoint:
    path = locate(path)
    size = path.size()
    storages: dict[str, StorageRef] = {}

    def persistent(pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
            findings.objects.add("<unknown persistent id>")
            return None
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        dtype = storage_type.dtype if isinstance(storage_type, StorageType) else "uint8"
        key = str(key)
        if not isinstance(numel, int) or numel < 0:
            raise IntegrityError(f"{path}: storage {key} has invalid size {numel!r}")
        root = storages.setdefault(key, StorageRef(key, dtype, str(location), numel))
        if isinstance(view, tuple) and len(view) >= 2 and isinstance(view[1], int):
            return StorageRef(key, dtype, root.location, root.numel, view_offset=view[1])
        return root

    with path.open() as fh:
        what = f"legacy torch file {path}"
        magic = read_pickle(fh, findings, what=what, location="pickle 1 of 5 (magic number)")
        if magic != MAGIC_NUMBER:
            if findings.unsafe:
                raise UnsafePickleError(
                    f"{path}: a pickle that calls {', '.join(sorted(findings.unsafe))}",
                    findings=findings)
            raise FormatError(f"{path}: a plain pickle, not a PyTorch checkpoint",
                              hint="ckptkit reads torch.save files; plain pickles are never "
                                   "loaded", path=str(path))
        protocol = read_pickle(fh, findings, what=what, location="pickle 2 of 5 (protocol)")
        sys_info = read_pickle(fh, findings, what=what, location="pickle 3 of 5 (system info)")
        obj = read_pickle(fh, findings, persistent, what=what,
                          location="pickle 4 of 5 (the object)")
        keys = read_pickle(fh, findings, what=what, location="pickle 5 of 5 (storage keys)")
        spans = _walk_storages(path, fh, keys, storages, size)
    if protocol != PROTOCOL_VERSION:
        raise IntegrityError(f"{path}: unsupported legacy protocol {protocol!r}")
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    tree = Resolver(lambda s: spans.get(s.key)).resolve(obj)
    details = {"protocol_version": protocol, "byteorder": "little" if little else "big",
               "storages": len(spans), "pickles": findings.pickles, **findings.details()}
    safety = SafetyReport(tuple(sorted(findings.objects)), tuple(sorted(findings.unsafe)),
                          findings.pickles)
    return RawCheckpoint(FORMAT, tree, tuple(iter_tensors(tree)), safety, details)


def _walk_storages(path: Location, fh: Any, keys: Any, storages: dict[str, StorageRef],
                   size: int) -> dict[str, ByteSpan]:
    if not isinstance(keys, list):
        raise IntegrityError(f"{path}: legacy storage key list is missing or malformed")
    spans: dict[str, ByteSpan] = {}
    pos = fh.tell()
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise IntegrityError(f"{path}: storage {key!r} is listed but never used")
        fh.seek(pos)
        head = fh.read(8)
        if len(head) < 8:
            raise IntegrityError(
                f"{path}: file ends inside the storage table (storage {key!r} at byte {pos} of "
                f"{size})", hint="The download or save was cut short; fetch or save it again",
                path=str(path))
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise IntegrityError(f"{path}: storage {key!r} holds {numel} elements, "
                                 f"its tensors say {storage.numel}")
        length = int(numel * itemsize(storage.dtype))
        spans[storage.key] = ByteSpan(str(path), pos + 8, length)
        pos += 8 + length
    if pos > size:
        raise IntegrityError(
            f"{path}: truncated: the storages need {pos} bytes, the file has {size}",
            hint="The download or save was cut short; fetch or save it again", path=str(path))
    if pos < size:
        raise IntegrityError(f"{path}: {size - pos} unexpected bytes after the last storage",
                             hint="The file was altered or concatenated; do not trust it",
                             path=str(path))
    return spans


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    from ckptkit.formats import torch_common

    return torch_common.load(path, framework, unsafe=unsafe, reader=read_info)
