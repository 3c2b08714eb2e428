"""Plain pickles, joblib files and .npy arrays as checkpoints: inspect, load, convert and diff
read their numpy arrays from where the bytes sit, and nothing in the file runs."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptkit
from ckptkit import formats
from ckptkit.errors import FormatError, IntegrityError, UnsafeContentError
from ckptkit.formats import npy, pickle_file
from ckptkit.formats.tensor_io import read_bytes
from ckptkit.storage.budget import reading
from tests.conftest import SRC, run_main

joblib = pytest.importorskip("joblib")
SAMPLES = SRC / "ckptkit" / "samples"


def jax_style_params() -> dict[str, Any]:
    """What ``pickle.dump(jax.device_get(state))`` leaves: numpy arrays in nested dicts."""
    rng = np.random.default_rng(0)
    return {
        "params": {"Dense_0": {"kernel": rng.standard_normal((4, 3)).astype(np.float32),
                               "bias": np.zeros(3, np.float32)},
                   "Conv_0": {"kernel": np.asfortranarray(rng.standard_normal((3, 3, 2)))}},
        "opt_state": [np.arange(5, dtype=np.int32), {"mu": np.ones((2, 2), np.float16)},
                      np.array([True, False])],
        "step": np.int64(120), "config": {"lr": 1e-3, "name": "mlp", "layers": (8, 8)},
        "empty": np.zeros((0, 4), np.float32), "big": rng.standard_normal(40_000),
    }


def assert_tree_equal(ours: Any, theirs: Any, where: str = "") -> None:
    if isinstance(theirs, np.ndarray):
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == theirs.dtype.newbyteorder("="), where
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), where
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
        for key in theirs:
            assert_tree_equal(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_tree_equal(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where


def spans_hold_the_arrays(path: Path, expected: dict[str, np.ndarray]) -> None:
    raw = formats.detect(path).read_info(path)
    names = {".".join(map(str, p)): ref for p, ref in raw.tensors}
    with reading(path):
        for name, array in expected.items():
            ref = names[name]
            assert ref.span is not None and ref.span.length == array.nbytes, name
            order = "F" if ref.fortran_order else "C"
            assert bytes(read_bytes(ref)) == array.tobytes(order=order), name


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_pickled_params_inspect_and_load_like_pickle_load(protocol: int, tmp_path: Path) -> None:
    state = jax_style_params()
    path = tmp_path / "params.pkl"
    with open(path, "wb") as fh:
        pickle.dump(state, fh, protocol=protocol)
    assert formats.detect(path) is pickle_file
    info = ckptkit.inspect(path)
    assert info.format == "pickle" and info.unsafe == () and info.objects == ()
    shapes = {t.name: (t.dtype, t.shape) for t in info.tensors}
    assert shapes["params.Dense_0.kernel"] == ("float32", (4, 3))
    assert shapes["params.Conv_0.kernel"] == ("float64", (3, 3, 2))
    assert shapes["opt_state.1.mu"] == ("float16", (2, 2))
    assert ckptkit.load(path, framework="numpy")["step"] == 120
    assert_tree_equal(ckptkit.load(path, framework="numpy"), pickle.loads(path.read_bytes()))
    spans_hold_the_arrays(path, {"params.Dense_0.kernel": state["params"]["Dense_0"]["kernel"],
                                 "params.Conv_0.kernel": state["params"]["Conv_0"]["kernel"],
                                 "big": state["big"]})


def test_protocol_2_arrays_are_listed_but_their_text_encoded_bytes_not_located(
        tmp_path: Path) -> None:
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps({"w": np.ones(3, np.float32)}, protocol=2))
    raw = pickle_file.read_info(path)
    (name, ref), = raw.tensors
    assert (name, ref.dtype, ref.shape, ref.span) == (("w",), "float32", (3,), None)
    with pytest.raises(IntegrityError, match="no bytes in the file"):
        ckptkit.load(path, framework="numpy")


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("xz", 1), ("bz2", 1)],
                         ids=["raw", "zlib", "gzip", "xz", "bz2"])
def test_joblib_files_load_like_joblib(compress: Any, tmp_path: Path) -> None:
    state = jax_style_params()
    path = tmp_path / "state.joblib"
    joblib.dump(state, path, compress=compress)
    raw = pickle_file.read_info(path)
    assert "joblib" in raw.details["container"]
    ref = dict((".".join(map(str, p)), r) for p, r in raw.tensors)["params.Conv_0.kernel"]
    assert ref.fortran_order and (ref.span.compression is None) == (compress == 0)
    assert_tree_equal(ckptkit.load(path, framework="numpy"), joblib.load(path))
    spans_hold_the_arrays(path, {"big": state["big"]})


def test_npy_files_load_like_np_load(tmp_path: Path) -> None:
    arrays = {"c.npy": np.arange(12, dtype=np.float32).reshape(3, 4),
              "f.npy": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              "big_endian.npy": np.arange(5, dtype=">i4"), "scalar.npy": np.array(2.5)}
    for name, array in arrays.items():
        path = tmp_path / name
        np.save(path, array)
        assert formats.detect(path) is npy
        raw = npy.read_info(path)
        (tensor_name, ref), = raw.tensors
        assert tensor_name == (path.stem,) and ref.shape == array.shape
        assert_tree_equal(ckptkit.load(path, framework="numpy"), np.load(path))


def test_npy_object_array_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    info = ckptkit.inspect(path)
    assert info.format == "npy" and "numpy.ndarray[object]" in info.objects
    with pytest.raises(FormatError, match="allow_pickle"):
        ckptkit.load(path, framework="numpy")


def test_truncated_npy_is_an_integrity_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cut.npy"
    np.save(path, np.ones(100, np.float64))
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(IntegrityError, match="truncated"):
        npy.read_info(path)
    code, _out, err = run_main(capsys, "inspect", str(path))
    assert code == 3 and err.count("\n") == 1 and "Traceback" not in err


def test_custom_classes_show_as_objects_and_are_not_built(tmp_path: Path) -> None:
    path = tmp_path / "run.pkl"
    path.write_bytes(pickle.dumps({"args": argparse.Namespace(lr=0.1),
                                   "w": np.ones(2, np.float32)}, protocol=4))
    info = ckptkit.inspect(path)
    assert info.objects == ("argparse.Namespace",) and [t.name for t in info.tensors] == ["w"]
    loaded = ckptkit.load(path, framework="numpy")
    assert type(loaded["args"]).__name__ == "Opaque" and loaded["w"].tolist() == [1.0, 1.0]


class _Touch:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("wrap", ["pickle", "gzip", "joblib"])
def test_hostile_pickle_is_refused_and_nothing_runs(wrap: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "pwned"
    obj = {"w": np.ones(2, np.float32), "hook": _Touch(sentinel)}
    path = tmp_path / "hostile.pkl"
    if wrap == "joblib":
        joblib.dump(obj, path, compress=3)
    else:
        data = pickle.dumps(obj, protocol=4)
        path.write_bytes(gzip.compress(data) if wrap == "gzip" else data)
    with pytest.raises(UnsafeContentError, match="system"):
        ckptkit.load(path, framework="numpy")
    code, _out, _err = run_main(capsys, "inspect", str(path))
    assert code == 5
    assert not sentinel.exists()


def test_plain_pickles_do_not_take_torch_or_msgpack_files() -> None:
    assert formats.detect(SAMPLES / "prior_level_2.pth.tar").FORMAT == "torch-legacy"
    assert formats.detect(SAMPLES / "jukebox" / "vqvae.pth.tar").FORMAT == "torch-legacy"
    assert formats.detect(SAMPLES / "flax_params.msgpack").FORMAT == "flax-msgpack"
    assert formats.detect(SAMPLES / "params.pkl").FORMAT == "pickle"
    assert formats.detect(SAMPLES / "probe_head.joblib").FORMAT == "pickle"
    assert formats.detect(SAMPLES / "embeddings.npy").FORMAT == "npy"


@pytest.mark.parametrize("sample", ["params.pkl", "probe_head.joblib", "embeddings.npy"])
def test_samples_convert_to_safetensors_and_diff_unchanged(
        sample: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file

    source = SAMPLES / sample
    out = tmp_path / "out.safetensors"
    code, _out, err = run_main(capsys, "convert", str(source), "--to", "safetensors",
                               "--output", str(out))
    assert code == 0, err
    converted = load_file(out)
    loaded = ckptkit.load(source, framework="numpy")
    flat = {".".join(map(str, p)): ref for p, ref in formats.detect(source).read_info(
        source).tensors}
    assert set(converted) == set(flat)
    if sample == "embeddings.npy":
        assert np.array_equal(converted["embeddings"], loaded)
    code, out_text, err = run_main(capsys, "diff", str(source), str(out), "--json")
    assert code == 0, err
    summary = json.loads(out_text)["summary"]
    assert summary["changed"] == summary["only_a"] == summary["only_b"] == 0
    assert summary["unchanged"] == len(flat)


# --- oversized: headers and lengths that promise far more than the file holds ----------------

def _npy_with_header(path: Path, header: str) -> Path:
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * 8)
    return path


def _oversized(kind: str, tmp_path: Path) -> Path:
    if kind == "npy-shape":
        return _npy_with_header(tmp_path / "huge.npy", "{'descr': '<f4', 'fortran_order': False, "
                                                       "'shape': (1099511627776,), }")
    if kind == "npy-impossible":
        return _npy_with_header(tmp_path / "inf.npy", "{'descr': '<f8', 'fortran_order': False, "
                                                      "'shape': (4611686018427387904, 17), }")
    if kind == "pickle-bytes8":  # BINBYTES8 of 2**40 bytes, 9 bytes present
        data = b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"x" * 9 + b"."
        (tmp_path / "len.pkl").write_bytes(data)
        return tmp_path / "len.pkl"
    if kind == "joblib-shape":  # a wrapper promising 8 GB of array data after it
        path = tmp_path / "huge.joblib"
        joblib.dump({"w": np.zeros(4, np.float64)}, path)
        data = path.read_bytes()
        marker = b"K\x04\x85"  # shape (4,) as joblib pickles it: BININT1 4, TUPLE1
        assert data.count(marker) == 1
        path.write_bytes(data.replace(marker, b"J\x00\x00\x00\x40\x85"))
        return path
    if kind == "gzip-bomb":  # 40 MB of zeros inside a bytes value, in a 40 KB file
        path = tmp_path / "bomb.pkl"
        path.write_bytes(gzip.compress(pickle.dumps(bytes(40 << 20), protocol=4), 9))
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["npy-shape", "npy-impossible", "pickle-bytes8",
                                  "joblib-shape", "gzip-bomb"])
def test_oversized_inputs_are_one_line_integrity_errors(
        kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTKIT_MAX_BYTES", str(8 << 20))  # the gzip bomb passes this
    monkeypatch.setenv("CKPTKIT_MAX_RATIO", "16")
    path = _oversized(kind, tmp_path)
    for command in (("inspect", str(path)), ("convert", str(path), "--to", "safetensors",
                                             "-o", str(tmp_path / "out.safetensors"))):
        code, _out, err = run_main(capsys, *command)
        assert code == 3, (command, err)
        assert err.count("\n") == 1 and err.startswith("ckpt: ") and "Traceback" not in err
        assert path.name in err
    assert not (tmp_path / "out.safetensors").exists()
