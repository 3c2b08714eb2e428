"""safetensors files: an 8-byte header length, a JSON header, then one flat byte buffer.

Only the header is read.  It is validated the way the reference implementation does: known
dtypes, byte ranges that match shapes, contiguous and covering the whole buffer.  Its size is
capped by the reading budget's ``header`` (100 MB, the reference implementation's limit), and
the objects and lists it holds are counted against ``nodes`` before it is parsed, so a header
of millions of ``{}`` costs nothing.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.storage.location import Location, locate
from ckptkit.errors import CkptkitError, IntegrityError, UsageError
from ckptkit.model import ByteSpan, RawCheckpoint, TensorRef, checked_shape, itemsize

FORMAT = "safetensors"
#: Header lengths the sniff takes for safetensors (the reference implementation's limit).
MAX_HEADER = 100_000_000
#: JSON strings: brackets inside them open no container.
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}


def sniff(path: Path | Location) -> bool:
    loc = locate(path)
    try:
        head = loc.read(0, 9)
        size = loc.size()
    except (OSError, CkptkitError):
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    ceiling = max(MAX_HEADER, budget.current().limit("header"))  # read_info holds the budget
    return head[8:9] == b"{" and 2 <= length <= min(ceiling, size - 8)


def read_header(path: Path | Location) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the offset where the byte buffer starts.

    Two reads at most: the length, then the JSON (both inside the first, coalesced read when
    the header is under :data:`~ckptkit.storage.location.PREFETCH` bytes)."""
    loc = locate(path)
    size = loc.size()
    head = loc.read(0, 8)
    if len(head) < 8:
        raise IntegrityError(f"{path}: {size} bytes is too short for a safetensors file "
                             "(8-byte header length first)",
                             hint="The file is truncated or corrupt", path=str(path))
    (length,) = struct.unpack("<Q", head)
    if length + 8 > size:
        raise IntegrityError(f"{path}: safetensors header of {length} bytes does not fit "
                             f"in a {size}-byte file", hint="The file is truncated or corrupt",
                             path=str(path))
    account = budget.current()
    account.check("header", length, "the safetensors header")
    raw = loc.read(8, length)
    # Parsing builds every object and list at once: count them first.  Brackets inside
    # strings open nothing; they are taken out only when the plain count is too high.
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > account.room("nodes"):
        bare = _STRINGS.sub(b"", raw)
        containers = bare.count(b"{") + bare.count(b"[")
        del bare
    account.charge("nodes", containers, "the safetensors header")
    try:
        header = json.loads(raw, parse_int=_integer)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{path}: safetensors header is not valid JSON ({exc})",
                             hint="The file is corrupt", path=str(path)) from exc
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + length


class _Digits(str):
    """An integer too long to convert (Python refuses past 4300 digits): kept as its text, so
    the entry holding it is the one named as malformed."""

    def __repr__(self) -> str:
        return f"<a {len(self)}-digit number>"


def _integer(text: str) -> int | _Digits:
    return int(text) if len(text) <= 40 else _Digits(text)


@metered
def read_info(path: Path | Location) -> RawCheckpoint:
    loc = locate(path)
    header, start = read_header(loc)
    size = loc.size()
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise IntegrityError(f"{path}: safetensors __metadata__ is a {type(metadata).__name__}, "
                             "not a map of strings", hint="The file is corrupt", path=str(path))
    entries = []
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = checked_shape(entry["shape"], f"{path}: tensor {name!r}", dtype)
            begin, end = (int(x) for x in entry["data_offsets"])
        except IntegrityError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(1e400) overflows
            raise IntegrityError(f"{path}: tensor {name!r} has a malformed header entry "
                                 f"({exc!r})", hint="The file is corrupt", path=str(path))
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * itemsize(dtype):
            raise IntegrityError(f"{path}: tensor {name!r} spans {end - begin} bytes but "
                                 f"{dtype}{list(shape)} needs {math.prod(shape) * itemsize(dtype)}")
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    cursor = 0
    for begin, end, name, _dtype, _shape in entries:
        if begin != cursor:
            raise IntegrityError(f"{path}: tensor {name!r} starts at {begin}, expected {cursor} "
                                 "(holes or overlaps in the buffer)")
        cursor = end
    if start + cursor != size:
        raise IntegrityError(
            f"{path}: the buffer needs {start + cursor} bytes, the file has {size}",
            hint="The file is truncated or was altered; re-download or re-save it",
            path=str(path))
    by_name = {e[2]: e for e in entries}
    tree: dict[str, Any] = {}
    tensors = []
    for name in header:  # header order, as written
        begin, end, _n, dtype, shape = by_name[name]
        ref = TensorRef(dtype, shape, ByteSpan(str(path), start + begin, end - begin))
        tree[name] = ref
        tensors.append(((name,), ref))
    details = {"header_bytes": start - 8, "metadata": dict(metadata)}
    return RawCheckpoint(FORMAT, tree, tuple(tensors), details=details)


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: dict of arrays; ``torch``: a state dict (needs torch)."""
    from ckptkit.formats.tensor_io import materialise, read_tensor

    raw = read_info(path)
    if framework == "numpy":
        return materialise(raw.tree)
    if framework != "torch":
        raise UsageError(f"{path}: cannot load safetensors as {framework!r}",
                         hint="Use framework='numpy' or framework='torch'")
    from ckptkit.formats.torch_common import import_torch

    torch = import_torch()
    state = {}
    for (name,), ref in raw.tensors:
        array = read_tensor(ref)
        if ref.dtype in ("bfloat16",) or ref.dtype.startswith("float8"):
            width = {1: "uint8", 2: "int16"}[array.dtype.itemsize]
            tensor = torch.from_numpy(array.view(width)).view(getattr(torch, ref.dtype))
        else:
            tensor = torch.from_numpy(array)
        state[name] = tensor
    return state
