"""storage/atomic.py: the one atomic writer, its temporary names and its sweep rule.

Writers are real child processes: one is killed with SIGKILL in the middle of a write (it
signals through a pipe once its bytes are in the temporary file, so no timing is guessed), one
runs under a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) so that its write fails with EFBIG
as on a full disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckptkit.errors import DiskFullError, NotFoundError, UsageError
from ckptkit.storage import atomic
from ckptkit.storage.atomic import ABANDONED_AFTER, atomic_file, is_temp, staged, write_bytes

SRC = Path(__file__).resolve().parents[2] / "src"

#: A child that writes to the target, says "written" on stdout, then waits to be killed.
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ckptkit.storage.atomic import atomic_file
    with atomic_file(Path(sys.argv[1])) as fh:
        fh.write(b"new" * 100_000)
        fh.flush()
        print("written", flush=True)
        time.sleep(600)
""")


def start_writer(target: Path) -> subprocess.Popen[str]:
    """A writer process stopped in the middle of its write (its bytes on disk, not renamed)."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], text=True,
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert child.stdout is not None and child.stdout.readline().strip() == "written"
    return child


def temps_of(target: Path) -> list[Path]:
    return sorted(p for p in target.parent.iterdir() if is_temp(p.name))


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_killed_writer_leaves_the_old_file_and_a_temp_with_its_pid(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    child = start_writer(target)
    try:
        (temp,) = temps_of(target)
        assert temp.stat().st_size == 300_000  # mid-write: the bytes are in the temp file
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"  # never a partial file under the final name
    match = atomic.TEMP_NAME.fullmatch(temp.name)
    assert match and match[1] == "model.pt" and int(match[2]) == child.pid
    assert temp.name.startswith(".model.pt.") and temp.name.endswith(".partial")


def test_a_killed_first_write_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    target = tmp_path / "fresh.safetensors"
    child = start_writer(target)
    child.kill()
    child.wait()
    assert not target.exists()
    assert len(temps_of(target)) == 1


def test_the_next_write_sweeps_a_dead_writers_old_temp_only(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    child = start_writer(target)
    child.kill()
    child.wait()
    (dead,) = temps_of(target)
    # Fresh: a writer on another machine sharing this disk could own that pid; kept.
    write_bytes(target, b"one")
    assert dead.exists() and target.read_bytes() == b"one"
    # Untouched for longer than ABANDONED_AFTER with its pid gone: removed by the next write.
    age(dead, ABANDONED_AFTER + 5)
    write_bytes(target, b"two")
    assert not dead.exists() and target.read_bytes() == b"two"
    assert temps_of(target) == []


def test_a_live_writers_temp_is_kept_however_old(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    child = start_writer(target)
    try:
        (live,) = temps_of(target)
        age(live, 10 * ABANDONED_AFTER)
        write_bytes(target, b"mine")
        assert live.exists() and target.read_bytes() == b"mine"
    finally:
        child.kill()
        child.wait()


def test_the_sweep_touches_only_temps_of_the_same_target(tmp_path: Path) -> None:
    target = tmp_path / "a.pt"
    other = tmp_path / ".b.pt.999999999.0123abcd.partial"  # another target's, dead pid
    lookalike = tmp_path / ".a.pt.notapid.0123abcd.partial"  # not our scheme
    for path in (other, lookalike):
        path.write_bytes(b"x")
        age(path, 10 * ABANDONED_AFTER)
    write_bytes(target, b"a")
    assert other.exists() and lookalike.exists()


def test_a_failed_write_removes_its_temp_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as fh:
            fh.write(b"half")
            raise RuntimeError("the producer failed")
    assert target.read_text() == "{}" and temps_of(target) == []


def test_staged_places_a_directory_and_cleans_up_after_failure(tmp_path: Path) -> None:
    target = tmp_path / "module"
    with staged(target) as tmp:
        assert is_temp(tmp.name) and not tmp.exists()
        tmp.mkdir()
        (tmp / "saved_model.pb").write_bytes(b"pb")
    assert (target / "saved_model.pb").read_bytes() == b"pb"
    other = tmp_path / "other"
    with pytest.raises(OSError):
        with staged(other) as tmp:
            tmp.mkdir()
            (tmp / "f").write_bytes(b"x")
            raise OSError("copy failed")
    assert not other.exists() and temps_of(other) == []


def test_a_dead_writers_staged_directory_is_swept(tmp_path: Path) -> None:
    target = tmp_path / "tree"
    leftover = tmp_path / f".tree.{_dead_pid()}.0123abcd.partial"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "f").write_bytes(b"x")
    age(leftover, ABANDONED_AFTER + 5)
    with staged(target) as tmp:
        tmp.mkdir()
    assert target.is_dir() and not leftover.exists()


def test_bad_targets_are_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        write_bytes(tmp_path, b"x")
    with pytest.raises(NotFoundError) as exc:
        write_bytes(tmp_path / "missing" / "f.pt", b"x")
    assert "missing" in exc.value.message
    write_bytes(tmp_path / "made" / "f.pt", b"x", make_parents=True)
    assert (tmp_path / "made" / "f.pt").read_bytes() == b"x"


#: A child whose files may not grow past 4 KiB: its write fails as on a full disk.
LIMITED = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from ckptkit.errors import DiskFullError
    from ckptkit.storage.atomic import write_bytes
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        write_bytes(Path(sys.argv[1]), b"x" * 100_000)
    except DiskFullError as exc:
        print(exc.exit_code, str(exc))
""")


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "big.pt"
    target.write_bytes(b"old")
    out = subprocess.run([sys.executable, "-c", LIMITED, str(target)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.returncode == 0, out.stderr
    code, message = out.stdout.strip().split(" ", 1)
    assert int(code) == DiskFullError.exit_code
    assert message.startswith(f"{target}: the file size limit was reached while writing it")
    assert "ulimit -f" in message and "\n" not in message
    assert target.read_bytes() == b"old" and temps_of(target) == []


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
