"""The GGUF header (llama.cpp files): a header of typed key/value metadata, tensor infos, then aligned data.

Layout: ``GGUF``, version (2 or 3), tensor count, key/value count; each key/value (a string
key, a type id, the value: numbers, bool, string or a typed array); each tensor info (name,
dimension count, dimensions in ggml order, ggml type id, offset into the data section); then
the data section, which starts at the next multiple of ``general.alignment`` (32 by default).
Files written on big-endian machines carry every number big-endian.

Read here without the ``gguf`` package, through :mod:`ckptkit.storage.location`, and only the
header: the metadata (the chat template included, kept as text, never rendered or run) and
every tensor's type, shape and byte range.  Shapes are given in numpy order (ggml lists the
fastest-moving dimension first).  Quantized types are packed dtypes (:func:`ckptkit.model.
packed_types`): parameters are counted from the dimensions, bytes from the blocks.

Every count and length is checked against the bytes the file still has before anything is
allocated for it, and the metadata is charged to the reading budget (``header`` bytes,
``nodes`` per value).
"""

from __future__ import annotations

import functools
import math
import struct
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ckptkit.errors import IntegrityError
from ckptkit.model import Problem, checked_shape
from ckptkit.storage import budget
from ckptkit.storage.location import Location, locate

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
#: Bytes read from the file at a time while walking the header.
_WINDOW = 1 << 20

