"""Remote locations: ranged reads of a URL through the one read interface.

:class:`RemoteLocation` implements :class:`~ckptkit.storage.location.Location` on top of two
operations a backend supplies: ``_stat`` (size and a validator: ETag or mtime) and ``_fetch``
(the bytes of one range).  The backends are :mod:`ckptkit.storage.http_location` (plain
``http(s)://``, one request per range and no HEAD) and :mod:`ckptkit.storage.fsspec_location`
(``s3://``, ``gs://``, ``hf://``, ``memory://`` and any other installed fsspec protocol).

What a reader asks for is rounded up so that headers cost one round trip:

* a read near the start fetches at least :data:`HEAD` bytes (safetensors' 8 bytes and its
  JSON, a torch zip's ``data.pkl`` that ``torch.save`` writes first): larger than a local
  file's prefetch, as a round trip costs far more than 192 KiB more of one response;
* a read in the last :data:`TAIL` bytes fetches the whole tail (a zip's end records and its
  central directory);
* fetched spans are kept (at most :data:`KEEP` bytes, oldest dropped first), so later reads
  inside them cost nothing.

A reader never sees more than it asked for; large reads (tensor data for ``load``/``diff``)
are fetched as asked, without prefetch.

Every message names a location by :func:`display`, which drops credentials a URL may carry
(``user:password@``, a presigned URL's signature): credentials are never printed.
"""

from __future__ import annotations

import io
import threading
import urllib.parse
from typing import BinaryIO

from ckptkit.errors import NotFoundError, UsageError
from ckptkit.storage.entries import PREFETCH, Entry

#: Bytes a read near the start of a file fetches: the whole head.
HEAD = 256 << 10
#: Bytes a read in the last TAIL bytes of a file fetches: the whole tail.  Large enough for
#: the central directory of a torch zip of a few hundred tensors.
TAIL = 256 << 10
#: Bytes of fetched spans kept per location.
KEEP = 8 << 20
#: Query parameters that carry credentials (presigned S3/GCS URLs, SAS tokens, API keys).
_SECRET_PARAMS = ("signature", "sig", "token", "key", "credential", "auth", "password",
                  "secret", "security")


