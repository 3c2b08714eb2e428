"""Cross-process locks on a lock file that survive their holder's death.

A lock is a file created atomically (``O_CREAT | O_EXCL``) holding JSON
``{host, pid, token, started, purpose}``.  While it is held a heartbeat thread touches the file
every couple of seconds, so a waiter can tell a live holder from one that died or hung:

1. same host and the holder's pid no longer exists -> the lock is taken over at once;
2. otherwise no heartbeat for ``stale_after`` seconds -> taken over (holder on another host
   or in another pid namespace, or a process that hung);
3. otherwise the waiter polls until the lock is released or ``timeout`` expires.

Taking over is serialised between waiters by a short-lived guard file ``<path>.takeover``
(itself ``O_EXCL``): under it a waiter checks that the lock is still the very file it judged
stale, renames it to a unique name, checks again what it moved (and puts back a newer lock it
moved by mistake), then deletes it.  Without the guard a slow waiter could delete the fresh lock
of a faster one (ABA).  Every waiter then competes for a fresh ``O_EXCL`` create, so creating
the file stays the single way to acquire.  Unlike ``flock`` this works on NFS and
Lustre, and unlike a plain soft lock it never hangs forever on an orphan (huggingface_hub #2543).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable

from ckptkit.errors import LockTimeoutError

HEARTBEAT_INTERVAL = 2.0
STALE_AFTER = 60.0
#: Seconds an empty or unparsable lock file is respected (its creator may be mid-write).
UNWRITTEN_GRACE = 2.0
POLL_INTERVAL = 0.5
GUARD_STALE_AFTER = 10.0  # a takeover takes a few syscalls; an older guard is an orphan
HOST = socket.gethostname()
_TAKEOVER_PAUSE = 0.02
_MAX_LOCK_BYTES = 4096


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as written in the lock file."""

    host: str
    pid: int
    token: str
    started: float
    purpose: str = ""

    def describe(self) -> str:
        """``pid 123 on host (downloading https://...)``, for messages."""
        text = f"pid {self.pid} on {self.host}"
        return f"{text} ({self.purpose})" if self.purpose else text


@dataclass(frozen=True)
class _Snapshot:
    """One observation of a lock file; identity is (device, inode, content, mtime)."""

    dev: int
    ino: int
    mtime_ns: int
    raw: bytes

    @property
    def holder(self) -> LockHolder | None:
        return _parse_holder(self.raw)

    def same_file(self, other: _Snapshot | None) -> bool:
        return other is not None and (self.dev, self.ino, self.mtime_ns, self.raw) == (
            other.dev, other.ino, other.mtime_ns, other.raw)


def read_holder(path: str | os.PathLike[str]) -> LockHolder | None:
    """The holder recorded in the lock file at ``path``; None if it is absent or unreadable."""
    snap = _snapshot(Path(path))
    return None if snap is None else snap.holder


def pid_alive(pid: int) -> bool:
    """False only when process ``pid`` provably does not exist on this host."""
    if pid <= 0 or sys.platform == "win32":
        # pid 0 would signal our own process group; on Windows os.kill(pid, 0) kills the target.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def stale_reason(holder: LockHolder | None, age: float, *, stale_after: float,
                 host: str = HOST, alive: Callable[[int], bool] = pid_alive) -> str | None:
    """Why a lock whose file was last touched ``age`` seconds ago may be taken over.

    Returns None while the lock must be respected.  ``holder`` is None when the file could not
    be parsed (e.g. its creator died between creating and writing it); only age decides then.
    """
    if holder is not None and holder.host == host and not alive(holder.pid):
        return f"holder pid {holder.pid} is no longer running"
    if holder is None and age > min(stale_after, UNWRITTEN_GRACE):
        # A creator writes its record right after the O_EXCL create; a file still empty or
        # unparsable seconds later belongs to a process killed in between.
        return f"the lock file has held no valid record for {age:.0f} s"
    if age > stale_after:
        return f"no heartbeat for {age:.0f} s"
    return None


