"""Streaming, atomic checkpoint writers: npz, safetensors, PyTorch zip and Flax msgpack.

:func:`write` pulls ``(name, array)`` pairs one at a time and writes each before asking for
the next, so peak memory is about the largest tensor, not the model.  Output goes to a unique
temporary file beside the target, is fsynced and only then renamed over it; on any error
(including Ctrl-C) the temporary file is removed and the target is left as it was.

How each format holds the tensors and the ``metadata``:

- ``npz``: one stored ``<name>.npy`` member per tensor, names as given (Flax ``/`` keys);
  bfloat16 as numpy saves it (``|V2``), float8 as ``|V1``.  Metadata: sidecar
  ``<out>.meta.json``.
- ``safetensors``: JSON header, then one buffer ordered by element size so that every tensor
  is aligned.  Metadata: the header's ``__metadata__`` (strings).
- ``torch``: a ``torch.save`` zip of a flat state dict with 64-byte aligned storages
  (``torch.load(weights_only=True, mmap=True)`` works).  Metadata: the record
  ``extra/ckptkit_metadata.json``, which torch never opens.
- ``flax``: ``flax.serialization`` msgpack nested on ``separator``, arrays over 1 GiB chunked
  as flax chunks them.  Metadata: sidecar ``<out>.meta.json``.

The sidecar is written only when there is something to say: metadata, or dtypes that numpy
cannot name in an ``.npy`` header (float8).  A stale sidecar from an earlier write to the
same path is removed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Literal, Protocol, Sequence

import numpy as np

from ckptkit.errors import IntegrityError, NotFoundError, UsageError, disk_full
from ckptkit.storage.atomic import atomic_file

Fmt = Literal["npz", "safetensors", "torch", "flax"]
FORMATS: tuple[Fmt, ...] = ("npz", "safetensors", "torch", "flax")
#: ``(name, dtype name, shape)`` of every tensor, in the order they will arrive.
LayoutEntry = tuple[str, str, tuple[int, ...]]
SIDECAR_SUFFIX = ".meta.json"


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write` produced: the file, its format, what is in it and its size.

    ``sidecar`` is the ``<out>.meta.json`` file for formats without a metadata slot (npz,
    flax), or ``None`` when nothing needed one.
    """

    path: Path
    format: str
    tensor_count: int
    param_count: int
    bytes: int
    sidecar: Path | None = None


class TensorWriter(Protocol):
    """One output format: takes tensors one at a time, then completes the file."""

    def add(self, name: str, array: np.ndarray) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None:
        """Release what the writer holds after a failure; the output is discarded anyway."""