def display(url: str) -> str:
    """``url`` as it may be shown: without ``user:password@`` and with the values of
    credential-bearing query parameters replaced by ``***``.

    Example:
        >>> display("https://u:p@host/a?X-Amz-Signature=abc&v=1")
        'https://host/a?X-Amz-Signature=***&v=1'
    """
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{k}={'***' if any(s in k.lower() for s in _SECRET_PARAMS) else v}"
            for k, v in pairs)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class RemoteLocation:
    """A file or directory named by a URL; subclasses supply the backend operations.

    Subclasses implement ``_stat() -> (size, validator) | None`` (None: no such file),
    ``_fetch(start, stop) -> bytes``, ``_is_dir()``, ``_list() -> list[Entry]`` and
    ``_make(url)`` (a location of the same backend).
    """

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._spans: list[tuple[int, bytes]] = []
        self._stat_cache: tuple[int, str | None] | None = None
        self._known_missing = False
        #: Requests and bytes this location fetched (what the tests and benchmarks count).
        self.requests = 0
        self.fetched = 0

    # -- what subclasses supply ---------------------------------------------------------
    def _stat(self) -> tuple[int, str | None] | None:
        raise NotImplementedError

    def _fetch(self, start: int, stop: int) -> bytes:
        raise NotImplementedError

    def _is_dir(self) -> bool:
        raise NotImplementedError

    def _list(self) -> list[Entry]:
        raise NotImplementedError

    def _make(self, url: str) -> RemoteLocation:
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop what the backend cached about this location (listings)."""

    # -- the Location protocol ------------------------------------------------------------
    @property
    def name(self) -> str:
        path = urllib.parse.urlsplit(self.url).path.rstrip("/")
        return urllib.parse.unquote(path.rpartition("/")[2])

    def __str__(self) -> str:
        return display(self.url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({display(self.url)!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.url == self.url  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.url)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_file(self) -> bool:
        return self._stat_once() is not None

    def is_dir(self) -> bool:
        if self.url.endswith("/"):
            return self._is_dir()
        return self._stat_once() is None and self._is_dir()

    def size(self) -> int:
        stat = self._stat_once()
        if stat is None:
            raise NotFoundError(f"{self}: no such file", path=str(self),
                                hint="Check the URL (bucket, key and spelling)")
        return stat[0]

    def fingerprint(self) -> tuple[int, str | None]:
        """``(size, validator)`` asked of the store now, not from the cache: what a deletion
        re-checks right before it deletes (ETag for S3/GCS/HTTP, else the mtime)."""
        self._stat_cache = None
        self._known_missing = False
        self._forget()
        stat = self._stat_once()
        if stat is None:
            raise NotFoundError(f"{self}: no such file", path=str(self),
                                hint="It was removed since it was listed")
        return stat

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read({offset}, {length}): negative offset or length")
        if length == 0:
            return b""
        with self._lock:
            cached = self._cached(offset, length)
            if cached is not None:
                return cached
        size = self.size()  # may fetch the head itself (HTTP): look again
        with self._lock:
            cached = self._cached(offset, length)
            if cached is not None:
                return cached
        stop = min(size, offset + length)
        start, fetch_stop = offset, stop
        if length < PREFETCH:
            if offset >= size - TAIL:
                start, fetch_stop = max(0, size - TAIL), size
            elif offset < HEAD:
                start, fetch_stop = 0, min(size, max(stop, HEAD))
            else:
                fetch_stop = min(size, offset + PREFETCH)
        with self._lock:
            have = self._prefix(start, fetch_stop)
        # Only what is not cached yet: a record just longer than the head costs its rest.
        data = have + self._counted_fetch(start + len(have), fetch_stop) \
            if start + len(have) < fetch_stop else have
        with self._lock:
            self._keep(start, data)
        return data[offset - start:stop - start]

    def _prefix(self, start: int, stop: int) -> bytes:
        """The cached bytes from ``start`` on (up to ``stop``), if a kept span holds
        ``start``."""
        for begin, data in self._spans:
            if begin <= start < begin + len(data):
                return data[start - begin:stop - begin]
        return b""

    def read_many(self, spans: list[tuple[int, int]], gap: int = PREFETCH) -> list[bytes]:
        """The bytes of each ``(offset, length)`` in ``spans``; spans closer than ``gap`` are
        fetched in one request (coalescing)."""
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        out: list[bytes] = [b""] * len(spans)
        group: list[int] = []

        def flush() -> None:
            if not group:
                return
            first = spans[group[0]][0]
            last = max(spans[i][0] + spans[i][1] for i in group)
            data = self.read(first, last - first)
            for i in group:
                off, length = spans[i]
                out[i] = data[off - first:off - first + length]
            group.clear()

        end = -1
        for i in order:
            off, length = spans[i]
            if group and off > end + gap:
                flush()
            group.append(i)
            end = max(end, off + length)
        flush()
        return out

    def open(self) -> BinaryIO:
        return io.BufferedReader(_RangedFile(self), buffer_size=8192)  # type: ignore[arg-type]

    def list(self) -> list[Entry]:
        return sorted(self._list(), key=lambda e: e.name)

    def child(self, name: str) -> RemoteLocation:
        base = self.url if self.url.endswith("/") else self.url + "/"
        return self._make(base + urllib.parse.quote(name) if self._quotes() else base + name)

    def sibling(self, name: str) -> RemoteLocation:
        base = self.url.rstrip("/")
        head = base.rpartition("/")[0]
        return self._make(f"{head}/{urllib.parse.quote(name) if self._quotes() else name}")

    def __truediv__(self, name: str) -> RemoteLocation:
        """``location / "name"``: :meth:`child`, so path-style code reads remote folders."""
        return self.child(name)

    def parent(self) -> RemoteLocation:
        """The directory (prefix) holding this entry, with a trailing ``/``."""
        return self._make(self.url.rstrip("/").rpartition("/")[0] + "/")

    def _quotes(self) -> bool:
        """Whether names are percent-encoded in this backend's URLs (HTTP: yes)."""
        return False

    # -- internals ------------------------------------------------------------------------
    def _stat_once(self) -> tuple[int, str | None] | None:
        if self._stat_cache is None and not self._known_missing:
            stat = self._stat()
            if stat is None:
                self._known_missing = True
            else:
                self._stat_cache = stat
        return self._stat_cache

    def _counted_fetch(self, start: int, stop: int) -> bytes:
        return self._fetch(start, stop)

    def _count(self, nbytes: int, requests: int = 1) -> None:
        """Record requests made and body bytes received (backends call it)."""
        with self._lock:
            self.requests += requests
            self.fetched += nbytes

    def _cached(self, offset: int, length: int) -> bytes | None:
        for start, data in self._spans:
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start:offset - start + length]
        size = self._stat_cache[0] if self._stat_cache else None
        if size is not None and offset >= size:
            return b""
        if size is not None:
            for start, data in self._spans:
                if start <= offset and start + len(data) == size:
                    return data[offset - start:offset - start + length]
        return None

    def _keep(self, start: int, data: bytes) -> None:
        if len(data) > KEEP:
            return
        self._spans.append((start, data))
        while sum(len(d) for _s, d in self._spans) > KEEP:
            self._spans.pop(0)


