"""kill -9 at random points, and a full disk: never a truncated file under a final name.

Each of ``ckpt fetch``, ``ckptkit.save``, ``ckpt strip``, ``ckpt convert`` and ``ckpt cleanup``
runs in a real process that is killed with SIGKILL ``CKPTKIT_KILLS`` times (default 20; raise
it for long runs, ``CKPTKIT_KILL_SEED`` picks other points).  After every kill each final path
is absent or complete and byte-identical to a clean run's, a rerun succeeds, and cleanup has
kept at least what it was asked to keep.

Kill points are drawn from a seeded generator, in three kinds, so that they land in every
phase and not only in the longest one:

- ``time``: uniform over a clean run (interpreter start, planning, writing, renaming, checks);
- ``progress``: once a random fraction of the work is done (bytes in the temporary file, bytes
  served, checkpoints deleted);
- ``tail``: once the work is done, uniform over what is left of a clean run (the rename,
  verification, commit, pins, exit).

The choice of points is reproducible; their timing to the microsecond is not.

Disk full: a small tmpfs is mounted for the test where that works (root), else the child runs
with ``RLIMIT_FSIZE`` (and SIGXFSZ ignored), so its writes fail with EFBIG instead of ENOSPC.
Each command must then exit 1 with one line naming the path and the lack of space, without a
traceback, and leave nothing under the final name (only fetch's resumable ``.part`` may stay).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

import ckptkit
from ckptkit.storage.hashing import sha256_file
from ckptkit.runs.integrity import check_complete
from ckptkit.runs.retention import plan_cleanup
from tests import figures
from tests.conftest import SRC, run_ckpt, run_main
from tests.runs import train_states
from tests.servers.http import HTTPTestServer, http_server  # noqa: F401 (fixture)

torch = pytest.importorskip("torch")

KILLS = int(os.environ.get("CKPTKIT_KILLS", "20"))
SEED = int(os.environ.get("CKPTKIT_KILL_SEED", "0"))
MiB = 1 << 20


# --------------------------------------------------------------------------- killing


@dataclass(frozen=True)
class KillPoint:
    kind: Literal["time", "progress", "tail"]
    value: float  # seconds after start (time), fraction of the work (progress), seconds (tail)


@dataclass(frozen=True)
class Clock:
    """A clean run: how long it took, and when its work was done (progress reached 1)."""

    total: float
    done_at: float


Progress = Callable[[], float]


def kill_points(name: str, clock: Clock) -> Iterator[KillPoint]:
    """Endless seeded kill points for command ``name``; the caller stops after KILLS kills."""
    rng = random.Random(f"{name}:{SEED}")
    while True:
        r = rng.random()
        if r < 0.25:
            yield KillPoint("time", rng.uniform(0.0, clock.total))
        elif r < 0.8:
            yield KillPoint("progress", rng.uniform(0.02, 0.98))
        else:
            yield KillPoint("tail", rng.uniform(0.0, max(clock.total - clock.done_at, 0.01)))


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1", **extra}


def ckpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckptkit", *args]


def _wait(proc: subprocess.Popen, condition: Callable[[], bool], what: str) -> bool:
    """Poll until ``condition()`` holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + 120
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)  # the child needs the CPU more than this loop does
    return proc.poll() is None


def kill_at(proc: subprocess.Popen, point: KillPoint, progress: Progress) -> bool:
    """SIGKILL ``proc`` at ``point`` and reap it; False when it finished before the kill."""
    started = time.monotonic()
    if point.kind == "time":
        alive = _wait(proc, lambda: time.monotonic() - started >= point.value, "the kill time")
    else:
        target = point.value if point.kind == "progress" else 1.0
        alive = _wait(proc, lambda: progress() >= target, f"progress {target:.2f}")
        if alive and point.kind == "tail":
            resume = time.monotonic()
            alive = _wait(proc, lambda: time.monotonic() - resume >= point.value, "the tail")
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode == -signal.SIGKILL


