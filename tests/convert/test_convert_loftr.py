"""`ckpt convert ... --recipe loftr --to flax`: exact counts, and both forward passes agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_ckpt
from tests.convert.reference_models import (COARSE, FINE, FlaxLoFTR, assert_agree, load_npz,
                                            loftr_state, torch, unflatten)
from tests.servers.http import HTTPTestServer, http_server  # noqa: F401 (fixture)

LAYER_KEYS = ("q_proj/kernel", "k_proj/kernel", "v_proj/kernel", "merge/kernel", "mlp.0/kernel",
              "mlp.2/kernel", "norm1/scale", "norm1/bias", "norm2/scale", "norm2/bias")


def convert_json(*args: str, cwd: Path) -> dict:
    result = run_ckpt("convert", *args, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_same_outputs(torch_model, flax_params: dict, config: dict, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    feat0 = rng.standard_normal((2, 60, config["d_model"]))
    feat1 = rng.standard_normal((2, 44, config["d_model"]))
    assert_agree(torch_model, FlaxLoFTR(**config), {"params": flax_params}, [feat0, feat1])


def test_coarse_transformer_is_80_arrays_and_computes_what_torch_does(loftr_ckpt,
                                                                      tmp_path: Path) -> None:
    path, coarse, _fine = loftr_ckpt
    report = convert_json(str(path), "--recipe", "loftr", "--to", "flax", cwd=tmp_path)
    out = tmp_path / "outdoor_ds.loftr_coarse.flax.npz"
    assert report["output"] == str(out)
    assert (report["tensor_count"], report["param_count"]) == (80, 5_251_072)
    assert (report["filled"], report["unfilled"], report["unused"], report["mismatched"]) == (
        80, [], [], [])
    assert report["prefix"] == "loftr_coarse" and report["base"] == "state_dict.matcher."
    arrays = load_npz(out)
    assert sorted(arrays) == sorted(f"layers.{i}/{k}" for i in range(8) for k in LAYER_KEYS)
    assert sum(a.size for a in arrays.values()) == 5_251_072
    state = coarse.state_dict()
    np.testing.assert_array_equal(arrays["layers.3/mlp.2/kernel"],
                                  state["layers.3.mlp.2.weight"].numpy().T)
    assert arrays["layers.0/mlp.0/kernel"].shape == (512, 512)
    assert arrays["layers.0/mlp.2/kernel"].shape == (512, 256)
    assert_same_outputs(coarse, unflatten(arrays), COARSE)
    # Training facts travel in the metadata sidecar, with what was selected.
    meta = json.loads(Path(f"{out}.meta.json").read_text())["metadata"]
    assert meta["epoch"] == "29" and meta["global_step"] == "1000"
    assert meta["recipe"] == "loftr" and meta["prefix"] == "loftr_coarse"


def test_the_demo_checkpoint_layout_is_these_networks_state_dict() -> None:
    """ckptkit.testing.loftr, which scripts/demo serves as LoFTR, describes the networks whose
    forward passes these tests compare."""
    from ckptkit.testing.loftr import state_dict_layout

    state, _coarse, _fine = loftr_state()
    assert {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()} \
        == {name: (dtype, shape) for name, dtype, shape in state_dict_layout()}


def test_fine_transformer_by_prefix(loftr_ckpt, tmp_path: Path) -> None:
    path, _coarse, fine = loftr_ckpt
    report = convert_json(str(path), "--recipe", "loftr", "--prefix", "loftr_fine", "--to",
                          "flax", "-o", "fine.npz", cwd=tmp_path)
    assert (report["tensor_count"], report["param_count"]) == (20, 328_704)
    arrays = load_npz(tmp_path / "fine.npz")
    assert arrays["layers.1/q_proj/kernel"].shape == (128, 128)
    assert_same_outputs(fine, unflatten(arrays), FINE)


@pytest.mark.parametrize("layout", ["kornia", "bare-coarse"])
def test_state_dicts_without_the_lightning_wrapper(layout: str, tmp_path: Path) -> None:
    from ckptkit.convert.engine import convert

    state, coarse, _fine = loftr_state(seed=3)
    if layout == "bare-coarse":  # the coarse transformer's own state dict: no prefix at all
        state = {k[len("loftr_coarse."):]: v for k, v in state.items()
                 if k.startswith("loftr_coarse.")}
    torch.save(state, tmp_path / "loftr.pth")
    report = convert(tmp_path / "loftr.pth", "flax", tmp_path / "out.npz", recipe="loftr")
    assert (report.tensor_count, report.param_count) == (80, 5_251_072)
    assert report.base == ""
    assert_same_outputs(coarse, unflatten(load_npz(tmp_path / "out.npz")), COARSE, seed=4)


def test_msgpack_and_safetensors_outputs_hold_the_same_arrays(loftr_ckpt, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from ckptkit.convert.engine import convert

    path, coarse, _fine = loftr_ckpt
    npz = load_npz(Path(convert(path, "flax", tmp_path / "a.npz", recipe="loftr").output))
    msgpack_report = convert(path, "flax", tmp_path / "a.msgpack", recipe="loftr")
    assert msgpack_report.format == "flax"
    from flax import serialization

    tree = serialization.msgpack_restore((tmp_path / "a.msgpack").read_bytes())
    assert_same_outputs(coarse, tree, COARSE, seed=5)
    convert(path, "safetensors", tmp_path / "a.safetensors", recipe="loftr")
    flat = load_file(tmp_path / "a.safetensors")
    assert flat.keys() == npz.keys()
    for key, value in npz.items():
        np.testing.assert_array_equal(flat[key], value)


def test_catalogue_name_is_fetched_through_the_mirror(loftr_ckpt, http_server: HTTPTestServer,
                                                      tmp_path: Path) -> None:
    path, coarse, _fine = loftr_ckpt
    http_server.add("/hf/kornia/loftr/resolve/main/loftr_outdoor.ckpt", path)
    mirror = (f"https://huggingface.co={http_server.url('/hf')},"
              f"http://cmp.felk.cvut.cz={http_server.url('/cmp')}")
    report = convert_json("loftr", "--to", "flax", "--mirror", mirror, cwd=tmp_path)
    assert report["recipe"] == "loftr"  # the catalogue entry names its recipe
    assert (report["tensor_count"], report["param_count"]) == (80, 5_251_072)
    assert report["output"] == str(tmp_path / "outdoor_ds.loftr_coarse.flax.npz")
    assert_same_outputs(coarse, unflatten(load_npz(Path(report["output"]))), COARSE, seed=6)
    assert http_server.hits("/hf/kornia/loftr/resolve/main/loftr_outdoor.ckpt")
    # Cached now: converting the fine transformer needs no server.
    http_server.routes.clear()
    again = convert_json("loftr", "--to", "flax", "--prefix", "loftr_fine", "--offline",
                         cwd=tmp_path)
    assert (again["tensor_count"], again["param_count"]) == (20, 328_704)
