"""FileLock: exclusion between processes, heartbeat, stale and dead holders, timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ckptkit.errors import ExitCode, LockTimeoutError
from ckptkit.storage.locks import HOST, FileLock, LockHolder, read_holder, stale_reason
from tests.conftest import SRC

HOLDER = """
import sys, time
from ckptkit.storage.locks import FileLock
lock = FileLock(sys.argv[1], heartbeat_interval=0.1, stale_after=30)
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""

WAITER = """
import os, sys, time
from ckptkit.storage.locks import FileLock
lock_path, inside, log = sys.argv[1:4]
with FileLock(lock_path, poll_interval=0.005, stale_after=30, heartbeat_interval=0.5,
              on_wait=lambda holder: print("waiting", holder.pid, flush=True)):
    try:  # a second process inside the critical section would find this file
        os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        alone = True
    except FileExistsError:
        alone = False
    time.sleep(0.05)
    if alone:
        os.unlink(inside)
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()} {alone}\\n")
"""


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            text=True, env=env)


def lock_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ckpt-lock")]


def write_lock(path: Path, *, host: str, pid: int, age: float) -> None:
    """A lock record last touched ``age`` seconds ago; a negative age (a heartbeat "in the
    future") stays fresh however long the machine takes to look at it."""
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "theirs",
                                "started": time.time() - age, "purpose": "downloading x"}))
    touch(path, age)


def touch(path: Path, age: float) -> None:
    os.utime(path, (time.time() - age, time.time() - age))


