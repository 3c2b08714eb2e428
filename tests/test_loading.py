"""`ckptkit.load`: safe by default, explicit opt-in for code, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

import ckptkit
from ckptkit.errors import FormatError, UsageError
from tests.checkpoints import namespace_checkpoint, save_torch

torch = pytest.importorskip("torch")


def test_custom_classes_are_refused_by_weights_only_with_a_hint(tmp_path: Path) -> None:
    path = save_torch(namespace_checkpoint(), tmp_path / "epoch.pt")
    with pytest.raises(FormatError, match="framework='numpy'"):
        ckptkit.load(path, framework="torch")
    loaded = ckptkit.load(path, framework="torch", unsafe=True)
    assert loaded["args"].lr == 0.1


def test_numpy_load_reads_custom_class_files_without_running_them(tmp_path: Path) -> None:
    path = save_torch(namespace_checkpoint(), tmp_path / "epoch.pt")
    tree = ckptkit.load(path, framework="numpy")
    assert tree["model_state_dict"]["head.weight"].tolist() == [[1.0] * 3] * 2
    assert tree["epoch"] == 4


def test_unknown_framework_is_a_usage_error(tmp_path: Path) -> None:
    path = save_torch({"w": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(UsageError, match="framework='torch'"):
        ckptkit.load(path, framework="tf")
