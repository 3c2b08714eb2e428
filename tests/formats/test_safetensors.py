"""safetensors: header only, validated like the reference implementation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, dict]:
    tensors = {"enc.weight": torch.randn(4, 3), "enc.bias": torch.zeros(4, dtype=torch.bfloat16),
               "head.w": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "f8": torch.ones(2).to(torch.float8_e5m2)}
    path = tmp_path / "model.safetensors"
    st.save_file(tensors, str(path), metadata={"step": "42"})
    return path, tensors


def test_header_matches_the_library(written) -> None:
    path, tensors = written
    info = ckptkit.inspect(path)
    assert info.format == "safetensors" and info.kind == "state-dict"
    assert {t.name: (t.dtype, t.shape) for t in info.tensors} == {
        k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items()}
    assert info.metadata == {"step": "42"}


def test_values_read_back_bit_exact(written) -> None:
    path, tensors = written
    loaded = ckptkit.load(path, framework="torch")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name
    arrays = ckptkit.load(path, framework="numpy")
    np.testing.assert_array_equal(arrays["enc.weight"], tensors["enc.weight"].numpy())


def test_truncated_buffer_is_an_integrity_error(written) -> None:
    path, _ = written
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(IntegrityError, match="truncated"):
        ckptkit.inspect(path)


def test_overlapping_offsets_are_refused(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    with pytest.raises(IntegrityError, match="holes or overlaps"):
        ckptkit.inspect(path)
