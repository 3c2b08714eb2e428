"""The files an unfinished download keeps beside ``dest``, and making them durable.

* ``<dest>.part`` (:class:`PartFile`): the data, pre-sized and written at each piece's offset
  by several threads through one descriptor;
* ``<dest>.part.json`` (:func:`load_sidecar` / :func:`save_sidecar`): the
  :class:`~ckptkit.hub.download.transfer_plan.Sidecar` naming the pieces already on disk, replaced atomically
  and fsynced, so after ``kill -9`` it never vouches for a piece that was not synced.

:class:`PrefixHasher` computes the sha256 of ``.part`` as its finished prefix grows, so the
hash is ready when the last piece lands.  What these files mean and when they may be reused is
decided in :mod:`ckptkit.hub.download.transfer_plan`; :mod:`ckptkit.hub.download.download` drives them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from ckptkit.errors import IntegrityError
from ckptkit.storage.atomic import write_text
from ckptkit.hub.download.transfer_plan import Piece, Sidecar


def sibling(dest: Path, suffix: str) -> Path:
    """``dest`` with ``suffix`` appended to its name (``model.bin`` -> ``model.bin.part``)."""
    return dest.with_name(dest.name + suffix)


class PartFile:
    """The ``.part`` file, written at offsets by several threads through one descriptor."""

    def __init__(self, path: Path, *, truncate_to: int | None) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
        self.fd = os.open(path, flags | (os.O_TRUNC if truncate_to is not None else 0), 0o644)
        self._seek_lock = threading.Lock()  # only used where pwrite/pread do not exist
        if truncate_to:
            os.ftruncate(self.fd, truncate_to)  # sparse; the pieces fill it in any order

    def write_at(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            if hasattr(os, "pwrite"):
                written = os.pwrite(self.fd, view, offset)
            else:
                with self._seek_lock:
                    os.lseek(self.fd, offset, os.SEEK_SET)
                    written = os.write(self.fd, view)
            view, offset = view[written:], offset + written

    def read_at(self, size: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self.fd, size, offset)
        with self._seek_lock:
            os.lseek(self.fd, offset, os.SEEK_SET)
            return os.read(self.fd, size)

    def datasync(self) -> None:
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(self.fd)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


class PrefixHasher:
    """sha256 of the contiguous run of finished pieces from the start, read back from the
    page cache as it grows; only pieces finished out of order wait for their turn."""

    def __init__(self, part: PartFile, pieces: tuple[Piece, ...], chunk_size: int) -> None:
        self._part = part
        self._pieces = pieces
        self._chunk_size = chunk_size
        self._next = 0
        self._sha = hashlib.sha256()

    def advance(self, done: set[int]) -> None:
        chunk = self._chunk_size
        while self._next < len(self._pieces) and self._next in done:
            piece = self._pieces[self._next]
            for offset in range(piece.start, piece.end, chunk):
                block = self._part.read_at(min(chunk, piece.end - offset), offset)
                if not block:
                    raise IntegrityError(f"{self._part.path} ended at byte {offset:,} while "
                                         f"hashing", path=str(self._part.path))
                self._sha.update(block)
            self._next += 1

    def hexdigest(self) -> str:
        if self._next != len(self._pieces):
            raise RuntimeError("hashed before every piece was finished")
        return self._sha.hexdigest()


def load_sidecar(path: Path) -> Sidecar | None:
    """The sidecar at ``path``, or None when there is nothing usable to resume from."""
    try:
        return Sidecar.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or not text: nothing to resume
        return None


def save_sidecar(path: Path, state: Sidecar) -> None:
    """Write ``state`` to ``path`` atomically (:mod:`ckptkit.storage.atomic`)."""
    write_text(path, state.to_json())
