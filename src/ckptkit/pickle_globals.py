"""The globals a restricted pickle may name, and the inert stand-ins it gets for them.

:data:`ALLOWED` maps ``(module, name)`` to what :class:`~ckptkit.unpickler.InertUnpickler`
hands the pickle instead of importing: torch tensor and storage rebuild functions become
builders of :class:`PendingTensor`, storage classes and dtypes become small markers, and a few
builtins keep their meaning but are bounded.  Nothing here imports or calls what a pickle names.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable

from ckptkit.model import Opaque

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
    if code[:1] in "USV" and code[1:].isdigit():
        # numpy's own names carry the width in bits (str64 for <U2), so sizes stay right.
        width = int(code[1:]) * (32 if code[0] == "U" else 8)
        return {"U": "str", "S": "bytes", "V": "void"}[code[0]] + str(width)
    return code


# --- objects that live only while a pickle is being interpreted -------------------------------

class AttrDict(dict):
    """A dict that also accepts attributes (torch pickles set ``_metadata`` via BUILD)."""


@dataclass(eq=False)  # hashable by identity, like the torch object
class StorageType:
    dtype: str


@dataclass(eq=False)  # hashable by identity, like the torch object
class DType:
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
class PendingTensor:
    storage: Any
    offset: Any
    size: Any
    stride: Any
    dtype: str | None = None
    device: str | None = None


def inert_type(qualname: str) -> type:
    def __new__(cls, *args, **kwargs):  # noqa: N807 - the inert stand-in for construction
        return Opaque(qualname, args + ((kwargs,) if kwargs else ()))

    return type(qualname.rpartition(".")[2] or "Inert", (), {"__new__": __new__})


def _rebuild_qtensor(storage, storage_offset, size, stride, *rest):
    """A quantized tensor: its storage is typed (QInt8Storage ...), so the dtype is known."""
    return PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *rest):
    return PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=None, hooks=None,
                       dtype=None, *rest):
    return PendingTensor(storage, storage_offset, size, stride,
                          dtype.name if isinstance(dtype, DType) else None)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_meta(dtype, size, stride, *rest):
    name = dtype.name if isinstance(dtype, DType) else "float32"
    return PendingTensor(None, 0, size, stride, name, "meta")


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
            check_keys(args[0])  # set members are hashed
        try:
            return ctor(*args)
        except (TypeError, ValueError):
            return Opaque(f"builtins.{name}", args)

    return build


def _new_dict(*args, **kwargs):
    result = AttrDict()
    if args and isinstance(args[0], (dict, list)):
        if isinstance(args[0], list):
            check_keys([p[0] for p in args[0] if isinstance(p, tuple) and p])
        try:
            result.update(args[0])
        except (TypeError, ValueError):
            pass
    return result


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _new_dict,
        ("collections", "defaultdict"): lambda *a: AttrDict(),
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
        ("builtins", "object"): inert_type("builtins.object"),  # _reconstructor's base
        ("__builtin__", "object"): inert_type("builtins.object"),
        ("copy_reg", "_reconstructor"): _reconstructor,
    }
    for name, dtype in TORCH_STORAGE_DTYPES.items():
        table[("torch", name)] = StorageType(dtype)
    # _rebuild_tensor_v3 (float8 and other new dtypes) names the untyped storage by its module.
    table[("torch.storage", "UntypedStorage")] = StorageType("uint8")
    table[("__builtin__", "complex")] = _bounded(complex, "complex")  # protocol 2 spelling
    table[("torch._utils", "_rebuild_qtensor")] = _rebuild_qtensor
    for scheme in ("per_tensor_affine", "per_channel_affine", "per_tensor_symmetric",
                   "per_channel_symmetric", "per_channel_affine_float_qparams"):
        table[("torch", scheme)] = f"torch.{scheme}"  # quantizer parameters: plain names
    for name, dtype in TORCH_DTYPES.items():
        table[("torch", name)] = DType(dtype)
    return table


ALLOWED = _allowed()
#: numpy reconstruction helpers: recorded as Opaque and turned into values afterwards.
NUMPY_BENIGN = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


def check_keys(keys: Any) -> None:
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
