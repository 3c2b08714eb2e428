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
from ckptkit.errors import CkptkitError, ExitCode, IntegrityError
from ckptkit.model import ByteSpan, Opaque, TensorRef

#: Upper bounds that keep a hostile pickle from exhausting time or memory.
MAX_OPCODES = 50_000_000
MAX_NODES = 5_000_000
MAX_DEPTH = 400
MAX_STATIC_SCAN = 64 << 20
#: Hashing a tuple hashes every element again, uncached: a memo-shared tuple of tuples used as
#: a dict key or set member would cost 10**levels hash calls.  Real keys are tiny.
MAX_KEY_NODES = 1_000

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


@dataclass(eq=False)  # hashable by identity, like the torch object
class _StorageType:
    dtype: str


@dataclass(eq=False)  # hashable by identity, like the torch object
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


@dataclass(eq=False)  # hashable by identity, like the torch object
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
    # isinstance(encoding, str): str() of a memo-shared nested list is exponential.
    if isinstance(obj, str) and isinstance(encoding, str) and encoding.lower().replace(
            "_", "-") in ("latin1", "latin-1", "utf-8", "utf8", "iso-8859-1"):
        return obj.encode(encoding)
    return Opaque("_codecs.encode", (obj, encoding))


def _reconstructor(cls: Any = None, base: Any = None, state: Any = None, *rest: Any) -> Any:
    """Protocol 0/1 spelling of "make an instance of cls": the class itself is what gets
    classified (it arrives through find_class like any global), so this only forwards."""
    return cls() if isinstance(cls, type) else Opaque("copyreg._reconstructor", (cls,))


def _scalar_text(args: tuple[Any, ...]) -> list[str]:
    """``str()`` of plain scalar arguments only: ``str()`` of a memo-shared nested list (a
    "billion laughs") is exponential, so containers are never stringified."""
    return [str(a) for a in args if isinstance(a, (str, int, float))]


