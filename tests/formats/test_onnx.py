"""ONNX: read with ckptkit's wire reader, checked against models the onnx package writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError
from ckptkit.formats import onnx as reader
from tests.conftest import SRC, run_main

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SAMPLE = SRC / "ckptkit" / "samples" / "onnx_mlp" / "mlp.onnx"


def _model(inits: list[TensorProto]) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [i.name], [f"out_{i.name}"]) for i in inits[:1]]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info(f"out_{inits[0].name}", TensorProto.FLOAT, None)],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.example", 1)])


def test_sample_matches_onnx() -> None:
    model = onnx.load(str(SAMPLE))  # reads the external data too
    info = ckptkit.inspect(SAMPLE)
    d = info.details
    assert d["ir_version"] == model.ir_version and d["opsets"] == {"ai.onnx": 17}
    assert d["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    assert d["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}]
    assert d["operators"] == {"MatMul": 2, "Add": 2, "Relu": 1}
    assert d["external_files"] == ["mlp.onnx.data"]
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [(t.name, t.shape) for t in info.tensors] == [(n, a.shape) for n, a in expected.items()]
    loaded = ckptkit.load(SAMPLE, framework="numpy")
    assert all(np.array_equal(loaded[n], a) for n, a in expected.items())
    assert reader.verify(SAMPLE) == [] and reader.verify(SAMPLE, hashes=True) == []


def test_inline_and_varint_coded_initializers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((3, 5)).astype(np.float32),
              "h": rng.standard_normal(4).astype(np.float16),
              "i": np.array([-3, 7, 1 << 40], np.int64),
              "b": np.array([True, False, True]),
              "d": rng.standard_normal(2)}
    inits = [numpy_helper.from_array(arrays["w"], "w"),
             helper.make_tensor("h", TensorProto.FLOAT16, [4], arrays["h"].tolist()),
             helper.make_tensor("i", TensorProto.INT64, [3], arrays["i"].tolist()),
             helper.make_tensor("b", TensorProto.BOOL, [3], arrays["b"].tolist()),
             helper.make_tensor("d", TensorProto.DOUBLE, [2], arrays["d"].tolist())]
    path = tmp_path / "inline.onnx"
    onnx.save_model(_model(inits), str(path))
    raw = reader.read_info(path)
    assert raw.details["opsets"] == {"ai.onnx": 18, "com.example": 1}
    assert raw.details["outputs"][0]["shape"] is None
    assert sorted(raw.details["varint_coded"]) == ["b", "h", "i"]
    loaded = ckptkit.load(path, framework="numpy")
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array), name


def _external(folder: Path, location: str) -> Path:
    """A model whose one initializer's external data is at ``location``."""
    model = _model([numpy_helper.from_array(np.arange(6, dtype=np.float32), "w")])
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin",
                                                             size_threshold=0)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    saved = onnx.load(str(path), load_external_data=False)
    for entry in saved.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(saved, str(path))
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(6, dtype=np.float32).tobytes())
    (tmp_path / "model").mkdir()
    return secret


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link"])
def test_external_data_outside_the_folder_is_refused(how: str, outside: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    folder = outside.parent / "model"
    location = {"dotdot": "../secret.bin", "absolute": str(outside), "link": "w.bin"}[how]
    path = _external(folder, location)
    if how == "link":  # the data file the onnx package wrote, replaced by a link out
        (folder / "w.bin").unlink()
        os.symlink(outside, folder / "w.bin")
    raw = reader.read_info(path)
    assert raw.tensors[0][1].span is None  # never opened
    [problem] = reader.verify(path)
    assert problem.kind == "escapes-folder" and location in problem.message
    code, out, _err = run_main(capsys, "scan", "--json", str(path))
    [result] = json.loads(out)["files"]
    assert code == 5 and result["verdict"] == "unsafe"
    assert "outside the model folder" in result["unsafe"][0]["opcode"]
    code, _out, err = run_main(capsys, "inspect", str(path))
    assert code == 5 and "onnx.load" in err
    with pytest.raises(IntegrityError, match="leaves the model's folder"):
        ckptkit.load(path, framework="numpy")
    code, _out, err = run_main(capsys, "convert", str(path), "--to", "npz", "-o",
                               str(folder / "out.npz"))
    assert code == 2 and "not converted" in err


def test_missing_and_short_external_data(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "m"
    shutil.copytree(SAMPLE.parent, folder)
    data = folder / "mlp.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    kinds = {p.kind for p in reader.verify(folder / "mlp.onnx")}
    assert kinds == {"truncated"}
    code, _out, err = run_main(capsys, "convert", str(folder / "mlp.onnx"), "--to", "npz",
                               "-o", str(tmp_path / "out.npz"))
    assert code == 3 and len(err.strip().splitlines()) == 1
    data.unlink()
    problems = reader.verify(folder / "mlp.onnx")
    assert {p.kind for p in problems} == {"missing-external"} and len(problems) == 4
    info = ckptkit.inspect(folder / "mlp.onnx")  # the graph is still shown
    assert info.details["external_missing"]["fc1.weight"] == "mlp.onnx.data"


def test_inspect_shows_the_graph(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_main(capsys, "inspect", str(SAMPLE))
    assert code == 0
    assert "ONNX      IR" in out and "opsets ai.onnx 17" in out
    assert "Inputs    x:float32[batch, 4]" in out and "Outputs   logits:float32[batch, 3]" in out


def test_convert_to_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file

    out = tmp_path / "mlp.safetensors"
    code, _out, err = run_main(capsys, "convert", str(SAMPLE), "--to", "safetensors", "-o",
                               str(out), "--quiet")
    assert code == 0, err
    model = onnx.load(str(SAMPLE))
    written = load_file(out)
    for t in model.graph.initializer:
        assert np.array_equal(written[t.name], numpy_helper.to_array(t))


def test_not_onnx_is_not_sniffed(tmp_path: Path) -> None:
    """SavedModel protos also start with field 1 = a small number; they have no graph."""
    saved_model = SRC / "ckptkit" / "samples" / "musiq_saved_model" / "saved_model.pb"
    assert not reader.sniff(saved_model)
    assert reader.sniff(SAMPLE)
    (tmp_path / "x.onnx").write_bytes(SAMPLE.read_bytes()[:40])
    with pytest.raises(IntegrityError):
        reader.read_info(tmp_path / "x.onnx")
