"""The chunks of a tensor stored in pieces (PyTorch DCP): reading each stored piece, gathering
them into the global tensor one tensor at a time, and checking that they tile its shape.

:mod:`ckptkit.formats.torch_dcp` registers :func:`assemble` with
:mod:`~ckptkit.formats.tensor_hooks`, so that :func:`ckptkit.formats.tensor_io.read_tensor`
gives every consumer of tensors (load, convert) the global tensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ckptkit.errors import IntegrityError, UsageError
from ckptkit.formats import chunked, tensor_io
from ckptkit.formats.chunked import ChunkedTensor, Piece
from ckptkit.model import ByteSpan, Chunk, TensorRef
from ckptkit.storage import budget
from ckptkit.storage.location import locate


def read_chunk(chunk: Chunk, dtype: str) -> np.ndarray:
    """One stored chunk as an array of ``chunk.sizes``.

    ``FileSystemWriter`` stores a chunk as a whole ``torch.save`` file at the recorded byte
    range (its default, ``SerializationFormat.TORCH_SAVE``), or, with
    ``SerializationFormat.SAFETENSORS``, as a tensor of one safetensors blob written after the
    bytes items, every chunk of the file recording where that blob starts.  Told apart by
    content.
    """
    span = chunk.span
    if chunk.transforms:
        raise UsageError(f"{span.path}: chunk stored through {'+'.join(chunk.transforms)}, "
                         "which ckptkit does not decode",
                         hint="Load it with torch.distributed.checkpoint instead")
    head = locate(span.path).read(span.offset, 9)
    if head[:4] == b"PK\x03\x04":
        return _torch_save_chunk(chunk, dtype)
    if head[8:9] == b"{":
        ref = _safetensors_chunk(chunk, dtype, int.from_bytes(head[:8], "little"))
        return tensor_io.read_tensor(ref)
    raise IntegrityError(f"{span.path}: the chunk of {chunk.name!r} at byte {span.offset} is "
                         "neither a torch.save file nor in a safetensors blob", path=span.path)


def raw_span(chunk: Chunk, dtype: str) -> ByteSpan | None:
    """The byte range holding the chunk's elements raw, little-endian and in C order: inside
    its ``torch.save`` item (a stored, uncompressed zip record) or its safetensors blob.  None
    when only decoding can read it (stream transforms, a view into a larger storage), and then
    :func:`read_chunk` does.  What lets a consolidation read each chunk straight into its place
    in the global tensor, without holding the chunk twice."""
    from ckptkit.formats.chunks import is_contiguous, tensor_range

    span = chunk.span
    if chunk.transforms:
        return None
    head = locate(span.path).read(span.offset, 9)
    if head[:4] == b"PK\x03\x04":
        inner = _torch_save_ref(chunk, dtype)
    elif head[8:9] == b"{":
        inner = _safetensors_chunk(chunk, dtype, int.from_bytes(head[:8], "little"))
    else:
        return None
    if inner.span is None or inner.span.member is not None or not is_contiguous(inner):
        return None
    start, length = tensor_range(inner)
    if start + length > inner.span.length:
        return None  # a view reaching outside its storage: read_chunk names the damage
    return ByteSpan(inner.span.path, inner.span.offset + start, length)


def _torch_save_chunk(chunk: Chunk, dtype: str) -> np.ndarray:
    return tensor_io.read_tensor(_torch_save_ref(chunk, dtype))


def _torch_save_ref(chunk: Chunk, dtype: str) -> TensorRef:
    from ckptkit.formats.torch_zip import TorchArchive

    span = chunk.span
    try:
        with TorchArchive(Path(span.path), "DCP chunk",
                          window=(span.offset, span.length)) as archive:
            inner = archive.read_object("data.pkl", "data")
    except FileNotFoundError:
        raise IntegrityError(f"{span.path}: DCP data file missing", path=span.path) from None
    if not isinstance(inner, TensorRef) or inner.shape != chunk.sizes or inner.dtype != dtype:
        got = (f"{inner.dtype}{list(inner.shape)}" if isinstance(inner, TensorRef)
               else type(inner).__name__)
        raise IntegrityError(f"{span.path}: the chunk of {chunk.name!r} at byte {span.offset} "
                             f"holds {got}, .metadata says {dtype}{list(chunk.sizes)}",
                             path=span.path)
    return inner


def _safetensors_chunk(chunk: Chunk, dtype: str, length: int) -> TensorRef:
    """Where the chunk's elements are in the safetensors blob starting at its recorded
    offset: the blob's header names it by its DCP name."""
    import json

    from ckptkit.formats.safetensors import DTYPES

    span = chunk.span
    where = locate(span.path)
    size = where.size()
    start = span.offset + 8
    if start + length > size:
        raise IntegrityError(f"{span.path}: safetensors blob at byte {span.offset} claims a "
                             f"{length}-byte header past the end of the file", path=span.path)
    budget.current().check("header", length, "a DCP safetensors blob header")
    try:
        header = json.loads(where.read(start, length))
        entry = header[chunk.name]
        begin, end = (int(x) for x in entry["data_offsets"])
        stored = DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{span.path}: safetensors blob at byte {span.offset} has no "
                             f"readable entry for {chunk.name!r} ({exc!r})",
                             path=span.path) from None
    if stored != dtype or shape != chunk.sizes or end - begin != span.length:
        raise IntegrityError(f"{span.path}: {chunk.name!r} in the safetensors blob is "
                             f"{stored}{list(shape)} ({end - begin} bytes), .metadata says "
                             f"{dtype}{list(chunk.sizes)} ({span.length} bytes)", path=span.path)
    return TensorRef(dtype, shape, ByteSpan(span.path, start + length + begin, end - begin))


