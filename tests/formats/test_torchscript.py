"""TorchScript archives: parameters listed from data.pkl, code never run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import UnsafeContentError

torch = pytest.importorskip("torch")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)
        self.register_buffer("scale", torch.full((2,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3))) * self.scale


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.jit.ScriptModule]:
    module = torch.jit.script(Net().eval())
    path = tmp_path_factory.mktemp("ts") / "net_scripted.pt"
    module.save(str(path))
    return path, module


def test_parameters_and_buffers_match_the_script_module(scripted) -> None:
    path, module = scripted
    info = ckptkit.inspect(path)
    assert info.format == "torchscript" and info.kind == "torchscript-module"
    expected = dict(module.state_dict())
    got = {t.name: t for t in info.tensors}
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tuple(tensor.shape)
        assert got[name].dtype == str(tensor.dtype).removeprefix("torch.")
    assert info.details["code_files"] >= 1 and info.details["code_executed"] is False
    assert info.unsafe == () and info.objects == ()


def test_weights_read_as_numpy_without_running_code(scripted) -> None:
    path, module = scripted
    arrays = ckptkit.load(path, framework="numpy")
    assert set(arrays) == set(module.state_dict())
    for name, tensor in module.state_dict().items():
        np.testing.assert_array_equal(arrays[name], tensor.numpy(), err_msg=name)


def test_loading_through_torch_needs_explicit_opt_in(scripted) -> None:
    path, _ = scripted
    with pytest.raises(UnsafeContentError, match="runs its own code"):
        ckptkit.load(path, framework="torch")
    assert isinstance(ckptkit.load(path, framework="torch", unsafe=True), torch.jit.ScriptModule)