class FileLock:
    """Exclusive lock between processes (and threads) on the file ``path``; not reentrant.

    Use as a context manager.  ``timeout=None`` waits forever, otherwise
    :class:`~ckptkit.errors.LockTimeoutError` is raised after ``timeout`` seconds.
    ``on_wait(holder)`` is called once, when this lock first has to wait (``holder`` is None if
    the lock file was unreadable at that moment).  ``purpose`` is recorded for other waiters,
    e.g. ``"downloading https://..."``.

    Example::

        with FileLock(cache / "blob.lock", timeout=600, on_wait=lambda h: log(h.describe())):
            ...
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = None,
                 poll_interval: float = POLL_INTERVAL, stale_after: float = STALE_AFTER,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 on_wait: Callable[[LockHolder | None], None] | None = None,
                 purpose: str = "") -> None:
        if stale_after <= 2 * heartbeat_interval:
            raise ValueError(f"stale_after ({stale_after}) must exceed twice the heartbeat "
                             f"interval ({heartbeat_interval})")
        self.path = Path(path)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self.heartbeat_interval = heartbeat_interval
        self.on_wait = on_wait
        self.purpose = purpose
        self._token: str | None = None
        self._lost = threading.Event()
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def is_held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        return self._token is not None

    @property
    def lost(self) -> bool:
        """True if, while held, the lock file vanished or was taken over by another process."""
        return self._lost.is_set()

    def acquire(self) -> None:
        """Block until the lock is ours; see the class docstring for timeout and staleness."""
        if self._token is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        waited = False
        while not self._try_create():
            snap = _snapshot(self.path)
            if snap is None:
                continue  # released between our create and our look: try again at once
            age = time.time() - snap.mtime_ns / 1e9
            if stale_reason(snap.holder, age, stale_after=self.stale_after) is not None:
                if _take_over(self.path, snap):
                    continue  # acquiring is still the O_EXCL create, which others may win
                pause = min(self.poll_interval, _TAKEOVER_PAUSE)  # another waiter is at it
            else:
                if not waited:
                    waited = True
                    if self.on_wait is not None:
                        self.on_wait(snap.holder)
                pause = self.poll_interval
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise self._timeout_error(snap.holder)
            time.sleep(pause if remaining is None else min(pause, remaining))
        self._start_heartbeat()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours; idempotent."""
        token, self._token = self._token, None
        if token is None:
            return
        self._stop_beat.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        holder = read_holder(self.path)
        # Deleting a file that is no longer ours would free someone else's lock.
        if holder is not None and holder.token == token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _try_create(self) -> bool:
        holder = _create(self.path, self.purpose)
        if holder is None:
            return False
        self._token = holder.token
        self._lost.clear()
        return True

    def _start_heartbeat(self) -> None:
        self._stop_beat = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(self._token, self._stop_beat),
                                      name="ckpt-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self, token: str, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_interval):
            holder = read_holder(self.path)
            if holder is None or holder.token != token:
                self._lost.set()
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self._lost.set()
                return
            except OSError:
                pass  # a transient failure to touch; the next beat tries again

    def _timeout_error(self, holder: LockHolder | None) -> LockTimeoutError:
        who = holder.describe() if holder else "an unknown process"
        return LockTimeoutError(
            f"gave up after {self.timeout:g} s waiting for the lock {self.path}, held by {who}",
            hint=f"Wait for that process to finish, or delete {self.path} if it is gone",
            lock_path=str(self.path), holder_host=holder.host if holder else None,
            holder_pid=holder.pid if holder else None)


def _create(path: Path, purpose: str) -> LockHolder | None:
    """Create the lock file ``path`` if it does not exist; the holder written, else None."""
    holder = LockHolder(host=HOST, pid=os.getpid(), token=uuid.uuid4().hex, started=time.time(),
                        purpose=purpose)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o664)  # group-writable: caches are often shared
    except FileExistsError:
        return None
    try:
        os.write(fd, json.dumps({"host": holder.host, "pid": holder.pid, "token": holder.token,
                                 "started": holder.started, "purpose": purpose}).encode())
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return holder


def _snapshot(path: Path) -> _Snapshot | None:
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read(_MAX_LOCK_BYTES)
    except FileNotFoundError:
        return None
    return _Snapshot(st.st_dev, st.st_ino, st.st_mtime_ns, raw)


def _parse_holder(raw: bytes) -> LockHolder | None:
    try:
        data = json.loads(raw)
        return LockHolder(host=str(data["host"]), pid=int(data["pid"]), token=str(data["token"]),
                          started=float(data["started"]), purpose=str(data.get("purpose", "")))
    except (ValueError, KeyError, TypeError):
        return None


def _take_over(path: Path, judged: _Snapshot) -> bool:
    """Delete the stale lock ``judged`` if it is still the file at ``path``; True if we did.

    Serialised between waiters by the guard file, so that a waiter that judged the old lock
    stale cannot delete the new lock of the waiter that already replaced it.
    """
    guard = path.with_name(f"{path.name}.takeover")
    mine = _create(guard, "taking over a stale lock")
    if mine is None:
        orphan = _snapshot(guard)
        if orphan is not None and stale_reason(
                orphan.holder, time.time() - orphan.mtime_ns / 1e9,
                stale_after=GUARD_STALE_AFTER) is not None:
            _remove_if_same(guard, orphan)  # its creator died mid-takeover
        return False
    try:
        return judged.same_file(_snapshot(path)) and _remove_if_same(path, judged)
    finally:
        holder = read_holder(guard)
        if holder is not None and holder.token == mine.token:
            guard.unlink(missing_ok=True)


def _remove_if_same(path: Path, judged: _Snapshot) -> bool:
    """Rename ``path`` aside, and delete it if it is ``judged``; else put it back."""
    aside = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if judged.same_file(_snapshot(aside)):
        aside.unlink(missing_ok=True)
        return True
    # link() never replaces an existing file, so restoring cannot clobber a newer lock.
    try:
        os.link(aside, path)
    except OSError:
        pass  # its holder's heartbeat will notice and report the lock as lost
    aside.unlink(missing_ok=True)
    return False
