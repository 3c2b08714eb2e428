"""Reading a lazy tensor's bytes into a numpy array, on demand and one tensor at a time.

A view that expands its storage (a broadcast: ``torch.zeros(1).expand(40000, 40000)`` keeps
four bytes and strides of 0) stays a view: :func:`read_tensor` returns it read-only over the
storage's bytes, as torch would.  Only :func:`materialised` writes out every element, and it
charges the bytes beyond what the storage holds to the reading budget first (``expanded``:
:mod:`ckptkit.storage.budget`), so four bytes cannot become 6.4 GB.  Bytes inflated from a compressed
member are charged as ``decompressed``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptkit.storage import budget
from ckptkit.errors import IntegrityError, MissingDependencyError
from ckptkit.formats.ziparchive import ZIP_ERRORS, zip_of
from ckptkit.storage.location import locate
from ckptkit.model import ByteSpan, TensorRef, itemsize

_NATIVE = {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
           "float16", "float32", "float64", "complex64", "complex128"}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a ckptkit dtype name; extended floats come from ``ml_dtypes``."""
    if name in _NATIVE:
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise MissingDependencyError("ml_dtypes", None, f"reading {name} tensors") from None
    if not hasattr(ml_dtypes, name):
        raise IntegrityError(f"dtype {name} cannot be read into numpy")
    return np.dtype(getattr(ml_dtypes, name))


def read_bytes(ref: TensorRef) -> bytes | memoryview:
    """The raw bytes of the tensor's whole span (a storage, for torch tensors)."""
    if ref.span is None:
        raise IntegrityError("tensor has no bytes in the file (meta tensor or inline value)",
                             hint="Leave that tensor out: there are no values to read")
    return read_span(ref.span)


def read_span(span: ByteSpan) -> bytes | memoryview:
    """The bytes ``span`` names: in a file, a zip member or a compressed stream."""
    if span.compression is not None:
        from ckptkit.pickles.pickle_streams import read_inflated

        data = read_inflated(span.path, span.offset, span.length)
    elif span.member is None:
        loc = locate(span.path)
        # A read allocates all it is asked for before it reads: ask only for what the file
        # holds, so a damaged length costs nothing.
        left = max(0, loc.size() - span.offset)
        data = loc.read(span.offset, min(span.length, left))
    else:
        budget.current().charge("decompressed", span.offset + span.length,
                                f"member {span.member!r}")
        try:
            with zip_of(span.path) as archive, archive.open(span.member) as member:
                if span.offset:
                    member.read(span.offset)
                data = member.read(span.length)
        except (*ZIP_ERRORS, KeyError) as exc:
            raise IntegrityError(f"{span.path}: cannot read zip member {span.member!r} "
                                 f"({exc})", hint="The file is truncated or corrupt",
                                 path=span.path) from None
    if len(data) != span.length:
        raise IntegrityError(f"{span.path}: expected {span.length} bytes at offset "
                             f"{span.offset}, found {len(data)} (file truncated?)")
    return data


def read_tensor(ref: TensorRef, *, big_endian: bool = False) -> np.ndarray:
    """``ref`` as a numpy array that owns its memory; an expanding view (see
    :func:`expansion`) as a read-only view of its storage instead, never copied."""
    view = tensor_view(ref, big_endian=big_endian)
    return view if expansion(ref) else view.copy()


def tensor_view(ref: TensorRef, *, big_endian: bool = False) -> np.ndarray:
    """``ref`` as a read-only view, in native byte order, of its storage's bytes (read whole
    from the file; swapped whole first for a big-endian file)."""
    if ref.chunks:
        view = _gathered(ref)
        view.flags.writeable = False
        return view
    dtype = numpy_dtype(ref.dtype)
    if big_endian:
        dtype = dtype.newbyteorder(">")
    flat = np.frombuffer(read_bytes(ref), dtype=dtype)
    if big_endian:
        flat = flat.astype(dtype.newbyteorder("="))
        flat.flags.writeable = False
    if ref.stride is not None:
        return _strided(flat, ref)
    count = ref.numel
    start = ref.element_offset
    if start + count > flat.size:
        raise IntegrityError(f"{_where(ref)}tensor of {count} elements overruns its storage "
                             f"of {flat.size}")
    return flat[start:start + count].reshape(ref.shape, order="F" if ref.fortran_order else "C")


