"""The ONNX model walked field by field: one ``ModelProto`` (protobuf), weights inline or in
external data files.

Read with ckptkit's own wire reader (:mod:`~ckptkit.formats.protowire`), no ``onnx`` or
``protobuf`` import.  The model is walked field by field through its
:class:`~ckptkit.storage.location.Location`: weights stored inline (``raw_data``, packed
``float_data``) become byte spans of the model file without being read, so a 2 GB model costs
a few reads.  What is read: IR version, producer, opsets, model metadata, the graph's inputs
and outputs (names, element types, shapes with symbolic dimensions), its operator counts, and
each initializer (name, dtype, shape, where its bytes are).

External data (``data_location = EXTERNAL``) names a file relative to the model's folder.  A
location that is absolute, climbs out with ``..``, or resolves (through links) outside the
folder is never opened: the tensor gets no byte span, and the file is reported unsafe
(``ckpt scan``, ``ckpt inspect`` exit 5) and by :func:`verify`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import numpy as np

from ckptkit.errors import IntegrityError
from ckptkit.formats import protowire as pw
from ckptkit.model import ByteSpan, TensorRef, checked_shape, itemsize
from ckptkit.storage import budget
from ckptkit.storage.location import LocalLocation, Location, locate

#: TensorProto.DataType -> ckptkit dtype.
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
          7: "int64", 8: "string", 9: "bool", 10: "float16", 11: "float64", 12: "uint32",
          13: "uint64", 14: "complex64", 15: "complex128", 16: "bfloat16",
          17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2",
          20: "float8_e5m2fnuz", 21: "uint4", 22: "int4", 23: "float4_e2m1fn",
          24: "float8_e8m0fnu", 25: "uint2", 26: "int2"}
#: Field numbers ModelProto has; a file with any other top-level field is not ONNX.
_MODEL_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 14, 20, 21, 25, 26}
#: IR versions the sniff accepts (1 and 2 predate 2018; SavedModel protos start like IR 1).
_IR_VERSIONS = range(3, 32)
#: Varint-coded data fields of TensorProto (int32_data, int64_data, uint64_data), decoded on
#: read; the fixed-width ones (float_data, double_data) are byte spans like raw_data.
_VARINT_DATA = {5: "int32", 7: "int64", 11: "uint64"}
_FIXED_DATA = {4: "float32", 10: "float64"}
_COMPLEX = {4: "complex64", 10: "complex128"}
_WINDOW = 1 << 20
#: Bytes of one small field (a name, a value info) read whole at most.
_SMALL = 16 << 20


class _Window:
    """``read(offset, length)`` on a location, a window of it kept, checked to give all the
    bytes asked for (protowire checks lengths against message ends, this against the file)."""

    def __init__(self, location: Location, size: int):
        self.location, self.size = location, size
        self._start, self._buf = 0, b""

    def __call__(self, offset: int, length: int) -> bytes:
        rel = offset - self._start
        if 0 <= rel and rel + length <= len(self._buf):
            return self._buf[rel:rel + length]
        if length > _WINDOW:
            data = self.location.read(offset, length)
        else:
            self._start, self._buf = offset, self.location.read(offset, _WINDOW)
            data = self._buf[:length]
        if len(data) != length:
            raise IntegrityError(f"file ends inside a field at byte {offset}")
        return data


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: name, element type, shape (``None``: unknown; a ``str``
    entry: a symbolic dimension such as ``batch``)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype,
                "shape": None if self.shape is None else list(self.shape)}


@dataclass
class Initializer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    span: ByteSpan | None = None
    varint: tuple[int, int, str] | None = None  # (offset, length, wire dtype) in the model
    external: dict[str, str] = field(default_factory=dict)


@dataclass
class Model:
    path: str
    ir_version: int = 0
    producer: str = ""
    opsets: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    graph_name: str = ""
    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[ValueInfo] = field(default_factory=list)
    operators: dict[str, int] = field(default_factory=dict)
    initializers: list[Initializer] = field(default_factory=list)
    sparse_initializers: int = 0
    external_files: list[str] = field(default_factory=list)
    escapes: dict[str, str] = field(default_factory=dict)   # tensor -> location that escapes
    missing: dict[str, str] = field(default_factory=dict)   # tensor -> location not found


def looks_like_onnx(path: str | Path | Location) -> bool:
    """An IR version first, then ModelProto fields only, a graph among them; a file whose
    first two fields are ModelProto's but that breaks off later is taken too (a truncated
    model: read_info says what is wrong with it)."""
    try:
        location = locate(path)
        if not location.is_file():
            return False
        size = location.size()
        read = _Window(location, size)
        seen: list[int] = []
        try:
            for number, wire, value in pw.iter_spans(read, 0, size):
                if not seen and (number != 1 or wire != pw.VARINT or value not in _IR_VERSIONS):
                    return False
                if number not in _MODEL_FIELDS or len(seen) > 64:
                    return False
                seen.append(number)
        except IntegrityError:
            return len(seen) >= 1 and _second_key_is_a_model_field(read, size)
        return 7 in seen
    except (OSError, ValueError, IntegrityError):
        return False


def _second_key_is_a_model_field(read: Callable[[int, int], bytes], size: int) -> bool:
    head = read(0, min(size, 24))
    _ir, pos = pw.read_varint(head, 1)
    key, _pos = pw.read_varint(head, pos)
    return key >> 3 in _MODEL_FIELDS and key & 7 in (pw.VARINT, pw.LENGTH)


def read_model(path: str | Path | Location) -> Model:
    """Walk the model (see the module docstring).

    Raises:
        IntegrityError: not a well-formed ONNX model.
        BudgetError: more graph records than the reading budget allows.
    """
    location = locate(path)
    size = location.size()
    read = _Window(location, size)
    account = budget.current()
    model = Model(str(location))
    where = f"{location}: "
    try:
        graph = None
        for number, _wire, value in pw.iter_spans(read, 0, size):
            account.charge("nodes", 1, "the ONNX model")
            if number == 1:
                model.ir_version = pw.as_int(value, "ir_version")
            elif number == 2:
                model.producer = _text(read, value, "producer_name")
            elif number == 3 and model.producer:
                model.producer += " " + _text(read, value, "producer_version")
            elif number == 7:
                graph = value
            elif number == 8:
                opset = pw.fields(_small(read, value, "opset_import"))
                domain = pw.as_str(pw.last(opset, 1) or memoryview(b""), "opset domain")
                model.opsets[domain or "ai.onnx"] = pw.signed64(
                    pw.as_int(pw.last(opset, 2) or 0, "opset version"))
            elif number == 14:
                entry = pw.fields(_small(read, value, "metadata_props"))
                model.metadata[_entry_text(entry, 1)] = _entry_text(entry, 2)
        if graph is None or not isinstance(graph, tuple):
            raise IntegrityError("no graph in the model")
        _read_graph(model, read, graph, account)
    except IntegrityError as exc:
        if str(exc).startswith(where):
            raise
        raise IntegrityError(f"{where}not a readable ONNX model ({exc})",
                             hint="The file is truncated or corrupt", path=str(location)) \
            from None
    _place_external(model, location)
    return model


def _small(read: Callable[[int, int], bytes], value: Any, what: str) -> bytes:
    if not isinstance(value, tuple):
        raise IntegrityError(f"{what}: expected a length-delimited field, found a number")
    offset, length = value
    budget.current().check("header", length, what)
    return read(offset, length)


def _text(read: Callable[[int, int], bytes], value: Any, what: str) -> str:
    return pw.as_str(memoryview(_small(read, value, what)), what)


def _entry_text(entry: dict[int, list[pw.Value]], number: int) -> str:
    value = pw.last(entry, number)
    return "" if value is None else pw.as_str(value, "string entry")


def _read_graph(model: Model, read: Callable[[int, int], bytes], graph: tuple[int, int],
                account: budget.Budget) -> None:
    start, length = graph
    for number, _wire, value in pw.iter_spans(read, start, start + length):
        account.charge("nodes", 1, "the ONNX graph")
        if number == 1 and isinstance(value, tuple):
            op, domain = "", ""
            for n, _w, v in pw.iter_spans(read, value[0], value[0] + value[1]):
                if n == 4:
                    op = _text(read, v, "op_type")
                elif n == 7:
                    domain = _text(read, v, "node domain")
            key = f"{domain}.{op}" if domain and domain != "ai.onnx" else op
            model.operators[key] = model.operators.get(key, 0) + 1
        elif number == 2:
            model.graph_name = _text(read, value, "graph name")
        elif number == 5 and isinstance(value, tuple):
            model.initializers.append(_tensor(read, value, model.path))
        elif number == 15:
            model.sparse_initializers += 1
        elif number in (11, 12):
            info = _value_info(_small(read, value, "graph input/output"))
            (model.inputs if number == 11 else model.outputs).append(info)


def _value_info(data: bytes) -> ValueInfo:
    grouped = pw.fields(data)
    name = pw.as_str(pw.last(grouped, 1) or memoryview(b""), "value name")
    type_proto = pw.last(grouped, 2)
    if type_proto is None:
        return ValueInfo(name, "?", None)
    tensor_type = pw.last(pw.fields(pw.as_bytes(type_proto, "type")), 1)
    if tensor_type is None:
        return ValueInfo(name, "non-tensor", None)
    tensor = pw.fields(pw.as_bytes(tensor_type, "tensor type"))
    elem = pw.as_int(pw.last(tensor, 1) or 0, "elem_type")
    dtype = DTYPES.get(elem, f"type {elem}")
    shape_proto = pw.last(tensor, 2)
    if shape_proto is None:
        return ValueInfo(name, dtype, None)
    dims: list[int | str | None] = []
    for dim in pw.fields(pw.as_bytes(shape_proto, "shape")).get(1, []):
        parts = pw.fields(pw.as_bytes(dim, "dimension"))
        if 1 in parts:
            dims.append(pw.signed64(pw.as_int(parts[1][-1], "dim_value")))
        elif 2 in parts:
            dims.append(pw.as_str(parts[2][-1], "dim_param"))
        else:
            dims.append(None)
    return ValueInfo(name, dtype, tuple(dims))


def _tensor(read: Callable[[int, int], bytes], value: tuple[int, int], path: str) -> Initializer:
    start, length = value
    dims: list[int] = []
    elem, name = 0, ""
    data: tuple[int, int, int] | None = None  # (field, offset, length)
    external: dict[str, str] = {}
    for number, wire, v in pw.iter_spans(read, start, start + length):
        if number == 1:
            if wire == pw.LENGTH:  # packed
                packed, pos = _small(read, v, "dims"), 0
                while pos < len(packed):
                    dim, pos = pw.read_varint(packed, pos)
                    dims.append(pw.signed64(dim))
            else:
                dims.append(pw.signed64(pw.as_int(v, "dims")))
        elif number == 2:
            elem = pw.as_int(v, "data_type")
        elif number == 8:
            name = _text(read, v, "tensor name")
        elif number in (9, *_FIXED_DATA, *_VARINT_DATA) and isinstance(v, tuple):
            data = (number, *v)
        elif number == 13:
            entry = pw.fields(_small(read, v, "external_data"))
            external[_entry_text(entry, 1)] = _entry_text(entry, 2)
    dtype = DTYPES.get(elem)
    if dtype is None:
        raise IntegrityError(f"initializer {name!r} has unknown data type {elem}")
    shape = checked_shape(dims, f"initializer {name!r}", dtype)
    init = Initializer(name, dtype, shape, external=external)
    if data is None or external:
        return init
    number, offset, size = data
    if number in _VARINT_DATA:
        init.varint = (offset, size, _VARINT_DATA[number])
        return init
    wanted = TensorRef(dtype, shape).nbytes
    if number in _FIXED_DATA and dtype not in (_FIXED_DATA[number], _COMPLEX[number]):
        raise IntegrityError(f"initializer {name!r} of {dtype} holds {_FIXED_DATA[number]} data")
    if size != wanted:
        raise IntegrityError(f"initializer {name!r}: {dtype}{list(shape)} needs {wanted:,} "
                             f"bytes, its data has {size:,}")
    init.span = ByteSpan(path, offset, size)
    return init


def escapes(folder: Path, location: str) -> str | None:
    """Why the external-data ``location`` leaves ``folder`` (None if it stays inside)."""
    if not location:
        return "an empty location"
    if "\x00" in location:
        return "a location with a NUL character"
    for flavour in (PurePosixPath, PureWindowsPath):
        pure = flavour(location)
        if pure.is_absolute() or pure.drive or pure.root:
            return "an absolute path"
        if ".." in pure.parts:
            return "a path climbing out with '..'"
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(folder / location)
    if os.path.commonpath([real_folder, real]) != real_folder:
        return "a link leading outside the model's folder"
    return None


def _place_external(model: Model, location: Location) -> None:
    folder = Path(str(location)).parent
    local = isinstance(location, LocalLocation)
    for init in model.initializers:
        if not init.external:
            continue
        where = init.external.get("location", "")
        why = escapes(folder, where)
        if why is not None:
            model.escapes[init.name] = f"{where!r} ({why})"
            continue
        target = folder / where
        if where not in model.external_files:
            model.external_files.append(where)
        if not local or not target.is_file():
            model.missing[init.name] = where
            continue
        try:
            offset = int(init.external.get("offset", "0") or 0)
            nbytes = int(init.external.get("length", "") or TensorRef(init.dtype,
                                                                     init.shape).nbytes)
        except ValueError:
            raise IntegrityError(f"{location}: initializer {init.name!r} has a malformed "
                                 f"external offset or length {init.external}",
                                 hint="The file is corrupt", path=str(location)) from None
        if offset < 0 or nbytes != TensorRef(init.dtype, init.shape).nbytes:
            raise IntegrityError(f"{location}: initializer {init.name!r}: external data of "
                                 f"{nbytes:,} bytes at {offset:,} for "
                                 f"{init.dtype}{list(init.shape)}", hint="The file is corrupt",
                                 path=str(location))
        init.span = ByteSpan(str(target), offset, nbytes)


def decode_varints(path: Path, init: Initializer) -> np.ndarray:
    from ckptkit.formats.tensor_io import numpy_dtype

    assert init.varint is not None
    offset, length, wire = init.varint
    budget.current().check("header", length, f"initializer {init.name!r}")
    data = locate(path).read(offset, length)
    values, pos = [], 0
    while pos < len(data):
        value, pos = pw.read_varint(data, pos)
        values.append(value if wire == "uint64" else pw.signed64(value))
    count = TensorRef(init.dtype, init.shape).numel
    if len(values) != count:
        raise IntegrityError(f"{path}: initializer {init.name!r} holds {len(values)} values, "
                             f"its shape needs {count}", path=str(path))
    if init.dtype in ("float16", "bfloat16") or init.dtype.startswith("float8"):
        # int32_data carries the raw bit patterns of narrow floats.
        width = "uint16" if itemsize(init.dtype) == 2 else "uint8"
        raw = np.array(values, dtype=np.int64).astype(width)
        return raw.view(numpy_dtype(init.dtype)).reshape(init.shape)
    return np.array(values, dtype=np.int64).astype(numpy_dtype(init.dtype)).reshape(init.shape)
