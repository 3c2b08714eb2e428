"""GGUF files (llama.cpp): the reader verbs over :mod:`~ckptkit.formats.gguf_header`.

Only the header is read (metadata, chat template included, and every tensor's type, shape
and byte range; see :mod:`~ckptkit.formats.gguf_header`).  Tensor bytes are read only to
load or convert: plain types as stored, Q8_0 dequantized to float32, other quantized types
refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ckptkit.errors import FormatError, IntegrityError, UsageError
from ckptkit.formats.gguf_header import (MAGIC, Header, TensorInfo, check_layout, ggml_types,
                                         parse_header, read_header)
from ckptkit.model import ByteSpan, Problem, RawCheckpoint, TensorRef
from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.storage.location import locate

__all__ = ["FORMAT", "sniff", "read_header", "read_info", "verify", "load", "dequantized",
           "converted_dtype", "tensor_reader"]

FORMAT = "gguf"
#: Metadata arrays longer than this are shown as a summary (type, count, first items).
SHOWN_ITEMS = 8


def sniff(path: Path) -> bool:
    try:
        location = locate(path)
        return location.is_file() and location.read(0, 4) == MAGIC
    except (OSError, ValueError):
        return False


def verify(path: str | Path, *, hashes: bool = False) -> list[Problem]:
    """Check tensor data offsets and alignment against the file size.

    GGUF stores no checksums: with ``hashes=True`` every tensor's bytes are read as well, so
    an unreadable stretch of the file is found.  A header that cannot be parsed is one
    problem of kind ``corrupt``.

    Raises:
        NotFoundError: no such file.
    """
    location = locate(path)
    location.size()  # NotFoundError for a missing file
    with budget.reading(path):
        try:
            header = parse_header(location)
        except IntegrityError as exc:
            return [Problem(str(location), "corrupt", str(exc))]
    problems = check_layout(header)
    if hashes and not problems:
        for t in header.tensors:
            start, left = header.data_offset + t.offset, t.nbytes
            while left:
                chunk = location.read(start, min(left, 8 << 20))
                if not chunk:
                    problems.append(Problem(str(location), "truncated",
                                            f"{location}: tensor {t.name!r} cannot be read "
                                            f"past byte {start:,}"))
                    break
                start, left = start + len(chunk), left - len(chunk)
    return problems


def shown_metadata(header: Header) -> dict[str, Any]:
    """The metadata as plain values for display and JSON: long arrays summarised as
    ``{"type", "count", "first"}``, numbers as Python numbers."""
    out: dict[str, Any] = {}
    for key, value in header.metadata.items():
        if isinstance(value, np.ndarray):
            value = value.tolist() if value.size <= SHOWN_ITEMS else {
                "type": header.value_types[key], "count": int(value.size),
                "first": value[:3].tolist()}
        elif isinstance(value, list) and len(value) > SHOWN_ITEMS:
            value = {"type": header.value_types[key], "count": len(value), "first": value[:3]}
        out[key] = value
    return out


def tensor_ref(header: Header, info: TensorInfo) -> TensorRef:
    return TensorRef(info.type.dtype, info.shape,
                     ByteSpan(header.path, header.data_offset + info.offset, info.nbytes))


@metered
def read_info(path: Path) -> RawCheckpoint:
    header = read_header(path)
    tree: dict[str, Any] = {}
    tensors = []
    types: dict[str, int] = {}
    for info in header.tensors:
        ref = tensor_ref(header, info)
        tree[info.name] = ref
        tensors.append((info.name, ref))
        types[info.type.name] = types.get(info.type.name, 0) + 1
    details: dict[str, Any] = {
        "gguf_version": header.version, "architecture": header.architecture,
        "alignment": header.alignment, "data_offset": header.data_offset,
        "tensor_types": types, "metadata": shown_metadata(header),
    }
    if header.byteorder == "big":
        details["byteorder"] = "big"
    return RawCheckpoint(FORMAT, tree, tuple(tensors), details=details)


def dequantized(ref: TensorRef, name: str, *, big_endian: bool = False) -> np.ndarray:
    """The values of a tensor as an array: plain types as stored, ``q8_0`` dequantized to
    float32 (a float16 scale times 32 signed bytes per block).

    Raises:
        FormatError: any other quantized type (naming it and what can be converted).
    """
    from ckptkit.formats.tensor_io import read_bytes, read_tensor

    if ref.dtype != "q8_0":
        _refuse_packed(ref, name)
        return read_tensor(ref, big_endian=big_endian)
    order = ">" if big_endian else "<"
    blocks = np.frombuffer(read_bytes(ref), dtype=np.dtype([("d", order + "f2"),
                                                            ("qs", "i1", (32,))]))
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN or inf scale stays one
        values = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
    return values.reshape(ref.shape)


def converted_dtype(ref: TensorRef, name: str) -> str:
    """The dtype ``ref`` has once converted: itself, or float32 for Q8_0.

    Raises:
        FormatError: another quantized type (see :func:`dequantized`).
    """
    if ref.dtype == "q8_0":
        return "float32"
    _refuse_packed(ref, name)
    return ref.dtype


def _refuse_packed(ref: TensorRef, name: str) -> None:
    if ref.dtype in {t.dtype for t in ggml_types().values() if t.quantized}:
        where = f"{ref.span.path}: " if ref.span is not None else ""
        raise FormatError(f"{where}tensor {name!r} is quantized as {ref.dtype.upper()}, which "
                         "ckptkit does not dequantize (it converts F32, F16, BF16, F64, "
                         "integer and Q8_0 tensors)",
                         hint="Convert with llama.cpp's tools, or re-export the model "
                              "unquantized")


def tensor_reader(path: Path) -> Any:
    """Each tensor's values (:func:`dequantized`), for ``convert``."""
    big = read_header(path).byteorder == "big"
    return lambda name, ref: dequantized(ref, name, big_endian=big)


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: a dict of arrays, Q8_0 dequantized to float32; other quantized types are
    refused (see :func:`dequantized`)."""
    if framework != "numpy":
        raise UsageError(f"{path}: cannot load GGUF as {framework!r}",
                         hint="Use framework='numpy', or llama.cpp for inference")
    raw = read_info(path)
    big = raw.details.get("byteorder") == "big"
    return {name: dequantized(ref, name, big_endian=big) for name, ref in raw.tensors}
