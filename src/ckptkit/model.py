"""The typed model of a checkpoint that every format reader returns.

A checkpoint is a tree of plain values (dicts, lists, numbers, strings), lazy tensors
(:class:`TensorRef`: dtype, shape and where the bytes live, never the bytes themselves) and
opaque objects (:class:`Opaque`: a class the file names, recorded instead of constructed).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

FormatName = Literal[
    "torch-zip", "torch-legacy", "torchscript", "npz", "safetensors",
    "savedmodel", "tf-checkpoint", "flax-msgpack", "gguf", "onnx", "keras", "keras-h5",
    "orbax", "deepspeed", "pickle", "npy", "hf-sharded", "torch-dcp",
]

#: Bytes per element for every dtype ckptkit names (numpy spelling).
ITEMSIZE: dict[str, float] = {
    "bool": 1, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4,
    "uint64": 8, "int64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1, "qint8": 1, "quint8": 1, "qint32": 4,
    "quint4x2": 1, "quint2x4": 1, "int4": 0.5, "uint4": 0.5, "int2": 0.25, "uint2": 0.25,
    "float4_e2m1fn": 0.5, "string": 0, "resource": 0, "variant": 0,
}


@functools.cache
def packed_types() -> dict[str, tuple[int, int]]:
    """Packed (block-quantized) dtypes: ``name -> (elements per block, bytes per block)``.

    GGUF's quantized types (``q4_0``, ``q8_0``, ``iq2_xxs``...), read from the table
    ``data/ggml_types.toml``; a tensor of such a dtype has ``numel`` parameters stored in
    ``numel / block * size`` bytes.
    """
    import tomllib
    from importlib import resources

    table = tomllib.loads((resources.files("ckptkit") / "data" / "ggml_types.toml").read_text())
    return {t["dtype"]: (t["block"], t["size"]) for t in table["types"].values()
            if t["dtype"] not in ITEMSIZE}


def itemsize(dtype: str) -> float:
    """Bytes per element of ``dtype``; 0 for dtypes without a fixed size (TF strings).

    numpy's fixed-width names (``str64``, ``bytes8``, ``void128``) carry their width in bits;
    packed types (:func:`packed_types`) take a fraction of a byte per element (``q4_0``: 18
    bytes per 32 elements).
    """
    if dtype in ITEMSIZE:
        return ITEMSIZE[dtype]
    packed = packed_types().get(dtype)
    if packed is not None:
        return packed[1] / packed[0]
    for prefix in ("str", "bytes", "void"):
        if dtype.startswith(prefix) and dtype[len(prefix):].isdigit():
            return int(dtype[len(prefix):]) / 8
    return 0


#: numpy's limits on an array: dimensions, and elements times itemsize below 2**63.
MAX_RANK = 64
_MAX_NBYTES = (1 << 63) - 1


def checked_shape(dims: Any, what: str, dtype: str | None = None) -> tuple[int, ...]:
    """``dims`` as a shape: whole numbers from 0 up, at most :data:`MAX_RANK` of them, whose
    product (zero dimensions aside) times the itemsize fits an array (below 2**63 bytes).

    Every reader turns a shape read from a file into a tuple through here, so a 5000-digit
    dimension, ``inf``, ``"0x10"`` or 17 x 2**62 elements is one clear error, not a crash in
    numpy or ``int()`` later on.

    Raises:
        IntegrityError: naming ``what`` (the tensor or entry) and the shape as read.
    """
    from ckptkit.errors import IntegrityError

    def bad(why: str) -> IntegrityError:
        shown = repr(dims) if len(repr(dims)) <= 120 else repr(dims)[:117] + "..."
        return IntegrityError(f"{what} has a malformed shape {shown}: {why}",
                              hint="The file is corrupt or crafted; do not load it")

    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__len__"):
        raise bad("not a list of dimensions")
    if len(dims) > MAX_RANK:
        raise bad(f"{len(dims)} dimensions, more than the {MAX_RANK} an array can have")
    shape = []
    for dim in dims:
        if isinstance(dim, bool):
            raise bad("each dimension must be a whole number")
        if not isinstance(dim, int):
            try:
                dim = operator.index(dim)  # numpy integers
            except TypeError:
                raise bad("each dimension must be a whole number") from None
        if dim < 0:
            raise bad("dimensions cannot be negative")
        shape.append(int(dim))
    width = max(1, math.ceil(itemsize(dtype))) if dtype else 1
    if math.prod(max(d, 1) for d in shape) * width > _MAX_NBYTES:
        raise bad("no array can be that large (2**63 bytes or more)")
    return tuple(shape)


@dataclass(frozen=True)
class ByteSpan:
    """Where a tensor's bytes live: a byte range of a file, of a member inside a zip, or of
    the stream a compressed file (joblib's zlib, gzip, ...) inflates to (``compression``
    names the codec; ``offset`` then counts inflated bytes)."""

    path: str
    offset: int
    length: int
    member: str | None = None
    compression: str | None = None


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor split across files (a DCP chunk written by one rank).

    ``offsets`` and ``sizes`` place the piece in the global tensor (elements per dimension);
    ``span`` is the stored item (a whole ``torch.save`` file, or the raw elements);
    ``transforms`` the stream transforms DCP applied to it (``stream.zstd/1``...), outermost
    first, empty when stored as is; ``name`` the key it is stored under (DCP's flattened name).
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    span: ByteSpan
    transforms: tuple[str, ...] = ()
    name: str = ""

    @property
    def file(self) -> str:
        """The name of the file holding the chunk (``__1_0.distcp``)."""
        return self.span.path.replace("\\", "/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class TensorRef:
    """A tensor known by its metadata only; the bytes stay on disk until asked for.

    ``stride`` and ``element_offset`` are in elements (PyTorch semantics); ``None`` stride means
    C-contiguous.  ``storage_key`` names the storage shared by views of one buffer.

    Tensors of multi-file checkpoints say where they live: ``file`` is the shard holding the
    tensor, relative to the checkpoint (``model-00002-of-00005.safetensors``); a tensor stored
    in pieces has no ``span`` but ``chunks`` (see :class:`Chunk`), which tile its shape.
    """

    dtype: str
    shape: tuple[int, ...]
    span: ByteSpan | None = None
    stride: tuple[int, ...] | None = None
    element_offset: int = 0
    storage_key: str | None = None
    device: str | None = None
    fortran_order: bool = False
    file: str | None = None
    chunks: tuple[Chunk, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        packed = packed_types().get(self.dtype) if self.dtype not in ITEMSIZE else None
        if packed is not None:  # whole blocks: exact for any size
            return -(-self.numel // packed[0]) * packed[1]
        return math.ceil(self.numel * itemsize(self.dtype))  # 4-bit types: whole bytes


@dataclass
class Opaque:
    """An object the file asks to construct (or a callable it asks to call), never executed.

    ``qualname`` is ``module.Name`` as written in the file; ``args`` the constructor or call
    arguments; ``state`` what ``BUILD``/``__setstate__`` would have received.
    """

    qualname: str
    args: tuple[Any, ...] = ()
    state: Any = None
    items: list[Any] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<object {self.qualname}>"

    # The pickle machine fills containers through these; they only record.
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def add(self, item: Any) -> None:
        self.items.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a signature (SavedModel inputs/outputs)."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    tensor_name: str = ""


@dataclass(frozen=True)
class Signature:
    """A callable entry point of a SavedModel, e.g. ``serving_default``."""

    key: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    method: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class SafetyReport:
    """What the restricted reader found: classes it recorded and callables it refused."""

    objects: tuple[str, ...] = ()
    unsafe: tuple[str, ...] = ()
    pickles: int = 0

    def merged(self, other: SafetyReport) -> SafetyReport:
        return SafetyReport(
            objects=tuple(sorted(set(self.objects) | set(other.objects))),
            unsafe=tuple(sorted(set(self.unsafe) | set(other.unsafe))),
            pickles=self.pickles + other.pickles,
        )


@dataclass(frozen=True)
class RawCheckpoint:
    """What a format reader returns: the tree plus format facts, before any summarising.

    ``tensors`` lists every tensor with its display name in file order; ``separator`` is the
    character the format joins nested names with (used to build the module tree).
    """

    format: FormatName
    tree: Any
    tensors: tuple[tuple[str, TensorRef], ...]
    safety: SafetyReport = SafetyReport()
    details: dict[str, Any] = field(default_factory=dict)
    signatures: tuple[Signature, ...] = ()
    separator: str = "."


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint, found by a reader's ``verify`` verb.

    Attributes:
        file: the file (or directory) at fault, as the user would name it.
        kind: a short stable tag for tools (``missing-shard``, ``truncated``,
            ``out-of-range``, ``not-tiled``, ``stray-shard``, ``duplicate``, ``hash-mismatch``...).
        message: one line for people, with concrete values.
    """

    file: str
    kind: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "kind": self.kind, "message": self.message}
