"""HTTP downloads that are parallel, resumable across runs, verified and atomic.

:func:`download` fetches one URL into one file.  While it runs, three files sit beside ``dest``:

* ``<dest>.part``: the data, pre-sized and written at each piece's offset;
* ``<dest>.part.json``: the sidecar: URL, size, the server's validators (ETag / Last-Modified),
  the pieces already on disk and how far each piece in flight has got (recorded every
  :func:`~ckptkit.transfer_plan.checkpoint_interval` bytes, after ``fdatasync``), so a rerun
  after ``kill -9`` fetches only what is missing;
* ``<dest>.lock``: a :class:`~ckptkit.locks.FileLock`, so two processes never write one ``.part``.

``dest`` itself only ever appears through the final ``os.replace``, after size and sha256 are
verified, so a file under its final name is always complete.

How a transfer runs: one probe (``GET`` with ``Range: bytes=0-0``; HEAD answers are often wrong)
learns the size, range support and validators.  A server that honours ranges gets up to
``connections`` concurrent range requests, one piece each, every one sent with ``If-Range`` so a
file that changes mid-way is noticed.  A server that ignores ranges streams the probe's own
answer.  sha256 is computed during the transfer, over the contiguous prefix of finished pieces.

What a transfer may cost is bounded (:class:`~ckptkit.transfer_plan.TransferLimits`): a body of
unexpected size may not pass ``max_bytes`` (refused before the body when the server announces
more, cut off when it streams more), its headers must come within ``header_timeout`` and its
body must keep above the low-speed limit (:mod:`ckptkit.stalls`).  Tripping any of them fails
the download at once (no retry: a source that did it once would do it again).

This module drives a transfer; the decisions are pure functions in
:mod:`ckptkit.transfer_plan`, the HTTP requests and retries are :mod:`ckptkit.transport`, and
the ``.part`` / ``.part.json`` files are :mod:`ckptkit.partial`.

The knobs in upper case below are read at call time, so tests can make backoff and pieces tiny;
patch them here (``ckptkit.download.BACKOFF_BASE``): they are passed on to the other modules.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

import requests

from ckptkit.errors import (CkptkitError, DiskFullError, IntegrityError, SourceError,
                            UsageError, disk_full)
from ckptkit.hashing import sha256_file
from ckptkit.locks import FileLock, LockHolder
from ckptkit.partial import (PartFile, PrefixHasher, fsync_dir, load_sidecar, save_sidecar,
                             sibling)
from ckptkit import reasons, transfer_plan
from ckptkit.stalls import SpeedWatch
from ckptkit.transfer_plan import (Piece, PiecePlan, PieceSizing, Probe, Sidecar, TransferLimits,
                                   backoff_delay, can_resume, checkpoint_interval,
                                   looks_like_html, plan_pieces)
from ckptkit.transport import Restart, Transient, Transport, content_length, new_session

CHUNK_SIZE = 1 << 20              # most bytes taken from a socket at once: bounds memory
MIN_PIECE_SIZE = 8 << 20
MAX_PIECE_SIZE = 16 << 20
PARALLEL_THRESHOLD = 8 << 20      # smaller files are one piece (still resumable)
PIECE_ALIGN = 1 << 16
CHECKPOINT_FLOOR = 256 << 10      # a piece's progress is made durable every 1/16 of it,
CHECKPOINT_CAP = 4 << 20          # but not more often than this, nor more rarely than that
MAX_REDIRECTS = 10
BACKOFF_BASE = 0.5                # seconds; doubled per failed attempt, with jitter
BACKOFF_CAP = 20.0
RETRY_AFTER_CAP = 60.0
MAX_RESTARTS = 2                  # the file changed under us this many times: give up
FREE_SPACE_MARGIN = 32 << 20
LOCK_POLL_INTERVAL = 0.5
LOCK_STALE_AFTER = 60.0


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download` produced."""

    path: Path            # the final path (complete and verified)
    size: int
    sha256: str           # hex
    url: str              # final URL after redirects
    transferred: int      # payload bytes received in this call (a resume: only the missing part)
    resumed_from: int     # bytes already present from an earlier interrupted run (0 if none)
    announced: bool = True  # the server stated the size before the body (Content-Length or
    #                         Content-Range); False for a body that just streamed until it ended


class Progress(Protocol):
    """Where :func:`download` reports progress (tqdm-like); the caller creates and closes it.

    ``set_total`` is called once the size is known (None: unknown); ``update(n)`` as bytes
    arrive, from one thread at a time.  A resumed download first reports the bytes it already
    has; after a restart from scratch, updates resume once the new transfer passes the old one.
    """

    def set_total(self, total: int | None) -> None: ...

    def update(self, n: int) -> None: ...


