"""`ckptkit.save` (atomic, kill -9 safe, optional retention) and `ckptkit.latest`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ckptkit
from ckptkit.errors import UsageError
from ckptkit.retention import plan_cleanup
from tests.conftest import SRC
from tests.runs import muomni_run, train_states, truncate

torch = pytest.importorskip("torch")

#: 50M float32 = 200 MB: a save takes long enough to be killed in every phase of it.
CHILD = r"""
import sys, torch, ckptkit
path, base = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
for k in range(base, base + 1000):
    ckptkit.save({"tag": k, "t": torch.full((50_000_000,), float(k))}, path)
    print(f"saved {k}", flush=True)
"""


def _read_tag(path: Path) -> int:
    obj = torch.load(path, weights_only=True, mmap=True)
    tag = obj["tag"]
    t = obj["t"]
    assert t.numel() == 50_000_000 and bool((t == float(tag)).all()), "torn tensor"
    return tag


def test_kill_9_mid_save_leaves_old_or_new_file(tmp_path: Path) -> None:
    path = tmp_path / "big_step_1.pt"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    confirmed: int | None = None
    rng = random.Random(5)
    for round_ in range(6):
        base = (round_ + 1) * 1000
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(base)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 2.5))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        if saved:
            confirmed = saved[-1]
        if confirmed is None and not path.exists():
            continue  # killed before the very first save finished: nothing was ever there
        tag = _read_tag(path)
        in_flight = (confirmed + 1) if saved else base
        assert tag in {confirmed, in_flight}, (round_, tag, confirmed, saved)
        confirmed = tag
    leftovers = sorted(tmp_path.glob(".big_step_1.pt.*.tmp"))
    # Fresh leftovers are ignored: cleanup keeps them (explained), latest never returns them.
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert not plan.deleted
    for item in plan.items:
        if item.path in leftovers:
            assert "interrupted ckptkit.save" in item.reason
    if path.exists():
        assert ckptkit.latest(tmp_path).path == path
    # A later successful save removes leftovers once they are stale.
    for leftover in leftovers:
        os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    ckptkit.save({"tag": 1}, path)
    assert list(tmp_path.glob(".*.tmp")) == []
    assert torch.load(path, weights_only=True) == {"tag": 1}


def test_failed_save_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = ckptkit.save({"step": 1}, tmp_path / "run_step_1.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):
        ckptkit.save({"step": 2, "bad": lambda: None}, path)  # lambdas do not pickle
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_step_1.pt"]


def test_save_creates_directory_and_round_trips(tmp_path: Path) -> None:
    state = train_states([7])[0]
    path = ckptkit.save(state, tmp_path / "new" / "thinker_step_7.pt")
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 7
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())


def test_save_with_keep_last_leaves_the_two_newest(tmp_path: Path) -> None:
    muomni_run(tmp_path, "vision", steps=(1, 2, 3))  # another run in the same directory
    for state in train_states([100, 200, 300, 400, 500]):
        ckptkit.save(state, tmp_path / f"thinker_step_{state['step']}.pt", keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("thinker")] == ["thinker_step_400.pt",
                                                            "thinker_step_500.pt"]
    assert {"vision_step_1.pt", "vision_step_2.pt", "vision_step_3.pt", "vision_best.pt",
            "vision.pt", "tokenizer.model"} <= set(names)


def test_save_keep_best_keeps_best_and_newest(tmp_path: Path) -> None:
    for state in train_states([1, 2, 3, 4]):  # val_loss 3.0, 2.5, 2.0, 5.0
        ckptkit.save(state, tmp_path / f"thinker_step_{state['step']}.pt", keep_best="val_loss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thinker_step_3.pt",
                                                         "thinker_step_4.pt"]


def test_retention_needs_a_periodic_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="periodic"):
        ckptkit.save({"x": 1}, tmp_path / "thinker_best.pt", keep_last=1)
    assert not (tmp_path / "thinker_best.pt").exists()


def test_latest_by_step_skipping_incomplete(tmp_path: Path) -> None:
    muomni_run(tmp_path)
    os.utime(tmp_path / "thinker_step_100.pt", (2e9, 2e9))
    assert ckptkit.latest(tmp_path).path.name == "thinker_step_400.pt"
    truncate(tmp_path / "thinker_step_400.pt")
    found = ckptkit.saving.find_latest(tmp_path)
    assert found.checkpoint is not None and found.checkpoint.step == 300
    assert [c.step for c, _why in found.skipped] == [400]


def test_latest_needs_prefix_with_several_runs(tmp_path: Path) -> None:
    muomni_run(tmp_path, "thinker", steps=(1, 2))
    muomni_run(tmp_path, "vision", steps=(5,))
    with pytest.raises(UsageError, match="--prefix"):
        ckptkit.latest(tmp_path)
    assert ckptkit.latest(tmp_path, prefix="vision").step == 5
    assert ckptkit.latest(tmp_path, prefix="audio") is None


def test_bad_retention_flags_fail_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        ckptkit.save({"x": 1}, tmp_path / "run_step_1.pt", keep_last=0)
    with pytest.raises(UsageError):
        ckptkit.save({"x": 1}, tmp_path / "run_step_1.pt", keep_best="loss:up")
    assert list(tmp_path.iterdir()) == []