def _bounded(ctor: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A builtin whose arguments must already be plain data (no allocation by count)."""

    def build(*args):
        if any(isinstance(a, int) and not isinstance(a, bool) for a in args) and name in (
                "bytearray", "bytes"):
            return Opaque(f"builtins.{name}", args)
        if name in ("set", "frozenset") and args and isinstance(args[0], (list, tuple)):
            _check_keys(args[0])  # set members are hashed
        try:
            return ctor(*args)
        except (TypeError, ValueError):
            return Opaque(f"builtins.{name}", args)

    return build


def _new_dict(*args, **kwargs):
    result = _Dict()
    if args and isinstance(args[0], (dict, list)):
        if isinstance(args[0], list):
            _check_keys([p[0] for p in args[0] if isinstance(p, tuple) and p])
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
        ("torch", "device"): lambda *a: ":".join(_scalar_text(a)),
        ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
        ("torch.serialization", "_get_layout"): lambda *a: "".join(_scalar_text(a[:1])),
        ("builtins", "set"): _bounded(set, "set"),
        ("builtins", "frozenset"): _bounded(frozenset, "frozenset"),
        ("builtins", "bytearray"): _bounded(bytearray, "bytearray"),
        ("builtins", "bytes"): _bounded(bytes, "bytes"),
        ("builtins", "complex"): _bounded(complex, "complex"),
        ("builtins", "slice"): _bounded(slice, "slice"),
        ("__builtin__", "set"): _bounded(set, "set"),
        ("_codecs", "encode"): _codecs_encode,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("builtins", "object"): _inert_type("builtins.object"),  # _reconstructor's base
        ("__builtin__", "object"): _inert_type("builtins.object"),
        ("copy_reg", "_reconstructor"): _reconstructor,
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
        if not _plain_pid(pid):
            # Format readers str() the key and location; a nested or memo-shared container
            # there would make that exponential.  Torch ids are flat tuples of scalars.
            self.findings.objects.add("<unknown persistent id>")
            return Opaque("<persistent id>")
        return self._persistent(pid)

    def load(self) -> Any:
        # The stdlib loop, plus an opcode budget; pickle errors become IntegrityError upstream.
        # No _Unframer: like the C unpickler that pickle.load and torch.load use, FRAME is only
        # a prefetch hint (see _load_frame), so an opcode may straddle a declared frame end.
        # The pure-Python _Unframer rejects that ("pickle exhausted before end of frame"), a
        # parser differential that let a payload run under torch.load while this reader
        # stopped early and reported the file as merely corrupt.
        self.read = self._file_read
        self.readline = self._file_readline
        self.readinto = self._readinto
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

    def _readinto(self, buf: Any) -> int:
        data = self._file_read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def _load_frame(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > MAX_STATIC_SCAN << 4:
            raise pickle.UnpicklingError(f"frame of {size} bytes")

    def _load_bytearray8(self) -> None:
        # The stdlib allocates (and zeroes) bytearray(<declared length>) before reading, so a
        # 20-byte pickle could demand gigabytes.  Read what is there, then check the length.
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(min(size, MAX_STATIC_SCAN << 4))
        if len(data) != size:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {size} bytes is truncated")
        self.append(bytearray(data))

    # --- calls and mutations the stand-ins cannot mirror ------------------------------------
    # The real loader calls real objects where this reader has recorders and stand-ins, so
    # some operations that succeed there fail here: calling a call's result (getattr(...)(x)),
    # NEWOBJ on a stand-in function, BUILD or SETITEM on a tensor.  Stopping there would leave
    # the rest of the pickle unread (and the file merely "corrupt") while torch.load runs it,
    # so such an operation is recorded as an Opaque, or skipped, and interpretation goes on.

    def _record_call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        extra = (kwargs,) if isinstance(kwargs, dict) and kwargs else ()
        try:
            if isinstance(kwargs, dict) and kwargs:
                return func(*args, **kwargs)
            return func(*args)
        except _MISMATCH as exc:
            if isinstance(exc, CkptkitError):
                raise
            return _called(func, args + extra)

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._record_call(self.stack[-1], args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._record_call(lambda *a: cls.__new__(cls, *a), args)
                    if not isinstance(cls, Opaque) else _called(cls, args))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._record_call(lambda *a, **k: cls.__new__(cls, *a, **k), args, kwargs)
                    if not isinstance(cls, Opaque) else _called(cls, args))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:  # INST and OBJ
        if args or not isinstance(klass, type):
            self.append(self._record_call(klass, args))
        else:
            self.append(self._record_call(lambda: klass.__new__(klass), ()))

    def _load_build(self) -> None:
        # Only objects this read created take state.  The stand-ins are shared module-level
        # objects (torch.FloatStorage, torch.float32, the rebuild functions): a BUILD that set
        # attributes on them would poison every later read in the process.
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Opaque):
            Opaque.__setstate__(inst, state)
        elif isinstance(inst, _Dict):
            self.stack.append(state)
            self._tolerant(pickle._Unpickler.load_build)  # type: ignore[attr-defined]

    def _tolerant(self, handler: Callable[[Any], None]) -> None:
        try:
            handler(self)  # these pop their operands before they can fail
        except _MISMATCH as exc:
            if isinstance(exc, CkptkitError):
                raise

    # Keys and set members are hashed; refuse tuples that expand to huge trees (see
    # MAX_KEY_NODES) before the stdlib handler hashes them.
    def _load_setitem(self) -> None:
        _check_keys(self.stack[-2:-1])
        self._tolerant(pickle._Unpickler.load_setitem)  # type: ignore[attr-defined]

    def _load_setitems(self) -> None:
        _check_keys(self.stack[0::2])
        self._tolerant(pickle._Unpickler.load_setitems)  # type: ignore[attr-defined]

    def _load_additems(self) -> None:
        _check_keys(self.stack)
        self._tolerant(pickle._Unpickler.load_additems)  # type: ignore[attr-defined]

    def _load_append(self) -> None:
        self._tolerant(pickle._Unpickler.load_append)  # type: ignore[attr-defined]

    def _load_appends(self) -> None:
        self._tolerant(pickle._Unpickler.load_appends)  # type: ignore[attr-defined]

    def _load_dict(self) -> None:
        _check_keys(self.stack[0::2])
        pickle._Unpickler.load_dict(self)  # type: ignore[attr-defined]

    def _load_frozenset(self) -> None:
        _check_keys(self.stack)
        pickle._Unpickler.load_frozenset(self)  # type: ignore[attr-defined]

    def _load_stack_global(self) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        if isinstance(module, Opaque) or isinstance(name, Opaque):
            # Operands computed at load time (posixpath.basename('/x/os') is 'os'): where
            # this global leads cannot be known without running the file, so it is unsafe.
            qualname = f"{_describe(module)}.{_describe(name)}"
            self.findings.unsafe.setdefault(qualname, "STACK_GLOBAL")
            self.append(_inert_type(qualname))
            return
        if type(name) is not str or type(module) is not str:
            raise pickle.UnpicklingError("STACK_GLOBAL requires str")
        self._via = "STACK_GLOBAL"
        try:
            self.append(self.find_class(module, name))
        finally:
            self._via = "GLOBAL"

    for _op, _handler in ((pickle.FRAME, _load_frame), (pickle.BYTEARRAY8, _load_bytearray8),
                          (pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj),
                          (pickle.NEWOBJ_EX, _load_newobj_ex), (pickle.BUILD, _load_build),
                          (pickle.SETITEM, _load_setitem), (pickle.SETITEMS, _load_setitems),
                          (pickle.ADDITEMS, _load_additems), (pickle.APPEND, _load_append),
                          (pickle.APPENDS, _load_appends), (pickle.DICT, _load_dict),
                          (pickle.FROZENSET, _load_frozenset),
                          (pickle.STACK_GLOBAL, _load_stack_global)):
        dispatch[_op[0]] = _handler
    del _op, _handler

    def _tagged(opcode: bytes, via: str):  # noqa: N805 - builds dispatch wrappers
        original = pickle._Unpickler.dispatch[opcode[0]]  # type: ignore[attr-defined]

        def run(self):
            self._via = via
            try:
                original(self)
            finally:
                self._via = "GLOBAL"

        return run

    for _op, _via in ((pickle.INST, "INST"), (pickle.OBJ, "OBJ"), (pickle.EXT1, "EXT1"),
                      (pickle.EXT2, "EXT2"), (pickle.EXT4, "EXT4")):
        dispatch[_op[0]] = _tagged(_op, _via)
    del _op, _via, _tagged


#: What a stand-in raises where the real object would have done something.
_MISMATCH = (TypeError, AttributeError, ValueError, KeyError, IndexError)


def _describe(value: Any) -> str:
    """A short, bounded name for a value used as a callable or a global's operand (bounded:
    a chain of a million calls on call results must not build ever longer names)."""
    if isinstance(value, Opaque):
        text = value.qualname if value.qualname.endswith(")") else f"{value.qualname}(...)"
        return f"<{text[:200]}>"
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    return name[:200] if isinstance(name, str) else f"<{type(value).__name__}>"


def _called(func: Any, args: Any) -> Opaque:
    """The record of a call this reader cannot make."""
    return Opaque(f"{_describe(func)}()", args if isinstance(args, tuple) else (args,))


def _plain_pid(pid: Any) -> bool:
    """True for a persistent id made of scalars (and flat tuples of them), as torch writes."""
    if not isinstance(pid, tuple):
        return True  # the format reader rejects it cheaply
    for part in pid:
        if isinstance(part, tuple):
            if not all(p is None or isinstance(p, (str, bytes, int, float)) for p in part):
                return False
        elif isinstance(part, (list, dict, set, frozenset, bytearray, Opaque)):
            return False
    return True


def _check_keys(keys: Any) -> None:
    """Raise if any of ``keys`` is a tuple whose nested tuples expand past MAX_KEY_NODES.

    Counts with a memo by id, so a memo-shared tower of tuples costs at most MAX_KEY_NODES
    steps here, while hashing it would cost the full exponential expansion."""
    sizes: dict[int, int] = {}
    for key in keys:
        if type(key) is not tuple:
            continue
        stack: list[tuple[Any, bool]] = [(key, False)]
        while stack:
            node, done = stack.pop()
            if id(node) in sizes:
                continue
            if done:
                size = 1 + sum(sizes.get(id(c), 1) for c in node)
                if size > MAX_KEY_NODES:
                    raise pickle.UnpicklingError(
                        f"dict key or set member expands to more than {MAX_KEY_NODES} objects")
                sizes[id(node)] = size
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in node if type(c) is tuple and id(c) not in sizes)
            if len(stack) > MAX_KEY_NODES:
                raise pickle.UnpicklingError(
                    f"dict key or set member expands to more than {MAX_KEY_NODES} objects")


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
        message = f"corrupt {what}: {type(exc).__name__}: {exc}"[:300]
        if findings.unsafe:
            # pickle.load runs every opcode before the break, so a truncated or broken file
            # that names dangerous callables is unsafe first and corrupt second.
            raise UnsafePickleError(f"{message}; it names dangerous callables: "
                                    f"{', '.join(sorted(findings.unsafe))}",
                                    unsafe=sorted(findings.unsafe)) from exc
        raise IntegrityError(message) from exc


class UnsafePickleError(IntegrityError):
    """A corrupt pickle that also names dangerous callables: exits like unsafe content (5).

    An :class:`IntegrityError`, so readers that skip broken pickles (npz object arrays) still
    do, and report the names through their findings."""

    exit_code = ExitCode.UNSAFE

    def __init__(self, message: str, *, unsafe: list[str]):
        super().__init__(message, hint="Do not load it with pickle or torch.load")
        self.unsafe = unsafe


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
    values, recorders become plain Opaque state.  Bounded in depth and node count.

    A subtree the pickle shares through its memo is resolved once and shared in the result,
    but counts towards MAX_NODES as often as it is reachable: summaries and JSON output walk
    the result as a tree, so a "billion laughs" (lists of the same list, nine levels deep)
    must fail here, not hang there."""

    def __init__(self, span_for: SpanResolver | None = None):
        self.span_for = span_for
        self.nodes = 0
        self._seen: dict[int, Any] = {}
        self._weight: dict[int, int] = {}  # id of a resolved raw node -> its expanded size

    def resolve(self, value: Any, depth: int = 0) -> Any:
        """Resolve ``value``; a tree too deep for Python's own stack is an IntegrityError."""
        try:
            return self._walk(value, depth)
        except RecursionError:
            raise IntegrityError("pickle nests too deeply to walk") from None

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            raise IntegrityError(f"pickle expands to more than {MAX_NODES} objects")

    def _walk(self, value: Any, depth: int) -> Any:
        start = self.nodes
        self._count(1)
        if depth > MAX_DEPTH:
            raise IntegrityError(f"pickle nests deeper than {MAX_DEPTH} levels")
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return value
        key = id(value)
        if key in self._seen:
            self._count(self._weight.get(key, 1) - 1)  # unknown yet inside a cycle: once
            return self._seen[key]
        result = self._build(value, depth, key)
        self._seen[key] = result
        self._weight[key] = self.nodes - start
        return result

    def _build(self, value: Any, depth: int, key: int) -> Any:
        # One Python frame per level (plain loops, no generators), so MAX_DEPTH levels fit
        # in the default recursion limit.
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            self._seen[key] = out
            for k, v in value.items():
                out[self._key(k, depth)] = self._walk(v, depth + 1)
            return out
        if isinstance(value, list):
            out_list: list[Any] = []
            self._seen[key] = out_list
            for v in value:
                out_list.append(self._walk(v, depth + 1))
            return out_list
        if isinstance(value, (tuple, set, frozenset)):
            items = []
            for v in value:
                items.append(self._walk(v, depth + 1))
            if isinstance(value, tuple):
                return tuple(items)
            # Sorted for stable output; containers keep their order (repr of a shared
            # container at every nesting level would be quadratic or worse).
            return sorted(items, key=_sort_key)
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

    def _key(self, key: Any, depth: int) -> Any:
        if isinstance(key, (str, int, float, bool, bytes)) or key is None:
            return key
        # repr of the resolved key, whose size _walk has counted (a raw tuple key may hold
        # frozensets of memo-shared tuples, exponential to print).
        return repr(self._walk(key, depth + 1))

    def _span(self, storage: StorageRef) -> ByteSpan | None:
        return self.span_for(storage) if self.span_for else None

    def _tensor(self, p: _PendingTensor) -> Any:
        try:
            shape = tuple(int(s) for s in p.size)
            stride = tuple(int(s) for s in p.stride) if p.stride is not None else None
            offset = int(p.offset or 0)
        except (TypeError, ValueError):
            return Opaque("torch.Tensor")  # not the raw size/stride: they are unresolved
        if any(s < 0 for s in shape) or offset < 0:
            raise IntegrityError(f"tensor with negative size or offset {shape}/{offset}")
        storage = p.storage if isinstance(p.storage, StorageRef) else None
        if p.storage is not None and storage is None:
            return Opaque("torch.Tensor", (shape,))
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
        resolved = Opaque(name)
        self._seen[id(obj)] = resolved  # before the children: its state may refer to it
        resolved.args = tuple([self._walk(a, depth + 1) for a in obj.args])
        resolved.state = self._walk(obj.state, depth + 1)
        resolved.items = [self._walk(i, depth + 1) for i in obj.items]
        return resolved


def _sort_key(value: Any) -> tuple[int, str]:
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return (0, repr(value))
    return (1, type(value).__name__)


def _dtype_of(obj: Any) -> str:
    if (isinstance(obj, Opaque) and obj.qualname == "numpy.dtype" and obj.args
            and isinstance(obj.args[0], str)):  # never str() a container (it may be huge)
        descr = obj.args[0]
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
        try:
            dims = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            return Opaque("numpy.ndarray")
        if name == "object":
            return Opaque("numpy.ndarray[object]", (dims,))
        return TensorRef(name, dims, None, fortran_order=bool(fortran))
    return Opaque("numpy.ndarray")
