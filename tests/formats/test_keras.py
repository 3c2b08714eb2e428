"""Keras: .keras archives and legacy .h5, checked against what Keras and h5py write and read.

Models with unsafe parts are written by Keras itself (numpy backend, in a child process, so no
TensorFlow is imported here); configs Keras would not write on this machine (TFSMLayer, a
pickled torch module, a custom module) are spliced into a real archive's config.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError
from ckptkit.formats import keras as keras_reader
from ckptkit.formats import keras_config, keras_h5
from tests.conftest import SRC, run_ckpt_without, run_main

h5py = pytest.importorskip("h5py")

SAMPLES = SRC / "ckptkit" / "samples"
KERAS, H5 = SAMPLES / "keras_mlp.keras", SAMPLES / "keras_mlp.h5"


def _datasets(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: found.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset)
                     else None)
    return found


def test_keras_archive_matches_h5py(tmp_path: Path) -> None:
    with zipfile.ZipFile(KERAS) as archive:
        archive.extract("model.weights.h5", tmp_path)
    expected = _datasets(tmp_path / "model.weights.h5")
    info = ckptkit.inspect(KERAS)
    assert info.format == "keras" and info.kind == "model" and not info.unsafe
    assert {t.name: t.shape for t in info.tensors} == {n: a.shape for n, a in expected.items()}
    model = info.details["model"]
    assert (model["model_class"], model["name"]) == ("Sequential", "classifier")
    assert model["layer_names"] == ["pixels", "hidden", "logits"] or \
        model["layer_names"][-2:] == ["hidden", "logits"]
    loaded = ckptkit.load(KERAS, framework="numpy")
    assert all(np.array_equal(loaded[n], a) for n, a in expected.items())


def test_legacy_h5_matches_h5py() -> None:
    expected = _datasets(H5)
    info = ckptkit.inspect(H5)
    assert info.format == "keras-h5" and info.details["model"]["name"] == "classifier"
    assert {t.name for t in info.tensors} == set(expected)
    loaded = ckptkit.load(H5, framework="numpy")
    assert all(np.array_equal(loaded[n], a) for n, a in expected.items())


def test_chunked_and_compressed_datasets_read_through_the_child(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    values = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("dense/kernel", data=values, compression="gzip", chunks=(8, 32))
        f.create_dataset("dense/bias", data=np.arange(32, dtype=">f4"))
        f.create_dataset("names", data=np.array([b"a", b"b"]))
    raw = keras_h5.read_info(path)
    refs = dict(raw.tensors)
    assert set(refs) == {"dense/kernel", "dense/bias"}  # strings are not tensors
    assert refs["dense/kernel"].span is None and refs["dense/bias"].span is None
    loaded = ckptkit.load(path, framework="numpy")
    assert np.array_equal(loaded["dense/kernel"], values)
    assert np.array_equal(loaded["dense/bias"], np.arange(32, dtype=np.float32))


@pytest.fixture(scope="session")
def lambda_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A functional model with a Lambda layer, saved by Keras (numpy backend)."""
    path = tmp_path_factory.mktemp("keras") / "lambda.keras"
    code = ("import keras\n"
            "x = keras.Input((4,))\n"
            "h = keras.layers.Dense(3, name='fc')(x)\n"
            "y = keras.layers.Lambda(lambda t: t * 2, name='double')(h)\n"
            f"keras.Model(x, y).save({str(path)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "KERAS_BACKEND": "numpy"}, timeout=300)
    return path


def test_lambda_layer_is_unsafe(lambda_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_main(capsys, "scan", "--json", str(lambda_model))
    [result] = json.loads(out)["files"]
    assert code == 5 and result["verdict"] == "unsafe"
    [danger] = result["unsafe"]
    assert "bytecode" in danger["opcode"] and danger["pickle"] == "layer 'double'"
    code, _out, err = run_main(capsys, "inspect", str(lambda_model))
    assert code == 5 and "safe_mode=False" in err


def _spliced(tmp_path: Path, layer: dict) -> Path:
    """The sample archive with ``layer`` added to its config's layers."""
    out = tmp_path / "spliced.keras"
    with zipfile.ZipFile(KERAS) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"].append(layer)
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    return out


def _layer(class_name: str, package: str = "keras.layers", **config: object) -> dict:
    return {"module": package, "class_name": class_name, "registered_name": None,
            "config": {"name": "extra", "trainable": True, **config}}


@pytest.mark.parametrize("layer, verdict, named", [
    (_layer("TFSMLayer", "keras.layers", filepath="/tmp/saved", call_endpoint="serve"),
     "unsafe", "keras.layers.TFSMLayer"),
    (_layer("TorchModuleWrapper", "keras.layers", module="gASVAAAA"), "unsafe",
     "keras.layers.TorchModuleWrapper"),
    (_layer("StringLookup", "keras.layers", vocabulary="/etc/passwd"), "unsafe",
     "keras.layers.StringLookup"),
    (_layer("StringLookup", "keras.layers", vocabulary=["a", "b"]), "safe", None),
    (_layer("Activation", "keras.layers",
            activation={"module": "os", "class_name": "system", "config": "system",
                        "registered_name": "system"}), "unsafe", "os.system"),
    (_layer("MyBlock", "my_project.layers"), "unknown-objects", "my_project.layers.MyBlock"),
])
def test_safe_mode_rules(layer: dict, verdict: str, named: str | None, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path = _spliced(tmp_path, layer)
    code, out, _err = run_main(capsys, "scan", "--json", str(path))
    [result] = json.loads(out)["files"]
    assert result["verdict"] == verdict, result
    if verdict == "unsafe":
        assert [d["callable"] for d in result["unsafe"]] == [named] and code == 5
    elif named:
        assert result["objects"] == [named]


def test_rules_are_data() -> None:
    rules = keras_config.rules()
    assert {"TFSMLayer", "__lambda__"} <= {n for r in rules.unsafe for n in r.class_names}
    assert "keras" in rules.keras_packages


def test_without_h5py_the_config_is_still_shown() -> None:
    done = run_ckpt_without(("h5py",), "inspect", "--json", str(KERAS))
    assert done.returncode == 0, done.stderr
    details = json.loads(done.stdout)["details"]
    assert details["model"]["name"] == "classifier" and "ckptkit[keras]" in details["weights"]
    done = run_ckpt_without(("h5py",), "inspect", str(H5))
    assert done.returncode == 1 and "ckptkit[keras]" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_damaged_hdf5_is_one_line_exit_3(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cut.h5"
    path.write_bytes(H5.read_bytes()[:3000])
    code, _out, err = run_main(capsys, "inspect", str(path))
    assert code == 3 and "HDF5" in err and len(err.strip().splitlines()) == 1


def test_convert_keras_to_safetensors(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file

    out = tmp_path / "k.safetensors"
    code, _out, err = run_main(capsys, "convert", str(KERAS), "--to", "safetensors", "-o",
                               str(out), "--quiet")
    assert code == 0, err
    written = load_file(out)
    loaded = ckptkit.load(KERAS, framework="numpy")
    assert set(written) == set(loaded)
    assert all(np.array_equal(written[n], loaded[n]) for n in loaded)


def test_not_a_keras_archive() -> None:
    assert not keras_reader.sniff(SAMPLES / "thinker_step_200.pt")
    with pytest.raises(IntegrityError, match="config.json"):
        keras_reader.read_info(SAMPLES / "thinker_step_200.pt")


def test_compressed_data_beyond_the_budget_is_refused(tmp_path: Path) -> None:
    """A few KiB of HDF5 whose chunked dataset reads as 2 GiB (chunks never written read as
    the fill value): listed by inspect, refused by load before the child reads it."""
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("w", shape=(1 << 29,), dtype="float32", chunks=(1 << 20,),
                         compression="gzip")
    assert path.stat().st_size < 1 << 16
    [(name, ref)] = keras_h5.read_info(path).tensors
    assert (name, ref.shape, ref.span) == ("w", (1 << 29,), None)
    with pytest.raises(IntegrityError, match="reading budget"):
        ckptkit.load(path, framework="numpy")
