"""Members of zip and tar archives, streamed one at a time for ``ckpt scan``, with caps.

Only members whose first bytes or name say they could hold a pickle (a pickle, a zip such as a
torch file, a tar, a compressed stream, a ``.pkl``-like name) are copied out to be scanned;
the rest cannot run code when loaded.  Hub archive extraction's member cap applies
(:mod:`ckptkit.storage.archives`), and every byte unpacked is charged to the reading budget
(:mod:`ckptkit.storage.budget`), which archives nested inside the archive share: a decompression bomb
ends early instead of filling the disk, however deep it is nested.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from ckptkit.storage import archives, budget
from ckptkit.formats.ziparchive import zip_of
from ckptkit.pickles import plain_pickle
from ckptkit.storage.location import locate

#: Bytes read from each member to decide whether it is worth scanning (a tar header is 512).
HEAD = 512
_MAGIC = (b"\x80", b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00")


class ArchiveBomb(Exception):
    """An archive past the member cap, or a member longer than its header says."""


@dataclass(frozen=True)
class Member:
    """A member worth scanning: its first bytes, and its stream (read once, within the caps)."""

    name: str
    head: bytes
    declared: int
    _stream: Any
    _budget: budget.Budget

    def copy_to(self, target: Path) -> None:
        """Write the member's bytes to ``target``."""
        with self._stream, open(target, "wb") as out:
            for chunk in self._chunks():
                out.write(chunk)

    def read(self, limit: int) -> bytes:
        """The member's first ``limit`` bytes (what a static scan needs of a large record)."""
        parts, got = [], 0
        with self._stream:
            for chunk in self._chunks():
                parts.append(chunk[:limit - got])
                got += len(parts[-1])
                if got >= limit:
                    break
        return b"".join(parts)

    def _chunks(self) -> Iterator[bytes]:
        copied, chunk = 0, self.head
        while chunk:
            copied += len(chunk)
            if copied > self.declared:
                raise ArchiveBomb(f"member {self.name!r} is longer than its header says")
            self._budget.charge("decompressed", len(chunk), self.name)
            yield chunk
            chunk = self._stream.read(1 << 20)


def kind(path: Path) -> str | None:
    """``"tar"``, ``"zip"`` or None (tar is checked first: see :func:`archives.archive_kind`)."""
    return archives.archive_kind(path)


def members(path: Path) -> Iterator[Member | str]:
    """Each regular member: a :class:`Member` when it could hold a pickle, else its name."""
    account = budget.current()
    count = 0
    for name, declared, opener in _entries(path):
        count += 1
        if count > archives.DEFAULT_MAX_MEMBERS:
            raise ArchiveBomb(f"more than {archives.DEFAULT_MAX_MEMBERS} members")
        if declared > account.room("decompressed"):  # before a byte is unpacked
            raise account.over("decompressed", f"member {name!r} ({declared:,} bytes declared)")
        stream = opener()
        head = stream.read(HEAD)
        if not could_hold_pickles(head, name):
            stream.close()
            yield name
            continue
        yield Member(name, head, declared, stream, account)


def _entries(path: Path) -> Iterator[tuple[str, int, Callable[[], Any]]]:
    loc = locate(path)
    if kind(path) == "tar":
        with loc.open() as fh, tarfile.open(fileobj=fh) as tar:
            for info in tar:
                if info.isfile():  # links, devices and directories hold no bytes of their own
                    yield info.name, info.size, lambda i=info: tar.extractfile(i)
        return
    with zip_of(loc) as archive:
        for info in archive.infolist():
            if not info.is_dir():
                yield info.filename, info.file_size, lambda i=info: archive.open(i)


def could_hold_pickles(head: bytes, name: str) -> bool:
    if head.startswith(_MAGIC) or head[257:262] == b"ustar":
        return True
    if head[:1] == b"\x78" and len(head) > 1 and (head[0] << 8 | head[1]) % 31 == 0:
        return True  # a zlib stream (joblib's default compression)
    return any(s in plain_pickle.SUFFIXES for s in PurePosixPath(name).suffixes)

