"""A restricted pickle reader: interprets pickle data without importing or calling anything.

Every global a pickle names (GLOBAL, STACK_GLOBAL, INST, EXT*) reaches Python through exactly one
gate, :meth:`InertUnpickler.find_class`.  It never imports: known tensor and storage rebuild
functions become lazy-tensor builders, a short list of harmless builtins keeps its meaning, and
every other name becomes an inert recorder, a type whose "construction" or "call" only returns an
:class:`~ckptkit.model.Opaque` holding its arguments.  Dangerous names are additionally reported
as unsafe.  The pure-Python unpickler is used on purpose: its memo is a dict, so a hostile
``LONG_BINPUT 0xFFFFFFFF`` cannot make it allocate a 32 GiB memo array as the C one would.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from ckptkit import danger
from ckptkit.errors import IntegrityError
from ckptkit.model import ByteSpan, Opaque, TensorRef

#: Upper bounds that keep a hostile pickle from exhausting time or memory.
MAX_OPCODES = 50_000_000
MAX_NODES = 5_000_000
MAX_DEPTH = 400
MAX_STATIC_SCAN = 64 << 20

TORCH_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}

TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "short": "int16",
    "int8": "int8", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
    "uint64": "uint64", "bool": "bool", "complex64": "complex64", "cfloat": "complex64",
    "complex128": "complex128", "cdouble": "complex128", "complex32": "complex32",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz", "float8_e5m2fnuz": "float8_e5m2fnuz",
    "float8_e8m0fnu": "float8_e8m0fnu", "float4_e2m1fn_x2": "float4_e2m1fn_x2",
    "qint8": "qint8", "quint8": "quint8", "qint32": "qint32",
}

_NUMPY_CODES = {
    "b1": "bool", "i1": "int8", "u1": "uint8", "i2": "int16", "u2": "uint16", "i4": "int32",
    "u4": "uint32", "i8": "int64", "u8": "uint64", "f2": "float16", "f4": "float32",
    "f8": "float64", "c8": "complex64", "c16": "complex128", "V2": "bfloat16?",
}
_STRUCT_CODES = {"int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i",
                 "uint32": "I", "int64": "q", "uint64": "Q", "float16": "e", "float32": "f",
                 "float64": "d", "bool": "?"}


def numpy_dtype_name(descr: str) -> str:
    """Map a numpy type string (``'<f4'``, ``'|b1'``, ``'f8'``) to its numpy spelling."""
    code = descr.lstrip("<>|=")
    if code in _NUMPY_CODES:
        return _NUMPY_CODES[code]
    aliases = {"d": "float64", "f": "float32", "e": "float16", "q": "int64", "l": "int64",
               "i": "int32", "h": "int16", "b": "int8", "B": "uint8", "?": "bool",
               "O": "object", "float64": "float64", "float32": "float32", "int64": "int64",
               "int32": "int32", "bool": "bool", "bfloat16": "bfloat16"}
    if code in aliases:
        return aliases[code]
    if code[:1] in "US":
        return "str" if code[0] == "U" else "bytes"
    return code


# --- objects that live only while a pickle is being interpreted -------------------------------

class _Dict(dict):
    """A dict that also accepts attributes (torch pickles set ``_metadata`` via BUILD)."""


@dataclass
class _StorageType:
    dtype: str


@dataclass
class _DType:
    name: str


@dataclass
class StorageRef:
    """A storage named by a persistent id; the format reader decides where its bytes are."""

    key: str
    dtype: str
    location: str
    numel: int
    view_offset: int = 0


@dataclass
class _PendingTensor:
    storage: Any
    offset: Any
    size: Any
    stride: Any
    dtype: str | None = None
    device: str | None = None


@dataclass
class Findings:
    """What one or more pickles asked for, by how they asked for it."""

    objects: set[str] = field(default_factory=set)
    unsafe: dict[str, str] = field(default_factory=dict)  # qualname -> how it was reached
    pickles: int = 0


def _inert_type(qualname: str) -> type:
    def __new__(cls, *args, **kwargs):  # noqa: N807 - the inert stand-in for construction
        return Opaque(qualname, args + ((kwargs,) if kwargs else ()))

    return type(qualname.rpartition(".")[2] or "Inert", (), {"__new__": __new__})


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *rest):
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=None, hooks=None,
                       dtype=None, *rest):
    return _PendingTensor(storage, storage_offset, size, stride,
                          dtype.name if isinstance(dtype, _DType) else None)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_meta(dtype, size, stride, *rest):
    name = dtype.name if isinstance(dtype, _DType) else "float32"
    return _PendingTensor(None, 0, size, stride, name, "meta")


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args) if callable(func) else Opaque("torch._tensor._rebuild_from_type_v2")


def _codecs_encode(obj, encoding="utf-8", *rest):
    if isinstance(obj, str) and str(encoding).lower().replace("_", "-") in (
            "latin1", "latin-1", "utf-8", "utf8", "iso-8859-1"):
        return obj.encode(encoding)
    return Opaque("_codecs.encode", (obj, encoding))


def _bounded(ctor: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A builtin whose arguments must already be plain data (no allocation by count)."""

    def build(*args):
        if any(isinstance(a, int) and not isinstance(a, bool) for a in args) and name in (
                "bytearray", "bytes"):
            return Opaque(f"builtins.{name}", args)
        try:
            return ctor(*args)
        except (TypeError, ValueError):
            return Opaque(f"builtins.{name}", args)

    return build