def test_lock_file_records_the_holder_and_is_removed_on_release(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.lock"
    with FileLock(path, purpose="downloading f") as lock:
        assert lock.is_held
        holder = read_holder(path)
        assert holder is not None and (holder.host, holder.pid) == (HOST, os.getpid())
        assert holder.purpose == "downloading f" and holder.started <= time.time()
        assert set(json.loads(path.read_text())) == {"host", "pid", "token", "started",
                                                     "purpose"}
    assert not path.exists() and not lock.is_held
    assert lock_threads() == []


def test_waiter_times_out_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    seen: list[LockHolder | None] = []
    with FileLock(path, purpose="downloading f"):
        started = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            FileLock(path, timeout=0.3, poll_interval=0.02, on_wait=seen.append).acquire()
        assert time.monotonic() - started >= 0.3  # it waited its timeout out
    err = info.value
    assert (err.holder_pid, err.holder_host, err.lock_path) == (os.getpid(), HOST, str(path))
    assert f"pid {os.getpid()}" in str(err) and "downloading f" in str(err)
    assert err.exit_code == ExitCode.ERROR and err.hint
    assert len(seen) == 1 and seen[0] is not None and seen[0].pid == os.getpid()


def test_waiter_without_timeout_gets_the_lock_when_released(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    first = FileLock(path)
    first.acquire()
    timer = threading.Timer(0.3, first.release)
    timer.start()
    with FileLock(path, timeout=None, poll_interval=0.02):
        assert not first.is_held  # it got the lock because it was released, not before
    timer.join()


def test_holder_heartbeat_keeps_the_lock_fresh(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    with FileLock(path, heartbeat_interval=0.05, stale_after=30):
        touch(path, 100)
        old = path.stat().st_mtime
        while path.stat().st_mtime == old:  # the heartbeat thread touches it again
            time.sleep(0.01)
        assert time.time() - path.stat().st_mtime < 30
        with pytest.raises(LockTimeoutError):  # a fresh heartbeat is respected
            FileLock(path, timeout=0.2, poll_interval=0.02, stale_after=30,
                     heartbeat_interval=0.1).acquire()
    assert lock_threads() == []


def test_lock_without_heartbeat_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    write_lock(path, host="elsewhere", pid=1, age=5)  # another host: only the age tells
    with FileLock(path, timeout=30, stale_after=3, heartbeat_interval=0.1) as lock:
        assert read_holder(path).token != "theirs"
    assert not lock.is_held and not path.exists()


def test_lock_of_another_host_with_recent_heartbeat_is_respected(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    write_lock(path, host="elsewhere", pid=1, age=-3600)
    with pytest.raises(LockTimeoutError, match="pid 1 on elsewhere"):
        FileLock(path, timeout=0.2, poll_interval=0.02, stale_after=3,
                 heartbeat_interval=0.1).acquire()
    assert read_holder(path).token == "theirs"


def test_unreadable_lock_file_is_judged_by_age_only(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    path.write_bytes(b"")  # its creator died between creating and writing it
    touch(path, -3600)  # young, however slowly this test runs: its creator may be writing
    seen: list[LockHolder | None] = []
    with pytest.raises(LockTimeoutError, match="unknown process"):
        FileLock(path, timeout=0.2, poll_interval=0.02, stale_after=3, heartbeat_interval=0.1,
                 on_wait=seen.append).acquire()
    assert seen == [None]
    touch(path, 10)
    with FileLock(path, timeout=30, stale_after=3, heartbeat_interval=0.1):
        assert read_holder(path) is not None


def test_empty_lock_of_a_creator_killed_mid_create_is_taken_over_in_seconds(
        tmp_path: Path) -> None:
    """kill -9 between the O_EXCL create and the write: no 60 s wait for the heartbeat age."""
    path = tmp_path / "f.lock"
    path.write_bytes(b"")
    touch(path, 3)
    with FileLock(path, timeout=30, heartbeat_interval=0.1):  # default stale_after: 60 s
        assert read_holder(path) is not None


def test_holder_killed_with_sigkill_is_taken_over_at_once(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    holder = spawn(HOLDER, str(path))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockTimeoutError):  # alive: respected
            FileLock(path, timeout=0.2, poll_interval=0.02).acquire()
    finally:
        holder.kill()
        holder.wait()
    with FileLock(path, timeout=30, poll_interval=0.02, stale_after=60):  # dead: no 60 s wait
        assert read_holder(path).pid == os.getpid()


def test_takeover_is_exclusive_among_many_waiters(tmp_path: Path) -> None:
    path, inside, log = tmp_path / "f.lock", tmp_path / "inside", tmp_path / "log"
    holder = spawn(HOLDER, str(path))
    waiters: list[subprocess.Popen[str]] = []
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        waiters = [spawn(WAITER, str(path), str(inside), str(log)) for _ in range(4)]
        for waiter in waiters:  # every one is polling the live lock before its holder dies
            assert waiter.stdout is not None
            assert waiter.stdout.readline().split() == ["waiting", str(holder.pid)]
        holder.kill()
        holder.wait()
        for waiter in waiters:
            assert waiter.wait(timeout=20) == 0
    finally:
        for proc in [holder, *waiters]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    lines = log.read_text().split("\n")[:-1]
    assert sorted(line.split()[1] for line in lines) == ["True"] * 4
    assert not path.exists() and not inside.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["log"]  # no guard or stale file left


def test_release_leaves_a_lock_that_was_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    lock = FileLock(path, heartbeat_interval=0.05, stale_after=1)
    lock.acquire()
    write_lock(path, host=HOST, pid=os.getpid(), age=0)  # as if another waiter replaced it
    deadline = time.monotonic() + 60  # the heartbeat (every 0.05 s) notices
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.lost
    lock.release()
    assert read_holder(path).token == "theirs"
    assert lock_threads() == []


def test_stale_reason_decides_from_host_pid_and_age() -> None:
    alive = LockHolder(host=HOST, pid=123, token="t", started=0.0)
    assert stale_reason(alive, 5, stale_after=60, alive=lambda pid: True) is None
    assert "no longer running" in stale_reason(alive, 5, stale_after=60, alive=lambda pid: False)
    assert "heartbeat" in stale_reason(alive, 61, stale_after=60, alive=lambda pid: True)
    remote = LockHolder(host="other", pid=123, token="t", started=0.0)
    assert stale_reason(remote, 5, stale_after=60, alive=lambda pid: False) is None
    assert stale_reason(None, 1, stale_after=60) is None  # its creator may be mid-write
    assert "no valid record" in stale_reason(None, 5, stale_after=60)


def test_lock_is_not_reentrant_and_release_is_idempotent(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "f.lock")
    with lock:
        with pytest.raises(RuntimeError):
            lock.acquire()
    lock.release()
    with pytest.raises(ValueError):
        FileLock(tmp_path / "g.lock", heartbeat_interval=2, stale_after=3)
