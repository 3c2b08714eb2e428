"""HTTP downloads that are parallel, resumable across runs, verified and atomic.

:func:`download` fetches one URL into one file.  While it runs, three files sit beside ``dest``:

* ``<dest>.part``: the data, pre-sized and written at each piece's offset;
* ``<dest>.part.json``: the sidecar: URL, size, the server's validators (ETag / Last-Modified)
  and the pieces already on disk, so a rerun after ``kill -9`` fetches only what is missing;
* ``<dest>.lock``: a :class:`~ckptkit.locks.FileLock`, so two processes never write one ``.part``.

``dest`` itself only ever appears through the final ``os.replace``, after size and sha256 are
verified, so a file under its final name is always complete.

How a transfer runs: one probe (``GET`` with ``Range: bytes=0-0``; HEAD answers are often wrong)
learns the size, range support and validators.  A server that honours ranges gets up to
``connections`` concurrent range requests, one piece each, every one sent with ``If-Range`` so a
file that changes mid-way is noticed.  A server that ignores ranges streams the probe's own
answer.  sha256 is computed during the transfer, over the contiguous prefix of finished pieces.

The knobs in upper case below are read at call time, so tests can make backoff and pieces tiny.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timezone
from pathlib import Path
from typing import Callable, Literal, Protocol
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from ckptkit import __version__
from ckptkit.errors import (AuthError, CkptkitError, IntegrityError, NotFoundError, SourceError,
                            UsageError)
from ckptkit.locks import FileLock, LockHolder

CHUNK_SIZE = 1 << 20              # most bytes taken from a socket at once: bounds memory
MIN_PIECE_SIZE = 8 << 20
MAX_PIECE_SIZE = 16 << 20
PARALLEL_THRESHOLD = 8 << 20      # smaller files are one piece (still resumable)
PIECE_ALIGN = 1 << 16
MAX_REDIRECTS = 10
BACKOFF_BASE = 0.5                # seconds; doubled per failed attempt, with jitter
BACKOFF_CAP = 20.0
RETRY_AFTER_CAP = 60.0
MAX_RESTARTS = 2                  # the file changed under us this many times: give up
FREE_SPACE_MARGIN = 32 << 20
SNIFF_BYTES = 512
LOCK_POLL_INTERVAL = 0.5
LOCK_STALE_AFTER = 60.0
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
SIDECAR_VERSION = 1

_NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError,
                   http.client.HTTPException, OSError)
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download` produced."""

    path: Path            # the final path (complete and verified)
    size: int
    sha256: str           # hex
    url: str              # final URL after redirects
    transferred: int      # payload bytes received in this call (a resume: only the missing part)
    resumed_from: int     # bytes already present from an earlier interrupted run (0 if none)


class Progress(Protocol):
    """Where :func:`download` reports progress (tqdm-like); the caller creates and closes it.

    ``set_total`` is called once the size is known (None: unknown); ``update(n)`` as bytes
    arrive, from one thread at a time.  A resumed download first reports the bytes it already
    has; after a restart from scratch, updates resume once the new transfer passes the old one.
    """

    def set_total(self, total: int | None) -> None: ...

    def update(self, n: int) -> None: ...


# --- deciding: pure functions -------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of the file, the unit of parallelism and of resume."""

    index: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PiecePlan:
    """How a file of ``size`` bytes is cut, and which pieces still have to be fetched."""

    size: int
    piece_size: int
    pieces: tuple[Piece, ...]
    missing: tuple[Piece, ...]
    workers: int

    @property
    def have(self) -> frozenset[int]:
        """Indices of the pieces already on disk."""
        return frozenset(range(len(self.pieces))) - {piece.index for piece in self.missing}

    @property
    def have_bytes(self) -> int:
        return self.size - sum(piece.size for piece in self.missing)


@dataclass(frozen=True)
class ContentRange:
    """A parsed ``Content-Range`` header; None fields stand for ``*``."""

    start: int | None
    end: int | None
    total: int | None


