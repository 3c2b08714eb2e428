"""What every location shares, local or remote: the coalescing prefetch size and the entry of a
directory listing (re-exported by :mod:`ckptkit.storage.location`)."""

from __future__ import annotations

from dataclasses import dataclass

#: Bytes the first read of a location fetches at least (coalescing small header reads).
PREFETCH = 64 << 10


@dataclass(frozen=True)
class Entry:
    """One entry of a directory listing."""

    name: str
    is_dir: bool
    size: int | None = None
    mtime: float | None = None


__all__ = ["PREFETCH", "Entry"]
