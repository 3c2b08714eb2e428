"""Small files that ask a reader for far more work or memory than their size: the cases of
issue 11 ("bounded work on any input"), written with the standard library only.

Each writer takes a directory and returns the path it wrote (1 KiB to a few MiB; the
safetensors header flood is the largest).  They are what the budget tests, the fuzz profile and
``scripts/bench/adversarial`` read; ``python -m ckptkit.testing.adversarial DIR`` writes the
whole set (:data:`CASES`) into ``DIR``.

Example::

    path = empty_sets(tmp_path, count=10_000_000)   # 10 KiB; 2.3 GiB for an unbounded reader
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

#: The torch zip records every hand-built checkpoint here carries besides ``data.pkl``.
_RECORDS = {"archive/byteorder": b"little", "archive/version": b"3"}


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if -(1 << 31) <= value < 1 << 31:
        return pickle.BININT + struct.pack("<i", value)
    body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(body)]) + body


def _str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def tensor_pickle(shape: tuple[int, ...], stride: tuple[int, ...], numel: int,
                  key: str = "0") -> bytes:
    """The opcodes ``torch.save`` writes for a float32 view of storage ``key`` (``numel``
    elements): ``_rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())``."""
    storage = _tuple(_str("storage"), pickle.GLOBAL + b"torch\nFloatStorage\n", _str(key),
                     _str("cpu"), _int(numel)) + pickle.BINPERSID
    hooks = pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
    return (pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n"
            + _tuple(storage, _int(0), _tuple(*map(_int, shape)), _tuple(*map(_int, stride)),
                     pickle.NEWFALSE, hooks) + pickle.REDUCE)


def state_dict(tensors: dict[str, bytes]) -> bytes:
    """A whole pickle of ``{name: tensor}``, each tensor's opcodes from :func:`tensor_pickle`."""
    body = b"".join(_str(name) + tensor for name, tensor in tensors.items())
    return _whole(pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS)


def torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None, *,
              deflate: bool = True) -> Path:
    """A torch zip checkpoint around ``data_pkl`` (deflated unless ``deflate`` is False, as a
    hostile writer may choose; torch itself stores), with ``records`` as ``archive/data/*``."""
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("archive/data.pkl"), data_pkl, compress_type=method,
                    compresslevel=9)
        for name, data in {**_RECORDS, **{f"archive/data/{k}": v
                                          for k, v in (records or {}).items()}}.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method, compresslevel=9)
    return path


