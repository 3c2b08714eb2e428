"""One download of a URL into ``<dest>.part``, run under its lock: the engine behind
:func:`ckptkit.hub.download.download.download`.

:meth:`Transfer.run` probes the file, fetches it as parallel pieces (or one stream when the
server ignores ranges), records each piece's progress durably as it goes, hashes the finished
prefix while later pieces arrive, verifies size and sha256 and renames ``.part`` over ``dest``.
It holds the body to the :class:`~ckptkit.hub.download.transfer_plan.TransferLimits` (size ceiling, low
speed).  The tuning values come in a :class:`Knobs`, built by :mod:`ckptkit.hub.download.download` from its
module constants when a download starts, so tests patch them in one place.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import requests

from ckptkit.hub import reasons
from ckptkit.hub.download import transfer_plan, waiting
from ckptkit.errors import CkptkitError, DiskFullError, IntegrityError, SourceError, disk_full
from ckptkit.storage.locks import FileLock
from ckptkit.storage.atomic import fsync_dir
from ckptkit.hub.download.partial import PartFile, PrefixHasher, load_sidecar, save_sidecar, sibling
from ckptkit.hub.download.stalls import SpeedWatch
from ckptkit.hub.download.transfer_plan import (Piece, PiecePlan, PieceSizing, Probe, Sidecar, TransferLimits,
                                   can_resume, checkpoint_interval, looks_like_html, plan_pieces)
from ckptkit.hub.download.transport import Restart, Transient, Transport, content_length
from ckptkit.hub.download.progress import Cursor, Meter, Progress

__all__ = ["DownloadResult", "Knobs", "Progress", "Transfer"]


@dataclass(frozen=True)
class Knobs:
    """The tuning values of one transfer (``ckptkit.hub.download.download``'s constants, read at call time)."""

    chunk_size: int                       # most bytes taken from a socket at once
    sizing: PieceSizing
    checkpoint_floor: int                 # see transfer_plan.checkpoint_interval
    checkpoint_cap: int
    max_restarts: int                     # the file changed under us this many times: give up
    free_space_margin: int
    backoff: Callable[[int, float | None], float]


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


class Transfer:
    """One download of ``url`` into ``dest``, run under its lock (:meth:`run`)."""

    def __init__(self, url: str, dest: Path, *, http: requests.Session, lock: FileLock,
                 expected_size: int | None, expected_sha256: str | None, connections: int,
                 timeout: float, retries: int, headers: dict[str, str],
                 progress: Progress | None, check_free_space: bool,
                 limits: TransferLimits, knobs: Knobs) -> None:
        self.url = url
        self.dest = dest
        self.part = sibling(dest, ".part")
        self.sidecar = sibling(dest, ".part.json")
        self.limits = limits
        self.knobs = knobs
        self.net = Transport(url, dest, http=http, headers=headers, timeout=timeout,
                             retries=retries, backoff=knobs.backoff)
        self.lock = lock
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self.connections = connections
        self.meter = Meter(progress)
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
        for restart in range(self.knobs.max_restarts + 1):
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
                force_stream = not exc.changed or restart + 1 == self.knobs.max_restarts
                continue
            return self._finalize(size, digest, resumed)
        raise SourceError(f"{self.url} changed {self.knobs.max_restarts + 1} times during the "
                          "download",
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
                               self.knobs.sizing, saved.partial)
        else:
            # The old sidecar goes first: a crash right after truncating must not leave a
            # sidecar that vouches for zeroed pieces.
            self._discard_partial()
            plan = plan_pieces(size, frozenset(), None, self.connections,
                               self.knobs.sizing)
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
            hasher = PrefixHasher(part, plan.pieces, self.knobs.chunk_size)
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
                for future in waiting.as_completed(futures):
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

        cursor = Cursor(piece.start, synced=piece.start, on_progress=checkpoint,
                         interval=checkpoint_interval(whole, self.knobs.checkpoint_floor,
                                                     self.knobs.checkpoint_cap))
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

    def _fetch_range(self, part: PartFile, cursor: Cursor, end: int,
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
            cursor = Cursor(0, sniff_pending=True)
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

    def _pump(self, resp: requests.Response, part: PartFile, cursor: Cursor,
              end: int | None, sha: hashlib._Hash | None = None) -> None:
        """Copy the body of ``resp`` to the part file from ``cursor.pos``, at most to ``end``
        (None: as long as it lasts, up to the ceiling), above the low-speed limit."""
        watch = SpeedWatch(self.limits.min_speed, self.limits.speed_window)
        ceiling = self.limits.max_bytes
        for chunk in self.net.chunks(resp, self.knobs.chunk_size):
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
        margin = self.knobs.free_space_margin
        if free < needed + margin:
            raise DiskFullError(f"not enough disk space for {self.dest}: downloading {self.url} "
                                f"needs {needed + margin:,} bytes in "
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