def write(out: str | os.PathLike[str], fmt: Fmt, tensors: Iterable[tuple[str, np.ndarray]], *,
          metadata: dict[str, str] | None = None, separator: str = "/",
          layout: Sequence[LayoutEntry] | None = None) -> WriteResult:
    """Write ``tensors`` to ``out`` in format ``fmt``, streaming and atomically.

    ``tensors`` is consumed lazily, one array at a time; the writer drops each array before
    pulling the next.  Arrays are written with their exact dtype and bytes (big-endian input
    is stored little-endian).

    Args:
        out: the file to create or replace.  Its directory must exist.
        fmt: ``"npz"``, ``"safetensors"``, ``"torch"`` or ``"flax"``.
        tensors: ``(name, numpy array)`` pairs; names must be unique and non-empty.
        metadata: string-to-string facts (step, epoch); where they go depends on ``fmt``
            (see the module docstring).
        separator: for ``flax``, the character that splits names into the nested tree.
        layout: ``(name, dtype, shape)`` of every tensor, if known in advance.  Lets
            safetensors write its header first and each tensor straight to its place, and
            flax stream when the order allows; without it both spool the bytes to an
            anonymous temporary file first (still bounded memory, twice the I/O).  Dtypes
            the format cannot hold are refused before anything is written.

    Returns:
        A :class:`WriteResult` for the completed file.

    Raises:
        UsageError: no tensors ("converting to 0 tensors is always an error"), a duplicate or
            empty name, a dtype ``fmt`` cannot hold, a tensor that contradicts ``layout``,
            ``out`` is a directory.
        NotFoundError: the directory of ``out`` does not exist.
        Anything ``tensors`` raises propagates unchanged; the target is untouched then.

    Example:
        >>> arrays = (("w", np.ones((2, 3), np.float32)), ("b", np.zeros(3, np.float32)))
        >>> write("m.safetensors", "safetensors", arrays, metadata={"step": "10"})  # doctest: +SKIP
        WriteResult(path=PosixPath('m.safetensors'), format='safetensors', tensor_count=2, ...)
    """
    target = Path(out)
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format {fmt!r}",
                         hint=f"Use one of: {', '.join(FORMATS)}")
    meta = _checked_metadata(metadata)
    if layout is not None:
        layout = [(str(n), str(d), tuple(int(s) for s in shape)) for n, d, shape in layout]
        if len({entry[0] for entry in layout}) != len(layout):
            raise UsageError("the layout names a tensor twice",
                             hint="Every tensor of a checkpoint needs its own name")
        for name, dtype, _shape in layout:
            check_name(fmt, name)
            check_dtype(fmt, name, dtype)
    sidecar: Path | None = None
    with atomic_file(target) as fh:
        writer = _open_writer(fmt, fh, target, meta, separator, layout)
        try:
            count, params, float8 = _stream(writer, fmt, tensors)
            if count == 0:
                raise UsageError(f"{target}: converting to 0 tensors is always an error",
                                 hint="Check the input and the selection (prefix, filter) used")
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        fh.flush()
        size = os.fstat(fh.fileno()).st_size
        if fmt in ("npz", "flax"):
            sidecar = _write_sidecar(target, meta, float8 if fmt == "npz" else {})
    if fmt in ("npz", "flax") and sidecar is None:
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(target).unlink()  # from an earlier write; it would describe other data
    return WriteResult(target, fmt, count, params, size, sidecar)


def _stream(writer: TensorWriter, fmt: Fmt,
            tensors: Iterable[tuple[str, np.ndarray]]) -> tuple[int, int, dict[str, str]]:
    """Feed ``tensors`` to ``writer``; returns the tensor and parameter counts and the float8
    dtypes (which npz cannot name, so its sidecar does)."""
    count = params = 0
    names: set[str] = set()
    float8: dict[str, str] = {}
    for name, array in tensors:
        array = _checked_array(fmt, name, array, names)
        writer.add(name, array)
        count += 1
        params += array.size
        if array.dtype.name.startswith("float8"):
            float8[name] = array.dtype.name
        del array  # before pulling the next one: one tensor alive at a time
    return count, params, float8


def sidecar_path(out: Path) -> Path:
    """Where the metadata of an npz or flax file written by :func:`write` lives."""
    return out.with_name(out.name + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict[str, dict[str, str]]:
    """The ``{"metadata": ..., "dtypes": ...}`` sidecar of ``path``, or ``{}`` if none."""
    from ckptkit.errors import CkptkitError
    from ckptkit.storage.location import locate

    loc = locate(path)
    sidecar = loc.sibling(loc.name + SIDECAR_SUFFIX)
    try:
        data = json.loads(sidecar.read(0, sidecar.size()).decode("utf-8"))
    except (OSError, ValueError, CkptkitError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: {str(a): str(b) for a, b in v.items()} for k, v in data.items()
            if k in ("metadata", "dtypes") and isinstance(v, dict)}


def check_dtype(fmt: Fmt, name: str, dtype: str) -> None:
    """Raise :class:`UsageError` if ``fmt`` cannot store a tensor of ``dtype``."""
    if holds(fmt, dtype):
        return
    others = [f for f in FORMATS if f != fmt and holds(f, dtype)]
    raise UsageError(f"tensor {name!r} has dtype {dtype}, which {fmt} cannot store",
                     hint=(f"Convert to {' or '.join(others)} instead" if others else
                           "No output format ckptkit writes holds this dtype"))


def check_name(fmt: Fmt, name: str) -> None:
    """Raise :class:`UsageError` if ``fmt`` cannot store a tensor called ``name``: npz member
    names and safetensors headers are UTF-8, so a name read from a pickle that holds a lone
    surrogate (bytes that were not UTF-8) fits only torch's pickle."""
    if fmt == "torch":
        return
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"tensor {name!r} has a name that is not UTF-8 text, which {fmt} "
                         "cannot store", hint="Convert --to torch, which keeps any name, or "
                         "rename the tensor with a recipe rule") from None


