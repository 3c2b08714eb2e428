"""A single ``.npy`` array (``numpy.save``): its header, and its bytes where they sit.

The header is a Python literal parsed with ``ast.literal_eval``
(:mod:`ckptkit.pickles.npy_header`).  An object array is a pickle that ``np.load`` runs only
with ``allow_pickle=True``; it is interpreted by the restricted reader, never loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptkit.errors import FormatError, IntegrityError, UnsafeContentError, UsageError, naming
from ckptkit.formats.tensor_io import read_tensor
from ckptkit.model import ByteSpan, Opaque, RawCheckpoint, SafetyReport, TensorRef, checked_shape
from ckptkit.pickles import plain_pickle
from ckptkit.pickles.npy_header import MAX_HEADER, NPY_MAGIC, parse_header
from ckptkit.pickles.pickle_globals import numpy_dtype_name
from ckptkit.storage.budget import metered
from ckptkit.storage.location import locate

FORMAT = "npy"


def sniff(path: Path) -> bool:
    location = locate(path)
    try:
        return location.is_file() and location.read(0, len(NPY_MAGIC)) == NPY_MAGIC
    except OSError:
        return False


def name_of(path: Path) -> str:
    """The array's name in the tree: the file's stem (``embeddings.npy`` -> ``embeddings``)."""
    return path.name[:-4] if path.name.endswith(".npy") and len(path.name) > 4 else "array"


@metered
def read_info(path: Path) -> RawCheckpoint:
    with naming(path):
        return _read(path)


def _read(path: Path) -> RawCheckpoint:
    location = locate(path)
    size = location.size()
    header, start = parse_header(location.read(0, MAX_HEADER + 12), str(path))
    descr = header["descr"]
    name = name_of(path)
    details: dict[str, Any] = {"npy_version": f"{location.read(6, 1)[0]}.0",
                               "data_offset": start}
    if descr in ("|O", "O"):
        findings, _kind = plain_pickle.analyse_npy(path)
        safety = SafetyReport(tuple(sorted(findings.objects)), tuple(sorted(findings.unsafe)),
                              findings.pickles)
        shape = checked_shape(header["shape"], f"{path}: array")
        details.update(findings.details())
        return RawCheckpoint(FORMAT, {name: Opaque("numpy.ndarray[object]", (shape,))}, (),
                             safety, details)
    if not isinstance(descr, str):
        raise IntegrityError(f"{path}: structured arrays (dtype {str(descr)[:60]}) are not "
                             "tensors", hint="Load it with numpy itself", path=str(path))
    dtype = numpy_dtype_name(descr)
    if dtype == "bfloat16?":
        dtype = "bfloat16"  # ml_dtypes' bfloat16 is saved as raw V2
    big = descr.startswith(">") and not dtype.startswith(("str", "bytes", "void"))
    shape = checked_shape(header["shape"], f"{path}: array", dtype)
    ref = TensorRef(dtype, shape, None, fortran_order=bool(header["fortran_order"]))
    if start + ref.nbytes > size:
        raise IntegrityError(
            f"{path}: truncated: the header promises {ref.nbytes:,} bytes of data, the file "
            f"has {max(0, size - start):,}", hint="The save or download was cut short; "
                                                  "save or fetch it again", path=str(path))
    if start + ref.nbytes < size:
        details["trailing_bytes"] = size - start - ref.nbytes
    ref = TensorRef(dtype, shape, ByteSpan(str(path), start, ref.nbytes),
                    fortran_order=ref.fortran_order)
    if big:
        details["byteorder"] = "big"
    return RawCheckpoint(FORMAT, {name: ref}, (((name,), ref),), SafetyReport(), details)


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: the array, as ``np.load`` gives it (object arrays are refused: loading
    them runs their pickle)."""
    if framework not in ("numpy", "jax", "flax"):
        raise UsageError(f"{path}: cannot load a .npy file as {framework!r}",
                         hint="Use framework='numpy'")
    raw = read_info(path)
    value = next(iter(raw.tree.values()))
    if isinstance(value, Opaque):
        if raw.safety.unsafe:
            raise UnsafeContentError(
                f"{path}: an object array whose pickle calls {', '.join(raw.safety.unsafe)}",
                unsafe=list(raw.safety.unsafe), path=str(path),
                hint="Run `ckpt scan` on it; do not load it")
        raise FormatError(f"{path}: an object array; loading it runs its pickle",
                          hint="np.load(..., allow_pickle=True) it yourself only if you trust "
                               "the file", path=str(path))
    with naming(path):
        return read_tensor(value, big_endian=raw.details.get("byteorder") == "big")
