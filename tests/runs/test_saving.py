"""`ckptkit.save` (atomic, optional retention) and `ckptkit.latest`.

kill -9 in the middle of saves, and a full disk: tests/runs/test_crashes.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import ckptkit
from ckptkit.errors import UsageError
from tests.runs import muomni_run, train_states, truncate

torch = pytest.importorskip("torch")


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


@pytest.mark.parametrize("pattern", ["step_{}.pt", "checkpoint_{}.pt", "ckpt_{}.pt",
                                     "model_{}.pt", "iter_{}.pt", "{}.pt"])
def test_save_with_the_common_names(tmp_path: Path, pattern: str) -> None:
    """The README's own example: ckptkit.save(checkpoint, "run/step_1000.pt", keep_last=3)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "resnet50.pt").write_bytes(b"pretrained, not ours")
    for step in (1000, 2000, 3000, 4000, 5000):
        ckptkit.save({"step": step}, tmp_path / "run" / pattern.format(step), keep_last=3)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [pattern.format(s) for s in (3000, 4000, 5000)] + ["resnet50.pt"])


def test_retention_needs_a_periodic_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="periodic"):
        ckptkit.save({"x": 1}, tmp_path / "thinker_best.pt", keep_last=1)
    assert not (tmp_path / "thinker_best.pt").exists()


def test_latest_by_step_skipping_incomplete(tmp_path: Path) -> None:
    muomni_run(tmp_path)
    os.utime(tmp_path / "thinker_step_100.pt", (2e9, 2e9))
    assert ckptkit.latest(tmp_path).path.name == "thinker_step_400.pt"
    truncate(tmp_path / "thinker_step_400.pt")
    found = ckptkit.runs.saving.find_latest(tmp_path)
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