def _new_dict(*args, **kwargs):
    result = _Dict()
    if args and isinstance(args[0], (dict, list)):
        try:
            result.update(args[0])
        except (TypeError, ValueError):
            pass
    return result


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _new_dict,
        ("collections", "defaultdict"): lambda *a: _Dict(),
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Size"): lambda *a: tuple(a[0]) if a and isinstance(a[0], (list, tuple)) else (),
        ("torch", "device"): lambda *a: ":".join(str(x) for x in a),
        ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
        ("torch.serialization", "_get_layout"): lambda *a: str(a[0]) if a else "",
        ("builtins", "set"): _bounded(set, "set"),
        ("builtins", "frozenset"): _bounded(frozenset, "frozenset"),
        ("builtins", "bytearray"): _bounded(bytearray, "bytearray"),
        ("builtins", "bytes"): _bounded(bytes, "bytes"),
        ("builtins", "complex"): _bounded(complex, "complex"),
        ("builtins", "slice"): _bounded(slice, "slice"),
        ("__builtin__", "set"): _bounded(set, "set"),
        ("_codecs", "encode"): _codecs_encode,
    }
    for name, dtype in TORCH_STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(dtype)
    for name, dtype in TORCH_DTYPES.items():
        table[("torch", name)] = _DType(dtype)
    return table


_ALLOWED = _allowed()
#: numpy reconstruction helpers: recorded as Opaque and turned into values afterwards.
_NUMPY_BENIGN = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class InertUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Interprets one pickle stream into plain values, pending tensors and Opaque records."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: BinaryIO, findings: Findings,
                 persistent: Callable[[Any], Any] | None = None,
                 context: PickleContext | None = None):
        super().__init__(file, encoding="latin1")
        self.findings = findings
        self._persistent = persistent
        self._context = context or PickleContext()
        self._via = "GLOBAL"
        self._types: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:  # the one gate to every global
        module, name = str(module), str(name)
        qualname = f"{module}.{name}"
        if (module, name) in self._context.allowed:
            return self._context.allowed[(module, name)]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith(self._context.known_prefixes):
            pass  # classes the format itself defines (TorchScript's __torch__.*): not findings
        elif danger.is_dangerous(module, name):
            self.findings.unsafe.setdefault(qualname, self._via)
        elif (module, name) not in _NUMPY_BENIGN:
            self.findings.objects.add(qualname)
        if qualname not in self._types:
            self._types[qualname] = _inert_type(qualname)
        return self._types[qualname]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            return Opaque("<persistent id>", (pid,))
        return self._persistent(pid)

    def load(self) -> Any:
        # The stdlib loop, plus an opcode budget; pickle errors become IntegrityError upstream.
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        budget = MAX_OPCODES
        try:
            while budget:
                budget -= 1
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value
        raise pickle.UnpicklingError(f"more than {MAX_OPCODES} opcodes")

    def _tagged(opcode: bytes, via: str):  # noqa: N805 - builds dispatch wrappers
        original = pickle._Unpickler.dispatch[opcode[0]]  # type: ignore[attr-defined]

        def run(self):
            self._via = via
            try:
                original(self)
            finally:
                self._via = "GLOBAL"

        return run

    for _op, _via in ((pickle.STACK_GLOBAL, "STACK_GLOBAL"), (pickle.INST, "INST"),
                      (pickle.OBJ, "OBJ"), (pickle.EXT1, "EXT1"), (pickle.EXT2, "EXT2"),
                      (pickle.EXT4, "EXT4")):
        dispatch[_op[0]] = _tagged(_op, _via)
    del _op, _via, _tagged