def _gathered(ref: TensorRef) -> np.ndarray:
    from ckptkit.formats import tensor_hooks

    if tensor_hooks.chunk_reader is None:
        raise IntegrityError("tensor is stored in chunks and no reader for them is loaded")
    return tensor_hooks.chunk_reader(ref)


def expansion(ref: TensorRef) -> int:
    """Bytes the tensor has beyond what its storage holds: above 0 only for a view whose
    elements overlap (a broadcast, stride 0), which materialising would write out."""
    return max(0, ref.nbytes - (ref.span.length if ref.span is not None else 0)) \
        if ref.stride is not None else 0


def materialised(ref: TensorRef, name: str, *, big_endian: bool = False) -> np.ndarray:
    """``ref`` with every element in memory (what a writer needs), C-contiguous.

    Raises:
        BudgetError: the view expands past the budget's ``expanded`` bytes (the message names
            the tensor, its shape and the bytes it would take).
    """
    extra = expansion(ref)
    if extra:
        budget.current().charge(
            "expanded", extra, f"tensor {name!r}, a {ref.dtype}{list(ref.shape)} view of "
            f"{ref.span.length if ref.span else 0:,} stored bytes that would take {ref.nbytes:,}")
    array = read_tensor(ref, big_endian=big_endian)  # a C-ordered copy, unless a view
    return array.copy() if extra else array


def _strided(flat: np.ndarray, ref: TensorRef) -> np.ndarray:
    if ref.numel == 0:
        return np.zeros(ref.shape, dtype=flat.dtype)
    stride = ref.stride or ()
    if len(stride) != len(ref.shape):
        raise IntegrityError(f"{_where(ref)}tensor of shape {ref.shape} has stride {stride} of "
                             "another rank")
    last = ref.element_offset + sum((s - 1) * st for s, st in zip(ref.shape, stride, strict=True))
    if ref.element_offset < 0 or last >= flat.size or any(st < 0 for st in stride):
        raise IntegrityError(f"{_where(ref)}tensor view (offset {ref.element_offset}, stride "
                             f"{ref.stride}) reaches outside its storage of {flat.size} elements")
    size = int(itemsize(ref.dtype))
    base = flat[ref.element_offset:]
    # as_strided goes through the array interface, which cannot spell ml_dtypes' types
    # (bfloat16, float8): stride over same-width integers and view the result back.
    plain = ref.dtype in _NATIVE
    strided = np.lib.stride_tricks.as_strided(
        base if plain else base.view(f"u{size}"), shape=ref.shape,
        strides=tuple(st * size for st in stride), writeable=False)
    return strided if plain else strided.view(flat.dtype)


def _where(ref: TensorRef) -> str:
    """``"<file>: "`` for messages about a tensor, so that they name the file it came from."""
    return f"{ref.span.path}: " if ref.span is not None else ""


def materialise(tree: Any, *, big_endian: bool = False) -> Any:
    """A copy of ``tree`` with every TensorRef replaced by its numpy array."""
    if isinstance(tree, TensorRef):
        return read_tensor(tree, big_endian=big_endian)
    if isinstance(tree, dict):
        return {k: materialise(v, big_endian=big_endian) for k, v in tree.items()}
    if isinstance(tree, list):
        return [materialise(v, big_endian=big_endian) for v in tree]
    if isinstance(tree, tuple):
        return tuple(materialise(v, big_endian=big_endian) for v in tree)
    return tree