class _RangedFile(io.RawIOBase):
    """A seekable, read-only file over :meth:`RemoteLocation.read` (for :mod:`zipfile`)."""

    def __init__(self, location: RemoteLocation):
        super().__init__()
        self._location = location
        self._pos = 0
        self._size = location.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(22, f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._location.read(self._pos, len(buffer))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


#: ``scheme -> (module, extra, package)`` of the fsspec implementations ckptkit names in its
#: "missing extra" errors.
EXTRAS: dict[str, tuple[str, str, str]] = {
    "s3": ("s3fs", "s3", "s3fs"), "s3a": ("s3fs", "s3", "s3fs"),
    "gs": ("gcsfs", "gcs", "gcsfs"), "gcs": ("gcsfs", "gcs", "gcsfs"),
    "hf": ("huggingface_hub", "hf", "huggingface_hub"),
}


def require_writable(scheme: str) -> None:
    """Raise a usage error for schemes that cannot take an atomic write."""
    if scheme in ("http", "https", "hf"):
        raise UsageError(f"cannot write to {scheme}:// locations",
                         hint="Write to a local path, s3://, gs:// or memory://; upload to the "
                              "Hub with huggingface_hub")


#: Bytes per ranged read when a whole object is copied (bounded memory).
COPY_CHUNK = 4 << 20


def copy_to(location: RemoteLocation, target: BinaryIO) -> int:
    """Write every byte of ``location`` to ``target`` in ranged reads of
    :data:`COPY_CHUNK`; returns the size.  For commands that read every tensor byte anyway
    (convert, strip, diff): the cost is the object's size, stated in docs/remote.md.

    Raises:
        IntegrityError: the object ended before its stated size (truncated while read).
    """
    from ckptkit.errors import IntegrityError

    size = location.size()
    done = 0
    while done < size:
        chunk = location.read(done, min(COPY_CHUNK, size - done))
        if not chunk:
            raise IntegrityError(f"{location}: the object ended after {done:,} of its "
                                 f"{size:,} bytes", path=str(location),
                                 hint="It is truncated or was rewritten while read; try again")
        target.write(chunk)
        done += len(chunk)
    return size
