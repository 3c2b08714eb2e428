"""Global tensors stored as chunks, and gathering one of them into memory.

Sharded and distributed checkpoints (PyTorch DCP, Orbax, Hugging Face shards) keep a tensor
as one or more *chunks*: boxes of the global tensor, each at its ``offsets`` with its
``sizes``, each stored somewhere.  A :class:`ChunkedCheckpoint` describes such a checkpoint
without reading any tensor byte; :func:`assemble` then builds one global tensor at a time,
which is what ``ckpt convert`` and ``ckptkit.load`` need.  A single-file checkpoint fits the
same model: every tensor is one chunk that covers it.

A chunk's data is either a byte range of a file (:class:`~ckptkit.model.ByteSpan`) holding the
chunk's elements raw, little-endian and in C order, which :func:`assemble` reads straight into
the global array in bounded pieces; or a callable returning the chunk as an array, for stores
that need a decoder (a ``torch.save``'d item, TensorStore).  Peak memory while assembling is
the global tensor plus :data:`~ckptkit.formats.chunks.CHUNK` bytes for span chunks, plus the
chunk itself for callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckptkit.errors import IntegrityError
from ckptkit.formats.chunks import CHUNK
from ckptkit.formats.tensor_io import numpy_dtype
from ckptkit.model import ByteSpan, itemsize
from ckptkit.storage.location import locate


@dataclass(frozen=True)
class Piece:
    """One chunk of a global tensor, ready to read: ``offsets`` and ``sizes`` per dimension.

    (A format's own record of a chunk, such as DCP's :class:`ckptkit.model.Chunk`, says how it
    is stored; a piece says how to read it.)  Exactly one of ``span`` (raw little-endian C-order bytes of the box) and ``read`` (returns
    the box as an array of shape ``sizes``) is set.  ``file`` names where it lives, for
    messages and for ``ckpt inspect``.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    span: ByteSpan | None = None
    read: Callable[[], np.ndarray] | None = field(default=None, compare=False, repr=False)
    file: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class ChunkedTensor:
    """A global tensor: its name (flattened, ``model.layers.0.weight`` or ``params/dense/kernel``),
    dtype (ckptkit/numpy spelling), global shape and the chunks that tile it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.numel * itemsize(self.dtype))


@dataclass(frozen=True)
class ChunkedCheckpoint:
    """A checkpoint as global tensors and their chunks (what ``ckpt convert`` consolidates).

    ``metadata`` holds plain top-level facts (``step``) as strings, ``left_out`` names the
    non-tensor entries no tensor format can carry, ``inputs`` every file the tensors are read
    from (an output must never replace one of them) and ``separator`` the character names
    are joined with.
    """

    path: Path
    format: str
    tensors: tuple[ChunkedTensor, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()
    inputs: frozenset[Path] = frozenset()
    separator: str = "."


def whole(name: str, dtype: str, shape: tuple[int, ...], read: Callable[[], np.ndarray],
          file: str = "") -> ChunkedTensor:
    """A tensor stored whole: one chunk covering it, read by ``read``."""
    return ChunkedTensor(name, dtype, tuple(shape),
                         (Piece((0,) * len(shape), tuple(shape), read=read, file=file),))


def check_tiling(tensor: ChunkedTensor) -> None:
    """Raise :class:`IntegrityError` unless the chunks tile the global tensor exactly: each
    inside it, none overlapping another, together as many elements as the tensor has."""
    rank = len(tensor.shape)
    total = 0
    for chunk in tensor.chunks:
        if len(chunk.offsets) != rank or len(chunk.sizes) != rank or any(
                o < 0 or s < 0 or o + s > d
                for o, s, d in zip(chunk.offsets, chunk.sizes, tensor.shape)):
            raise IntegrityError(f"{tensor.name}: chunk at {list(chunk.offsets)} of size "
                                 f"{list(chunk.sizes)} lies outside the tensor's shape "
                                 f"{list(tensor.shape)}{_where(chunk)}",
                                 hint="The checkpoint's metadata is corrupt; run `ckpt verify`")
        total += chunk.numel
    if total != tensor.numel or _overlap(tensor.chunks):
        raise IntegrityError(f"{tensor.name}: its {len(tensor.chunks)} chunk(s) do not tile the "
                             f"shape {list(tensor.shape)} ({total:,} of {tensor.numel:,} elements"
                             f"{', overlapping' if total >= tensor.numel else ''})",
                             hint="A rank's data is missing or duplicated; run `ckpt verify`")


def _overlap(chunks: tuple[Piece, ...]) -> bool:
    # Sorted by the first offset, a chunk can only overlap the ones that start before its end.
    boxes = sorted((c for c in chunks if c.numel), key=lambda c: c.offsets)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a.offsets and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            if all(bo < ao + asz and ao < bo + bsz for ao, asz, bo, bsz in
                   zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                return True
    return False


def assemble(tensor: ChunkedTensor) -> np.ndarray:
    """The global tensor as one array, gathered from its chunks (see the module docstring).

    Raises:
        IntegrityError: the chunks do not tile the tensor, a chunk's byte range does not hold
            its elements, a file ends early, or a decoded chunk has another shape or dtype.
    """
    dtype = numpy_dtype(tensor.dtype)
    check_tiling(tensor)
    chunks = tensor.chunks
    if len(chunks) == 1 and chunks[0].read is not None:
        return _decoded(tensor, chunks[0], dtype)  # whole already: no second copy
    out = np.empty(tensor.shape, dtype)
    for chunk in chunks:
        if not chunk.numel:
            continue
        # Ellipsis first: a 0-d tensor's region stays a view, not a copied scalar.
        region = out[(..., *(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes)))]
        if chunk.read is not None:
            region[...] = _decoded(tensor, chunk, dtype)
            continue
        if chunk.span is None:
            raise IntegrityError(f"{tensor.name}: a chunk has neither bytes nor a reader"
                                 f"{_where(chunk)}")
        _read_span(tensor, chunk, chunk.span, region)
    return out


def _decoded(tensor: ChunkedTensor, chunk: Piece, dtype: np.dtype) -> np.ndarray:
    array = np.asarray(chunk.read())  # type: ignore[misc]
    if tuple(array.shape) != tuple(chunk.sizes) or array.dtype != dtype:
        raise IntegrityError(f"{tensor.name}: a chunk read as {array.dtype.name}"
                             f"{list(array.shape)}, its metadata says {tensor.dtype}"
                             f"{list(chunk.sizes)}{_where(chunk)}",
                             hint="The checkpoint is corrupt; run `ckpt verify`")
    return array


def _read_span(tensor: ChunkedTensor, chunk: Piece, span: ByteSpan, region: np.ndarray) -> None:
    want = chunk.numel * region.dtype.itemsize
    if span.length != want:
        raise IntegrityError(f"{span.path}: {tensor.name} chunk at {list(chunk.offsets)} "
                             f"needs {want:,} bytes, its record says {span.length:,}",
                             hint="The checkpoint is corrupt; run `ckpt verify`", path=span.path)
    if span.member is not None:
        raise IntegrityError(f"{span.path}: {tensor.name}: a chunk inside a zip member must be "
                             "given as a reader, not a byte range", path=span.path)
    with locate(span.path).open() as fh:
        fh.seek(span.offset)
        _place(fh, region, span)


def _place(fh, region: np.ndarray, span: ByteSpan) -> None:
    """Read ``region``'s elements (C order) from ``fh``: straight into the array when the
    region is contiguous in it, else in pieces of at most :data:`CHUNK` bytes."""
    if region.flags.c_contiguous:
        _fill(fh, memoryview(region.reshape(-1).view(np.uint8)), span)
        return
    row = math.prod(region.shape[1:]) * region.dtype.itemsize
    if row > CHUNK:
        for i in range(region.shape[0]):
            _place(fh, region[i], span)
        return
    step = max(1, CHUNK // max(row, 1))
    buffer = np.empty(step * row, np.uint8)
    for start in range(0, region.shape[0], step):
        rows = min(step, region.shape[0] - start)
        piece = buffer[:rows * row]
        _fill(fh, memoryview(piece), span)
        region[start:start + rows] = piece.view(region.dtype).reshape((rows, *region.shape[1:]))


def _fill(fh, view: memoryview, span: ByteSpan) -> None:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise IntegrityError(f"{span.path}: file ends {len(view) - got:,} bytes before a "
                                 "chunk does (truncated?)", hint="Re-copy or re-save it; "
                                 "`ckpt verify` lists every damaged file", path=span.path)
        got += n


def _where(chunk: Piece) -> str:
    return f" (in {chunk.file})" if chunk.file else ""


__all__ = ["ChunkedCheckpoint", "ChunkedTensor", "Piece", "assemble", "check_tiling", "whole"]
