"""The ``data.pkl`` of a PyTorch zip checkpoint, written opcode by opcode without torch.

The pickle is what ``torch.save(state_dict)`` writes for a flat dict of tensors, and only what
``torch.load(weights_only=True)`` accepts: each value is ``torch._utils._rebuild_tensor_v2``
applied to a persistent id ``('storage', torch.<X>Storage, key, 'cpu', numel)``, an offset,
size, stride, ``requires_grad=False`` and empty backward hooks.  Dtypes without a legacy
storage class (uint16/32/64, float8) are written the way torch writes them too: an
``UntypedStorage`` sized in bytes and ``_rebuild_tensor_v3`` with the dtype as its last
argument.

Opcodes are emitted directly rather than through ``pickle.Pickler``: pickling needs the real
torch objects (or stand-ins that fake their module), and the emitter is shorter than either.
"""

from __future__ import annotations

import math
import pickle
import struct
from dataclasses import dataclass
from typing import Sequence

from ckptkit.model import itemsize

#: dtype -> the storage class ``torch.save`` names for it.
LEGACY_STORAGES = {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage",
    "bool": "BoolStorage", "complex64": "ComplexFloatStorage",
    "complex128": "ComplexDoubleStorage",
}
#: dtypes torch saves as untyped (byte) storages plus an explicit ``torch.<dtype>``.
UNTYPED_DTYPES = frozenset({
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu",
})
#: Keys per SETITEMS, as pickle itself batches them.
_BATCH = 1000


def supports(dtype: str) -> bool:
    """Whether a tensor of ``dtype`` can be written to a torch checkpoint."""
    return dtype in LEGACY_STORAGES or dtype in UNTYPED_DTYPES


@dataclass(frozen=True)
class StoredTensor:
    """A state-dict entry: its name, dtype, shape and the ``data/<key>`` record of its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    key: str


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides in elements, as torch computes them (sizes of 0 count as 1)."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def state_dict_pickle(tensors: Sequence[StoredTensor]) -> bytes:
    """Protocol-2 pickle of ``{name: tensor}`` for ``tensors``, in their order."""
    out = _Emitter()
    out.op(pickle.PROTO + b"\x02")
    out.op(pickle.EMPTY_DICT)
    for start in range(0, len(tensors), _BATCH):
        out.op(pickle.MARK)
        for tensor in tensors[start:start + _BATCH]:
            out.text(tensor.name)
            _tensor(out, tensor)
        out.op(pickle.SETITEMS)
    out.op(pickle.STOP)
    return bytes(out.buffer)


def _tensor(out: _Emitter, tensor: StoredTensor) -> None:
    legacy = LEGACY_STORAGES.get(tensor.dtype)
    elements = math.prod(tensor.shape)
    if legacy is not None:
        rebuild, storage, count = "_rebuild_tensor_v2", ("torch", legacy), elements
    else:
        nbytes = int(elements * itemsize(tensor.dtype))
        rebuild, storage, count = "_rebuild_tensor_v3", ("torch.storage", "UntypedStorage"), nbytes
    out.global_("torch._utils", rebuild)
    out.op(pickle.MARK)
    out.op(pickle.MARK)  # the persistent id of the storage
    out.text("storage")
    out.global_(*storage)
    out.text(tensor.key)
    out.text("cpu")
    out.int_(count)
    out.op(pickle.TUPLE)
    out.op(pickle.BINPERSID)
    out.int_(0)  # storage offset: every tensor has a storage of its own
    out.ints(tensor.shape)
    out.ints(contiguous_strides(tensor.shape))
    out.op(pickle.NEWFALSE)  # requires_grad
    out.global_("collections", "OrderedDict")  # backward hooks: an empty OrderedDict
    out.op(pickle.EMPTY_TUPLE)
    out.op(pickle.REDUCE)
    if legacy is None:
        out.global_("torch", tensor.dtype)
    out.op(pickle.TUPLE)
    out.op(pickle.REDUCE)


class _Emitter:
    """Appends opcodes to a buffer; globals are memoised so each is spelled out once."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._memo: dict[tuple[str, str], int] = {}

    def op(self, code: bytes) -> None:
        self.buffer += code

    def global_(self, module: str, name: str) -> None:
        index = self._memo.get((module, name))
        if index is not None:
            self.op(pickle.BINGET + bytes([index]) if index < 256
                    else pickle.LONG_BINGET + struct.pack("<I", index))
            return
        index = self._memo[(module, name)] = len(self._memo)
        self.op(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.op(pickle.BINPUT + bytes([index]) if index < 256
                else pickle.LONG_BINPUT + struct.pack("<I", index))

    def text(self, value: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        self.op(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

    def int_(self, value: int) -> None:
        if 0 <= value < 0x100:
            self.op(pickle.BININT1 + bytes([value]))
        elif 0 <= value < 0x10000:
            self.op(pickle.BININT2 + struct.pack("<H", value))
        elif -0x80000000 <= value < 0x80000000:
            self.op(pickle.BININT + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.op(pickle.LONG1 + bytes([len(data)]) + data)

    def ints(self, values: Sequence[int]) -> None:
        """A tuple of ints, with the short tuple opcodes pickle uses."""
        if not values:
            self.op(pickle.EMPTY_TUPLE)
            return
        if len(values) > 3:
            self.op(pickle.MARK)
        for value in values:
            self.int_(int(value))
        self.op({1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(values),
                                                                          pickle.TUPLE))