@dataclass(frozen=True)
class Probe:
    """What the first request learned about the file."""

    final_url: str
    size: int | None
    ranges: bool
    etag: str | None
    last_modified: str | None

    @property
    def validator(self) -> str | None:
        """The value to send in ``If-Range``: a strong ETag, else Last-Modified (RFC 9110)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


@dataclass(frozen=True)
class Sidecar:
    """The state of an interrupted download, stored as ``<dest>.part.json``."""

    url: str
    final_url: str
    size: int
    etag: str | None
    last_modified: str | None
    piece_size: int
    done: frozenset[int]

    def to_json(self) -> str:
        return json.dumps({"version": SIDECAR_VERSION, "url": self.url,
                           "final_url": self.final_url, "size": self.size, "etag": self.etag,
                           "last_modified": self.last_modified, "piece_size": self.piece_size,
                           "done": sorted(self.done)})

    @classmethod
    def from_json(cls, text: str) -> Sidecar | None:
        """The sidecar in ``text``, or None if it is corrupt or from another version."""
        try:
            data = json.loads(text)
            if data.get("version") != SIDECAR_VERSION:
                return None
            return cls(url=str(data["url"]), final_url=str(data["final_url"]),
                       size=int(data["size"]), etag=data["etag"],
                       last_modified=data["last_modified"], piece_size=int(data["piece_size"]),
                       done=frozenset(int(i) for i in data["done"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def choose_piece_size(size: int, connections: int) -> int:
    """Pieces of 8-16 MiB (the module knobs), at least ``connections`` of them when possible."""
    if size < PARALLEL_THRESHOLD:
        return max(size, 1)
    per_connection = -(-size // connections)
    piece = min(max(per_connection, MIN_PIECE_SIZE), MAX_PIECE_SIZE)
    return -(-piece // PIECE_ALIGN) * PIECE_ALIGN


def plan_pieces(size: int, have: frozenset[int], piece_size: int | None,
                connections: int) -> PiecePlan:
    """Cut ``size`` bytes into pieces and list those not in ``have`` (indices already on disk).

    ``piece_size=None`` chooses one (:func:`choose_piece_size`); a resumed download passes the
    size its sidecar recorded, because piece indices only mean something for one layout.
    """
    step = piece_size if piece_size is not None else choose_piece_size(size, connections)
    pieces = tuple(Piece(i, start, min(start + step, size))
                   for i, start in enumerate(range(0, size, step)))
    missing = tuple(piece for piece in pieces if piece.index not in have)
    return PiecePlan(size=size, piece_size=step, pieces=pieces, missing=missing,
                     workers=min(connections, len(missing)))


def can_resume(saved: Sidecar | None, probe: Probe, url: str, part_size: int | None) -> bool:
    """True when the pieces of an earlier run are the same file the server serves now."""
    if saved is None or probe.size is None or not probe.ranges:
        return False
    if saved.url != url or saved.size != probe.size or part_size != probe.size:
        return False
    if probe.etag:
        return saved.etag == probe.etag
    # Without any validator we cannot tell an updated file from the old one: start over.
    return probe.last_modified is not None and saved.last_modified == probe.last_modified


def parse_content_range(value: str | None) -> ContentRange | None:
    """``bytes 0-99/1000`` -> ContentRange(0, 99, 1000); None if absent or malformed."""
    match = _CONTENT_RANGE.fullmatch(value or "")
    if match is None:
        return None
    start, end, total = match.groups()
    return ContentRange(start=None if start is None else int(start),
                        end=None if end is None else int(end),
                        total=None if total == "*" else int(total))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to sleep after failed attempt number ``attempt`` (1-based).

    The server's ``Retry-After`` wins, capped at ``RETRY_AFTER_CAP``; otherwise exponential
    backoff from ``BACKOFF_BASE`` capped at ``BACKOFF_CAP``, with equal jitter so that parallel
    pieces do not retry in lockstep.
    """
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)) * (0.5 + rand() / 2)


