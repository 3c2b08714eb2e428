"""``ckpt strip``: μOmni training checkpoints become bit-identical inference checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptkit.errors import FormatError, UsageError
from ckptkit.runs.strip import plan_strip, strip, training_reason
from tests.checkpoints import tiny_training_state
from tests.conftest import run_main

torch = pytest.importorskip("torch")


run = run_main


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, dict]:
    state = tiny_training_state()
    state["config"] = {"d_model": 8, "name": "thinker_tiny", "dims": [1, 2]}
    state["torch_version"] = str(torch.__version__)
    path = tmp_path / "thinker_step_200.pt"
    torch.save(state, path)
    return path, state


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape
        assert actual[key].numpy().tobytes() == value.numpy().tobytes(), key


def test_strip_drops_training_state_keeps_weights_bit_identical(trained) -> None:
    src, state = trained
    result = strip(src)
    out = src.with_name("thinker_step_200.stripped.pt")
    assert result.output == str(out)
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == {"model", "step", "best_val_loss", "config", "torch_version"}
    assert_same_weights(state["model"], loaded["model"])
    assert loaded["step"] == 210 and loaded["best_val_loss"] == 1.75
    assert loaded["config"] == state["config"]
    assert set(result.dropped) == {"optimizer", "scheduler", "scaler"}
    assert result.size_after == out.stat().st_size < result.size_before
    # The stripped model loads strictly into a fresh model.
    from torch import nn

    model = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.Linear(8, 32, bias=False))
    model.load_state_dict(loaded["model"], strict=True)


def test_keep_optimizer_keeps_it(trained, tmp_path: Path) -> None:
    src, state = trained
    out = tmp_path / "with_opt.pt"
    result = strip(src, out, keep=["optimizer"])
    loaded = torch.load(out, weights_only=True)
    assert "optimizer" in loaded and "scheduler" not in loaded
    assert set(result.dropped) == {"scheduler", "scaler"}
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for i, per in state["optimizer"]["state"].items():
        for name, value in per.items():
            assert torch.equal(loaded["optimizer"]["state"][i][name], value)


def test_never_over_src_unless_in_place(trained, capsys: pytest.CaptureFixture[str]) -> None:
    src, state = trained
    before = src.read_bytes()
    with pytest.raises(UsageError, match="--in-place"):
        strip(src, src)
    code, _out, err = run(capsys, "strip", str(src), "-o", str(src))
    assert code == 2 and "refusing" in err
    assert src.read_bytes() == before
    with pytest.raises(UsageError):
        strip(src, src.with_name("x.pt"), in_place=True)
    strip(src)
    with pytest.raises(UsageError, match="already exists"):
        strip(src)  # a default name never replaces a file
    code, out, err = run(capsys, "strip", str(src), "--in-place", "--json")  # no TTY, no --yes
    assert code == 2 and "refusing to replace" in err and "--yes" in err and out == ""
    assert src.read_bytes() == before
    code, out, _ = run(capsys, "strip", str(src), "--in-place", "--yes", "--json")
    data = json.loads(out)
    assert code == 0 and data["output"] == str(src.resolve())
    loaded = torch.load(src, weights_only=True)
    assert "optimizer" not in loaded
    assert_same_weights(state["model"], loaded["model"])
    assert data["size_after"] == src.stat().st_size < data["size_before"]
    assert not [p for p in src.parent.iterdir() if p.name.endswith(".partial")]


def test_output_is_atomic_on_failure(trained, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    src, _ = trained
    out = tmp_path / "deploy.pt"
    out.write_bytes(b"old complete file")
    import ckptkit.formats.tree_writer as tw

    def broken(*_a, **_k):
        yield b"x" * 10
        raise OSError("disk full")

    monkeypatch.setattr(tw, "_storage_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        strip(src, out)
    assert out.read_bytes() == b"old complete file"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_bare_state_dict_nothing_to_strip(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "weights.pt"
    state = tiny_training_state()["model"]
    torch.save(state, src)
    code, out, _ = run(capsys, "strip", str(src), "--json")
    data = json.loads(out)
    assert code == 0 and data["output"] is None and "nothing to strip" in data["note"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]
    copy = tmp_path / "copy.pt"
    strip(src, copy)
    assert_same_weights(state, torch.load(copy, weights_only=True))


def test_dry_run_writes_nothing(trained, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = trained
    code, out, _ = run(capsys, "strip", str(src), "--dry-run")
    assert code == 0 and "Drop      optimizer" in out and "dry run" in out
    assert not src.with_name("thinker_step_200.stripped.pt").exists()


def test_custom_objects_are_dropped_and_cannot_be_kept(tmp_path: Path) -> None:
    import argparse

    src = tmp_path / "lightning.ckpt"
    state = tiny_training_state()
    torch.save({"state_dict": state["model"], "optimizer_states": [state["optimizer"]],
                "lr_schedulers": [state["scheduler"]], "hparams": argparse.Namespace(lr=1),
                "callbacks": {"ModelCheckpoint": {"best": 1.0}}, "epoch": 3}, src)
    plan = plan_strip(src)
    assert set(plan.dropped) == {"optimizer_states", "lr_schedulers", "hparams", "callbacks"}
    assert "custom object" in plan.dropped["hparams"]
    result = plan.execute()
    loaded = torch.load(result.output, weights_only=True)
    assert set(loaded) == {"state_dict", "epoch"}
    with pytest.raises(UsageError, match="custom object"):
        plan_strip(src, tmp_path / "o.pt", keep=["hparams"])
    with pytest.raises(UsageError, match="no top-level entry"):
        plan_strip(src, tmp_path / "o.pt", keep=["nope"])


def test_views_and_shared_storages_survive(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    src = tmp_path / "views.pt"
    torch.save({"model": {"w": base, "row": base[2], "t": base.t(), "h": base.half()},
                "optimizer": {"state": {}, "param_groups": []}}, src)
    out = Path(strip(src).output or "")
    loaded = torch.load(out, weights_only=True)["model"]
    assert torch.equal(loaded["row"], base[2]) and torch.equal(loaded["t"], base.t())
    assert loaded["t"].stride() == (1, 6)
    assert loaded["w"].untyped_storage().data_ptr() == loaded["row"].untyped_storage().data_ptr()
    assert torch.equal(loaded["h"], base.half())


def test_refuses_other_formats_and_names_rules(tmp_path: Path) -> None:
    npz = tmp_path / "w.npz"
    import numpy as np

    np.savez(npz, w=np.ones(3))
    with pytest.raises(UsageError, match="no optimizer state"):
        plan_strip(npz)
    assert training_reason("lr_scheduler", {}) == "scheduler state"
    assert training_reason("opt_g", {}) == "optimizer state"
    assert training_reason("whatever", {"state": {}, "param_groups": []}) == "optimizer state"
    assert training_reason("ema", {"w": 1}) is None
    assert training_reason("options", {}) is None
    tuple_root = tmp_path / "t.pt"
    torch.save((torch.zeros(1),), tuple_root)
    with pytest.raises(FormatError):
        plan_strip(tuple_root)


def test_report_says_larger_when_the_output_grew() -> None:
    """Alignment padding can make a tiny stripped file larger than its source."""
    from ckptkit.cli.strip import _human

    base = {"source": "a.pt", "size_before": 1000, "dropped": {}, "kept": ["model"],
            "note": "", "output": "b.pt", "dry_run": False}
    assert _human({**base, "size_after": 1080}).endswith("8% larger")
    assert _human({**base, "size_after": 300}).endswith("70% smaller")
