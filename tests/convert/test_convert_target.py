"""Merging into a target layout: tying one source layer into two target modules (IFViT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import run_ckpt
from tests.convert.reference_models import (COARSE, FlaxEncoderLayer, LocalFeatureTransformer,
                                            assert_agree, fnn, jax, load_npz, unflatten)
from tests.convert.test_convert_loftr import LAYER_KEYS

SHAPES = {"q_proj/kernel": [256, 256], "k_proj/kernel": [256, 256], "v_proj/kernel": [256, 256],
          "merge/kernel": [256, 256], "mlp.0/kernel": [512, 512], "mlp.2/kernel": [512, 256],
          "norm1/scale": [256], "norm1/bias": [256], "norm2/scale": [256], "norm2/bias": [256]}


def ifvit_layout(layers: int = 4) -> dict[str, list[int]]:
    """IFViT's Flax LoFTR: separate modules `layers.{i}.0` (feat0) and `layers.{i}.1` (feat1)."""
    return {f"layers.{i}.{s}/{k}": shape for i in range(layers) for s in (0, 1)
            for k, shape in SHAPES.items()}


class FlaxTwoStream(fnn.Module):
    """LoFTR's computation with one module per layer and stream, as IFViT lays it out."""

    layer_names: tuple[str, ...] = ("self", "cross") * 2

    @fnn.compact
    def __call__(self, feat0, feat1):
        for i, name in enumerate(self.layer_names):
            first = FlaxEncoderLayer(256, 8, name=f"layers.{i}.0")
            second = FlaxEncoderLayer(256, 8, name=f"layers.{i}.1")
            if name == "self":
                feat0, feat1 = first(feat0, feat0), second(feat1, feat1)
            else:
                feat0 = first(feat0, feat1)
                feat1 = second(feat1, feat0)
        return feat0, feat1


def test_tied_json_target_is_filled_from_layers_0_to_3(loftr_ckpt, tmp_path: Path) -> None:
    path, coarse, _fine = loftr_ckpt
    (tmp_path / "ifvit.json").write_text(json.dumps(ifvit_layout()))
    result = run_ckpt("convert", str(path), "--recipe", "loftr", "--target", "ifvit.json",
                      "--layers", "0-3", "--to", "flax", "-o", "ifvit.npz", "--json",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["filled"], report["tensor_count"], report["tied"]) == (80, 80, 40)
    assert report["unfilled"] == [] and report["mismatched"] == []
    assert report["param_count"] == 2 * 2_625_536
    unused = [u["name"] for u in report["unused"]]
    assert sorted(unused) == sorted(f"state_dict.matcher.loftr_coarse.layers.{i}.{k}"
                                    for i in range(4, 8) for k in _torch_keys())
    assert {u["reason"] for u in report["unused"]} == {
        f"layer {i} not selected (--layers 0-3)" for i in range(4, 8)}
    arrays = load_npz(tmp_path / "ifvit.npz")
    assert arrays.keys() == ifvit_layout().keys()
    state = coarse.state_dict()
    for i in range(4):
        for stream in (0, 1):  # both streams get the one shared LoFTR layer
            np.testing.assert_array_equal(arrays[f"layers.{i}.{stream}/q_proj/kernel"],
                                          state[f"layers.{i}.q_proj.weight"].numpy().T)
            np.testing.assert_array_equal(arrays[f"layers.{i}.{stream}/norm2/bias"],
                                          state[f"layers.{i}.norm2.bias"].numpy())


def test_tied_msgpack_target_computes_what_the_first_four_torch_layers_do(
        loftr_ckpt, tmp_path: Path) -> None:
    from flax import serialization

    from ckptkit.convert.engine import convert

    path, coarse, _fine = loftr_ckpt
    feat = np.zeros((1, 4, 256), np.float32)
    template = FlaxTwoStream().init(jax.random.PRNGKey(0), feat, feat)
    (tmp_path / "template.msgpack").write_bytes(serialization.to_bytes(template))
    report = convert(path, "flax", tmp_path / "ifvit.npz", recipe="loftr",
                     target=tmp_path / "template.msgpack", layers="0-3")
    assert (report.filled, report.tied, len(report.unused)) == (80, 40, 40)
    arrays = load_npz(tmp_path / "ifvit.npz")
    assert set(arrays) == {f"params/layers.{i}.{s}/{k}" for i in range(4) for s in (0, 1)
                           for k in LAYER_KEYS}  # the template's own names
    four = LocalFeatureTransformer(256, 8, ("self", "cross") * 2).eval()
    four.load_state_dict({k: v for k, v in coarse.state_dict().items()
                          if int(k.split(".")[1]) < 4}, strict=True)
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((2, 50, COARSE["d_model"])),
              rng.standard_normal((2, 40, COARSE["d_model"]))]
    assert_agree(four, FlaxTwoStream(), unflatten(arrays), inputs)


def test_npz_template_under_a_root_module(loftr_ckpt, tmp_path: Path) -> None:
    from ckptkit.convert.engine import convert

    path, _coarse, _fine = loftr_ckpt
    template = {f"encoder/layers.{i}/{k}": np.zeros(shape, np.float32) for i in range(2)
                for k, shape in SHAPES.items()}
    np.savez(tmp_path / "template.npz", **template)
    report = convert(path, "flax", tmp_path / "out.npz", recipe="loftr", layers="0-1",
                     target=tmp_path / "template.npz")
    assert (report.filled, report.tied, report.unfilled, report.mismatched) == (20, 0, (), ())
    assert load_npz(tmp_path / "out.npz").keys() == template.keys()


def _torch_keys() -> list[str]:
    return ["q_proj.weight", "k_proj.weight", "v_proj.weight", "merge.weight", "mlp.0.weight",
            "mlp.2.weight", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
