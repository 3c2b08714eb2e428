"""safetensors output: an 8-byte header length, a JSON header, then one byte buffer.

The header must come first and states every tensor's byte range, so it needs all dtypes and
shapes before the first byte of data.  With a layout given up front the header is written at
once and each tensor is written straight to its offset as it arrives (in any order).  Without
one, tensors are spooled to an anonymous temporary file and copied after the header at the
end: the same bounded memory, twice the I/O.

Data is ordered by element size, largest first (within one size, in arrival order), as the
reference implementation does: with an 8-byte aligned header every tensor is then aligned to
its element size.  The header itself lists tensors in arrival order.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from ckptkit.formats.streams import Spool, raw_bytes
from ckptkit.errors import UsageError
from ckptkit.formats.safetensors import DTYPES
from ckptkit.model import itemsize

#: dtype name -> safetensors code, the inverse of the reader's table.
CODES = {dtype: code for code, dtype in DTYPES.items()}
_HEADER_ALIGNMENT = 8

Entry = tuple[str, str, tuple[int, ...]]


def assign_offsets(entries: Sequence[Entry]) -> dict[str, tuple[int, int]]:
    """``name -> (begin, end)`` in the data buffer: largest element size first."""
    order = sorted(range(len(entries)), key=lambda i: -itemsize(entries[i][1]))
    spans: dict[str, tuple[int, int]] = {}
    cursor = 0
    for i in order:
        name, dtype, shape = entries[i]
        end = cursor + int(math.prod(shape) * itemsize(dtype))
        spans[name] = (cursor, end)
        cursor = end
    return spans


def header_bytes(entries: Sequence[Entry], spans: dict[str, tuple[int, int]],
                 metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header, padded with spaces to 8 bytes as the reference
    writer does."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape in entries:
        header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                        "data_offsets": list(spans[name])}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes one safetensors file; see the module docstring for the two modes."""

    def __init__(self, fh: BinaryIO, directory: Path, metadata: dict[str, str],
                 layout: Sequence[Entry] | None):
        if "__metadata__" in {e[0] for e in layout or ()}:
            raise UsageError("a tensor cannot be named '__metadata__' in safetensors",
                             hint="Rename it with a recipe rule, or write npz instead")
        self.fh = fh
        self.metadata = metadata
        self.layout = list(layout) if layout is not None else None
        self.spool: Spool | None = None
        self.spooled: list[tuple[Entry, int]] = []
        if self.layout is not None:
            self.spans = assign_offsets(self.layout)
            self.expected = {name: (dtype, shape) for name, dtype, shape in self.layout}
            header = header_bytes(self.layout, self.spans, metadata)
            fh.write(header)
            self.data_start = len(header)
        else:
            self.spool = Spool(directory)

    def add(self, name: str, array: np.ndarray) -> None:
        dtype, shape = array.dtype.name, tuple(array.shape)
        if name == "__metadata__":
            raise UsageError("a tensor cannot be named '__metadata__' in safetensors",
                             hint="Rename it with a recipe rule, or write npz instead")
        if self.spool is not None:
            self.spooled.append(((name, dtype, shape), self.spool.put(raw_bytes(array))))
            return
        expected = self.expected.pop(name, None)
        if expected is None:
            raise UsageError(f"tensor {name!r} is not in the layout given to the writer",
                             hint="Pass layout=None, or a layout that lists every tensor")
        if expected != (dtype, shape):
            raise UsageError(f"tensor {name!r} arrived as {dtype}{list(shape)} but the layout "
                             f"says {expected[0]}{list(expected[1])}")
        # Straight to its place: arrival order need not match the data order.
        self.fh.seek(self.data_start + self.spans[name][0])
        self.fh.write(raw_bytes(array))

    def finish(self) -> None:
        if self.spool is None:
            if self.expected:
                missing = sorted(self.expected)
                raise UsageError(f"{len(missing)} tensor(s) of the layout never arrived: "
                                 f"{', '.join(missing[:5])}", hint="The tensor stream ended early")
            self.fh.seek(0, 2)
            return
        entries = [entry for entry, _offset in self.spooled]
        spans = assign_offsets(entries)
        self.fh.write(header_bytes(entries, spans, self.metadata))
        for entry, offset in sorted(self.spooled, key=lambda item: spans[item[0][0]][0]):
            begin, end = spans[entry[0]]
            self.spool.copy_to(self.fh, offset, end - begin)
        self.spool.close()

    def abort(self) -> None:
        if self.spool is not None:
            self.spool.close()
