"""ckptkit.convert.passthrough: real files from torch, safetensors, numpy, flax and TensorFlow,
converted to every target and compared bit for bit with what the source's own library loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest

import ckptkit
from ckptkit.convert.passthrough import convert_format, plan_format_conversion
from ckptkit.formats.writers import sidecar_path
from ckptkit.errors import UsageError
from tests.checkpoints import mixed_dtype_state_dict, save_torch, tiny_training_state, torch_tensors
from tests.conftest import SRC
from tests.convert import listing, numpy_bits, torch_bits

torch = pytest.importorskip("torch")

Bits = dict[str, tuple[str, tuple[int, ...], bytes]]
SUFFIX = {"npz": "npz", "safetensors": "safetensors", "torch": "pt", "flax": "msgpack"}
TORCH_METADATA = {"step": "210", "epoch": "3", "note": "warmup done"}


# --- sources, each with what its own library loads ------------------------------------------

def torch_checkpoint(legacy: bool = False) -> dict[str, Any]:
    """Mixed dtypes, views of one storage, tied weights, metadata next to the weights."""
    model = mixed_dtype_state_dict()
    if legacy:  # the legacy format predates float8 and uint16
        model.pop("f8")
    tied = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    model["embed.weight"] = tied
    model["lm_head.weight"] = tied  # the same storage under two names
    model["half_view"] = torch.randn(8, 8).bfloat16()[2:6, ::2]
    return {"model": model, "step": 210, "epoch": 3, "note": "warmup done"}


def make_torch(tmp: Path) -> tuple[Path, Bits]:
    path = save_torch(torch_checkpoint(), tmp / "source.pt")
    return path, torch_bits_of(torch.load(path, weights_only=True))


def make_torch_legacy(tmp: Path) -> tuple[Path, Bits]:
    path = save_torch(torch_checkpoint(legacy=True), tmp / "source.pth.tar", legacy=True)
    return path, torch_bits_of(torch.load(path, weights_only=True))


def make_safetensors(tmp: Path) -> tuple[Path, Bits]:
    from safetensors.torch import load_file, save_file

    state = {k: v.contiguous().clone() for k, v in mixed_dtype_state_dict().items()}
    path = tmp / "source.safetensors"
    save_file(state, path, metadata={"format": "pt", "step": "5"})
    return path, torch_bits_of(load_file(path))


def flax_style_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "params/encoder/layers_0/attn/kernel": rng.standard_normal((4, 8)).astype(np.float32),
        "params/encoder/layers_0/attn/bias": rng.standard_normal(8).astype(ml_dtypes.bfloat16),
        "params/encoder/norm/scale": rng.standard_normal(8).astype(np.float16),
        "params/head/kernel": np.asfortranarray(rng.standard_normal((8, 3))),
        "batch_stats/mean": rng.standard_normal(8).astype(np.float32),
        "step": np.array(12, np.int32),
    }


def make_npz(tmp: Path) -> tuple[Path, Bits]:
    path = tmp / "source.npz"
    np.savez(path, **flax_style_arrays())
    with np.load(path) as loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    return path, {k: numpy_bits(v.view(ml_dtypes.bfloat16) if v.dtype.kind == "V" else v)
                  for k, v in arrays.items()}


def make_flax(tmp: Path) -> tuple[Path, Bits]:
    serialization = pytest.importorskip("flax.serialization")
    tree = nested(flax_style_arrays(), "/")
    path = tmp / "source.msgpack"
    path.write_bytes(serialization.to_bytes(tree))
    return path, {k: numpy_bits(v) for k, v in
                  flatten(serialization.msgpack_restore(path.read_bytes()), "/").items()}


def make_tf(tmp: Path) -> tuple[Path, Bits]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    ckpt = tf.train.Checkpoint(
        w=tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)),
        b=tf.Variable(tf.ones(3, tf.bfloat16)), step=tf.Variable(5, dtype=tf.int64))
    directory = tmp / "tf"
    prefix = ckpt.write(str(directory / "ckpt"))
    reader = tf.train.load_checkpoint(prefix)
    names = [n for n in reader.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    return directory, {n: numpy_bits(reader.get_tensor(n)) for n in names}


SOURCES: dict[str, Callable[[Path], tuple[Path, Bits]]] = {
    "torch": make_torch, "torch-legacy": make_torch_legacy, "safetensors": make_safetensors,
    "npz": make_npz, "flax": make_flax, "tf": make_tf,
}
SEPARATOR = {"torch": ".", "torch-legacy": ".", "safetensors": "/", "npz": "/", "flax": "/",
             "tf": "/"}


# --- reading outputs back with their own libraries ------------------------------------------

def torch_bits_of(obj: Any) -> Bits:
    return {k: torch_bits(v) for k, v in torch_tensors(obj).items()}


def nested(flat: dict[str, Any], sep: str) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(sep)
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root


def flatten(tree: dict[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else key
        out.update(flatten(value, sep, name) if isinstance(value, dict) else {name: value})
    return out


def read_back(out: Path, fmt: str, sep: str) -> Bits:
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return torch_bits_of(load_file(out))
    if fmt == "torch":
        plain = torch_bits_of(torch.load(out, weights_only=True))
        assert torch_bits_of(torch.load(out, weights_only=True, mmap=True)) == plain
        return plain
    if fmt == "npz":
        dtypes = json.loads(sidecar_path(out).read_text()).get("dtypes", {}) if sidecar_path(
            out).exists() else {}
        with np.load(out) as loaded:
            arrays = {k: loaded[k] for k in loaded.files}
        fixed = {k: v.view(getattr(ml_dtypes, dtypes.get(k, "bfloat16")))
                 if v.dtype.kind == "V" else v for k, v in arrays.items()}
        return {k: numpy_bits(v) for k, v in fixed.items()}
    serialization = pytest.importorskip("flax.serialization")
    tree = serialization.msgpack_restore(out.read_bytes())
    return {k: numpy_bits(v) for k, v in flatten(tree, sep).items()}


PAIRS = [
    ("torch", "safetensors"), ("torch", "npz"), ("torch", "torch"), ("torch", "flax"),
    ("torch-legacy", "safetensors"), ("torch-legacy", "torch"),
    ("safetensors", "torch"), ("safetensors", "npz"), ("safetensors", "flax"),
    ("npz", "safetensors"), ("npz", "torch"), ("npz", "flax"),
    ("flax", "safetensors"), ("flax", "torch"), ("flax", "npz"),
    ("tf", "safetensors"), ("tf", "npz"),
]


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_conversion_is_bit_exact(tmp_path: Path, source: str, target: str) -> None:
    src, expected = SOURCES[source](tmp_path)
    out = tmp_path / f"converted.{SUFFIX[target]}"
    result = convert_format(src, target, out)
    assert result.path == out and result.format == target
    assert result.tensor_count == len(expected)
    assert result.param_count == sum(int(np.prod(shape)) for _d, shape, _b in expected.values())
    assert result.bytes == out.stat().st_size
    got = read_back(out, target, SEPARATOR[source])
    assert set(got) == set(expected)
    for name, bits in expected.items():
        assert got[name] == bits, name  # dtype, shape and every byte
    info = ckptkit.inspect(out)
    assert info.tensor_count == len(expected)


def test_torch_names_dtypes_and_tied_weights(tmp_path: Path) -> None:
    from safetensors import safe_open

    src, _expected = make_torch(tmp_path)
    out = tmp_path / "model.safetensors"
    convert_format(src, "safetensors", out)
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
        assert {"model.wbf16", "model.f8", "model.transposed", "model.embed.weight"} <= keys
        assert f.get_tensor("model.wbf16").dtype == torch.bfloat16
        assert f.get_tensor("model.f8").dtype == torch.float8_e4m3fn
        # Tied weights: written once per name, each with its own bytes.
        assert torch.equal(f.get_tensor("model.embed.weight"), f.get_tensor("model.lm_head.weight"))
    info = ckptkit.inspect(out)
    spans = {t.name: t for t in info.tensors}
    assert spans["model.transposed"].shape == (4, 6)


def test_metadata_is_carried_through_every_target(tmp_path: Path) -> None:
    from safetensors import safe_open

    src, _ = make_torch(tmp_path)
    plan = plan_format_conversion(src, "safetensors", tmp_path / "a.safetensors")
    assert plan.metadata == TORCH_METADATA
    convert_format(src, "safetensors", tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", "np") as f:
        assert f.metadata() == TORCH_METADATA
    # safetensors -> torch keeps it in a record torch ignores; torch -> npz in a sidecar; and
    # each comes back when ckptkit reads the file again.
    convert_format(tmp_path / "a.safetensors", "torch", tmp_path / "b.pt")
    with zipfile.ZipFile(tmp_path / "b.pt") as archive:
        assert json.loads(archive.read("b/extra/ckptkit_metadata.json")) == TORCH_METADATA
    convert_format(tmp_path / "b.pt", "npz", tmp_path / "c.npz")
    assert json.loads(sidecar_path(tmp_path / "c.npz").read_text())["metadata"] == TORCH_METADATA
    convert_format(tmp_path / "c.npz", "flax", tmp_path / "d.msgpack")
    convert_format(tmp_path / "d.msgpack", "safetensors", tmp_path / "e.safetensors")
    with safe_open(tmp_path / "e.safetensors", "np") as f:
        assert f.metadata() == TORCH_METADATA


def test_float8_survives_npz_and_back(tmp_path: Path) -> None:
    src, expected = make_torch(tmp_path)
    convert_format(src, "npz", tmp_path / "m.npz")
    convert_format(tmp_path / "m.npz", "torch", tmp_path / "m.pt")
    back = torch_bits_of(torch.load(tmp_path / "m.pt", weights_only=True))
    assert back["model.f8"] == expected["model.f8"]
    assert back["model.wbf16"] == expected["model.wbf16"]


def test_compressed_npz_and_flax_scalars(tmp_path: Path) -> None:
    serialization = pytest.importorskip("flax.serialization")
    arrays = flax_style_arrays()
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    convert_format(tmp_path / "c.npz", "torch", tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True, mmap=True)
    for name, array in arrays.items():
        assert torch_bits(state[name]) == numpy_bits(array), name
    # Top-level plain values of a Flax tree are metadata, not tensors.
    tree = {"params": {"w": np.ones(2, np.float32)}, "step": 7, "note": "ok"}
    (tmp_path / "t.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    plan = plan_format_conversion(tmp_path / "t.msgpack", "safetensors", tmp_path / "t.st")
    assert [t.name for t in plan.tensors] == ["params/w"]
    assert plan.metadata == {"step": "7", "note": "ok"}


def test_training_checkpoint_reports_what_is_left_out(tmp_path: Path) -> None:
    src = save_torch(tiny_training_state(), tmp_path / "train.pt")
    plan = plan_format_conversion(src, "safetensors", tmp_path / "train.safetensors")
    assert plan.left_out == ("optimizer.param_groups", "scheduler", "scaler")
    assert plan.metadata == {"step": "210", "best_val_loss": "1.75"}
    names = {t.name for t in plan.tensors}
    assert "model.1.weight" in names and "optimizer.state.0.exp_avg" in names
    assert not (tmp_path / "train.safetensors").exists()  # planning writes nothing
    result = plan.execute()
    assert result.tensor_count == len(names)


def test_refuses_to_write_over_the_input(tmp_path: Path) -> None:
    src, _ = make_torch(tmp_path)
    before = src.read_bytes()
    for spelling in (src, tmp_path / "." / src.name, Path(os.path.relpath(src))):
        with pytest.raises(UsageError, match="refusing to write over the input"):
            convert_format(spelling, "torch", src)
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    with pytest.raises(UsageError, match="refusing to write over the input"):
        convert_format(src, "torch", link)
    assert src.read_bytes() == before


def test_refuses_to_write_over_a_tf_shard(tmp_path: Path) -> None:
    src, _ = make_tf(tmp_path)
    shard = next(src.glob("ckpt.data-*"))
    with pytest.raises(UsageError, match="is part of it"):
        convert_format(src, "npz", shard)


def test_no_tensors_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    src = save_torch({"step": 1, "config": {"lr": 0.1}}, tmp_path / "empty.pt")
    out = tmp_path / "empty.safetensors"
    with pytest.raises(UsageError, match="0 tensors is always an error"):
        convert_format(src, "safetensors", out)
    assert listing(tmp_path) == {"empty.pt"}


def test_dtype_the_target_cannot_hold_is_refused_before_writing(tmp_path: Path) -> None:
    src = save_torch({"z": torch.ones(2, dtype=torch.complex128)}, tmp_path / "c.pt")
    with pytest.raises(UsageError, match="complex128, which safetensors cannot store"):
        convert_format(src, "safetensors", tmp_path / "c.safetensors")
    assert listing(tmp_path) == {"c.pt"}


MEASURE = ("import os, subprocess, sys\n"
           "proc = subprocess.Popen(sys.argv[1:])\n"
           "_pid, status, usage = os.wait4(proc.pid, 0)\n"
           "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n")


@pytest.mark.parametrize("target", ["safetensors", "npz", "torch", "flax"])
def test_peak_memory_stays_near_the_largest_tensor(tmp_path: Path, target: str) -> None:
    """A 200 MiB checkpoint of 4 MiB tensors converts in far less than 200 MiB of memory."""
    src = tmp_path / "source.pt"
    state = {f"layers.{i}.weight": torch.full((1024, 1024), float(i)) for i in range(50)}
    torch.save(state, src)
    del state
    out = tmp_path / f"big.{SUFFIX[target]}"
    script = ("import sys\n"
              "from ckptkit.convert.passthrough import plan_format_conversion\n"
              "plan = plan_format_conversion(sys.argv[1], sys.argv[2], sys.argv[3])\n"
              "if sys.argv[4] == 'run':\n"
              "    plan.execute()\n")

    def peak_mib(mode: str) -> float:
        # Measured from a small intermediate process: a child forked straight from this one
        # (torch imported, hundreds of MiB) would report this process's peak as its own.
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-c", script,
                               str(src), target, str(out), mode],
                              env=env, capture_output=True, text=True, timeout=300)
        code, kib = done.stdout.split()
        assert code == "0", done.stderr
        return int(kib) / 1024  # ru_maxrss is in KiB on Linux

    baseline = peak_mib("plan")  # same imports, same structure read, no tensor bytes
    peak = peak_mib("run")
    assert out.stat().st_size > 200 * 2**20
    assert peak - baseline < 120, f"peak {peak:.0f} MiB vs baseline {baseline:.0f} MiB"
