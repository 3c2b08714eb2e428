"""The header of a ``.npy`` array: what numpy writes before the raw bytes.

Plain pickles (joblib) and ``.npz`` archives both hold ``.npy`` data, so the parser lives here,
below both readers.  The header is a Python literal; it is parsed with ``ast.literal_eval``,
which builds only literals and never calls anything.
"""

from __future__ import annotations

import ast
import struct
from typing import Any

from ckptkit.errors import IntegrityError

NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER = 1 << 20


def parse_header(head: bytes, where: str) -> tuple[dict[str, Any], int]:
    """Parse a ``.npy`` header; returns the header dict and the offset where data starts."""
    if not head.startswith(NPY_MAGIC) or len(head) < 10:
        raise IntegrityError(f"{where}: not a .npy member (bad magic)")
    major = head[6]
    if major == 1:
        (length,), start = struct.unpack("<H", head[8:10]), 10
    elif major in (2, 3):
        (length,), start = struct.unpack("<I", head[8:12]), 12
    else:
        raise IntegrityError(f"{where}: unknown .npy version {major}")
    if length > MAX_HEADER or start + length > len(head):
        raise IntegrityError(f"{where}: .npy header of {length} bytes is cut or too large")
    text = head[start:start + length].decode("latin1" if major < 3 else "utf-8")
    try:
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise IntegrityError(f"{where}: unreadable .npy header") from exc
    if not isinstance(header, dict) or not {"descr", "shape", "fortran_order"} <= set(header):
        raise IntegrityError(f"{where}: .npy header lacks descr/shape/fortran_order")
    return header, start + length
