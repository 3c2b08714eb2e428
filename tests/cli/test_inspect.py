"""`ckpt inspect` as a user runs it: output, JSON schema, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoints import namespace_checkpoint, save_torch, tiny_training_state
from tests.conftest import run_ckpt

torch = pytest.importorskip("torch")

JSON_KEYS = {"path", "format", "size_bytes", "tensor_count", "param_count", "groups",
             "metadata", "tensors", "objects", "unsafe"}


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_torch(tiny_training_state(), tmp_path_factory.mktemp("cli") / "thinker_best.pt")


def test_human_output_names_the_training_state(thinker: Path) -> None:
    result = run_ckpt("inspect", str(thinker))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch-zip" in out and "code executed: none" in out
    assert "step=210" in out and "best_val_loss=1.75" in out
    assert "AdamW" in out and "Scheduler present" in out and "Scaler present" in out
    assert "model" in out and "optimizer" in out


def test_json_has_the_documented_schema(thinker: Path) -> None:
    result = run_ckpt("inspect", str(thinker), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert JSON_KEYS <= set(data)
    assert data["format"] == "torch-zip" and data["size_bytes"] == thinker.stat().st_size
    assert data["metadata"] == {"step": 210, "best_val_loss": 1.75}
    assert {g["name"] for g in data["groups"]} == {"model", "optimizer"}
    assert all(set(g) == {"name", "tensor_count", "param_count", "bytes"} for g in data["groups"])
    loaded = torch.load(thinker, weights_only=True)
    assert {"name": "model.1.weight", "dtype": "float32", "shape": [8, 8]} in data["tensors"]
    assert data["param_count"] == sum(
        t.numel() for part in ("model",) for t in loaded[part].values()) + sum(
        t.numel() for s in loaded["optimizer"]["state"].values() for t in s.values())


def test_filter_and_depth(thinker: Path) -> None:
    result = run_ckpt("inspect", str(thinker), "--filter", "model.*.weight", "--depth", "1")
    assert result.returncode == 0
    assert "model.1.weight" in result.stdout and "optimizer.state.0.exp_avg" not in result.stdout
    data = json.loads(run_ckpt("inspect", str(thinker), "--json", "--filter", "*.bias").stdout)
    assert data["tensors"] and all(t["name"].endswith(".bias") for t in data["tensors"])


def test_opaque_objects_are_listed_with_their_state(tmp_path: Path) -> None:
    path = save_torch(namespace_checkpoint(), tmp_path / "epoch_4.pt")
    result = run_ckpt("inspect", str(path))
    assert result.returncode == 0
    assert "<object argparse.Namespace>" in result.stdout and "lr=0.1" in result.stdout


@pytest.mark.parametrize("content, code, fragment", [
    (None, 4, "no such file or directory"),
    (b"hello, not a checkpoint", 1, "not a checkpoint format ckptkit knows"),
    (b"", 3, "file is empty"),
])
def test_bad_input_is_one_line_with_the_right_code(tmp_path: Path, content: bytes | None,
                                                    code: int, fragment: str) -> None:
    path = tmp_path / "input.pt"
    if content is not None:
        path.write_bytes(content)
    result = run_ckpt("inspect", str(path))
    assert result.returncode == code
    assert fragment in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_truncated_checkpoint_exits_3(thinker: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(thinker.read_bytes()[:1000])
    result = run_ckpt("inspect", str(cut))
    assert result.returncode == 3 and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"junk")
    result = run_ckpt("inspect", str(path), env={"CKPTKIT_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert run_ckpt("inspect").returncode == 2
    assert run_ckpt("inspect", "x", "--depth", "0").returncode == 2
    assert run_ckpt("no-such-command").returncode == 2


def test_version_and_help() -> None:
    assert run_ckpt("--version").stdout.startswith("ckpt, version")
    help_text = run_ckpt("inspect", "--help").stdout
    assert "Examples:" in help_text and "ckpt inspect thinker_best.pt" in help_text


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = run_ckpt("inspect", str(fifo))
    assert result.returncode == 1 and "not a regular file" in result.stderr


def test_tf_checkpoint_by_prefix() -> None:
    from tests.conftest import SRC

    prefix = SRC / "ckptkit" / "samples" / "tf_ckpt" / "ckpt-1"
    result = run_ckpt("inspect", str(prefix), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "tf-checkpoint"