def looks_like_html(head: bytes) -> bool:
    """True if the first bytes of a body are an HTML document (error and login pages)."""
    text = head[:SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<") and (b"<!doctype html" in text or b"<html" in text)


def html_expected(url: str) -> bool:
    """Only URLs of HTML documents may answer with HTML."""
    return urlsplit(url).path.lower().endswith((".html", ".htm"))


# --- doing ----------------------------------------------------------------------------------------

def download(url: str, dest: Path, *, expected_size: int | None = None,
             expected_sha256: str | None = None, connections: int = 8,
             timeout: float = 30.0, retries: int = 4, headers: dict[str, str] | None = None,
             session: requests.Session | None = None, progress: Progress | None = None,
             check_free_space: bool = True, lock_timeout: float | None = None,
             on_wait: Callable[[LockHolder | None], None] | None = None) -> DownloadResult:
    """Download ``url`` to ``dest``: parallel, resumable, verified, atomic.

    If ``dest`` exists and matches ``expected_size`` / ``expected_sha256`` (when given) it is
    returned at once (``transferred=0``, ``url`` as given, no request made); a mismatching
    ``dest`` is downloaded again and only replaced once the new copy is verified.  Otherwise the file is fetched into ``<dest>.part``
    (see the module docstring), verified and moved into place.  Another process downloading
    the same ``dest`` is waited for (``on_wait(holder)`` is called once, ``lock_timeout``
    seconds at most, None: forever), and its result reused.

    Args:
        connections: concurrent range requests at most (1 = sequential pieces).
        timeout: seconds to connect, and seconds without any data before a request is retried.
        retries: further attempts per request after a failure, with backoff and Retry-After.
        headers: sent with every request (e.g. ``Authorization``; requests drops that one when
            a redirect leaves the host).
        session: reused for the connections; by default one is made and closed.
        progress: receives ``set_total`` and ``update`` calls; the engine never prints.
        check_free_space: refuse to start when the disk lacks room for the missing bytes.

    Returns:
        :class:`DownloadResult` (final URL, bytes transferred in this call, bytes resumed).

    Raises:
        NotFoundError: HTTP 404/410.
        AuthError: HTTP 401/403.
        SourceError: unreachable after retries, another HTTP error, a redirect loop, or an
            HTML page instead of the file.
        IntegrityError: size or sha256 mismatch (a bad ``.part`` is deleted), or a body that
            stays short after retries.
        CkptkitError: not enough free space; the lock was lost to another process.
        LockTimeoutError: ``lock_timeout`` expired.

    Example::

        result = download("https://example.org/model.npz", cache / "model.npz",
                          expected_sha256="9f86d0...", progress=bar)
    """
    dest = Path(dest)
    _validate(connections=connections, timeout=timeout, retries=retries,
              expected_sha256=expected_sha256)
    want_sha = expected_sha256.lower() if expected_sha256 else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    # os.replace makes dest appear complete or not at all, so looking before locking is safe.
    reused = _reuse_existing(dest, url, expected_size, want_sha)
    if reused is not None:
        return reused
    lock = FileLock(_sibling(dest, ".lock"), timeout=lock_timeout,
                    poll_interval=LOCK_POLL_INTERVAL, stale_after=LOCK_STALE_AFTER,
                    on_wait=on_wait, purpose=f"downloading {url}")
    with lock:
        reused = _reuse_existing(dest, url, expected_size, want_sha)
        if reused is not None:
            return reused  # another process finished it while we waited
        http = session if session is not None else _new_session(connections)
        try:
            return _Transfer(url, dest, http=http, lock=lock, expected_size=expected_size,
                             expected_sha256=want_sha, connections=connections, timeout=timeout,
                             retries=retries, headers=headers or {}, progress=progress,
                             check_free_space=check_free_space).run()
        finally:
            if session is None:
                http.close()


def _validate(*, connections: int, timeout: float, retries: int,
              expected_sha256: str | None) -> None:
    if connections < 1 or retries < 0 or timeout <= 0:
        raise UsageError(f"connections ({connections}) must be >= 1, retries ({retries}) >= 0 "
                         f"and timeout ({timeout}) > 0")
    if expected_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        raise UsageError(f"expected_sha256 {expected_sha256!r} is not 64 hex digits")


def _reuse_existing(dest: Path, url: str, expected_size: int | None,
                    expected_sha256: str | None) -> DownloadResult | None:
    if not dest.is_file():
        return None
    size = dest.stat().st_size
    if expected_size is not None and size != expected_size:
        return None
    digest = _hash_file(dest)
    if expected_sha256 is not None and digest != expected_sha256:
        return None
    return DownloadResult(path=dest, size=size, sha256=digest, url=url, transferred=0,
                          resumed_from=0)


def _new_session(connections: int) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, connections))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.max_redirects = MAX_REDIRECTS
    return session


