"""`ckpt cleanup` and `ckpt latest` as a user runs them, on real training-run directories."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SRC, run_ckpt
from tests.runs import hf_run, muomni_run, truncate

pytest.importorskip("torch")


def ckpt_no_tty(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptkit", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})


@pytest.fixture
def run(tmp_path: Path) -> Path:
    muomni_run(tmp_path / "thinker_tiny")
    muomni_run(tmp_path / "vision_tiny", "vision", steps=(5, 6, 7), seed=1)
    return tmp_path


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_dry_run_prints_the_plan_and_deletes_nothing(run: Path) -> None:
    before = names(run / "thinker_tiny")
    result = run_ckpt("cleanup", str(run / "thinker_tiny"), "--keep-last", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "delete  thinker_step_100.pt" in out and "delete  thinker_step_200.pt" in out
    assert "keep    thinker_best.pt" in out and "keep    tokenizer.model" in out
    assert "2 checkpoint(s) to delete" in out
    assert names(run / "thinker_tiny") == before


def test_without_tty_refuses_unless_yes(run: Path) -> None:
    target = str(run / "thinker_tiny")
    result = ckpt_no_tty("cleanup", target, "--keep-last", "1")
    assert result.returncode == 2
    assert "--yes" in result.stderr
    assert "thinker_step_100.pt" in names(run / "thinker_tiny")
    result = ckpt_no_tty("cleanup", target, "--keep-last", "1", "--yes")
    assert result.returncode == 0, result.stderr
    assert "deleted 3 checkpoint(s)" in result.stdout
    assert names(run / "thinker_tiny") == {"thinker_step_400.pt", "thinker_best.pt",
                                           "thinker.pt", "tokenizer.model", "notes.txt"}


def test_asks_on_a_tty(run: Path) -> None:
    master, slave = pty.openpty()
    os.write(master, b"y\n")
    proc = subprocess.run([sys.executable, "-m", "ckptkit", "cleanup", str(run / "vision_tiny"),
                           "--keep-last", "1"], stdin=slave, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(SRC)})
    os.close(master)
    os.close(slave)
    assert proc.returncode == 0, proc.stderr
    assert "Delete 2 checkpoint(s)" in proc.stderr
    assert {"vision_step_5.pt", "vision_step_6.pt"}.isdisjoint(names(run / "vision_tiny"))


def test_truncating_the_newest_kept_while_the_prompt_waits_deletes_nothing(run: Path) -> None:
    folder = run / "vision_tiny"
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ckptkit", "cleanup", str(folder),
                             "--keep-last", "1"], stdin=follower, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC)})
    os.close(follower)
    try:
        # Wait for the question itself (bytes on stderr), never for time to pass.
        asked = b""
        while b"[y/N]" not in asked:
            chunk = proc.stderr.read1(4096)  # type: ignore[union-attr]
            assert chunk, f"no question was asked: {asked!r}"
            asked += chunk
        truncate(folder / "vision_step_7.pt")  # the one the plan keeps to resume from
        os.write(leader, b"y\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(leader)
    assert proc.returncode == 1, err
    line = err.decode().strip().splitlines()[-1]
    assert line.startswith("ckpt: error: nothing deleted: ") and "vision_step_7.pt" in line
    assert "no longer complete" in line and b"deleted" not in out
    assert {"vision_step_5.pt", "vision_step_6.pt"} <= names(folder)


def test_json_schema_recursive(run: Path) -> None:
    result = run_ckpt("cleanup", str(run), "--recursive", "--keep-last", "1", "--dry-run",
                      "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"kept", "deleted", "freed_bytes"}
    assert {Path(d["path"]).name for d in data["deleted"]} == {
        "thinker_step_100.pt", "thinker_step_200.pt", "thinker_step_300.pt",
        "vision_step_5.pt", "vision_step_6.pt"}
    for row in data["kept"] + data["deleted"]:
        assert set(row) >= {"path", "step", "reason"}
    assert data["freed_bytes"] == sum(d["bytes"] for d in data["deleted"])
    assert {d["step"] for d in data["deleted"]} == {100, 200, 300, 5, 6}
    assert all(Path(d["path"]).exists() for d in data["deleted"])  # dry run


def test_truncated_newest_is_explained(run: Path) -> None:
    truncate(run / "thinker_tiny" / "thinker_step_400.pt")
    result = ckpt_no_tty("cleanup", str(run / "thinker_tiny"), "--keep-last", "1", "--yes",
                         "--json")
    data = json.loads(result.stdout)
    assert {Path(d["path"]).name for d in data["deleted"]} == {"thinker_step_100.pt",
                                                               "thinker_step_200.pt"}
    assert any("incomplete" in n for n in data["notes"])
    assert (run / "thinker_tiny" / "thinker_step_300.pt").exists()


def test_keep_best_from_trainer_state(tmp_path: Path) -> None:
    hf_run(tmp_path, steps=(10, 20, 30), eval_losses=(2.0, 1.0, 1.5))
    result = run_ckpt("cleanup", str(tmp_path), "--keep-last", "1", "--keep-best", "eval_loss",
                      "--dry-run")
    assert "delete  checkpoint-10/" in result.stdout
    assert "best eval_loss (min) = 1" in result.stdout


def test_usage_errors(run: Path) -> None:
    result = run_ckpt("cleanup", str(run), "--keep-last", "0")
    assert result.returncode == 2 and "--keep-best" in result.stderr
    assert run_ckpt("cleanup", str(run)).returncode == 2  # --keep-last is required
    assert run_ckpt("cleanup", str(run / "missing"), "--keep-last", "1").returncode == 4


def test_latest_by_step_and_skipping_truncated(run: Path) -> None:
    folder = run / "thinker_tiny"
    os.utime(folder / "thinker_step_100.pt", (2e9, 2e9))
    result = run_ckpt("latest", str(folder))
    assert result.returncode == 0 and result.stdout.strip() == str(folder / "thinker_step_400.pt")
    truncate(folder / "thinker_step_400.pt")
    result = run_ckpt("latest", str(folder), "--json")
    assert json.loads(result.stdout) == {"path": str(folder / "thinker_step_300.pt"), "step": 300}
    assert "skipped" in result.stderr and "thinker_step_400.pt" in result.stderr


def test_latest_not_found_and_prefix(run: Path) -> None:
    empty = run / "empty"
    empty.mkdir()
    assert run_ckpt("latest", str(empty)).returncode == 4
    assert run_ckpt("latest", str(run / "vision_tiny"), "--prefix", "nope").returncode == 4
    result = run_ckpt("latest", str(run / "vision_tiny"), "--prefix", "vision")
    assert result.stdout.strip().endswith("vision_step_7.pt")


def test_help_has_examples() -> None:
    for command in ("cleanup", "latest"):
        assert "Examples:" in run_ckpt(command, "--help").stdout
