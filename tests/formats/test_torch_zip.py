"""torch.save zip files read without torch: structure, numerics and corruption."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError
from ckptkit.formats import torch_zip
from tests.checkpoints import (assert_matches_torch, mixed_dtype_state_dict, save_torch,
                               tiny_training_state)

torch = pytest.importorskip("torch")


def test_training_checkpoint_matches_torch_load(tmp_path: Path) -> None:
    path = save_torch(tiny_training_state(), tmp_path / "thinker_step_210.pt")
    info = ckptkit.inspect(path)
    assert info.format == "torch-zip"
    assert_matches_torch(info, torch.load(path, weights_only=True))
    assert info.kind == "training-checkpoint"
    assert info.metadata == {"step": 210, "best_val_loss": 1.75}
    assert [g.name for g in info.groups] == ["model", "optimizer"]
    assert info.optimizer is not None and info.optimizer.kind == "AdamW"
    assert info.optimizer.learning_rates == (3e-4,)
    assert info.scheduler and info.scaler
    assert info.details["zip_prefix"] == "thinker_step_210"


def test_bare_state_dict_is_one_unnamed_group(tmp_path: Path) -> None:
    path = save_torch(tiny_training_state()["model"], tmp_path / "weights.bin")
    info = ckptkit.inspect(path)
    assert info.kind == "state-dict"
    assert [(g.name, g.tensor_count) for g in info.groups] == [("", 6)]
    assert info.optimizer is None and not info.scheduler and not info.scaler


def test_every_dtype_shape_and_view(tmp_path: Path) -> None:
    state = mixed_dtype_state_dict()
    path = save_torch(state, tmp_path / "mixed.ckpt")
    info = ckptkit.inspect(path)
    assert_matches_torch(info, torch.load(path, weights_only=True))
    arrays = ckptkit.load(path, framework="numpy")
    for name, tensor in state.items():
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            expected = tensor.view(torch.int16 if tensor.dtype == torch.bfloat16
                                   else torch.uint8).numpy()
            got = arrays[name].view(expected.dtype)
        else:
            expected, got = tensor.numpy(), arrays[name]
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_prefix_is_found_not_assumed(tmp_path: Path) -> None:
    weird = save_torch({"w": torch.ones(2)}, tmp_path / "weird.name.with.dots.pth.tar")
    assert ckptkit.inspect(weird).details["zip_prefix"] == "weird.name.with.dots.pth"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer)
    from_buffer = tmp_path / "no_suffix"
    from_buffer.write_bytes(buffer.getvalue())
    info = ckptkit.inspect(from_buffer)
    assert info.details["zip_prefix"] == "archive" and info.tensors[0].shape == (3,)


def test_tensor_spans_point_at_the_bytes(tmp_path: Path) -> None:
    path = save_torch({"a": torch.arange(10, dtype=torch.float32)}, tmp_path / "a.pt")
    raw = torch_zip.read_info(path)
    (_, ref), = raw.tensors
    data = path.read_bytes()[ref.span.offset:ref.span.offset + ref.span.length]
    assert np.frombuffer(data, np.float32).tolist() == list(range(10))
    assert ref.span.offset % 64 == 0  # torch aligns records for mmap


def test_truncated_zip_is_an_integrity_error(tmp_path: Path) -> None:
    path = save_torch(tiny_training_state(), tmp_path / "cut.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="truncated or corrupt"):
        ckptkit.inspect(path)


def test_storage_smaller_than_its_tensor_is_refused(tmp_path: Path) -> None:
    path = save_torch({"w": torch.ones(64)}, tmp_path / "w.pt")
    rewritten = tmp_path / "short.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(rewritten, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                data = data[:16]
            dst.writestr(info.filename.replace("w/", "short/", 1), data)
    with pytest.raises(IntegrityError, match="needs 256"):
        ckptkit.inspect(rewritten)


def test_load_torch_uses_weights_only(tmp_path: Path) -> None:
    state = tiny_training_state()
    path = save_torch(state, tmp_path / "t.pt")
    loaded = ckptkit.load(path, framework="torch")
    assert torch.equal(loaded["model"]["1.weight"], state["model"]["1.weight"])


def test_two_data_pickles_are_refused(tmp_path: Path) -> None:
    path = save_torch({"w": torch.ones(2)}, tmp_path / "two.pt")
    doubled = tmp_path / "doubled.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(doubled, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr("other/data.pkl", src.read("two/data.pkl"))
    with pytest.raises(IntegrityError, match="exactly one"):
        ckptkit.inspect(doubled)


def test_float8_and_quantized_tensors_are_lazy_tensors(tmp_path: Path) -> None:
    with pytest.warns(UserWarning):  # torch deprecates quantized dtypes; old files have them
        q = torch.quantize_per_tensor(torch.rand(4, 3), 0.1, 2, torch.qint8)
    path = save_torch({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn), "q": q},
                      tmp_path / "odd.pt")
    info = ckptkit.inspect(path)
    assert info.objects == () and info.unsafe == ()
    assert {t.name: (t.dtype, t.shape) for t in info.tensors} == {
        "f8": ("float8_e4m3fn", (2,)), "q": ("qint8", (4, 3))}


def test_nan_metrics_give_strict_json(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import SRC

    path = save_torch({"w": torch.ones(2), "loss": float("nan"), "best": float("inf")},
                      tmp_path / "n.pt")
    out = subprocess.run([sys.executable, "-m", "ckptkit", "inspect", str(path), "--json"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}).stdout
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert data["metadata"] == {"loss": "nan", "best": "inf"}
