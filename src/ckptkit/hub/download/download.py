"""HTTP downloads that are parallel, resumable across runs, verified and atomic.

:func:`download` fetches one URL into one file.  While it runs, three files sit beside ``dest``:

* ``<dest>.part``: the data, pre-sized and written at each piece's offset;
* ``<dest>.part.json``: the sidecar: URL, size, the server's validators (ETag / Last-Modified),
  the pieces already on disk and how far each piece in flight has got (recorded every
  :func:`~ckptkit.hub.download.transfer_plan.checkpoint_interval` bytes, after ``fdatasync``), so a rerun
  after ``kill -9`` fetches only what is missing;
* ``<dest>.lock``: a :class:`~ckptkit.storage.locks.FileLock`, so two processes never write one ``.part``.

``dest`` itself only ever appears through the final ``os.replace``, after size and sha256 are
verified, so a file under its final name is always complete.

How a transfer runs: one probe (``GET`` with ``Range: bytes=0-0``; HEAD answers are often wrong)
learns the size, range support and validators.  A server that honours ranges gets up to
``connections`` concurrent range requests, one piece each, every one sent with ``If-Range`` so a
file that changes mid-way is noticed.  A server that ignores ranges streams the probe's own
answer.  sha256 is computed during the transfer, over the contiguous prefix of finished pieces.

What a transfer may cost is bounded (:class:`~ckptkit.hub.download.transfer_plan.TransferLimits`): a body of
unexpected size may not pass ``max_bytes`` (refused before the body when the server announces
more, cut off when it streams more), its headers must come within ``header_timeout`` and its
body must keep above the low-speed limit (:mod:`ckptkit.hub.download.stalls`).  Tripping any of them fails
the download at once (no retry: a source that did it once would do it again).

This module takes the lock and starts a transfer; the transfer itself is
:mod:`ckptkit.hub.download.transfer`, the decisions are pure functions in :mod:`ckptkit.hub.download.transfer_plan`, the
HTTP requests and retries are :mod:`ckptkit.hub.download.transport`, and the ``.part`` / ``.part.json`` files
are :mod:`ckptkit.hub.download.partial`.

The knobs in upper case below are read at call time, so tests can make backoff and pieces tiny;
patch them here (``ckptkit.hub.download.download.BACKOFF_BASE``): they are passed on to the other modules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import requests

from ckptkit.errors import UsageError
from ckptkit.storage.hashing import sha256_file
from ckptkit.storage.locks import FileLock, LockHolder
from ckptkit.hub.download.partial import sibling
from ckptkit.hub.download.transfer import DownloadResult, Knobs, Progress, Transfer
from ckptkit.hub.download.transfer_plan import PieceSizing, TransferLimits, backoff_delay
from ckptkit.hub.download.transport import new_session

__all__ = ["DownloadResult", "Progress", "download"]

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
    into place by :mod:`ckptkit.hub.download.file_urls` instead.

    Args:
        connections: concurrent range requests at most (1 = sequential pieces).
        timeout: seconds to connect, and seconds without any data before a request is retried.
        retries: further attempts per request after a failure, with backoff and Retry-After.
        headers: sent with every request (e.g. ``Authorization``; requests drops that one when
            a redirect leaves the host).
        session: reused for the connections; by default one is made and closed (only a
            session from :func:`ckptkit.hub.download.transport.new_session` keeps the header deadline).
        progress: receives ``set_total`` and ``update`` calls; the engine never prints.
        check_free_space: refuse to start when the disk lacks room for the missing bytes.
        limits: size ceiling (when ``expected_size`` is None), header deadline and low-speed
            limit [default: :class:`~ckptkit.hub.download.transfer_plan.TransferLimits`'s defaults].

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
    from ckptkit.hub.download import file_urls

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
            return Transfer(url, dest, http=http, lock=lock, expected_size=expected_size,
                            expected_sha256=want_sha, connections=connections, timeout=timeout,
                            retries=retries, headers=headers or {}, progress=progress,
                            check_free_space=check_free_space, limits=limits,
                            knobs=_knobs()).run()
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
    """:func:`~ckptkit.hub.download.transfer_plan.backoff_delay` with this module's knobs, read now."""
    return backoff_delay(attempt, retry_after, base=BACKOFF_BASE, cap=BACKOFF_CAP,
                         retry_after_cap=RETRY_AFTER_CAP)


def _knobs() -> Knobs:
    """This module's knobs, read now (tests patch them here)."""
    return Knobs(chunk_size=CHUNK_SIZE, sizing=_piece_sizing(), checkpoint_floor=CHECKPOINT_FLOOR,
                 checkpoint_cap=CHECKPOINT_CAP, max_restarts=MAX_RESTARTS,
                 free_space_margin=FREE_SPACE_MARGIN, backoff=_backoff)