def measure(argv: list[str], progress: Progress, **popen: object) -> Clock:
    """Run ``argv`` to the end, noting when ``progress`` first reached 1."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **popen)  # type: ignore[call-overload]
    done_at = None
    while proc.poll() is None:
        if done_at is None and progress() >= 1.0:
            done_at = time.monotonic() - started
        time.sleep(0.001)
    total = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return Clock(total, total if done_at is None else done_at)


def start(argv: list[str], log: Path, **popen: object) -> subprocess.Popen:
    with open(log, "w") as err:  # a file, not a pipe: a killed child must never block on it
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                **popen)  # type: ignore[call-overload]


def output_progress(target: Path, size: int, ignore: frozenset[str] = frozenset()
                    ) -> Progress:
    """Share of ``target``'s new content on disk: its hidden temporary sibling's size over
    ``size``, and 1.0 once ``target`` has been replaced (another inode under the name).
    Temporary files named in ``ignore`` (left by earlier kills) do not count."""
    try:
        before: int | None = target.stat().st_ino
    except FileNotFoundError:
        before = None
    prefix = f".{target.name}."

    def progress() -> float:
        try:
            if target.stat().st_ino != before:
                return 1.0
        except FileNotFoundError:
            pass
        biggest = 0
        with os.scandir(target.parent) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and entry.name not in ignore:
                    try:
                        biggest = max(biggest, entry.stat().st_size)
                    except FileNotFoundError:
                        pass
        return biggest / size

    return progress


def atomic_temp(name: str) -> str:
    """The names storage/atomic.atomic_file gives the temporary files of ``name`` (a regex)."""
    return rf"\.{name}\.\d+\.[0-9a-f]{{8}}\.partial"


def sweep_temps(directory: Path, pattern: str) -> list[str]:
    """Temporary files a killed writer left (hidden, never the final name); removed here to
    bound disk use.  Fails on any other leftover."""
    found = []
    for path in directory.iterdir():
        if path.name.startswith("."):
            assert re.fullmatch(pattern, path.name), path.name
            found.append(path.name)
            path.unlink()
    return found


def rerun(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``ckpt ARGS`` to the end in this process and return its stdout.  What a rerun
    must survive is the state a kill left on disk; a fresh interpreter per rerun would only
    double the cost of the loop (the clean runs and the killed ones are real processes)."""
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    return out


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A μOmni-style training checkpoint of ~38 MB: 3.1M weights plus real AdamW state."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(2048, 512), nn.Linear(512, 1024), nn.Linear(1024, 512),
                          nn.Linear(512, 2048, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    path = tmp_path_factory.mktemp("strip-input") / "thinker_step_5000.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": torch.amp.GradScaler("cpu").state_dict(),
                "step": 5000, "best_val_loss": 1.5}, path)
    return path


