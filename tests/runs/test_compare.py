"""``ckpt compare``: MRL-style epochs, missing metrics, directions, JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptkit.runs.compare import compare, direction_of, parse_metric
from ckptkit.errors import NotFoundError, UsageError
from tests.conftest import run_main
from tests.mrl_runs import mrl_run

torch = pytest.importorskip("torch")


run = run_main


def test_recommends_smaller_best_over_latest_with_equal_val_loss(tmp_path: Path) -> None:
    paths = mrl_run(tmp_path)
    result = compare([tmp_path])
    assert result.metric == "val_loss" and result.direction == "min"
    assert result.recommended == str(paths["best"])
    assert "smallest file of the 2" in result.reason
    rows = {Path(r.path).name: r for r in result.rows}
    assert rows["latest.pt"].optimizer and not rows["best.pt"].optimizer
    assert rows["latest.pt"].size_bytes > rows["best.pt"].size_bytes
    assert rows["epoch_0.pt"].epoch == 0 and rows["latest.pt"].epoch == 5


def test_checkpoint_without_metric_is_shown_not_fatal(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    paths = mrl_run(tmp_path)
    torch.save({"model": {"w": torch.zeros(2)}, "step": 9}, tmp_path / "nometric.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    code, out, _err = run(capsys, "compare", str(tmp_path))
    assert code == 0
    assert "nometric.pt" in out and "notes.txt" not in out
    assert "Recommended by val_loss (min): " + str(paths["best"]) in out
    assert "no val_loss" in out


def test_none_has_the_metric_falls_back_and_says_so(tmp_path: Path) -> None:
    mrl_run(tmp_path)
    result = compare([tmp_path], metric="val_acc")
    assert result.direction == "max"
    assert result.recommended == str(tmp_path / "best.pt")
    assert "no checkpoint has val_acc" in result.reason


def test_metric_direction_override_and_json(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    paths = mrl_run(tmp_path)
    code, out, _ = run(capsys, "compare", str(paths["epoch_0"]), str(paths["latest"]),
                       "--metric", "val_loss:max", "--json")
    data = json.loads(out)
    assert code == 0
    assert set(data) >= {"rows", "recommended", "metric", "direction", "reason"}
    assert data["recommended"] == str(paths["epoch_0"]) and data["direction"] == "max"
    row = data["rows"][1]
    assert set(row) >= {"path", "format", "epoch", "step", "metrics", "size_bytes",
                        "tensor_count", "optimizer"}
    assert row["optimizer"] is True and row["metrics"] == {"val_loss": 18.0021}
    assert row["format"] == "torch-zip" and row["tensor_count"] == 19


def test_unreadable_file_is_a_row_and_exit_3(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    paths = mrl_run(tmp_path)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(paths["best"].read_bytes()[:300])
    code, out, err = run(capsys, "compare", str(paths["best"]), str(broken), "--json")
    data = json.loads(out)
    assert code == 3 and "broken.pt" in err
    assert data["recommended"] == str(paths["best"])
    assert data["rows"][1]["error"]


def test_directions_and_errors(tmp_path: Path) -> None:
    assert direction_of("val_loss") == "min" and direction_of("val_acc") == "max"
    assert direction_of("bleu") == "max" and direction_of("eer") == "min"
    assert parse_metric("f1:min") == ("f1", "min")
    with pytest.raises(UsageError):
        parse_metric("val_loss:up")
    with pytest.raises(NotFoundError):
        compare([tmp_path / "missing.pt"])
    with pytest.raises(UsageError):
        compare([tmp_path])  # an empty directory holds no checkpoint
