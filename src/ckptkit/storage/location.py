"""Where a checkpoint's bytes live: the one read interface every reader uses.

A :class:`Location` names a file or directory and reads it: ``size``, ``read(offset, length)``,
``open`` (a seekable binary file, for code such as :mod:`zipfile` that wants one), ``exists``,
``is_file``/``is_dir``, ``list`` and ``child``.  Readers never call :func:`open` on a checkpoint
themselves, so the same reader serves a local path and (through fsspec) a URL.

Small reads are coalesced: the first ``read`` of a location that falls inside its first
:data:`PREFETCH` bytes fetches all of them, and later reads inside them cost nothing (a larger
read is served as asked and not kept).  Headers
(safetensors' 8 bytes then its JSON, a zip's end records) thus cost one read where a remote
store would otherwise see one round trip per field.

:func:`locate` turns a user's argument into a location.  Local paths get :class:`LocalLocation`
(plain ``os`` calls: fsspec is not imported on the local path, which keeps ``ckpt inspect``
fast).  Other schemes plug in through :data:`OPENERS`, keyed by URL scheme, so new backends
never touch the readers.
"""

from __future__ import annotations

import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from ckptkit.errors import NotFoundError
# Defined apart so that the remote backends (which :func:`locate` imports lazily) need not
# import this module back; re-exported here.
from ckptkit.storage.entries import PREFETCH, Entry


@runtime_checkable
class Location(Protocol):
    """A file or directory, local or remote (see the module docstring)."""

    @property
    def name(self) -> str:
        """The last component (``model.safetensors``)."""

    def __str__(self) -> str:
        """How the user named it: a path or a URL (used in every message)."""

    def exists(self) -> bool: ...

    def is_file(self) -> bool: ...

    def is_dir(self) -> bool: ...

    def size(self) -> int:
        """Bytes in the file.  Raises NotFoundError when there is no such file."""

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""

    def open(self) -> BinaryIO:
        """A seekable binary file object; the caller closes it."""

    def list(self) -> list[Entry]:
        """The entries of a directory, sorted by name."""

    def child(self, name: str) -> Location:
        """The entry ``name`` inside this directory (which need not exist)."""

    def sibling(self, name: str) -> Location:
        """The entry ``name`` beside this one (``ckpt-1`` -> ``ckpt-1.index``)."""

    def parent(self) -> Location:
        """The directory holding this entry."""


class LocalLocation:
    """A path on this machine's file systems."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._head: bytes | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"LocalLocation({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalLocation) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def is_file(self) -> bool:
        return self.path.is_file()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: no such file", path=str(self.path),
                                hint="Check the path") from None

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read({offset}, {length}): negative offset or length")
        head = self._head
        if head is not None and offset + length <= len(head):
            return head[offset:offset + length]
        with open(self.path, "rb") as fh:
            if head is None and offset + length <= PREFETCH:
                self._head = head = fh.read(PREFETCH)
                return head[offset:offset + length]
            # Past the prefetch (or larger than it): read just what was asked, and keep
            # nothing, so reading a whole file does not pin a copy of it here.
            fh.seek(offset)
            return fh.read(length)

    def open(self) -> BinaryIO:
        return open(self.path, "rb")

    def list(self) -> list[Entry]:
        entries = []
        with os.scandir(self.path) as it:
            for e in it:
                try:
                    st = e.stat()
                except OSError:
                    continue  # vanished, or a dangling link
                entries.append(Entry(e.name, stat_mod.S_ISDIR(st.st_mode),
                                     None if stat_mod.S_ISDIR(st.st_mode) else st.st_size,
                                     st.st_mtime))
        return sorted(entries, key=lambda entry: entry.name)

    def child(self, name: str) -> LocalLocation:
        return LocalLocation(self.path / name)

    def sibling(self, name: str) -> LocalLocation:
        return LocalLocation(self.path.with_name(name))

    def parent(self) -> LocalLocation:
        return LocalLocation(self.path.parent)

    def walk(self) -> Iterator[LocalLocation]:
        """Every file below this directory."""
        for root, _dirs, files in os.walk(self.path):
            for name in sorted(files):
                yield LocalLocation(Path(root) / name)


#: URL scheme -> a function making a :class:`Location` of a URL of that scheme.  Entries here
#: take precedence; schemes not listed go to :func:`ckptkit.storage.openers.opener_for` (``http(s)``
#: and every installed fsspec protocol), imported only when a URL is located.
OPENERS: dict[str, Callable[[str], Location]] = {}


def is_url(value: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (``file://`` included); a Windows drive letter is a path."""
    text = os.fspath(value)
    scheme, sep, _rest = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


def locate(value: str | os.PathLike[str] | Location) -> Location:
    """The :class:`Location` a command-line argument or API argument names."""
    # Anything that is neither a string nor a path is taken to be a Location already: a
    # structural check (isinstance on the Protocol) would reject a backend that predates a
    # method added later, and readers pass their Location back through here all the time.
    if isinstance(value, LocalLocation) or not isinstance(value, (str, os.PathLike)):
        return value  # type: ignore[return-value]
    text = os.fspath(value)
    if not is_url(text):
        return LocalLocation(Path(text).expanduser())
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        from urllib.parse import unquote, urlsplit

        return LocalLocation(Path(unquote(urlsplit(text).path)))
    opener = OPENERS.get(scheme)
    if opener is None:
        # http(s) and fsspec protocols, imported only now (never for a local path).
        from ckptkit.storage.openers import opener_for

        opener = opener_for(scheme)
    if opener is None:
        from ckptkit.errors import UsageError

        raise UsageError(f"{text}: ckptkit cannot read {scheme}:// locations here",
                         hint="Use a local path, or install the extra that reads this scheme "
                              "(docs/remote.md)")
    return opener(text)


def local_path(value: str | os.PathLike[str] | Location) -> Path:
    """The local path of ``value``, for readers that walk a directory with ``pathlib``
    (sharded and distributed layouts).

    Raises:
        UsageError: ``value`` is a remote location.
    """
    loc = locate(value)
    if isinstance(loc, LocalLocation):
        return loc.path
    from ckptkit.errors import UsageError

    raise UsageError(f"{loc}: this layout is read from a local directory only",
                     hint="Download the checkpoint's directory first (or mount it)")