@pytest.fixture(scope="module")
def loftr_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning LoFTR checkpoint (``state_dict.matcher.loftr_coarse.layers.N.*``) with
    d_model 256 (LoFTR's own): 5.2M coarse parameters, ~21 MB."""
    torch.manual_seed(1)
    d = 256
    state = {}
    for i in range(8):
        layer = f"matcher.loftr_coarse.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "merge"):
            state[f"{layer}{name}.weight"] = torch.randn(d, d)
        state[f"{layer}mlp.0.weight"] = torch.randn(2 * d, 2 * d)
        state[f"{layer}mlp.2.weight"] = torch.randn(d, 2 * d)
        for name in ("norm1", "norm2"):
            state[f"{layer}{name}.weight"] = torch.randn(d)
            state[f"{layer}{name}.bias"] = torch.randn(d)
    state["matcher.backbone.conv1.weight"] = torch.randn(128, 1, 7, 7)
    path = tmp_path_factory.mktemp("convert-input") / "outdoor_ds.ckpt"
    torch.save({"state_dict": state, "epoch": 29, "global_step": 1000}, path)
    return path


# --------------------------------------------------------------------------- strip


def test_kill_9_during_strip(training_checkpoint: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    src = training_checkpoint
    original = sha256_file(src)
    out, inplace = tmp_path / "deploy.pt", tmp_path / "inplace.pt"
    clean_run = run_ckpt("strip", str(src), "-o", str(out))
    assert clean_run.returncode == 0, clean_run.stderr
    loaded = torch.load(out, weights_only=True)
    weights = torch.load(src, weights_only=True)["model"]
    assert set(loaded) == {"model", "step", "best_val_loss"}
    assert all(torch.equal(loaded["model"][k], v) for k, v in weights.items())
    clean, size = sha256_file(out), out.stat().st_size
    os.link(src, inplace)  # --in-place replaces the name; the shared source stays intact
    assert run_ckpt("strip", str(inplace), "--in-place", "--yes").returncode == 0
    clean_inplace = sha256_file(inplace)  # the zip folder is named after the file
    out.unlink()
    clock = measure(ckpt("strip", str(src), "-o", str(out)), output_progress(out, size),
                    env=child_env())
    assert sha256_file(out) == clean

    kills = mid_write = attempts = 0
    points = kill_points("strip", clock)
    while kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS + 10, "too many runs finished before their kill"
        mode = ("fresh", "replace", "in-place")[attempts % 3]
        if mode == "in-place":
            inplace.unlink(missing_ok=True)
            os.link(src, inplace)
            target, args = inplace, (str(inplace), "--in-place", "--yes")
            allowed = {original, clean_inplace}
        else:
            if mode == "fresh":
                out.unlink(missing_ok=True)
            else:
                assert sha256_file(out) == clean  # left complete by the previous rerun
            target, args = out, (str(src), "-o", str(out))
            allowed = {clean}
        proc = start(ckpt("strip", *args), tmp_path / "stderr.txt", env=child_env())
        killed = kill_at(proc, next(points), output_progress(target, size))
        if target.exists():
            assert sha256_file(target) in allowed, (mode, attempts)
        else:
            assert mode == "fresh", (mode, attempts)
        temps = sweep_temps(tmp_path, atomic_temp(re.escape(target.name)))
        rerun(capsys, "strip", *args)
        assert sha256_file(target) == (clean_inplace if mode == "in-place" else clean)
        if killed:
            kills += 1
            mid_write += bool(temps)
            figures.count("kills")
    assert mid_write > 0, "no kill landed while the output was being written"
    assert sha256_file(src) == original


# --------------------------------------------------------------------------- convert


def test_kill_9_during_convert(loftr_checkpoint: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.npz"
    sidecar = out.with_name(out.name + ".meta.json")
    args = (str(loftr_checkpoint), "--recipe", "loftr", "--to", "flax", "-o", str(out))
    first = run_ckpt("convert", *args, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["tensor_count"] == 80
    with np.load(out) as arrays:
        kernel = torch.load(loftr_checkpoint, weights_only=True)["state_dict"][
            "matcher.loftr_coarse.layers.3.mlp.2.weight"]
        assert np.array_equal(arrays["layers.3/mlp.2/kernel"], kernel.numpy().T)
    clean, clean_sidecar, size = sha256_file(out), sidecar.read_bytes(), out.stat().st_size
    out.unlink()
    sidecar.unlink()
    clock = measure(ckpt("convert", *args), output_progress(out, size), env=child_env())
    assert sha256_file(out) == clean

    kills = mid_write = attempts = 0
    points = kill_points("convert", clock)
    while kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS + 10, "too many runs finished before their kill"
        fresh = attempts % 2 == 0
        if fresh:
            out.unlink()
            sidecar.unlink()
        proc = start(ckpt("convert", *args), tmp_path / "stderr.txt", env=child_env())
        killed = kill_at(proc, next(points), output_progress(out, size))
        if out.exists():
            assert sha256_file(out) == clean, attempts
        else:
            assert fresh, attempts
        if sidecar.exists():  # written just before the npz: it may precede it, never differ
            assert sidecar.read_bytes() == clean_sidecar, attempts
        temps = sweep_temps(tmp_path, atomic_temp(r"out\.npz(?:\.meta\.json)?"))
        rerun(capsys, "convert", *args)
        assert sha256_file(out) == clean and sidecar.read_bytes() == clean_sidecar
        if killed:
            kills += 1
            mid_write += bool(temps)
            figures.count("kills")
    assert mid_write > 0, "no kill landed while the output was being written"


# --------------------------------------------------------------------------- cleanup

KEEP_LAST = 3
STEPS = tuple(range(10, 810, 10))   # 80 periodic checkpoints
BEST_STEP = 380                      # val_loss is lowest there, far from the newest
LINKED_STEP = 600                    # last.pt points at it


@pytest.fixture(scope="module")
def run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A μOmni run directory: 80 thinker_step_N.pt carrying val_loss, thinker_best.pt, the
    final thinker.pt, a tokenizer and notes."""
    root = tmp_path_factory.mktemp("run-template")
    states = train_states([1, 2, 3, 4])
    best_index = STEPS.index(BEST_STEP)
    for i, step in enumerate(STEPS):
        torch.save({**states[i % 4], "step": step, "val_loss": 1.0 + abs(i - best_index) / 100},
                   root / f"thinker_step_{step}.pt")
    torch.save(states[1], root / "thinker_best.pt")
    torch.save({"model": states[-1]["model"]}, root / "thinker.pt")
    (root / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    (root / "notes.txt").write_text("lr sweep 3\n")
    return root


def make_run(template: Path, run: Path) -> None:
    """A fresh copy of the run (hard links: cleanup only ever unlinks names)."""
    if run.exists():
        shutil.rmtree(run)
    run.mkdir()
    for path in template.iterdir():
        os.link(path, run / path.name)
    (run / "last.pt").symlink_to(f"thinker_step_{LINKED_STEP}.pt")


def periodic(run: Path) -> set[int]:
    return {int(p.name[len("thinker_step_"):-3]) for p in run.glob("thinker_step_*.pt")}


def test_kill_9_during_cleanup(run_template: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    survivors = {*STEPS[-KEEP_LAST:], BEST_STEP, LINKED_STEP}
    pinned = {"thinker_best.pt", "thinker.pt", "tokenizer.model", "notes.txt", "last.pt"}
    to_delete = len(STEPS) - len(survivors)
    args = ("cleanup", str(run), "--keep-last", str(KEEP_LAST), "--keep-best", "val_loss",
            "--yes")
    make_run(run_template, run)
    planned = plan_cleanup(run, keep_last=KEEP_LAST, keep_best="val_loss")
    assert {i.step for i in planned.kept if i.step is not None} == survivors
    assert len(planned.deleted) == to_delete

    def progress() -> float:
        return (len(STEPS) - len(os.listdir(run)) + len(pinned)) / to_delete

    clock = measure(ckpt(*args), progress, env=child_env())
    assert periodic(run) == survivors

    kills = mid_delete = attempts = 0
    points = kill_points("cleanup", clock)
    while kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS + 10, "too many runs finished before their kill"
        make_run(run_template, run)
        proc = start(ckpt(*args), tmp_path / "stderr.txt", env=child_env())
        killed = kill_at(proc, next(points), progress)
        left = periodic(run)
        assert survivors <= left, (attempts, sorted(survivors - left))
        complete = [s for s in left if check_complete(run / f"thinker_step_{s}.pt")]
        assert len(complete) == len(left) >= KEEP_LAST  # deleting never truncates
        assert all(os.path.samefile(run / n, run_template / n) for n in pinned - {"last.pt"})
        assert os.readlink(run / "last.pt") == f"thinker_step_{LINKED_STEP}.pt"
        rerun(capsys, *args)
        assert periodic(run) == survivors
        assert pinned | {f"thinker_step_{s}.pt" for s in survivors} == set(os.listdir(run))
        if killed:
            kills += 1
            mid_delete += 0 < len(STEPS) - len(left) < to_delete
            figures.count("kills")
    assert mid_delete > 0, "no kill landed while checkpoints were being deleted"


# --------------------------------------------------------------------------- ckptkit.save

#: 12.5M float32 = 50 MB per save.  The child imports torch once and forks one process per
#: round, so 20+ kills do not pay 2 s of ``import torch`` each; the forked process is the one
#: killed, a separate process like any other.  Each line "PATH BASE COUNT LOG" forks one that
#: saves COUNT times (tags BASE...), logging "saved TAG"; the child answers with its pid, then
#: its wait status once it has ended.
NUMEL = 12_500_000
SAVER = r"""
import os, sys, torch, ckptkit
print("ready", flush=True)
for line in sys.stdin:
    path, base, count, log = line.split()
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for k in range(int(base), int(base) + int(count)):
            ckptkit.save({"tag": k, "t": torch.full((%d,), float(k))}, path)
            os.write(fd, b"saved %%d\n" %% k)
        os._exit(0)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
""" % NUMEL


class Saver:
    """The SAVER child; every round runs in a process forked from it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SAVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=child_env())
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.line() == "ready"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def line(self) -> str:
        return self.lines.get(timeout=120)

    def begin(self, path: Path, base: int, count: int, log: Path) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path} {base} {count} {log}\n")
        self.proc.stdin.flush()
        return int(self.line())

    def status(self) -> int:
        return int(self.line())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class _Forked:
    """What :func:`kill_at` needs of a process the SAVER child forked (and reaps: its wait
    status comes from :meth:`Saver.status`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)  # a zombie still answers, until the SAVER child reaps it
        except ProcessLookupError:
            self.returncode = -1
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            assert time.monotonic() < deadline, f"pid {self.pid} did not end"
            time.sleep(0.005)
        return -1


def read_tag(path: Path) -> int:
    obj = torch.load(path, weights_only=True, mmap=True)
    tag, t = obj["tag"], obj["t"]
    assert t.numel() == NUMEL and bool((t == float(tag)).all()), "torn tensor"
    return tag


def saved_tags(log: Path) -> list[int]:
    return [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []


def test_kill_9_during_save_leaves_old_or_new_file(tmp_path: Path) -> None:
    path = tmp_path / "big_step_1.pt"
    saver = Saver()
    try:
        log = tmp_path / "calibrate.log"
        started = time.monotonic()
        saver.begin(path, 1, 1, log)
        assert saver.status() == 0 and read_tag(path) == 1
        one_save = time.monotonic() - started
        size = path.stat().st_size
        clock = Clock(total=2.5 * one_save, done_at=one_save)
        confirmed = 1
        kills = mid_write = attempts = 0
        points = kill_points("save", clock)
        while kills < KILLS:
            attempts += 1
            assert attempts < 3 * KILLS + 10, "too many saves finished before their kill"
            base = attempts * 1000
            log = tmp_path / f"round-{attempts}.log"
            before = frozenset(p.name for p in tmp_path.glob(".*.partial"))
            progress = output_progress(path, size, ignore=before)
            pid = saver.begin(path, base, 1000, log)
            kill_at(_Forked(pid), next(points), progress)  # 1000 saves: it never ends first
            status = saver.status()
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            saved = saved_tags(log)
            tag = read_tag(path)
            in_flight = saved[-1] + 1 if saved else base
            assert tag in {saved[-1] if saved else confirmed, in_flight}, (tag, saved, confirmed)
            temps = {p.name for p in tmp_path.glob(".*.partial")} - before
            assert all(re.fullmatch(atomic_temp(r"big_step_1\.pt"), n) for n in temps), temps
            newest = ckptkit.latest(tmp_path)
            assert newest is not None and newest.path == path  # never a temp file
            # The rerun: a complete save right after the kill.
            saver.begin(path, base + 500, 1, log)
            assert saver.status() == 0 and read_tag(path) == base + 500
            confirmed = base + 500
            # Keep a few leftovers for the checks below; the rest would only fill the disk.
            for leftover in sorted(tmp_path.glob(".*.partial"), key=os.path.getmtime)[:-3]:
                leftover.unlink()
            kills += 1
            mid_write += bool(temps)
            figures.count("kills")
    finally:
        saver.close()
    assert mid_write > 0, "no kill landed while a save was being written"
    leftovers = sorted(tmp_path.glob(".big_step_1.pt.*.partial"))
    assert leftovers  # the three newest were kept
    # Fresh leftovers are ignored: cleanup keeps them (explained), latest never returns them.
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert not plan.deleted
    for item in plan.items:
        if item.path in leftovers:
            assert "interrupted ckptkit.save" in item.reason
    # A later successful save removes leftovers of dead writers once they are stale
    # (storage.atomic: dead pid and ABANDONED_AFTER seconds untouched).
    for leftover in leftovers:
        os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    ckptkit.save({"tag": 1}, path)
    assert list(tmp_path.glob(".*.partial")) == []
    assert torch.load(path, weights_only=True) == {"tag": 1}


# --------------------------------------------------------------------------- fetch

#: MiB per file: the VQ-VAE comes in two pieces, the priors in one each.
JUKEBOX_5B = {"jukebox/5b/vqvae.pth.tar": 16, "jukebox/5b/prior_level_0.pth.tar": 2,
              "jukebox/5b/prior_level_1.pth.tar": 2, "jukebox/5b/prior_level_2.pth.tar": 2}
AZURE = "https://openaipublic.azureedge.net"
BLOB = "https://openaipublic.blob.core.windows.net"


def jukebox_file(path: Path, seed: int, mib: int) -> Path:
    """A Jukebox-shaped legacy torch file (hps, model, opt=None, step) of about ``mib`` MiB."""
    g = torch.Generator().manual_seed(seed)
    torch.save({"hps": {"name": path.name, "level": seed}, "opt": None, "step": seed,
                "model": {"w": torch.randn(mib * MiB // 4 - 64, generator=g)}},
               path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def jukebox_5b(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jukebox")
    return {file_id: jukebox_file(root / file_id.replace("/", "_"), seed, mib)
            for seed, (file_id, mib) in enumerate(JUKEBOX_5B.items())}


def serve_jukebox(server: HTTPTestServer, files: dict[str, Path], rate: float | None) -> str:
    """Serve the files where the catalogue's storage account has them; the mirror setting."""
    for file_id, path in files.items():
        server.add(f"/blob/{file_id.replace('jukebox/', 'jukebox/models/', 1)}", path, rate=rate)
    return f"{AZURE}={server.url('/blob')},{BLOB}={server.url('/blob')}"


def check_cache(cache: Path, config: Path, expected: dict[str, str]) -> bool:
    """Every final path of the cache is absent or holds exactly the expected bytes; the
    commit marker and the pins vouch only for complete files.  True if a ``.part`` exists."""
    for file_id, digest in expected.items():
        final, staged = cache / "files" / file_id, cache / "staging" / file_id
        meta = cache / "meta" / f"{file_id}.json"
        for path in (final, staged):
            if path.exists():
                assert sha256_file(path) == digest, path
        if meta.exists():
            assert json.loads(meta.read_text())["sha256"] == digest and final.exists(), meta
        sidecar = staged.with_name(staged.name + ".part.json")
        if sidecar.exists():
            json.loads(sidecar.read_text())  # replaced atomically: never half written
    files = cache / "files"
    if files.is_dir():
        stray = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
        assert stray <= set(expected), stray - set(expected)
    pins = config / "lock.json"
    if pins.exists():
        for file_id, pin in json.loads(pins.read_text())["files"].items():
            assert pin["sha256"] == expected[file_id], file_id
    return any((cache / "staging").rglob("*.part")) if (cache / "staging").is_dir() else False


def test_kill_9_during_fetch(http_server: HTTPTestServer, jukebox_5b: dict[str, Path],
                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    expected = {file_id: sha256_file(path) for file_id, path in jukebox_5b.items()}
    total = sum(path.stat().st_size for path in jukebox_5b.values())
    rate = 12 * MiB  # per connection: two thirds of a second for the bundle
    mirror = serve_jukebox(http_server, jukebox_5b, rate)
    cache, config = tmp_path / "cache", tmp_path / "config"
    for name, value in {"CKPTKIT_CACHE": cache, "CKPTKIT_CONFIG": config,
                        "CKPTKIT_MIRROR": mirror, "HOME": tmp_path / "home"}.items():
        monkeypatch.setenv(name, str(value))  # for the children and the in-process reruns
    env = child_env()
    argv = ckpt("fetch", "jukebox-5b", "--source", "url", "--connections", "2")

    def served() -> float:
        return (http_server.bytes_sent() - base) / total

    def throttle(value: float | None) -> None:
        for route in http_server.routes.values():
            route.rate = value

    base = http_server.bytes_sent()
    clock = measure(argv, served, env=env)
    check_cache(cache, config, expected)
    rng = random.Random(f"fetch-chains:{SEED}")
    kills = partial = attempts = 0
    points = kill_points("fetch", clock)
    while kills < KILLS:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(config, ignore_errors=True)
        # A chain: killed, resumed and killed again, up to four times, then a rerun.
        for link in range(rng.randint(1, 4)):
            attempts += 1
            assert attempts < 3 * KILLS + 10, "too many fetches finished before their kill"
            base = http_server.bytes_sent()
            point = next(points) if link == 0 else KillPoint(
                "time", rng.uniform(0.0, clock.total))
            proc = start(argv, tmp_path / "stderr.txt", env=env)
            killed = kill_at(proc, point, served)
            http_server.wait_idle()
            has_part = check_cache(cache, config, expected)
            if killed:
                kills += 1
                partial += has_part
                figures.count("kills")
        throttle(None)
        out = rerun(capsys, "fetch", "jukebox-5b", "--source", "url", "--json")
        throttle(rate)
        fetched = {item["name"]: item for item in json.loads(out)}
        assert {name: sha256_file(Path(item["path"])) for name, item in fetched.items()} \
            == expected
        assert check_cache(cache, config, expected) is False  # nothing partial is left
    assert partial > 0, "no kill landed while the bundle was downloading"


#: The bundle of the kill-at-40 % test, MiB per file (71 MiB, as Jukebox 5B's share of it).
BUNDLE_71 = {"jukebox/5b/vqvae.pth.tar": 48, "jukebox/5b/prior_level_0.pth.tar": 8,
             "jukebox/5b/prior_level_1.pth.tar": 8, "jukebox/5b/prior_level_2.pth.tar": 7}


@pytest.mark.parametrize("fraction", [0.4, 0.75])
def test_kill_9_mid_bundle_costs_at_most_a_tenth_more(
        http_server: HTTPTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], fraction: float) -> None:
    """Killed once the server has sent ``fraction`` of the bundle, the rerun moves only what
    was not on disk at the pieces' last checkpoints: both runs together send ≤ 1.1 × it."""
    files = {file_id: jukebox_file(tmp_path / file_id.replace("/", "_"), seed, mib)
             for seed, (file_id, mib) in enumerate(BUNDLE_71.items())}
    total = sum(path.stat().st_size for path in files.values())
    # 4 MiB/s per connection, 9 connections: the bundle takes seconds, so the kill lands mid-way.
    mirror = serve_jukebox(http_server, files, 4 * MiB)
    cache, config = tmp_path / "cache", tmp_path / "config"
    for name, value in {"CKPTKIT_CACHE": cache, "CKPTKIT_CONFIG": config,
                        "CKPTKIT_MIRROR": mirror, "HOME": tmp_path / "home"}.items():
        monkeypatch.setenv(name, str(value))
    proc = start(ckpt("fetch", "jukebox-5b", "--source", "url"), tmp_path / "stderr.txt",
                 env=child_env())
    killed = kill_at(proc, KillPoint("progress", fraction),
                     lambda: http_server.bytes_sent() / total)
    assert killed, (tmp_path / "stderr.txt").read_text()
    http_server.wait_idle()
    at_kill = http_server.bytes_sent()
    assert at_kill < total  # the rate cap kept the bundle from finishing first
    for route in http_server.routes.values():
        route.rate = None
    out = rerun(capsys, "fetch", "jukebox-5b", "--source", "url", "--json")
    assert {item["name"]: sha256_file(Path(item["path"])) for item in json.loads(out)} \
        == {file_id: sha256_file(path) for file_id, path in files.items()}
    sent = http_server.bytes_sent()
    assert sent <= 1.1 * total, f"{sent / total:.3f} x the bundle (killed at {at_kill / total:.2f})"
    figures.count("kills")


# --------------------------------------------------------------------------- disk full


class SmallDisk:
    """A directory where writing more than ``size`` bytes fails.

    A tmpfs of that size where mounting works (we may be root), else a plain directory and a
    child limited by ``RLIMIT_FSIZE`` to ``file_limit`` bytes per file, with SIGXFSZ ignored
    so that the write fails with EFBIG instead of killing the process.
    """

    def __init__(self, root: Path, size: int, file_limit: int) -> None:
        self.root = root
        self.file_limit: int | None = file_limit
        root.mkdir(parents=True)
        self.mounted = _can_mount() and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(root)],
            capture_output=True).returncode == 0

    @property
    def message(self) -> str:
        return "no space left on device" if self.mounted else "the file size limit was reached"

    @property
    def hint(self) -> str:
        return "Free some" if self.mounted else "Raise the limit (ulimit -f)"

    def preexec(self) -> Callable[[], None] | None:
        limit = self.file_limit
        if self.mounted or limit is None:
            return None

        def limited() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return limited

    def run(self, argv: list[str], env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              env=env or child_env(), preexec_fn=self.preexec())

    def grow(self, size: int) -> None:
        """Make room: a bigger tmpfs (its files stay), or no file size limit."""
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.root)], check=True)
        self.file_limit = None

    def unmount(self) -> None:
        if self.mounted:
            done = subprocess.run(["umount", str(self.root)], capture_output=True)
            if done.returncode != 0:  # a straggler still holds a file: detach it anyway
                subprocess.run(["umount", "-l", str(self.root)], check=True)
            self.mounted = False


