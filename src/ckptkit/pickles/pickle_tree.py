"""Turning an interpreted pickle tree into ckptkit's model: tensors, values and Opaque state.

:class:`Resolver` walks what :func:`~ckptkit.pickles.unpickler.read_pickle` returned once, bounded in
depth and size: pending tensors and storages become :class:`~ckptkit.model.TensorRef`, numpy
scalar and array records are decoded, and inert records become plain Opaque state.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from ckptkit.storage import budget
from ckptkit.errors import IntegrityError
from ckptkit.model import ByteSpan, Opaque, TensorRef, checked_shape, itemsize
from ckptkit.pickles.pickle_globals import DType, PendingTensor, StorageRef, StorageType, numpy_dtype_name

_STRUCT_CODES = {"int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i",
                 "uint32": "I", "int64": "q", "uint64": "Q", "float16": "e", "float32": "f",
                 "float64": "d", "bool": "?"}

SpanResolver = Callable[[StorageRef], ByteSpan | None]
#: The bytes of an array pickled inline: given the raw bytes value (or joblib's array
#: wrapper), where they sit in the file, if the reader recorded it.
PayloadResolver = Callable[[Any], ByteSpan | None]
#: joblib's record of an array whose bytes follow it in the stream.
JOBLIB_WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"


class Resolver:
    """Walks an interpreted tree once: pending tensors become TensorRefs, numpy records become
    values, recorders become plain Opaque state.  Bounded in depth and node count (the
    budget's ``depth`` and ``tree``: :mod:`ckptkit.storage.budget`).

    A subtree the pickle shares through its memo is resolved once and shared in the result,
    but counts towards the tree budget as often as it is reachable: summaries and JSON output
    walk the result as a tree, so a "billion laughs" (lists of the same list, nine levels
    deep) must fail here, not hang there."""

    def __init__(self, span_for: SpanResolver | None = None,
                 payload_span: PayloadResolver | None = None):
        self.span_for = span_for
        self.payload_span = payload_span or (lambda _raw: None)
        self.nodes = 0
        self._account = budget.current()
        self._max_nodes = self._account.room("tree")
        self._max_depth = self._account.limit("depth")
        self._settled = 0
        self._seen: dict[int, Any] = {}
        self._weight: dict[int, int] = {}  # id of a resolved raw node -> its expanded size

    def resolve(self, value: Any, depth: int = 0) -> Any:
        """Resolve ``value``; a tree too deep for Python's own stack is an IntegrityError."""
        try:
            return self._walk(value, depth)
        except RecursionError:
            raise IntegrityError("pickle nests too deeply to walk") from None
        finally:
            self._settle()

    def _settle(self) -> None:
        self._account.used["tree"] += self.nodes - self._settled
        self._settled = self.nodes

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > self._max_nodes:
            self.nodes = self._max_nodes  # what is left was spent (a shared subtree is counted)
            raise self._account.over("tree", "the pickle's tree, which expands memo-shared "
                                             "parts where they recur")

    def _walk(self, value: Any, depth: int) -> Any:
        start = self.nodes
        self._count(1)
        if depth > self._max_depth:
            self._account.check("depth", depth, "the pickle's tree")
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
        # One Python frame per level (plain loops, no generators), so the default depth fits
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
        if isinstance(value, PendingTensor):
            return self._tensor(value)
        if isinstance(value, Opaque):
            return self._opaque(value, depth)
        if isinstance(value, DType):
            return f"dtype:{value.name}"
        if isinstance(value, StorageRef):
            return TensorRef(value.dtype, (value.numel,), self._span(value),
                             storage_key=value.key, device=value.location)
        if isinstance(value, (StorageType, type, slice)):
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

    def _tensor(self, p: PendingTensor) -> Any:
        try:
            shape = tuple(int(s) for s in p.size)
            stride = tuple(int(s) for s in p.stride) if p.stride is not None else None
            offset = int(p.offset or 0)
        except (TypeError, ValueError, OverflowError):
            return Opaque("torch.Tensor")  # not the raw size/stride: they are unresolved
        if any(s < 0 for s in shape) or offset < 0:
            raise IntegrityError(f"tensor with negative size or offset {shape}/{offset}")
        storage = p.storage if isinstance(p.storage, StorageRef) else None
        if p.storage is not None and storage is None:
            return Opaque("torch.Tensor", (shape,))
        dtype = p.dtype or (storage.dtype if storage else "float32")
        shape = checked_shape(shape, "a tensor", dtype)
        return TensorRef(dtype, shape, self._span(storage) if storage else None, stride,
                         offset + (storage.view_offset if storage else 0),
                         storage.key if storage else None,
                         p.device or (storage.location if storage else None))

    def _opaque(self, obj: Opaque, depth: int) -> Any:
        name = obj.qualname
        if name.endswith("multiarray.scalar"):
            return _numpy_scalar(obj)
        if name.endswith("multiarray._reconstruct"):
            return _numpy_array(obj, self.payload_span)
        if name.endswith("numeric._frombuffer"):  # numpy arrays pickled at protocol 5
            return _numpy_frombuffer(obj, self.payload_span)
        if name == JOBLIB_WRAPPER:
            return _joblib_array(obj, self.payload_span)
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


def _numpy_frombuffer(obj: Opaque, payload_span: PayloadResolver) -> Any:
    """``_frombuffer(buffer, dtype, shape, order)``: an array whose bytes are in the pickle."""
    if len(obj.args) >= 3 and isinstance(obj.args[2], tuple):
        try:
            dims = tuple(int(s) for s in obj.args[2])
        except (TypeError, ValueError, OverflowError):
            return Opaque("numpy.ndarray")
        return _array(_dtype_of(obj.args[1]), dims, len(obj.args) > 3 and obj.args[3] == "F",
                      payload_span(obj.args[0]))
    return Opaque("numpy.ndarray")


def _numpy_array(obj: Opaque, payload_span: PayloadResolver) -> Any:
    state = obj.state
    if isinstance(state, tuple) and len(state) == 5:
        _version, shape, dtype, fortran, raw = state
        name = _dtype_of(dtype)
        try:
            dims = tuple(int(s) for s in shape)
        except (TypeError, ValueError, OverflowError):
            return Opaque("numpy.ndarray")
        if name == "object":
            return Opaque("numpy.ndarray[object]", (dims,))
        return _array(name, dims, bool(fortran), payload_span(raw))
    return Opaque("numpy.ndarray")


def _joblib_array(obj: Opaque, payload_span: PayloadResolver) -> Any:
    """joblib's wrapper: dtype, shape and order in its state, the bytes right after it."""
    state = obj.state if isinstance(obj.state, dict) else {}
    name = _dtype_of(state.get("dtype"))
    shape = state.get("shape")
    if name == "object" or not isinstance(shape, tuple):
        return Opaque("numpy.ndarray[object]" if name == "object" else "numpy.ndarray")
    return _array(name, shape, state.get("order") == "F", payload_span(obj))


def _array(dtype: str, dims: Any, fortran: bool, span: ByteSpan | None) -> TensorRef | Opaque:
    """A numpy array as a TensorRef; its bytes are kept only when they are exactly the
    array's (a shorter or longer payload is what numpy would refuse to load)."""
    if not itemsize(dtype):  # a dtype this reader cannot name (a damaged or exotic record)
        return Opaque("numpy.ndarray", (dtype,))
    shape = checked_shape(dims, "a numpy array", dtype)
    ref = TensorRef(dtype, shape, None, fortran_order=fortran)
    if span is not None and span.length == ref.nbytes and not dtype.endswith(">"):
        return TensorRef(dtype, shape, span, fortran_order=fortran)
    return ref