def download(url: str, dest: Path, *, expected_size: int | None = None,
             expected_sha256: str | None = None, connections: int = 8,
             timeout: float = 30.0, retries: int = 4, headers: dict[str, str] | None = None,
             session: requests.Session | None = None, progress: Progress | None = None,
             check_free_space: bool = True, lock_timeout: float | None = None,
             on_wait: Callable[[LockHolder | None], None] | None = None,
             limits: TransferLimits | None = None) -> DownloadResult:
    """Download ``url`` to ``dest``: parallel, resumable, verified, atomic.

    If ``dest`` exists and matches ``expected_size`` / ``expected_sha256`` (when given) it is
    returned at once (``transferred=0``, ``url`` as given, no request made); a mismatching
    ``dest`` is downloaded again and only replaced once the new copy is verified.  Otherwise
    the file is fetched into ``<dest>.part`` (see the module docstring), verified and moved
    into place.  Another process downloading the same ``dest`` is waited for
    (``on_wait(holder)`` is called once, ``lock_timeout`` seconds at most, None: forever), and
    its result reused.  A ``file:`` URL (a mirror on disk) is copied, verified and renamed
    into place by :mod:`ckptkit.file_urls` instead.

    Args:
        connections: concurrent range requests at most (1 = sequential pieces).
        timeout: seconds to connect, and seconds without any data before a request is retried.
        retries: further attempts per request after a failure, with backoff and Retry-After.
        headers: sent with every request (e.g. ``Authorization``; requests drops that one when
            a redirect leaves the host).
        session: reused for the connections; by default one is made and closed (only a
            session from :func:`ckptkit.transport.new_session` keeps the header deadline).
        progress: receives ``set_total`` and ``update`` calls; the engine never prints.
        check_free_space: refuse to start when the disk lacks room for the missing bytes.
        limits: size ceiling (when ``expected_size`` is None), header deadline and low-speed
            limit [default: :class:`~ckptkit.transfer_plan.TransferLimits`'s defaults].

    Returns:
        :class:`DownloadResult` (final URL, bytes transferred in this call, bytes resumed).

    Raises:
        NotFoundError: HTTP 404/410.
        AuthError: HTTP 401/403.
        SourceError: unreachable after retries, another HTTP error, a redirect loop, an HTML
            page instead of the file, a body over ``limits.max_bytes`` (nothing is kept), headers
            past ``limits.header_timeout``, or a body below the low-speed limit.
        IntegrityError: size or sha256 mismatch (a bad ``.part`` is deleted), or a body that
            stays short after retries.
        DiskFullError: not enough free space before starting, or the disk filled up while
            writing (the ``.part`` file stays, to resume from).
        CkptkitError: the lock was lost to another process.
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
    from ckptkit import file_urls

    if file_urls.is_file_url(url):  # a mirror on disk: copied with the same checks
        return file_urls.copy(url, dest, expected_size=expected_size,
                              expected_sha256=want_sha, progress=progress)
    lock = FileLock(sibling(dest, ".lock"), timeout=lock_timeout,
                    poll_interval=LOCK_POLL_INTERVAL, stale_after=LOCK_STALE_AFTER,
                    on_wait=on_wait, purpose=f"downloading {url}")
    with lock:
        reused = _reuse_existing(dest, url, expected_size, want_sha)
        if reused is not None:
            return reused  # another process finished it while we waited
        limits = limits or TransferLimits()
        http = session if session is not None else new_session(connections, MAX_REDIRECTS,
                                                                limits.header_timeout)
        try:
            return _Transfer(url, dest, http=http, lock=lock, expected_size=expected_size,
                             expected_sha256=want_sha, connections=connections, timeout=timeout,
                             retries=retries, headers=headers or {}, progress=progress,
                             check_free_space=check_free_space, limits=limits).run()
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
    digest = sha256_file(dest)
    if expected_sha256 is not None and digest != expected_sha256:
        return None
    return DownloadResult(path=dest, size=size, sha256=digest, url=url, transferred=0,
                          resumed_from=0, announced=expected_size is not None)


def _piece_sizing() -> PieceSizing:
    """The piece-size knobs of this module, read now (tests patch them)."""
    return PieceSizing(min_size=MIN_PIECE_SIZE, max_size=MAX_PIECE_SIZE,
                       parallel_threshold=PARALLEL_THRESHOLD, align=PIECE_ALIGN)


def _backoff(attempt: int, retry_after: float | None) -> float:
    """:func:`~ckptkit.transfer_plan.backoff_delay` with this module's knobs, read now."""
    return backoff_delay(attempt, retry_after, base=BACKOFF_BASE, cap=BACKOFF_CAP,
                         retry_after_cap=RETRY_AFTER_CAP)