_MOUNT_WORKS: list[bool] = []


def _can_mount() -> bool:
    """Whether this process may mount a tmpfs (tried once per session)."""
    if not _MOUNT_WORKS:
        import tempfile

        probe = Path(tempfile.mkdtemp(prefix="ckptkit-mount-probe-"))
        works = shutil.which("mount") is not None and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
            capture_output=True).returncode == 0
        if works:
            subprocess.run(["umount", str(probe)], check=True)
        probe.rmdir()
        _MOUNT_WORKS.append(works)
    return _MOUNT_WORKS[0]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int, int], SmallDisk]]:
    """``small_disk(size, file_limit)``: a :class:`SmallDisk`, unmounted after the test."""
    made: list[SmallDisk] = []

    def make(size: int, file_limit: int) -> SmallDisk:
        made.append(SmallDisk(tmp_path / f"small{len(made)}", size, file_limit))
        return made[-1]

    yield make
    for disk in made:
        disk.unmount()


def assert_disk_full(result: subprocess.CompletedProcess[str], disk: SmallDisk,
                     path: Path) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    line = one_line_error(result.stderr)
    assert disk.message in line and str(path) in line, line
    return line


def test_disk_full_during_strip(training_checkpoint: Path, small_disk) -> None:
    disk = small_disk(8 * MiB, 8 * MiB)  # the stripped file is ~12.5 MB
    out = disk.root / "deploy.pt"
    result = disk.run(ckpt("strip", str(training_checkpoint), "-o", str(out)))
    line = assert_disk_full(result, disk, out)
    assert line.startswith("ckpt: error: ") and disk.hint in line
    assert list(disk.root.iterdir()) == []  # neither the output nor its temporary file
    figures.count("disk-full")