@dataclass(frozen=True)
class PickleContext:
    """Format-specific knowledge: extra allowlisted globals, and module prefixes that name the
    format's own classes (recorded as opaque state, not reported)."""

    allowed: dict[tuple[str, str], Any] = field(default_factory=dict)
    known_prefixes: tuple[str, ...] = ()


def read_pickle(data: bytes | BinaryIO, findings: Findings,
                persistent: Callable[[Any], Any] | None = None, *, what: str = "pickle",
                context: PickleContext | None = None) -> Any:
    """Interpret one pickle from ``data`` (bytes or a file positioned at its start).

    On malformed input the remaining opcodes are still scanned statically so that globals
    after the break are reported, then :class:`IntegrityError` is raised.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    start = stream.tell()
    findings.pickles += 1
    try:
        return InertUnpickler(stream, findings, persistent, context).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, struct.error, UnicodeDecodeError, OverflowError, MemoryError,
            RecursionError) as exc:
        stream.seek(start)
        scan_globals(stream.read(MAX_STATIC_SCAN), findings)
        raise IntegrityError(f"corrupt {what}: {type(exc).__name__}: {exc}"[:300]) from exc


def scan_globals(data: bytes, findings: Findings) -> None:
    """Statically list the globals a (possibly broken) pickle names, without interpreting it.

    Tracks string pushes and the memo so that ``STACK_GLOBAL`` operands fetched with
    ``BINGET`` are resolved too.
    """
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                _note(findings, module, attr, name)
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                _note(findings, str(strings[-2]), str(strings[-1]), name)
            if isinstance(arg, str) and ("UNICODE" in name or name.endswith("STRING")):
                strings.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                strings.append(memo[int(arg)])
            if name == "STOP":
                strings.clear()
    except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError):
        return


def _note(findings: Findings, module: str, name: str, via: str) -> None:
    if (module, name) in _ALLOWED or (module, name) in _NUMPY_BENIGN:
        return
    if danger.is_dangerous(module, name):
        findings.unsafe.setdefault(f"{module}.{name}", via)
    else:
        findings.objects.add(f"{module}.{name}")


# --- turning the interpreted tree into the public model ----------------------------------------

SpanResolver = Callable[[StorageRef], ByteSpan | None]


class Resolver:
    """Walks an interpreted tree once: pending tensors become TensorRefs, numpy records become
    values, recorders become plain Opaque state.  Bounded in depth and node count."""

    def __init__(self, span_for: SpanResolver | None = None):
        self.span_for = span_for
        self.nodes = 0
        self._seen: dict[int, Any] = {}

    def resolve(self, value: Any, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise IntegrityError(f"pickle expands to more than {MAX_NODES} objects")
        if depth > MAX_DEPTH:
            raise IntegrityError(f"pickle nests deeper than {MAX_DEPTH} levels")
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return value
        key = id(value)
        if key in self._seen:
            return self._seen[key]
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            self._seen[key] = out
            for k, v in value.items():
                out[self._key(k)] = self.resolve(v, depth + 1)
            return out
        if isinstance(value, list):
            out_list: list[Any] = []
            self._seen[key] = out_list
            out_list.extend(self.resolve(v, depth + 1) for v in value)
            return out_list
        if isinstance(value, tuple):
            return tuple(self.resolve(v, depth + 1) for v in value)
        if isinstance(value, (set, frozenset)):
            return sorted((self.resolve(v, depth + 1) for v in value), key=repr)
        if isinstance(value, bytearray):
            return bytes(value)
        if isinstance(value, _PendingTensor):
            return self._tensor(value)
        if isinstance(value, Opaque):
            return self._opaque(value, depth)
        if isinstance(value, _DType):
            return f"dtype:{value.name}"
        if isinstance(value, StorageRef):
            return TensorRef(value.dtype, (value.numel,), self._span(value),
                             storage_key=value.key, device=value.location)
        if isinstance(value, (_StorageType, type, slice)):
            return Opaque(getattr(value, "__name__", type(value).__name__))
        return Opaque(type(value).__name__)

    def _key(self, key: Any) -> Any:
        if isinstance(key, (str, int, float, bool, bytes)) or key is None:
            return key
        return repr(key)

    def _span(self, storage: StorageRef) -> ByteSpan | None:
        return self.span_for(storage) if self.span_for else None

    def _tensor(self, p: _PendingTensor) -> Any:
        try:
            shape = tuple(int(s) for s in p.size)
            stride = tuple(int(s) for s in p.stride) if p.stride is not None else None
            offset = int(p.offset or 0)
        except (TypeError, ValueError):
            return Opaque("torch.Tensor", (p.size, p.stride))
        if any(s < 0 for s in shape) or offset < 0:
            raise IntegrityError(f"tensor with negative size or offset {shape}/{offset}")
        storage = p.storage if isinstance(p.storage, StorageRef) else None
        if p.storage is not None and storage is None:
            return Opaque("torch.Tensor", (p.size,))
        dtype = p.dtype or (storage.dtype if storage else "float32")
        return TensorRef(dtype, shape, self._span(storage) if storage else None, stride,
                         offset + (storage.view_offset if storage else 0),
                         storage.key if storage else None,
                         p.device or (storage.location if storage else None))

    def _opaque(self, obj: Opaque, depth: int) -> Any:
        name = obj.qualname
        if name.endswith("multiarray.scalar"):
            return _numpy_scalar(obj)
        if name.endswith("multiarray._reconstruct"):
            return _numpy_array(obj)
        if name == "numpy.dtype":
            return f"dtype:{_dtype_of(obj)}"
        resolved = Opaque(name, tuple(self.resolve(a, depth + 1) for a in obj.args),
                          self.resolve(obj.state, depth + 1),
                          [self.resolve(i, depth + 1) for i in obj.items])
        return resolved


def _dtype_of(obj: Any) -> str:
    if isinstance(obj, Opaque) and obj.qualname == "numpy.dtype" and obj.args:
        descr = str(obj.args[0])
        order = obj.state[1] if isinstance(obj.state, tuple) and len(obj.state) > 1 else "<"
        return numpy_dtype_name(descr) + ("" if order in ("<", "|", "=") else ">")
    return "unknown"


def _numpy_scalar(obj: Opaque) -> Any:
    if len(obj.args) >= 2 and isinstance(obj.args[1], bytes):
        dtype = _dtype_of(obj.args[0])
        code = _STRUCT_CODES.get(dtype)
        if code and struct.calcsize("<" + code) == len(obj.args[1]):
            return struct.unpack("<" + code, obj.args[1])[0]
    return Opaque("numpy.generic", (), None)


def _numpy_array(obj: Opaque) -> Any:
    state = obj.state
    if isinstance(state, tuple) and len(state) == 5:
        _version, shape, dtype, fortran, raw = state
        name = _dtype_of(dtype)
        if name == "object":
            return Opaque("numpy.ndarray[object]", (tuple(shape),))
        try:
            return TensorRef(name, tuple(int(s) for s in shape), None, fortran_order=bool(fortran))
        except (TypeError, ValueError):
            pass
    return Opaque("numpy.ndarray")