@dataclass
class _Cursor:
    """Where the next byte of a request goes; survives the request so a retry resumes.

    For a piece, ``on_progress(pos)`` is called every ``interval`` bytes (from ``synced``, the
    last position made durable), to record the piece's progress.
    """

    pos: int
    sniff_pending: bool = False
    interval: int = 0
    synced: int = 0
    on_progress: Callable[[int], None] | None = None

    def advanced(self) -> None:
        if self.on_progress is not None and self.pos - self.synced >= self.interval:
            self.on_progress(self.pos)
            self.synced = self.pos


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


class _Transfer:
    """One download of ``url`` into ``dest``, run under its lock."""

    def __init__(self, url: str, dest: Path, *, http: requests.Session, lock: FileLock,
                 expected_size: int | None, expected_sha256: str | None, connections: int,
                 timeout: float, retries: int, headers: dict[str, str],
                 progress: Progress | None, check_free_space: bool,
                 limits: TransferLimits) -> None:
        self.url = url
        self.dest = dest
        self.part = sibling(dest, ".part")
        self.sidecar = sibling(dest, ".part.json")
        self.limits = limits
        self.net = Transport(url, dest, http=http, headers=headers, timeout=timeout,
                             retries=retries, backoff=_backoff)
        self.lock = lock
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self.connections = connections
        self.meter = _Meter(progress)
        self.check_free_space = check_free_space
        self.final_url = url
        self.size: int | None = None
        self.announced = False
        self._poisoned = False  # the .part holds bytes that must not be resumed
        self._state: Sidecar | None = None  # what the sidecar says, under _state_lock
        self._state_lock = threading.Lock()

    def run(self) -> DownloadResult:
        try:
            return self._run()
        except BaseException as exc:
            if self._poisoned or self.net.html_seen:
                self._discard_partial()
            full = disk_full(exc, self.part, f"downloading {self.url}", hint=(
                f"Free some space in {self.dest.parent} and run again (the download resumes "
                "from the .part file), or download to another disk"))
            if full is not None:
                raise full from exc
            raise

    def _run(self) -> DownloadResult:
        force_stream = False
        for restart in range(MAX_RESTARTS + 1):
            self.net.stop.clear()
            probe, response = self.net.probe()
            self.final_url, self.size = probe.final_url, probe.size
            wrong = probe.size is not None and (
                probe.size != self.expected_size if self.expected_size is not None
                else self._over_ceiling(probe.size))
            if wrong:
                if response is not None:
                    self.net.close(response)
                assert probe.size is not None
                raise (self._size_error(probe.size) if self.expected_size is not None
                       else self._too_large())
            try:
                if probe.ranges and probe.size is not None and not force_stream:
                    size, digest, resumed = self._run_pieces(probe)
                else:
                    size, digest, resumed = (*self._run_stream(response), 0)
            except Restart as exc:
                self._discard_partial()
                force_stream = not exc.changed or restart + 1 == MAX_RESTARTS
                continue
            return self._finalize(size, digest, resumed)
        raise SourceError(f"{self.url} changed {MAX_RESTARTS + 1} times during the download",
                          hint="Try again later or use another source", url=self.url)

    # -- parallel pieces ------------------------------------------------------------------------

    def _run_pieces(self, probe: Probe) -> tuple[int, str, int]:
        size = probe.size
        assert size is not None
        saved = load_sidecar(self.sidecar)
        part_size = self.part.stat().st_size if self.part.is_file() else None
        resume = can_resume(saved, probe, self.url, part_size)
        if saved is not None and resume:
            plan = plan_pieces(size, saved.done, saved.piece_size, self.connections,
                               _piece_sizing(), saved.partial)
        else:
            # The old sidecar goes first: a crash right after truncating must not leave a
            # sidecar that vouches for zeroed pieces.
            self._discard_partial()
            plan = plan_pieces(size, frozenset(), None, self.connections, _piece_sizing())
        self._check_space(size - plan.have_bytes)
        layout = {piece.index: piece for piece in plan.pieces}
        partial = tuple((p.index, p.start - layout[p.index].start) for p in plan.missing
                        if p.start > layout[p.index].start)
        self._state = Sidecar(url=self.url, final_url=probe.final_url, size=size,
                              etag=probe.etag, last_modified=probe.last_modified,
                              piece_size=plan.piece_size, done=plan.have, partial=partial)
        self.announced = True
        part = PartFile(self.part, truncate_to=None if resume else size)
        try:
            save_sidecar(self.sidecar, self._state)
            self.meter.start(size, plan.have_bytes)
            hasher = PrefixHasher(part, plan.pieces, CHUNK_SIZE)
            self._fetch_pieces(part, plan, probe.validator, hasher)
            return size, hasher.hexdigest(), plan.have_bytes
        finally:
            part.close()

    def _fetch_pieces(self, part: PartFile, plan: PiecePlan, validator: str | None,
                      hasher: PrefixHasher) -> None:
        done = set(plan.have)
        if not plan.missing:
            hasher.advance(done)
            return
        with ThreadPoolExecutor(max_workers=plan.workers,
                                thread_name_prefix="ckpt-download") as pool:
            futures = [pool.submit(self._fetch_piece, part, piece,
                                   plan.pieces[piece.index], validator)
                       for piece in plan.missing]
            try:
                hasher.advance(done)  # a resumed prefix is hashed while new pieces arrive
                for future in as_completed(futures):
                    piece = future.result()
                    done.add(piece.index)
                    self._check_lock()
                    # Recorded only after the piece's data is synced: kill -9 loses what
                    # arrived since the piece's last checkpoint, never bytes the sidecar claims.
                    self._record(piece.index, None)
                    if piece.index == 0:
                        self._sniff(part)
                    hasher.advance(done)
            except BaseException:
                self.net.stop.set()
                for future in futures:
                    future.cancel()
                self.net.abort_active()
                raise

    def _fetch_piece(self, part: PartFile, piece: Piece, whole: Piece,
                     validator: str | None) -> Piece:
        """Fetch ``piece`` (what is missing of the layout's piece ``whole``); its progress is
        made durable every :func:`checkpoint_interval` bytes."""
        def checkpoint(pos: int) -> None:
            part.datasync()
            self._record(whole.index, pos - whole.start)

        cursor = _Cursor(piece.start, synced=piece.start, on_progress=checkpoint,
                         interval=checkpoint_interval(whole, CHECKPOINT_FLOOR, CHECKPOINT_CAP))
        retrier = self.net.retrier()
        while cursor.pos < piece.end:
            before = cursor.pos
            try:
                self._fetch_range(part, cursor, piece.end, validator)
            except Transient as err:
                if cursor.pos > before:
                    retrier.reset()  # it made progress: the retry continues from cursor.pos
                retrier.failed(err)
        part.datasync()
        return piece

    def _record(self, index: int, prefix: int | None) -> None:
        """Save the sidecar with piece ``index`` done (``prefix`` None) or with its first
        ``prefix`` bytes on disk; the caller has synced them."""
        with self._state_lock:
            state = self._state
            assert state is not None
            partial = dict(state.partial)
            if prefix is None:
                partial.pop(index, None)
                state = replace(state, done=state.done | {index})
            else:
                partial[index] = prefix
            self._state = replace(state, partial=tuple(sorted(partial.items())))
            save_sidecar(self.sidecar, self._state)

    def _fetch_range(self, part: PartFile, cursor: _Cursor, end: int,
                     validator: str | None) -> None:
        asked = f"bytes={cursor.pos}-{end - 1}"
        with self.net.opened_range(self.final_url, cursor.pos, end, self.size,
                                   validator) as resp:
            self._pump(resp, part, cursor, end)
            if cursor.pos < end:
                raise Transient("body", f"the body of {asked} ended at byte {cursor.pos:,}")

    # -- one stream (servers that ignore Range) -------------------------------------------------

    def _run_stream(self, response: requests.Response | None) -> tuple[int, str]:
        self._discard_partial()  # earlier pieces cannot be reused without ranges
        # Nor can this stream's bytes be resumed: whatever ends it, they are deleted.
        self._poisoned = True
        retrier = self.net.retrier()
        while True:
            try:
                resp = response if response is not None else self.net.open(self.url, {})
                response = None
                return self._stream_once(resp)
            except Transient as err:
                retrier.failed(err)

    def _stream_once(self, resp: requests.Response) -> tuple[int, str]:
        try:
            if resp.status_code != 200:
                raise self.net.status_error(resp)
            self.net.check_content_type(resp)
            total = content_length(resp)
            self.announced = total is not None
            if total is not None and self.expected_size is not None \
                    and total != self.expected_size:
                raise self._size_error(total)
            if total is not None and self.expected_size is None and self._over_ceiling(total):
                raise self._too_large()
            limit = total if total is not None else self.expected_size
            self._check_space(limit or 0)
            self.meter.start(limit, 0)
            sha = hashlib.sha256()
            cursor = _Cursor(0, sniff_pending=True)
            part = PartFile(self.part, truncate_to=0)
            try:
                self._pump(resp, part, cursor, limit, sha)
            finally:
                part.close()
            if total is not None and cursor.pos < total:
                raise Transient("body", f"the body ended at byte {cursor.pos:,} of {total:,}")
            return cursor.pos, sha.hexdigest()
        finally:
            self.net.close(resp)

    # -- shared steps ---------------------------------------------------------------------------

    def _pump(self, resp: requests.Response, part: PartFile, cursor: _Cursor,
              end: int | None, sha: hashlib._Hash | None = None) -> None:
        """Copy the body of ``resp`` to the part file from ``cursor.pos``, at most to ``end``
        (None: as long as it lasts, up to the ceiling), above the low-speed limit."""
        watch = SpeedWatch(self.limits.min_speed, self.limits.speed_window)
        ceiling = self.limits.max_bytes
        for chunk in self.net.chunks(resp, CHUNK_SIZE):
            if end is not None and cursor.pos + len(chunk) > end:
                raise Transient("body", f"the server sent more than the {end:,} bytes expected")
            if end is None and ceiling is not None and cursor.pos + len(chunk) > ceiling:
                raise self._too_large()
            part.write_at(chunk, cursor.pos)
            if sha is not None:
                sha.update(chunk)
            cursor.pos += len(chunk)
            self.meter.add(len(chunk))
            cursor.advanced()
            if watch.add(len(chunk)):
                raise self._stalled()
            if cursor.sniff_pending and cursor.pos >= transfer_plan.SNIFF_BYTES:
                cursor.sniff_pending = False
                self._sniff(part)
        if cursor.sniff_pending:  # a body shorter than SNIFF_BYTES
            cursor.sniff_pending = False
            self._sniff(part)

    def _sniff(self, part: PartFile) -> None:
        if not self.net.html_ok and looks_like_html(part.read_at(transfer_plan.SNIFF_BYTES, 0)):
            raise self.net.html_error("the body is an HTML document")

    def _size_error(self, size: int) -> IntegrityError:
        return IntegrityError(f"{self.url} serves {size:,} bytes but {self.expected_size:,} "
                              f"were expected", hint="This source has a different file; try "
                                                     "another source", path=str(self.dest),
                              reason=f"{size:,} bytes instead of {self.expected_size:,}")

    def _over_ceiling(self, size: int) -> bool:
        return self.limits.max_bytes is not None and size > self.limits.max_bytes

    def _too_large(self) -> SourceError:
        assert self.limits.max_bytes is not None
        reason = reasons.too_large(self.limits.max_bytes)
        return SourceError(f"{self.url}: {reason}, the ceiling for a file of unknown size",
                           hint="If the file is genuine, raise CKPTKIT_MAX_DOWNLOAD or give its "
                                "size in the catalogue; otherwise try another source",
                           url=self.url, path=str(self.dest), reason=reason)

    def _stalled(self) -> SourceError:
        reason = reasons.stalled(self.limits.min_speed, self.limits.speed_window)
        return SourceError(f"{self.url}: {reason}",
                           hint="The server is too slow; try another source, or lower "
                                "CKPTKIT_LOW_SPEED_LIMIT", url=self.url, path=str(self.dest),
                           reason=reason)

    def _check_space(self, needed: int) -> None:
        if not self.check_free_space or needed <= 0:
            return
        free = shutil.disk_usage(self.dest.parent).free
        if free < needed + FREE_SPACE_MARGIN:
            raise DiskFullError(f"not enough disk space for {self.dest}: downloading {self.url} "
                                f"needs {needed + FREE_SPACE_MARGIN:,} bytes in "
                                f"{self.dest.parent}, {free:,} free",
                                hint="Free some disk space or download to another disk",
                                path=str(self.dest), errno_=errno.ENOSPC)

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
                                 hint="Try again or use another source", path=str(self.dest),
                                 reason=f"{actual:,} bytes instead of {wanted:,}")
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            self._poisoned = True
            raise IntegrityError(f"{self.url}: sha256 is {digest}, expected "
                                 f"{self.expected_sha256}",
                                 hint="The download was deleted; this source serves other "
                                      "bytes, try another source", path=str(self.dest),
                                 reason=reasons.sha256_mismatch(digest, self.expected_sha256))
        self._check_lock()
        os.replace(self.part, self.dest)
        fsync_dir(self.dest.parent)
        self.sidecar.unlink(missing_ok=True)
        return DownloadResult(path=self.dest, size=size, sha256=digest, url=self.final_url,
                              transferred=self.meter.transferred, resumed_from=resumed,
                              announced=self.announced)

