"""Byte plumbing shared by the writers: array bytes without copies, and a spool for tensors
whose final place in the output is known only once every tensor has been seen."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

#: Copy buffer for spooled bytes: large enough for full-speed sequential I/O, small next to
#: any tensor worth streaming.
COPY_CHUNK = 8 << 20


def raw_bytes(array: np.ndarray) -> memoryview:
    """The array's elements in C order as a flat ``uint8`` memoryview.

    No copy for C-contiguous arrays (the common case); views and Fortran-ordered arrays are
    copied once.  Always bytes, never elements, so ``len()`` is the byte count whatever the
    dtype (``ml_dtypes`` types included).
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    return memoryview(flat.view(np.uint8))


class Spool:
    """An anonymous temporary file beside the output that holds tensor bytes until the
    writer knows where they go.

    ``tempfile.TemporaryFile`` has no name on Linux (``O_TMPFILE``) or is unlinked at once
    elsewhere, so nothing is left behind whatever happens to the process.  It lives in the
    output's directory because that is where free space was asked for, not ``/tmp``.
    """

    def __init__(self, directory: Path):
        self._fh = tempfile.TemporaryFile(dir=directory, prefix=".ckptkit-spool-")
        self.size = 0

    def put(self, data: memoryview | bytes) -> int:
        """Append ``data``; returns its offset in the spool."""
        offset = self.size
        self._fh.write(data)
        self.size += len(data)
        return offset

    def copy_to(self, dest: BinaryIO, offset: int, length: int) -> None:
        """Write ``length`` spooled bytes starting at ``offset`` to ``dest``, in bounded chunks."""
        self._fh.flush()
        self._fh.seek(offset)
        buffer = memoryview(bytearray(min(COPY_CHUNK, max(length, 1))))
        remaining = length
        while remaining:
            got = self._fh.readinto(buffer[:min(remaining, len(buffer))])
            if not got:
                raise OSError(f"spool file ended {remaining} bytes early")
            dest.write(buffer[:got])
            remaining -= got

    def close(self) -> None:
        self._fh.close()
