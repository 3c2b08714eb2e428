"""Legacy (pre-1.6) torch files: five pickles, then storages walked by seeks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError
from ckptkit.formats import torch_legacy
from tests.checkpoints import (assert_matches_torch, mixed_dtype_state_dict, namespace_checkpoint,
                               save_torch, tiny_training_state)

torch = pytest.importorskip("torch")


def test_training_checkpoint_matches_torch_load(tmp_path: Path) -> None:
    path = save_torch(tiny_training_state(), tmp_path / "prior_level_2.pth.tar", legacy=True)
    info = ckptkit.inspect(path)
    assert info.format == "torch-legacy"
    assert_matches_torch(info, torch.load(path, weights_only=True))
    assert info.details["pickles"] == 5
    assert info.metadata["step"] == 210 and info.optimizer.kind == "AdamW"


def test_mixed_dtypes_and_views_read_back_exactly(tmp_path: Path) -> None:
    state = {k: v for k, v in mixed_dtype_state_dict().items() if k != "f8"}
    path = save_torch(state, tmp_path / "mixed.pt", legacy=True)
    info = ckptkit.inspect(path)
    assert_matches_torch(info, torch.load(path, weights_only=True))
    arrays = ckptkit.load(path, framework="numpy")
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            np.testing.assert_array_equal(arrays[name].view(np.int16),
                                          tensor.view(torch.int16).numpy())
        else:
            np.testing.assert_array_equal(arrays[name], tensor.numpy(), err_msg=name)


def test_custom_object_is_recorded_not_built(tmp_path: Path) -> None:
    path = save_torch(namespace_checkpoint(), tmp_path / "epoch_4.pt", legacy=True)
    info = ckptkit.inspect(path)
    assert info.objects == ("argparse.Namespace",) and info.unsafe == ()
    assert info.opaque["args"] == {"class": "argparse.Namespace",
                                   "state": {"lr": 0.1, "dims": [64, 128]}}


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.999])
def test_truncation_anywhere_is_an_integrity_error(tmp_path: Path, cut: float) -> None:
    path = save_torch(tiny_training_state(), tmp_path / "t.pth.tar", legacy=True)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(IntegrityError):
        torch_legacy.read_info(path)


def test_trailing_bytes_are_reported(tmp_path: Path) -> None:
    path = save_torch({"w": torch.ones(3)}, tmp_path / "t.pt", legacy=True)
    path.write_bytes(path.read_bytes() + b"\x80\x04extra")
    with pytest.raises(IntegrityError, match="unexpected bytes after the last storage"):
        ckptkit.inspect(path)