# GGUF value type ids -> struct code (numbers) or a name (the rest).
_NUMBERS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
VALUE_TYPES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
               6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
               12: "float64"}


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its id, ggml name, block geometry and ckptkit dtype name."""

    id: int
    name: str
    block: int
    size: int
    dtype: str

    @property
    def quantized(self) -> bool:
        return self.block > 1


@functools.cache
def ggml_types() -> dict[int, GGMLType]:
    """The type table, ``data/ggml_types.toml``, by id."""
    text = (resources.files("ckptkit") / "data" / "ggml_types.toml").read_text()
    return {int(key): GGMLType(int(key), t["name"], t["block"], t["size"], t["dtype"])
            for key, t in tomllib.loads(text)["types"].items()}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it; ``dims`` in ggml order, ``offset`` relative to
    the data section."""

    name: str
    dims: tuple[int, ...]
    type: GGMLType
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (slowest dimension first)."""
        return tuple(reversed(self.dims))

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return self.numel // self.type.block * self.type.size


@dataclass(frozen=True)
class Header:
    """Everything before the data section."""

    path: str
    version: int
    byteorder: str  # "little" or "big"
    metadata: dict[str, Any]
    value_types: dict[str, str]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class _Cursor:
    """Sequential reads through a :class:`Location`, a window at a time, each one checked
    against the file's end (so a damaged length fails before anything is allocated)."""

    def __init__(self, location: Location, size: int, order: str):
        self.location, self.size, self.order = location, size, order
        self.pos, self._start, self._buf = 0, 0, b""

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise IntegrityError(f"{self.location}: {what} needs {n:,} bytes at offset "
                                 f"{self.pos:,}, the file has {self.left():,} left",
                                 hint="The file is truncated or corrupt; re-download it",
                                 path=str(self.location))
        rel = self.pos - self._start
        if rel < 0 or rel + n > len(self._buf):
            self._start = self.pos
            self._buf = self.location.read(self.pos, max(n, _WINDOW))
            rel = 0
            if len(self._buf) < n:
                raise IntegrityError(f"{self.location}: file ended while reading {what}",
                                     hint="The file is truncated; re-download it",
                                     path=str(self.location))
        self.pos += n
        return self._buf[rel:rel + n]

    def number(self, code: str, what: str) -> Any:
        return struct.unpack(self.order + code, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> bytes:
        length = self.number("Q", what)
        return self.take(length, what)

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` strings (a vocabulary: 32k-256k of them), decoded straight out of the
        window; one that crosses the window's end takes the checked path."""
        out: list[str] = []
        unpack = struct.Struct(self.order + "Q").unpack_from
        for index in range(count):
            rel, buf = self.pos - self._start, self._buf
            if 0 <= rel and rel + 8 <= len(buf):
                (length,) = unpack(buf, rel)
                end = rel + 8 + length
                if end <= len(buf):
                    out.append(buf[rel + 8:end].decode("utf-8", "replace"))
                    self.pos += 8 + length
                    continue
            out.append(self.string(f"item {index} of {what}").decode("utf-8", "replace"))
        return out


def read_header(path: str | Path | Location) -> Header:
    """Parse the header (metadata and tensor infos) and check every tensor's byte range.

    Raises:
        IntegrityError: a malformed or truncated header, an unknown type, a tensor outside the
            file or not on the alignment.
        BudgetError: metadata larger than the reading budget allows.
    """
    header = parse_header(locate(path))
    problems = check_layout(header)
    if problems:
        raise IntegrityError(problems[0].message + (f" (and {len(problems) - 1} more problems)"
                                                    if len(problems) > 1 else ""),
                             hint="The file is truncated or corrupt; `ckpt verify` lists "
                                  "every problem", path=header.path)
    return header


def parse_header(location: Location) -> Header:
    """The header as written, without the layout check of :func:`read_header`."""
    size = location.size()
    head = location.read(0, 8)
    if head[:4] != MAGIC or len(head) < 8:
        raise IntegrityError(f"{location}: not a GGUF file (no GGUF magic)",
                             hint="Pass a .gguf file", path=str(location))
    order, version = "<", struct.unpack("<I", head[4:8])[0]
    if version not in VERSIONS and struct.unpack(">I", head[4:8])[0] in VERSIONS:
        order, version = ">", struct.unpack(">I", head[4:8])[0]
    if version not in VERSIONS:
        raise IntegrityError(f"{location}: GGUF version {version} is not one ckptkit reads "
                             f"(it reads {' and '.join(map(str, VERSIONS))})",
                             hint="Re-export it with a current llama.cpp or gguf package",
                             path=str(location))
    cursor = _Cursor(location, size, order)
    cursor.pos = 8
    account = budget.current()
    n_tensors = cursor.number("Q", "the tensor count")
    n_values = cursor.number("Q", "the metadata count")
    # A key/value takes at least 12 bytes, a tensor info at least 28: counts the file cannot
    # hold are refused before any loop runs.
    if n_values * 12 + n_tensors * 28 > cursor.left():
        raise IntegrityError(f"{location}: header declares {n_values:,} metadata entries and "
                             f"{n_tensors:,} tensors, more than {cursor.left():,} bytes hold",
                             hint="The file is truncated or corrupt", path=str(location))
    metadata: dict[str, Any] = {}
    value_types: dict[str, str] = {}
    for index in range(n_values):
        key = _text(cursor.string(f"metadata key #{index}"), f"metadata key #{index}", location)
        kind = cursor.number("I", f"the type of {key!r}")
        metadata[key], value_types[key] = _value(cursor, kind, key, account, location)
        account.check("header", cursor.pos, "the GGUF metadata")
        account.charge("nodes", 1, "the GGUF metadata")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1
            or alignment & (alignment - 1)):
        raise IntegrityError(f"{location}: general.alignment {alignment!r} is not a power of "
                             "two", hint="The file is corrupt", path=str(location))
    tensors = [_tensor_info(cursor, i, location) for i in range(n_tensors)]
    account.charge("nodes", len(tensors), "the GGUF tensor infos")
    account.check("header", cursor.pos, "the GGUF header")
    data_offset = -(-cursor.pos // alignment) * alignment
    return Header(str(location), version, "big" if order == ">" else "little", metadata,
                  value_types, tuple(tensors), alignment, data_offset, size)


def _text(raw: bytes, what: str, location: Location) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{location}: {what} is not UTF-8 ({exc.reason} at byte "
                             f"{exc.start})", hint="The file is corrupt",
                             path=str(location)) from None


def _value(cursor: _Cursor, kind: int, key: str, account: budget.Budget,
           location: Location) -> tuple[Any, str]:
    if kind in _NUMBERS:
        value = cursor.number(_NUMBERS[kind], repr(key))
        if kind == 6:  # the shortest decimal that is this float32 (1e-05, not 9.99999974e-06)
            value = float(str(np.float32(value)))
        return value, VALUE_TYPES[kind]
    if kind == _STRING:
        return cursor.string(repr(key)).decode("utf-8", "replace"), "string"
    if kind != _ARRAY:
        raise IntegrityError(f"{location}: metadata {key!r} has unknown value type {kind}",
                             hint="The file is corrupt", path=str(location))
    item = cursor.number("I", f"the item type of {key!r}")
    count = cursor.number("Q", f"the length of {key!r}")
    if item in _NUMBERS:
        width = struct.calcsize(_NUMBERS[item])
        raw = cursor.take(count * width, f"array {key!r}")
        values = np.frombuffer(raw, dtype=np.dtype(cursor.order + _NUMBERS[item]))
        values.flags.writeable = False
        return values, f"array[{VALUE_TYPES[item]}]"
    if item != _STRING:  # arrays of arrays exist in the spec, not in any file in use
        raise IntegrityError(f"{location}: metadata {key!r} is an array of "
                             f"{VALUE_TYPES.get(item, f'type {item}')}, which ckptkit does "
                             "not read", hint="The file is corrupt or uses a newer GGUF",
                             path=str(location))
    if count * 8 > cursor.left():
        raise IntegrityError(f"{location}: array {key!r} declares {count:,} strings, more "
                             f"than the {cursor.left():,} bytes left hold",
                             hint="The file is truncated or corrupt", path=str(location))
    account.charge("nodes", count, f"array {key!r}")
    return cursor.strings(count, repr(key)), "array[string]"


def _tensor_info(cursor: _Cursor, index: int, location: Location) -> TensorInfo:
    name = _text(cursor.string(f"tensor name #{index}"), f"tensor name #{index}", location)
    n_dims = cursor.number("I", f"the rank of tensor {name!r}")
    if n_dims > 64:
        raise IntegrityError(f"{location}: tensor {name!r} has {n_dims} dimensions",
                             hint="The file is corrupt", path=str(location))
    dims = tuple(cursor.number("Q", f"the shape of {name!r}") for _ in range(n_dims))
    type_id = cursor.number("I", f"the type of {name!r}")
    offset = cursor.number("Q", f"the offset of {name!r}")
    ggml = ggml_types().get(type_id)
    if ggml is None:
        raise IntegrityError(f"{location}: tensor {name!r} has ggml type {type_id}, which is "
                             "not in ckptkit's type table", hint="The file is corrupt, or "
                             "uses a type newer than this ckptkit", path=str(location))
    checked_shape(dims, f"{location}: tensor {name!r}", "uint8")
    if dims and dims[0] % ggml.block:
        raise IntegrityError(f"{location}: tensor {name!r} has {dims[0]} elements per row, "
                             f"not a multiple of the {ggml.block}-element blocks of "
                             f"{ggml.name}", hint="The file is corrupt", path=str(location))
    return TensorInfo(name, dims, ggml, offset)


def check_layout(header: Header) -> list[Problem]:
    """Every tensor's data range against the file: inside it, on the alignment, no two
    overlapping, and no names twice."""
    problems: list[Problem] = []
    seen: set[str] = set()
    ranges = []
    where = header.path
    for t in header.tensors:
        start = header.data_offset + t.offset
        end = start + t.nbytes
        if t.name in seen:
            problems.append(Problem(where, "duplicate", f"{where}: tensor {t.name!r} is "
                                    "listed twice"))
        seen.add(t.name)
        if t.offset % header.alignment:
            problems.append(Problem(where, "misaligned", f"{where}: tensor {t.name!r} starts "
                                    f"at data offset {t.offset:,}, not a multiple of the "
                                    f"{header.alignment}-byte alignment"))
        if end > header.file_size:
            problems.append(Problem(where, "truncated" if start <= header.file_size
                                    else "out-of-range",
                                    f"{where}: tensor {t.name!r} ({t.type.name}, {t.nbytes:,} "
                                    f"bytes at {start:,}) ends at {end:,}, past the end of the "
                                    f"{header.file_size:,}-byte file"))
        ranges.append((start, end, t.name))
    ranges.sort()
    for (_s1, e1, n1), (s2, _e2, n2) in zip(ranges, ranges[1:]):
        if s2 < e1:
            problems.append(Problem(where, "overlap", f"{where}: tensors {n1!r} and {n2!r} "
                                    f"overlap (bytes {s2:,} to {e1:,})"))
    return problems