def test_disk_full_during_convert(loftr_checkpoint: Path, small_disk) -> None:
    disk = small_disk(8 * MiB, 8 * MiB)  # the npz is ~21 MB
    out = disk.root / "out.npz"
    result = disk.run(ckpt("convert", str(loftr_checkpoint), "--recipe", "loftr", "--to",
                           "flax", "-o", str(out)))
    assert_disk_full(result, disk, out)
    assert result.stdout == ""  # no report of a conversion that did not happen
    assert list(disk.root.iterdir()) == []  # no npz, no sidecar, no temporary file
    figures.count("disk-full")


SAVE_ON_FULL_DISK = r"""
import sys, torch, ckptkit
try:
    ckptkit.save({"t": torch.zeros(5_000_000)}, sys.argv[1])  # 20 MB
except ckptkit.DiskFullError as exc:
    print(f"DiskFullError (OSError: {isinstance(exc, OSError)}): {exc}", file=sys.stderr)
    sys.exit(1)
"""


def test_disk_full_during_save_keeps_the_previous_file(small_disk) -> None:
    disk = small_disk(8 * MiB, 8 * MiB)
    path = disk.root / "run_step_2.pt"
    ckptkit.save({"step": 1}, path)  # in this process: not limited, and small anyway
    result = disk.run([sys.executable, "-c", SAVE_ON_FULL_DISK, str(path)])
    assert result.returncode == 1, result.stderr
    line = one_line_error(result.stderr)
    assert line.startswith("DiskFullError (OSError: True): ") and disk.message in line
    assert str(path) in line and "previous file there is untouched" in line
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in disk.root.iterdir()] == ["run_step_2.pt"]  # no temporary file
    figures.count("disk-full")


