"""NumPy ``.npz`` archives (JAX/Flax checkpoints such as MUSIQ's, keys joined with ``/``).

Only each member's ``.npy`` header is read (for deflated members, only its first bytes are
inflated).  Object arrays are pickles: they are never loaded, only interpreted by the restricted
reader so that what they would construct or call is reported.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any

from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.storage.location import Location, locate
from ckptkit.errors import FormatError, IntegrityError, UnsafeContentError, UsageError
from ckptkit.formats import ziparchive
from ckptkit.model import ByteSpan, Opaque, RawCheckpoint, SafetyReport, TensorRef, checked_shape
from ckptkit.pickles.pickle_globals import numpy_dtype_name
from ckptkit.pickles.npy_header import MAX_HEADER, NPY_MAGIC, parse_header
from ckptkit.pickles.unpickler import Findings, read_pickle

FORMAT = "npz"


def sniff(path: Path | Location) -> bool:
    path = locate(path)
    if not ziparchive.is_zip(path):
        return False
    try:
        with ziparchive.zip_of(path) as archive:
            names = archive.namelist()
    except (*ziparchive.ZIP_ERRORS, ValueError):
        # Truncated: the central directory is gone, but the first record still names a .npy.
        return ziparchive.first_member_name(path).endswith(".npy")
    return bool(names) and all(n.endswith(".npy") for n in names)


def _read_head(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with archive.open(info) as member:
        head = member.read(4096)
        if head[6:7] in (b"\x02", b"\x03") and len(head) >= 12:
            need = 12 + struct.unpack("<I", head[8:12])[0]
            if need > len(head) and need <= MAX_HEADER + 12:
                head += member.read(need - len(head))
    if info.compress_type != zipfile.ZIP_STORED:  # a megabyte of header from a few bytes
        budget.current().charge("decompressed", len(head), f"member {info.filename!r}")
    return head


@metered
def read_info(path: Path | Location) -> RawCheckpoint:
    path = locate(path)
    findings = Findings()
    tree: dict[str, Any] = {}
    tensors: list[tuple[str, TensorRef]] = []
    size = path.size()
    declared = 0
    compressed = False
    with ziparchive.open_zip(path, "npz archive") as archive, path.open() as fh:
        for info in archive.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            where = f"{path}: member {info.filename!r}"
            try:
                header, data_start = parse_header(_read_head(archive, info), where)
            except ziparchive.ZIP_ERRORS as exc:
                raise IntegrityError(f"{where} cannot be read ({exc})",
                                     hint="The file is truncated or corrupt", path=str(path))
            declared += info.file_size
            compressed |= info.compress_type != zipfile.ZIP_STORED
            descr = header["descr"]
            if descr == "|O" or descr == "O":
                tree[key] = _object_array(fh, size, info, data_start, findings, where)
                continue
            dtype = (numpy_dtype_name(descr) if isinstance(descr, str)
                     else f"void{_record_size(descr, where) * 8}")
            if dtype == "bfloat16?":
                dtype = "bfloat16"  # numpy saves bfloat16 as raw V2
            shape = checked_shape(header["shape"], f"{where}: array", dtype)
            ref = TensorRef(dtype, shape, None, fortran_order=bool(header["fortran_order"]))
            if info.compress_type == zipfile.ZIP_STORED:
                offset = ziparchive.data_offset(fh, info, size) + data_start
                ref = _with_span(ref, ByteSpan(str(path), offset, info.file_size - data_start))
            else:
                ref = _with_span(ref, ByteSpan(str(path), data_start,
                                               info.file_size - data_start, info.filename))
            if ref.nbytes > info.file_size - data_start:
                raise IntegrityError(f"{where}: header promises {ref.nbytes} bytes, "
                                     f"the member holds {info.file_size - data_start}")
            tree[key] = ref
            tensors.append((key, ref))
    details = {"members": len(tree), "compressed": compressed, "declared_bytes": declared,
               **findings.details()}
    if "opt/target" in {k.rsplit("/", 2)[0] for k in tree} or any(
            k.startswith("opt/target/") for k in tree):
        details["flax_optimizer_target"] = "opt/target"
    safety = SafetyReport(tuple(sorted(findings.objects)), tuple(sorted(findings.unsafe)),
                          findings.pickles)
    return RawCheckpoint(FORMAT, _nest(tree), tuple(
        (tuple(k.split("/")), r) for k, r in tensors), safety, details, separator="/")


def _record_size(descr: Any, where: str) -> int:
    """Bytes per element of a structured (record) dtype, from its header description."""
    from ckptkit.model import itemsize

    total = 0
    try:
        for field_ in descr:
            fmt = field_[1]
            count = 1
            for dim in (field_[2] if len(field_) > 2 else ()):
                count *= int(dim)
            size = _record_size(fmt, where) if isinstance(fmt, list) else int(
                itemsize(numpy_dtype_name(fmt)))
            total += size * count
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise IntegrityError(f"{where}: unreadable record dtype {descr!r}") from exc
    return total


def _with_span(ref: TensorRef, span: ByteSpan) -> TensorRef:
    return TensorRef(ref.dtype, ref.shape, span, fortran_order=ref.fortran_order)


def _object_array(fh: Any, size: int, info: zipfile.ZipInfo, start: int, findings: Findings,
                  where: str) -> Opaque:
    findings.objects.add("numpy.ndarray[object]")
    if info.file_size > 256 << 20:
        return Opaque("numpy.ndarray[object]")
    if info.compress_type != zipfile.ZIP_STORED:
        budget.current().charge("decompressed", info.file_size, f"member {info.filename!r}")
    # As numpy's pickle.load reads it: a CRC that fails only at the member's end does not stop
    # the opcodes before it from running, so it does not stop this reading either.
    data = ziparchive.read_record(fh, info, size)[0][start:]
    try:
        read_pickle(data, findings, what=f"object array {where}",
                    location=f"object array {info.filename}")
    except IntegrityError:
        pass  # a broken pickle in an object array is reported through its findings
    return Opaque("numpy.ndarray[object]")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Split ``/``-joined keys into a nested tree (``opt/target/...`` becomes dicts)."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        node = root
        parts = key.split("/")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                node = None
                break
            node = child
        if node is None or parts[-1] in node:
            root[key] = value  # a key that is both a leaf and a folder stays flat
        else:
            node[parts[-1]] = value
    return root


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: a flat dict of arrays; ``flax``: the nested tree (under ``opt/target`` for
    Flax optimizer checkpoints such as MUSIQ's)."""
    import numpy as np

    raw = read_info(path)
    if raw.safety.unsafe and not unsafe:
        raise UnsafeContentError(f"{path}: holds object arrays that call "
                                 f"{', '.join(raw.safety.unsafe)}", unsafe=list(raw.safety.unsafe),
                                 path=str(path))
    if framework not in ("numpy", "flax", "jax"):
        raise UsageError(f"{path}: cannot load an npz file as {framework!r}",
                         hint="Use framework='numpy' or framework='flax'")
    if raw.details.get("compressed"):  # numpy inflates each member whole
        budget.current().charge("decompressed", raw.details.get("declared_bytes", 0),
                                "its compressed arrays")
    try:
        with locate(path).open() as fh, np.load(fh, allow_pickle=unsafe) as data:
            flat = {k: data[k] for k in data.files}
    except ValueError as exc:
        raise FormatError(f"{path}: {exc}", hint="Object arrays need unsafe=True",
                          path=str(path)) from exc
    flat = {k: _bf16(v) for k, v in flat.items()}
    if framework == "numpy":
        return flat
    tree = _nest(flat)
    if isinstance(tree.get("opt"), dict) and isinstance(tree["opt"].get("target"), dict):
        return tree["opt"]["target"]
    return tree


def _bf16(array: Any) -> Any:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        from ckptkit.formats.tensor_io import numpy_dtype

        return array.view(numpy_dtype("bfloat16"))
    return array