def holds(fmt: Fmt, dtype: str) -> bool:
    """Whether ``fmt`` can store tensors of ``dtype`` (ckptkit/numpy spelling)."""
    if fmt == "safetensors":
        from ckptkit.formats.safetensors_writer import CODES

        return dtype in CODES
    if fmt == "torch":
        from ckptkit.formats.torch_pickle import supports

        return supports(dtype)
    from ckptkit.formats.tensor_io import numpy_dtype

    try:
        kind = numpy_dtype(dtype).kind
    except IntegrityError:  # numpy has no such dtype; a missing ml_dtypes propagates
        return False
    # "V": ml_dtypes types (bfloat16, float8) report themselves as void.
    return kind in "biufcV"


def _checked_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    if not metadata:
        return {}
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise UsageError(f"metadata must map strings to strings; {bad[0]!r} does not",
                         hint="Stringify values first, e.g. json.dumps(value)")
    return dict(metadata)


def _checked_array(fmt: Fmt, name: str, array: object, seen: set[str]) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise UsageError(f"tensor names must be non-empty strings, got {name!r}")
    if name in seen:
        raise UsageError(f"tensor name {name!r} occurs twice",
                         hint="Every tensor of a checkpoint needs its own name")
    check_name(fmt, name)
    seen.add(name)
    if not isinstance(array, np.ndarray):
        raise UsageError(f"tensor {name!r} is a {type(array).__name__}, not a numpy array",
                         hint="Pass numpy arrays (torch: tensor.numpy(), jax: np.asarray(x))")
    if array.dtype.name.startswith("void"):
        raise UsageError(f"tensor {name!r} is raw void data ({array.dtype.str})",
                         hint="If it is bfloat16 or float8 as np.load returns them, pass "
                              "array.view(ml_dtypes.bfloat16) (or the float8 type)")
    check_dtype(fmt, name, array.dtype.name)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))  # every format here is little-endian
    return array


def _open_writer(fmt: Fmt, fh: BinaryIO, target: Path, metadata: dict[str, str],
                 separator: str, layout: Sequence[LayoutEntry] | None) -> TensorWriter:
    if fmt == "npz":
        from ckptkit.formats.zip_writer import NpzWriter

        return NpzWriter(fh, target)
    if fmt == "torch":
        from ckptkit.formats.zip_writer import TorchZipWriter, archive_stem

        return TorchZipWriter(fh, archive_stem(target), metadata)
    if fmt == "safetensors":
        from ckptkit.formats.safetensors_writer import SafetensorsWriter

        return SafetensorsWriter(fh, target.parent, metadata, layout)
    from ckptkit.formats.msgpack_writer import FlaxMsgpackWriter

    return FlaxMsgpackWriter(fh, target.parent, separator, layout)


def _write_sidecar(target: Path, metadata: dict[str, str],
                   dtypes: dict[str, str]) -> Path | None:
    content = {k: v for k, v in (("metadata", metadata), ("dtypes", dtypes)) if v}
    if not content:
        return None
    path = sidecar_path(target)
    with atomic_file(path) as fh:
        fh.write(json.dumps(content, indent=1, sort_keys=True).encode("utf-8") + b"\n")
    return path
