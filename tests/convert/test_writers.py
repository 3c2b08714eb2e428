"""ckptkit.formats.writers: every format read back by its own library, bit for bit; atomicity;
one tensor alive at a time."""

from __future__ import annotations

import os
import json
import pickletools
import weakref
import zipfile
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
import pytest

import ckptkit
from ckptkit.formats import msgpack_writer
from ckptkit.formats.writers import FORMATS, WriteResult, sidecar_path, write
from ckptkit.errors import NotFoundError, UsageError
from ckptkit.formats import ziparchive
from tests.convert import listing, numpy_bits, torch_bits

SUFFIX = {"npz": "npz", "safetensors": "safetensors", "torch": "pt", "flax": "msgpack"}


def arrays() -> dict[str, np.ndarray]:
    """Every dtype family, odd shapes and non-contiguous inputs, Flax-style names."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 6)).astype(np.float32)
    return {
        "params/dense/kernel": base,
        "params/dense/bias": base[0].astype(ml_dtypes.bfloat16),
        "params/norm/scale": base[1].astype(np.float16),
        "params/f64": base[2].astype(np.float64),
        "step": np.array(1234, np.int64),
        "ids": np.arange(7, dtype=np.int32),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(5, dtype=np.uint8),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "u16": np.arange(4, dtype=np.uint16),
        "f8": base[3, :4].astype(ml_dtypes.float8_e4m3fn),
        "f8b": base[3, :4].astype(ml_dtypes.float8_e5m2),
        "empty": np.zeros((0, 3), np.float32),
        "transposed": base.T,
        "strided": base[::2, 1::2],
        "fortran": np.asfortranarray(base),
        "c64": (base[0] + 1j * base[1]).astype(np.complex64),
    }


def out_path(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / f"model.{SUFFIX[fmt]}"


def layout_of(items: dict[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, v.dtype.name, v.shape) for k, v in items.items()]


@pytest.mark.parametrize("with_layout", [False, True])
def test_torch_output_loads_in_torch_bit_exactly(tmp_path: Path, with_layout: bool) -> None:
    torch = pytest.importorskip("torch")
    data = arrays()
    out = out_path(tmp_path, "torch")
    result = write(out, "torch", iter(data.items()), metadata={"step": "1234"},
                   layout=layout_of(data) if with_layout else None)
    assert result == WriteResult(out, "torch", len(data), sum(a.size for a in data.values()),
                                 out.stat().st_size)
    for mmap in (False, True):
        state = torch.load(out, weights_only=True, mmap=mmap)
        assert list(state) == list(data)
        for name, array in data.items():
            assert torch_bits(state[name]) == numpy_bits(array), (name, mmap)
    info = ckptkit.inspect(out)
    assert info.format == "torch-zip" and info.unsafe == ()
    assert [(t.name, t.dtype, t.shape) for t in info.tensors] == layout_of(data)
    with zipfile.ZipFile(out) as archive:
        assert json.loads(archive.read("model/extra/ckptkit_metadata.json")) == {"step": "1234"}
        assert archive.read("model/version") == b"3\n"
        assert archive.read("model/byteorder") == b"little"
        with open(out, "rb") as fh:
            for info_ in archive.infolist():  # every record 64-byte aligned, like torch.save
                assert ziparchive.data_offset(fh, info_, out.stat().st_size) % 64 == 0


def test_torch_pickle_is_plain_protocol_2(tmp_path: Path) -> None:
    out = out_path(tmp_path, "torch")
    write(out, "torch", [("a.weight", np.ones((2, 2), np.float32)),
                         ("b", np.ones(3, ml_dtypes.float8_e4m3fn))])
    with zipfile.ZipFile(out) as archive:
        pickle_bytes = archive.read("model/data.pkl")
    text = []
    pickletools.dis(pickle_bytes, out=_Lines(text))
    listing_ = "\n".join(text)
    assert "PROTO      2" in listing_
    assert "'torch._utils _rebuild_tensor_v2'" in listing_
    assert "'torch.storage UntypedStorage'" in listing_ and "'torch float8_e4m3fn'" in listing_


class _Lines:
    def __init__(self, sink: list[str]):
        self.sink = sink

    def write(self, text: str) -> None:
        self.sink.append(text)


@pytest.mark.parametrize("with_layout", [False, True])
def test_safetensors_output_reads_back_exactly(tmp_path: Path, with_layout: bool) -> None:
    safetensors = pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    data = arrays()
    out = out_path(tmp_path, "safetensors")
    result = write(out, "safetensors", iter(data.items()), metadata={"epoch": "3"},
                   layout=layout_of(data) if with_layout else None)
    assert result.tensor_count == len(data) and result.bytes == out.stat().st_size
    with safetensors.safe_open(out, "np") as f:
        assert f.metadata() == {"epoch": "3"}
        for name, array in data.items():
            if array.dtype.name.startswith(("float8", "bfloat16")):
                continue  # safetensors' numpy side has no such dtypes; torch below does
            assert numpy_bits(f.get_tensor(name)) == numpy_bits(array), name
    state = load_file(out)
    for name, array in data.items():
        assert torch_bits(state[name]) == numpy_bits(array), name
    info = ckptkit.inspect(out)
    assert [(t.name, t.dtype, t.shape) for t in info.tensors] == layout_of(data)
    assert info.metadata == {"epoch": "3"}
    raw = out.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert length % 8 == 0  # the buffer starts 8-byte aligned
    header = json.loads(raw[8:8 + length])
    for name, array in data.items():  # largest elements first, so every tensor is aligned
        assert header[name]["data_offsets"][0] % array.dtype.itemsize == 0, name
    assert torch.equal(state["params/dense/kernel"], torch.from_numpy(data["params/dense/kernel"]))


def test_safetensors_layout_must_match_the_stream(tmp_path: Path) -> None:
    out = out_path(tmp_path, "safetensors")
    a, b = np.ones(3, np.float32), np.zeros(2, np.int64)
    with pytest.raises(UsageError, match="layout says"):
        write(out, "safetensors", [("a", a)], layout=[("a", "float32", (4,))])
    with pytest.raises(UsageError, match="never arrived"):
        write(out, "safetensors", [("a", a)], layout=[("a", "float32", (3,)),
                                                       ("b", "int64", (2,))])
    with pytest.raises(UsageError, match="not in the layout"):
        write(out, "safetensors", [("a", a), ("b", b)], layout=[("a", "float32", (3,))])
    assert not out.exists() and listing(tmp_path) == set()


def test_npz_output_loads_with_numpy(tmp_path: Path) -> None:
    data = arrays()
    out = out_path(tmp_path, "npz")
    result = write(out, "npz", iter(data.items()), metadata={"step": "7"})
    assert result.sidecar == sidecar_path(out)
    with np.load(out) as loaded:
        assert loaded.files == list(data)  # Flax '/' names kept as given
        for name, array in data.items():
            got = loaded[name]
            if got.dtype.kind == "V":  # how numpy hands back bfloat16 / float8 from .npy
                got = got.view(array.dtype)
            assert numpy_bits(got) == numpy_bits(array), name
        assert loaded["fortran"].flags.f_contiguous  # stored as Fortran order, no copy
    assert json.loads(result.sidecar.read_text()) == {
        "metadata": {"step": "7"}, "dtypes": {"f8": "float8_e4m3fn", "f8b": "float8_e5m2"}}
    loaded_by_us = ckptkit.load(out, framework="numpy")
    assert loaded_by_us["params/dense/bias"].dtype == ml_dtypes.bfloat16


def test_npz_sidecar_only_when_needed_and_stale_one_removed(tmp_path: Path) -> None:
    out = out_path(tmp_path, "npz")
    write(out, "npz", [("w", np.ones(2, np.float32))], metadata={"step": "1"})
    assert sidecar_path(out).exists()
    result = write(out, "npz", [("w", np.ones(2, np.float32))])
    assert result.sidecar is None and not sidecar_path(out).exists()


@pytest.mark.parametrize("mode", ["no-layout", "layout-in-order", "layout-out-of-order"])
def test_flax_output_restores_with_flax(tmp_path: Path, mode: str) -> None:
    serialization = pytest.importorskip("flax.serialization")
    data = arrays()
    items = list(data.items())
    if mode == "layout-out-of-order":  # not depth-first: dense/bias after a sibling of params
        items = items[1:2] + items[4:5] + items[:1] + items[2:4] + items[5:]
    layout = None if mode == "no-layout" else layout_of(dict(items))
    out = out_path(tmp_path, "flax")
    result = write(out, "flax", iter(items), layout=layout)
    assert result.tensor_count == len(data) and result.sidecar is None
    tree = serialization.msgpack_restore(out.read_bytes())
    for name, array in data.items():
        node: Any = tree
        for part in name.split("/"):
            node = node[part]
        assert numpy_bits(node) == numpy_bits(array), name
    info = ckptkit.inspect(out)
    assert {(t.name, t.dtype, t.shape) for t in info.tensors} == set(layout_of(data))


def test_flax_splits_huge_arrays_as_flax_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    serialization = pytest.importorskip("flax.serialization")
    monkeypatch.setattr(msgpack_writer, "MAX_CHUNK_SIZE", 64)  # 1 GiB in real life
    big = np.arange(50, dtype=np.float32).reshape(5, 10)
    for layout in (None, [("a/big", "float32", (5, 10)), ("a/small", "int8", (3,))]):
        out = out_path(tmp_path, "flax")
        write(out, "flax", [("a/big", big), ("a/small", np.arange(3, dtype=np.int8))],
              layout=layout)
        raw = serialization.msgpack_restore(out.read_bytes())
        np.testing.assert_array_equal(raw["a"]["big"], big)
        assert ckptkit.load(out, framework="flax")["a"]["big"].shape == (5, 10)


def test_flax_names_cannot_be_leaf_and_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="prefix"):
        write(tmp_path / "x.msgpack", "flax", [("a", np.ones(1)), ("a/b", np.ones(1))])
    with pytest.raises(UsageError, match="prefix"):
        write(tmp_path / "x.msgpack", "flax", [("a/b", np.ones(1)), ("a", np.ones(1))],
              layout=[("a/b", "float64", (1,)), ("a", "float64", (1,))])
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_tensors_is_always_an_error(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(UsageError, match="0 tensors is always an error"):
        write(out_path(tmp_path, fmt), fmt, iter(()))
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("with_layout", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_failure_mid_stream_leaves_nothing(tmp_path: Path, fmt: str, with_layout: bool) -> None:
    data = {f"layer{i}/w": np.full((64, 64), i, np.float32) for i in range(4)}

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        for i, (name, array) in enumerate(data.items()):
            if i == 2:
                raise RuntimeError("disk on fire")
            yield name, array

    out = out_path(tmp_path, fmt)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write(out, fmt, stream(), metadata={"step": "1"},
              layout=layout_of(data) if with_layout else None)
    assert listing(tmp_path) == set()
    # An existing file is left exactly as it was.
    out.write_bytes(b"previous contents")
    with pytest.raises(RuntimeError):
        write(out, fmt, stream(), metadata={"step": "1"})
    assert out.read_bytes() == b"previous contents" and listing(tmp_path) == {out.name}


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_tensor_alive_at_a_time(tmp_path: Path, fmt: str) -> None:
    alive: list[weakref.ref[np.ndarray]] = []

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        for i in range(5):
            if alive:
                assert alive[-1]() is None, "the writer kept the previous tensor"
            array = np.full((32, 32), i, np.float32)
            alive.append(weakref.ref(array))
            yield f"t{i}", array
            del array

    layout = [(f"t{i}", "float32", (32, 32)) for i in range(5)]
    for given in (None, layout):
        result = write(out_path(tmp_path, fmt), fmt, stream(), layout=given)
        assert result.tensor_count == 5
        alive.clear()


def test_big_endian_input_is_stored_little_endian(tmp_path: Path) -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    out = out_path(tmp_path, "safetensors")
    write(out, "safetensors", [("w", array)])
    np.testing.assert_array_equal(ckptkit.load(out, framework="numpy")["w"], array)


def test_bad_inputs_are_usage_errors(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    ones = np.ones(2, np.float32)
    with pytest.raises(UsageError, match="occurs twice"):
        write(out, "safetensors", [("a", ones), ("a", ones)])
    with pytest.raises(UsageError, match="complex128.*safetensors cannot store") as caught:
        write(out, "safetensors", [("c", np.ones(2, np.complex128))])
    assert "npz" in str(caught.value) and "torch" in str(caught.value)
    with pytest.raises(UsageError, match="raw void"):
        write(out, "npz", [("v", np.zeros(2, "V2"))])
    with pytest.raises(UsageError, match="object"):
        write(out, "npz", [("o", np.array([{}], dtype=object))])
    with pytest.raises(UsageError, match="not a numpy array"):
        write(out, "npz", [("l", [1, 2])])  # type: ignore[list-item]
    with pytest.raises(UsageError, match="strings to strings"):
        write(out, "safetensors", [("a", ones)], metadata={"step": 3})  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="unknown output format"):
        write(out, "onnx", [("a", ones)])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cannot store"):  # refused before reading anything
        write(out, "torch", iter(()), layout=[("c", "complex32", (2,))])
    with pytest.raises(NotFoundError, match="no such directory"):
        write(tmp_path / "missing" / "m.npz", "npz", [("a", ones)])
    with pytest.raises(UsageError, match="is a directory"):
        write(tmp_path, "npz", [("a", ones)])
    assert listing(tmp_path) == set()


def test_temp_files_of_killed_writers_are_swept_live_ones_kept(tmp_path: Path) -> None:
    """A kill -9 mid-write leaves `.<name>.<pid>.<hex>.partial`; the next write to the same
    target removes it when that pid is gone, and never touches a live writer's file."""
    import subprocess
    import sys
    import time

    from ckptkit.formats.writers import atomic_file

    target = tmp_path / "out.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".out.safetensors.{int(dead.stdout)}.0123abcd.partial"
    fresh = tmp_path / f".out.safetensors.{int(dead.stdout)}.4567abcd.partial"  # another host?
    live = tmp_path / f".out.safetensors.{os.getpid()}.89abcdef.partial"
    other = tmp_path / f".other.bin.{int(dead.stdout)}.0123abcd.partial"
    for path in (stale, fresh, live, other):
        path.write_bytes(b"half")
        if path is not fresh:
            os.utime(path, (time.time() - 120, time.time() - 120))
    with atomic_file(target) as fh:
        fh.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert not stale.exists() and fresh.exists() and live.exists() and other.exists()