def _sibling(dest: Path, suffix: str) -> Path:
    return dest.with_name(dest.name + suffix)


def _hash_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK_SIZE):
            sha.update(block)
    return sha.hexdigest()


class _Transient(Exception):
    """A failure worth retrying; ``kind`` decides the error raised once retries run out."""

    def __init__(self, kind: Literal["connect", "timeout", "status", "body"], detail: str, *,
                 status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


class _Restart(Exception):
    """The server answered a range request with the whole file: start over."""

    def __init__(self, changed: bool) -> None:
        super().__init__("file changed" if changed else "range ignored")
        self.changed = changed


class _Aborted(Exception):
    """Another piece failed; this one stops quietly."""


@dataclass
class _Cursor:
    """Where the next byte of a request goes; survives the request so a retry resumes."""

    pos: int
    sniff_pending: bool = False


class _PartFile:
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


class _Meter:
    """Counts payload bytes across threads and forwards progress without double counting."""

    def __init__(self, progress: Progress | None) -> None:
        self.transferred = 0
        self._progress = progress
        self._lock = threading.Lock()
        self._position = 0
        self._reported = 0
        self._total: int | None = None
        self._total_sent = False

    def start(self, total: int | None, position: int) -> None:
        with self._lock:
            if self._progress is not None and (not self._total_sent or total != self._total):
                self._progress.set_total(total)
            self._total, self._total_sent, self._position = total, True, position
            self._forward()

    def add(self, n: int) -> None:
        with self._lock:
            self.transferred += n
            self._position += n
            self._forward()

    def _forward(self) -> None:
        if self._progress is not None and self._position > self._reported:
            self._progress.update(self._position - self._reported)
            self._reported = self._position


class _PrefixHasher:
    """sha256 of the contiguous run of finished pieces from the start, read back from the
    page cache as it grows; only pieces finished out of order wait for their turn."""

    def __init__(self, part: _PartFile, pieces: tuple[Piece, ...]) -> None:
        self._part = part
        self._pieces = pieces
        self._next = 0
        self._sha = hashlib.sha256()

    def advance(self, done: set[int]) -> None:
        while self._next < len(self._pieces) and self._next in done:
            piece = self._pieces[self._next]
            for offset in range(piece.start, piece.end, CHUNK_SIZE):
                block = self._part.read_at(min(CHUNK_SIZE, piece.end - offset), offset)
                if not block:
                    raise IntegrityError(f"{self._part.path} ended at byte {offset:,} while "
                                         f"hashing", path=str(self._part.path))
                self._sha.update(block)
            self._next += 1

    def hexdigest(self) -> str:
        if self._next != len(self._pieces):
            raise RuntimeError("hashed before every piece was finished")
        return self._sha.hexdigest()


class _Transfer:
    """One download of ``url`` into ``dest``, run under its lock."""

    def __init__(self, url: str, dest: Path, *, http: requests.Session, lock: FileLock,
                 expected_size: int | None, expected_sha256: str | None, connections: int,
                 timeout: float, retries: int, headers: dict[str, str],
                 progress: Progress | None, check_free_space: bool) -> None:
        self.url = url
        self.dest = dest
        self.part = _sibling(dest, ".part")
        self.sidecar = _sibling(dest, ".part.json")
        self.http = http
        self.lock = lock
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self.connections = connections
        self.timeout = timeout
        self.retries = retries
        self.headers = {"User-Agent": f"ckptkit/{__version__}", **headers,
                        "Accept-Encoding": "identity"}  # byte ranges of the file, not of a gzip
        self.meter = _Meter(progress)
        self.check_free_space = check_free_space
        self.html_ok = html_expected(url)
        self.final_url = url
        self.size: int | None = None
        self.stop = threading.Event()
        self._poisoned = False  # the .part holds bytes that must not be resumed
        self._active: set[requests.Response] = set()
        self._active_lock = threading.Lock()

    def run(self) -> DownloadResult:
        try:
            return self._run()
        except BaseException:
            if self._poisoned:
                self._discard_partial()
            raise

    def _run(self) -> DownloadResult:
        force_stream = False
        for restart in range(MAX_RESTARTS + 1):
            self.stop.clear()
            probe, response = self._probe()
            self.final_url, self.size = probe.final_url, probe.size
            if probe.size is not None and self.expected_size is not None \
                    and probe.size != self.expected_size:
                if response is not None:
                    self._close(response)
                raise self._size_error(probe.size)
            try:
                if probe.ranges and probe.size is not None and not force_stream:
                    size, digest, resumed = self._run_pieces(probe)
                else:
                    size, digest, resumed = (*self._run_stream(response), 0)
            except _Restart as exc:
                self._discard_partial()
                force_stream = not exc.changed or restart + 1 == MAX_RESTARTS
                continue
            return self._finalize(size, digest, resumed)
        raise SourceError(f"{self.url} changed {MAX_RESTARTS + 1} times during the download",
                          hint="Try again later or use another source", url=self.url)

    # -- probe ----------------------------------------------------------------------------------

    def _probe(self) -> tuple[Probe, requests.Response | None]:
        """Learn size, range support and validators.  A server that ignores Range answers 200
        with the whole body: that response is returned open, to be streamed, not thrown away."""
        retrier = _Retrier(self)
        while True:
            try:
                return self._probe_once()
            except _Transient as err:
                retrier.failed(err)

    def _probe_once(self) -> tuple[Probe, requests.Response | None]:
        resp = self._open(self.url, {"Range": "bytes=0-0"})
        keep = False
        try:
            status = resp.status_code
            etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
            if status == 206:
                self._check_content_type(resp)
                span = parse_content_range(resp.headers.get("Content-Range"))
                total = span.total if span is not None else None
                return Probe(resp.url, total, total is not None, etag, modified), None
            if status == 200:
                self._check_content_type(resp)
                keep = True
                return Probe(resp.url, _content_length(resp), False, etag, modified), resp
            if status == 416:
                span = parse_content_range(resp.headers.get("Content-Range"))
                if span is not None and span.total == 0:  # bytes=0-0 of an empty file
                    return Probe(resp.url, 0, True, etag, modified), None
                return Probe(resp.url, None, False, etag, modified), None
            raise self._status_error(resp)
        finally:
            if not keep:
                self._close(resp, drain=True)

    # -- parallel pieces ------------------------------------------------------------------------

    def _run_pieces(self, probe: Probe) -> tuple[int, str, int]:
        size = probe.size
        assert size is not None
        saved = _load_sidecar(self.sidecar)
        part_size = self.part.stat().st_size if self.part.is_file() else None
        resume = can_resume(saved, probe, self.url, part_size)
        if saved is not None and resume:
            plan = plan_pieces(size, saved.done, saved.piece_size, self.connections)
        else:
            # The old sidecar goes first: a crash right after truncating must not leave a
            # sidecar that vouches for zeroed pieces.
            self._discard_partial()
            plan = plan_pieces(size, frozenset(), None, self.connections)
        self._check_space(size - plan.have_bytes)
        state = Sidecar(url=self.url, final_url=probe.final_url, size=size, etag=probe.etag,
                        last_modified=probe.last_modified, piece_size=plan.piece_size,
                        done=plan.have)
        part = _PartFile(self.part, truncate_to=None if resume else size)
        try:
            _save_sidecar(self.sidecar, state)
            self.meter.start(size, plan.have_bytes)
            hasher = _PrefixHasher(part, plan.pieces)
            self._fetch_pieces(part, plan, probe.validator, state, hasher)
            return size, hasher.hexdigest(), plan.have_bytes
        finally:
            part.close()

    def _fetch_pieces(self, part: _PartFile, plan: PiecePlan, validator: str | None,
                      state: Sidecar, hasher: _PrefixHasher) -> None:
        done = set(state.done)
        if not plan.missing:
            hasher.advance(done)
            return
        with ThreadPoolExecutor(max_workers=plan.workers,
                                thread_name_prefix="ckpt-download") as pool:
            futures = [pool.submit(self._fetch_piece, part, piece, validator)
                       for piece in plan.missing]
            try:
                hasher.advance(done)  # a resumed prefix is hashed while new pieces arrive
                for future in as_completed(futures):
                    piece = future.result()
                    done.add(piece.index)
                    self._check_lock()
                    # Recorded only after the piece's data is synced: kill -9 loses in-flight
                    # pieces, never a piece the sidecar claims.
                    _save_sidecar(self.sidecar, replace(state, done=frozenset(done)))
                    if piece.index == 0:
                        self._sniff(part)
                    hasher.advance(done)
            except BaseException:
                self.stop.set()
                for future in futures:
                    future.cancel()
                self._abort_active()
                raise

    def _fetch_piece(self, part: _PartFile, piece: Piece, validator: str | None) -> Piece:
        cursor = _Cursor(piece.start)
        retrier = _Retrier(self)
        while cursor.pos < piece.end:
            before = cursor.pos
            try:
                self._fetch_range(part, cursor, piece.end, validator)
            except _Transient as err:
                if cursor.pos > before:
                    retrier.reset()  # it made progress: the retry continues from cursor.pos
                retrier.failed(err)
        part.datasync()
        return piece

    def _fetch_range(self, part: _PartFile, cursor: _Cursor, end: int,
                     validator: str | None) -> None:
        asked = f"bytes={cursor.pos}-{end - 1}"
        extra = {"Range": asked} | ({"If-Range": validator} if validator else {})
        with self._opened(self.final_url, extra) as resp:
            if resp.status_code == 200:
                raise _Restart(changed=validator is not None)
            if resp.status_code != 206:
                raise self._status_error(resp)
            self._check_content_type(resp)
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None or (span.start, span.end) != (cursor.pos, end - 1) \
                    or span.total not in (None, self.size):
                raise _Transient("body", f"asked for {asked} of {self.size:,}, got Content-Range "
                                         f"{resp.headers.get('Content-Range')!r}")
            length = _content_length(resp)
            if length is not None and length != end - cursor.pos:
                raise _Transient("body", f"Content-Length {length:,} for {asked} "
                                         f"({end - cursor.pos:,} bytes)")
            self._pump(resp, part, cursor, end)
            if cursor.pos < end:
                raise _Transient("body", f"the body of {asked} ended at byte {cursor.pos:,}")

    # -- one stream (servers that ignore Range) -------------------------------------------------

    def _run_stream(self, response: requests.Response | None) -> tuple[int, str]:
        self._discard_partial()  # earlier pieces cannot be reused without ranges
        retrier = _Retrier(self)
        while True:
            try:
                resp = response if response is not None else self._open(self.url, {})
                response = None
                return self._stream_once(resp)
            except _Transient as err:
                retrier.failed(err)

    def _stream_once(self, resp: requests.Response) -> tuple[int, str]:
        try:
            if resp.status_code != 200:
                raise self._status_error(resp)
            self._check_content_type(resp)
            total = _content_length(resp)
            if total is not None and self.expected_size is not None \
                    and total != self.expected_size:
                raise self._size_error(total)
            limit = total if total is not None else self.expected_size
            self._check_space(limit or 0)
            self.meter.start(limit, 0)
            sha = hashlib.sha256()
            cursor = _Cursor(0, sniff_pending=True)
            part = _PartFile(self.part, truncate_to=0)
            try:
                self._pump(resp, part, cursor, limit, sha)
            finally:
                part.close()
            if total is not None and cursor.pos < total:
                raise _Transient("body", f"the body ended at byte {cursor.pos:,} of {total:,}")
            return cursor.pos, sha.hexdigest()
        finally:
            self._close(resp)

    # -- shared steps ---------------------------------------------------------------------------

    def _pump(self, resp: requests.Response, part: _PartFile, cursor: _Cursor,
              end: int | None, sha: hashlib._Hash | None = None) -> None:
        """Copy the body of ``resp`` to the part file from ``cursor.pos``, at most to ``end``."""
        for chunk in self._chunks(resp):
            if end is not None and cursor.pos + len(chunk) > end:
                raise _Transient("body", f"the server sent more than the {end:,} bytes expected")
            part.write_at(chunk, cursor.pos)
            if sha is not None:
                sha.update(chunk)
            cursor.pos += len(chunk)
            self.meter.add(len(chunk))
            if cursor.sniff_pending and cursor.pos >= SNIFF_BYTES:
                cursor.sniff_pending = False
                self._sniff(part)
        if cursor.sniff_pending:  # a body shorter than SNIFF_BYTES
            cursor.sniff_pending = False
            self._sniff(part)

    def _chunks(self, resp: requests.Response) -> Iterator[bytes]:
        raw = resp.raw
        while True:
            if self.stop.is_set():
                raise _Aborted()
            try:
                data = raw.read1(CHUNK_SIZE, decode_content=False)
            except _NETWORK_ERRORS as exc:
                if self.stop.is_set():
                    raise _Aborted() from exc
                kind = "timeout" if _is_timeout(exc) else "body"
                raise _Transient(kind, f"the connection broke mid-body ({_describe(exc)})") \
                    from exc
            if not data:
                return
            yield data

    def _open(self, url: str, extra: dict[str, str]) -> requests.Response:
        try:
            resp = self.http.get(url, headers={**self.headers, **extra}, stream=True,
                                 timeout=(self.timeout, self.timeout), allow_redirects=True)
        except requests.TooManyRedirects as exc:
            raise SourceError(f"{self.url} redirects in a loop (more than "
                              f"{self.http.max_redirects} redirects)",
                              hint="The server is misconfigured; try another source",
                              url=self.url) from exc
        except requests.exceptions.SSLError as exc:
            raise SourceError(f"{self.url}: TLS failed ({_describe(exc)})",
                              hint="Check the system clock and CA certificates "
                                   "(REQUESTS_CA_BUNDLE)", url=self.url) from exc
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise SourceError(f"{url} is not a valid http(s) URL ({_describe(exc)})",
                              hint="Fix the URL in the catalogue or the command line",
                              url=url) from exc
        except _NETWORK_ERRORS as exc:
            kind = "timeout" if _is_timeout(exc) else "connect"
            raise _Transient(kind, _describe(exc)) from exc
        with self._active_lock:
            self._active.add(resp)
        return resp

    @contextmanager
    def _opened(self, url: str, extra: dict[str, str]) -> Iterator[requests.Response]:
        resp = self._open(url, extra)
        try:
            yield resp
        finally:
            self._close(resp)

    def _close(self, resp: requests.Response, drain: bool = False) -> None:
        with self._active_lock:
            self._active.discard(resp)
        raw = resp.raw
        if drain:  # the probe's one byte (or a short error page) is read to reuse the socket
            try:
                raw.read(64 << 10, decode_content=False)
            except _NETWORK_ERRORS:
                pass
        if getattr(raw, "length_remaining", None) == 0:
            raw.release_conn()  # body fully read: keep the connection for the next piece
        else:
            resp.close()

    def _abort_active(self) -> None:
        """Wake threads blocked reading a stalled socket, so stopping takes no ``timeout``."""
        with self._active_lock:
            responses = list(self._active)
        for resp in responses:
            try:
                resp.raw.shutdown()  # urllib3 >= 2.3
                continue
            except (AttributeError, ValueError, RuntimeError, OSError):
                pass
            sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _status_error(self, resp: requests.Response) -> Exception:
        status = resp.status_code
        if status in (404, 410):
            return NotFoundError(f"{self.url} does not exist (HTTP {status})",
                                 hint="Check the URL, or use another source", path=str(self.dest))
        if status in (401, 403):
            return AuthError(f"{self.url} refused access (HTTP {status})",
                             hint="Provide credentials (a token or login for this source) or "
                                  "accept its terms, or use another source",
                             url=self.url, status=status, path=str(self.dest))
        if status in RETRY_STATUSES:
            return _Transient("status", f"HTTP {status}", status=status,
                              retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        return SourceError(f"{self.url} answered HTTP {status} {resp.reason or ''}".rstrip(),
                           hint="Try another source", url=self.url, status=status,
                           path=str(self.dest))

    def final_error(self, err: _Transient, attempts: int) -> CkptkitError:
        """The error for ``err`` once every retry failed."""
        if err.kind == "body":
            return IntegrityError(f"{self.url}: {err.detail} (after {attempts} attempts)",
                                  hint="The server keeps sending incomplete data; try again "
                                       "later or use another source", path=str(self.dest))
        return SourceError(f"{self.url} is unreachable: {err.detail} (after {attempts} attempts)",
                           hint="Check the network, try again later, or use another source",
                           url=self.url, status=err.status, path=str(self.dest))

    def _check_content_type(self, resp: requests.Response) -> None:
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype in _HTML_TYPES and not self.html_ok:
            raise self._html_error(f"Content-Type {ctype}")

    def _sniff(self, part: _PartFile) -> None:
        if not self.html_ok and looks_like_html(part.read_at(SNIFF_BYTES, 0)):
            raise self._html_error("the body is an HTML document")

    def _html_error(self, why: str) -> SourceError:
        self._poisoned = True
        return SourceError(f"{self.url} returned an HTML page instead of the file ({why})",
                           hint="The link may need a login or a confirmation page, or has "
                                "moved; try another source", url=self.url, path=str(self.dest))

    def _size_error(self, size: int) -> IntegrityError:
        return IntegrityError(f"{self.url} serves {size:,} bytes but {self.expected_size:,} "
                              f"were expected", hint="This source has a different file; try "
                                                     "another source", path=str(self.dest))

    def _check_space(self, needed: int) -> None:
        if not self.check_free_space or needed <= 0:
            return
        free = shutil.disk_usage(self.dest.parent).free
        if free < needed + FREE_SPACE_MARGIN:
            raise CkptkitError(f"downloading {self.url} needs {needed + FREE_SPACE_MARGIN:,} "
                               f"bytes in {self.dest.parent}, {free:,} free",
                               hint="Free some disk space or download to another disk",
                               path=str(self.dest))

    def _check_lock(self) -> None:
        if self.lock.lost:
            raise CkptkitError(f"another process took over the lock {self.lock.path} while "
                               f"this one was downloading {self.url}",
                               hint="Run the download again", path=str(self.dest))

    def _discard_partial(self) -> None:
        self.part.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)

    def _finalize(self, size: int, digest: str, resumed: int) -> DownloadResult:
        actual = self.part.stat().st_size
        wanted = self.expected_size if self.expected_size is not None else size
        if actual != size or actual != wanted:
            self._poisoned = True
            raise IntegrityError(f"{self.url}: downloaded {actual:,} bytes, expected {wanted:,}",
                                 hint="Try again or use another source", path=str(self.dest))
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            self._poisoned = True
            raise IntegrityError(f"{self.url}: sha256 is {digest}, expected "
                                 f"{self.expected_sha256}",
                                 hint="The download was deleted; this source serves other "
                                      "bytes, try another source", path=str(self.dest))
        self._check_lock()
        os.replace(self.part, self.dest)
        _fsync_dir(self.dest.parent)
        self.sidecar.unlink(missing_ok=True)
        return DownloadResult(path=self.dest, size=size, sha256=digest, url=self.final_url,
                              transferred=self.meter.transferred, resumed_from=resumed)


class _Retrier:
    """Counts failed attempts of one request and sleeps between them."""

    def __init__(self, transfer: _Transfer) -> None:
        self._transfer = transfer
        self._attempts = 0

    def reset(self) -> None:
        self._attempts = 0

    def failed(self, err: _Transient) -> None:
        """Sleep before the next attempt, or raise the final error when none is left."""
        self._attempts += 1
        if self._attempts > self._transfer.retries:
            raise self._transfer.final_error(err, self._attempts) from err
        if self._transfer.stop.wait(backoff_delay(self._attempts, err.retry_after)):
            raise _Aborted()


def _load_sidecar(path: Path) -> Sidecar | None:
    try:
        return Sidecar.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or not text: nothing to resume
        return None


def _save_sidecar(path: Path, state: Sidecar) -> None:
    tmp = _sibling(path, ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(state.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open directories; its rename is durable enough
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError))


def _describe(exc: BaseException) -> str:
    """A short one-line reason from a requests/urllib3 exception chain."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