def test_disk_full_during_fetch(http_server: HTTPTestServer, tmp_path: Path,
                                small_disk) -> None:
    # Four 16 MiB files at once: each alone passes the free-space check (16 MiB + the 32 MiB
    # margin), together they fill the 56 MiB disk mid-download.
    files = {file_id: jukebox_file(tmp_path / file_id.replace("/", "_"), seed, 16)
             for seed, file_id in enumerate(JUKEBOX_5B)}  # not the sizes of the kill test
    expected = {file_id: sha256_file(path) for file_id, path in files.items()}
    disk = small_disk(56 * MiB, 8 * MiB)
    cache, config = disk.root / "cache", tmp_path / "config"
    env = child_env(CKPTKIT_CACHE=str(cache), CKPTKIT_CONFIG=str(config),
                    CKPTKIT_MIRROR=serve_jukebox(http_server, files, None),
                    HOME=str(tmp_path / "home"))
    result = disk.run(ckpt("fetch", "jukebox-5b", "--source", "url", "--quiet"), env=env)
    assert result.returncode == 1, (result.returncode, result.stderr)
    line = one_line_error(result.stderr)
    assert re.search(rf"{disk.message}|not enough disk space", line), line
    assert str(cache) in line and disk.hint in line, line
    assert "could not fetch" not in line  # not reported as every source failing
    check_cache(cache, config, expected)
    missing = [i for i in expected if not (cache / "files" / i).exists()]
    assert missing, "every file fitted: the disk was not full"
    # As the error says: with room again, the rerun completes (resuming what it had).
    disk.grow(160 * MiB)
    again = disk.run(ckpt("fetch", "jukebox-5b", "--source", "url", "--json"), env=env)
    assert again.returncode == 0, again.stderr
    assert {f["name"]: sha256_file(Path(f["path"])) for f in json.loads(again.stdout)} \
        == expected
    figures.count("disk-full")