def piece(chunk: Chunk, dtype: str) -> Piece:
    """``chunk`` ready to read: by its raw byte range when it has one (:func:`raw_span`), else
    through :func:`read_chunk`."""
    span = raw_span(chunk, dtype)
    if span is not None:
        return Piece(chunk.offsets, chunk.sizes, span=span, file=chunk.file)
    return Piece(chunk.offsets, chunk.sizes, read=lambda: read_chunk(chunk, dtype),
                 file=chunk.file)


def assemble(ref: TensorRef) -> np.ndarray:
    """The global tensor of ``ref``, its chunks read one at a time straight into their place
    where they are stored raw (:func:`ckptkit.formats.chunked.assemble`, which refuses chunks
    that do not tile the tensor), else decoded."""
    pieces = tuple(piece(chunk, ref.dtype) for chunk in ref.chunks)
    return chunked.assemble(ChunkedTensor(_name(ref), ref.dtype, ref.shape, pieces))


def _name(ref: TensorRef) -> str:
    return ref.chunks[0].name if ref.chunks else "tensor"


def tiling_problem(name: str, shape: tuple[int, ...], chunks: tuple[Chunk, ...]) -> str | None:
    """Why ``chunks`` do not cover ``shape`` exactly once, or None."""
    total = 0
    boxes = []
    for chunk in chunks:
        if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape):
            return f"{name!r}: chunk {list(chunk.offsets)} has another rank than {list(shape)}"
        if any(o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, shape, strict=True)):
            return (f"{name!r}: chunk at {list(chunk.offsets)} of size "
                    f"{list(chunk.sizes)} reaches outside {list(shape)}")
        boxes.append(chunk)
        total += math.prod(chunk.sizes)
    budget.current().charge("opcodes", len(boxes) * len(boxes) // 2, "DCP chunk overlap checks")
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(
                    a.offsets, a.sizes, b.offsets, b.sizes, strict=True)):
                if math.prod(a.sizes) and math.prod(b.sizes):
                    return (f"{name!r}: chunks at {list(a.offsets)} and {list(b.offsets)} "
                            "overlap")
    # Disjoint boxes inside the shape cover it exactly when their volumes add up to it.
    if total != math.prod(shape):
        return (f"{name!r}: chunks cover {total:,} of {math.prod(shape):,} elements of "
                f"{list(shape)}")
    return None