def _whole(body: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + body + pickle.STOP


# --- the cases --------------------------------------------------------------------------------

def empty_sets(where: Path, count: int = 10_000_000) -> Path:
    """``count`` ``EMPTY_SET`` opcodes left on the stack, in a deflated ``data.pkl``."""
    return repeated(where, pickle.EMPTY_SET, count, "empty-sets.pt")


#: Short opcode sequences that each leave (or build) something, to be repeated.
UNITS: dict[str, bytes] = {
    "empty-set": pickle.EMPTY_SET, "empty-dict": pickle.EMPTY_DICT,
    "empty-list": pickle.EMPTY_LIST, "none": pickle.NONE, "mark": pickle.MARK,
    "memoize": pickle.NONE + pickle.MEMOIZE, "get": pickle.BINGET + b"\x00",
    "none-pop": pickle.NONE + pickle.POP, "tuple": pickle.MARK + pickle.NONE + pickle.TUPLE,
    "call": pickle.EMPTY_TUPLE + pickle.REDUCE,
}


def repeated(where: Path, unit: bytes, count: int, name: str = "repeated.pt") -> Path:
    """``unit`` repeated ``count`` times in a deflated ``data.pkl`` (memo 0 holds a callable
    first, so that ``get`` and ``call`` units have something to act on)."""
    first = pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.BINPUT + b"\x00"
    return torch_zip(where / name, _whole(first + unit * count + pickle.NONE))


def deep_list(where: Path, depth: int = 399, items: int = 4_000_000) -> Path:
    """A list nested ``depth`` levels deep whose innermost list holds ``items`` references to
    one tensor: every reference is a tensor at the full depth."""
    return nested(where, "list", depth, items, name="deep-list.pt")


def nested(where: Path, kind: str = "list", depth: int = 399, items: int = 4_000_000,
           tensors: bool = True, name: str = "nested.pt") -> Path:
    """Containers of ``kind`` (list, dict or tuple) nested ``depth`` deep, the innermost
    holding ``items`` references to one tensor (or None)."""
    leaf = pickle.BINGET + b"\x00" if tensors else pickle.NONE
    tensor = tensor_pickle((1,), (1,), 1) + pickle.BINPUT + b"\x00" + pickle.POP
    if kind == "list":
        inner = pickle.EMPTY_LIST + pickle.MARK + leaf * items + pickle.APPENDS
        body = pickle.EMPTY_LIST * (depth - 1) + inner + pickle.APPEND * (depth - 1)
    elif kind == "dict":
        pairs = b"".join(_int(i) + leaf for i in range(items))
        inner = pickle.EMPTY_DICT + pickle.MARK + pairs + pickle.SETITEMS
        body = (pickle.EMPTY_DICT + _int(0)) * (depth - 1) + inner + pickle.SETITEM * (depth - 1)
    else:
        body = pickle.MARK * depth + leaf * items + pickle.TUPLE * depth
    return torch_zip(where / name, _whole(tensor + body), {"0": bytes(4)})


def rechecked_key(where: Path, width: int = 998, setitems: int = 500_000) -> Path:
    """A tuple of ``width`` ints used as a dict key ``setitems`` times (each SETITEM hashes
    it again: the tuple's hash is not cached)."""
    key = pickle.MARK + (pickle.BININT1 + b"\x01") * width + pickle.TUPLE
    body = (key + pickle.BINPUT + b"\x00" + pickle.POP + pickle.EMPTY_DICT
            + (pickle.BINGET + b"\x00" + pickle.NONE + pickle.SETITEM) * setitems)
    return torch_zip(where / "rechecked-key.pt", _whole(body))


def pickle_records(where: Path, records: int = 16, record_mib: int = 64) -> Path:
    """A valid torch zip whose ``records`` tensor records each hold ``record_mib`` MiB of
    well-formed pickle opcodes (NONE, POP), deflated: what a static scan of tensor records
    must read."""
    record = pickle.PROTO + b"\x02" + b"N0" * (record_mib << 19) + pickle.NONE + pickle.STOP
    data = _whole(pickle.EMPTY_DICT)
    return torch_zip(where / "pickle-records.pt", data, {str(i): record for i in range(records)})


def broadcast_view(where: Path, side: int = 40_000, shape: tuple[int, ...] | None = None,
                   stride: tuple[int, ...] | None = None, numel: int = 1) -> Path:
    """One float32 of storage viewed as a ``side`` x ``side`` tensor with stride (0, 0), as
    ``torch.save(torch.zeros(1).expand(side, side))`` writes it (stored, not deflated); or
    any ``shape`` and ``stride`` over a storage of ``numel`` elements."""
    shape = shape or (side, side)
    stride = stride or (0,) * len(shape)
    return torch_zip(where / "broadcast-view.pt",
                     state_dict({"w": tensor_pickle(shape, stride, numel)}),
                     {"0": bytes(4 * numel)}, deflate=False)


def nested_zips(where: Path, levels: int = 3, fanout: int = 4, member_mib: int = 256) -> Path:
    """Zips inside zips, ``levels`` deep with ``fanout`` members per level; the innermost hold
    ``member_mib`` MiB of zeros named ``.pkl`` (so ``ckpt scan`` unpacks them).  Zeros deflated
    twice shrink a second time, so the file stays small."""
    zeros = bytes(member_mib << 20)
    inner = _zip({f"part{i}.pkl": zeros for i in range(fanout)})
    for level in range(levels - 1):
        inner = _zip({f"level{level}-{i}.zip": inner for i in range(fanout)})
    path = where / "nested-zips.zip"
    path.write_bytes(inner)
    return path


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def header_flood(where: Path, count: int = 30_000_000) -> Path:
    """A safetensors file whose header has an unknown field holding ``count`` empty objects,
    then one valid tensor."""
    flood = b"[" + b"{}," * (count - 1) + b"{}]"
    tensor = json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}).encode()
    header = b'{"__flood__":' + flood + b',"w":' + tensor + b"}"
    path = where / "header-flood.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    return path


def msgpack_flood(where: Path, count: int = 30_000_000, depth: int = 1) -> Path:
    """A Flax msgpack file whose ``params`` hold ``count`` empty maps in a list, inside
    ``depth`` levels of single-key maps (no arrays)."""
    flood = b"\xdd" + struct.pack(">I", count) + b"\x80" * count
    for _ in range(depth):
        flood = b"\x81\xa1a" + flood
    path = where / "flood.msgpack"
    path.write_bytes(b"\x81\xa6params" + flood)
    return path


#: Every case with its default size, by name.
CASES: dict[str, Callable[[Path], Path]] = {
    "empty-sets": empty_sets, "deep-list": deep_list, "rechecked-key": rechecked_key,
    "pickle-records": pickle_records, "broadcast-view": broadcast_view,
    "nested-zips": nested_zips, "header-flood": header_flood, "msgpack-flood": msgpack_flood,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ckptkit.testing.adversarial DIR", file=sys.stderr)
        return 2
    where = Path(argv[0])
    where.mkdir(parents=True, exist_ok=True)
    for name, write in CASES.items():
        path = write(where)
        print(f"{name}\t{path}\t{path.stat().st_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
