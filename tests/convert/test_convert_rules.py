"""Generic PyTorch <-> Flax rules: a CNN both ways (numerically), kinds, naming, transforms."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ckptkit import name_rules as rules
from tests.conftest import run_ckpt
from tests.convert.reference_models import (FlaxCNN, TorchCNN, assert_agree, jax, load_npz,
                                            random_cnn, torch, unflatten)

CNN_KEYS = {"params/conv/kernel": (3, 3, 3, 8), "params/conv/bias": (8,),
            "params/bn/scale": (8,), "params/bn/bias": (8,), "batch_stats/bn/mean": (8,),
            "batch_stats/bn/var": (8,), "params/norm/scale": (8,), "params/norm/bias": (8,),
            "params/fc/kernel": (8, 5), "params/fc/bias": (5,)}


def nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


def test_cnn_to_flax_matches_torch_in_eval_mode(tmp_path: Path) -> None:
    model = random_cnn()
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    result = run_ckpt("convert", "cnn.pt", "--to", "flax", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Unused      1" in result.stdout and "num_batches_tracked" in result.stdout
    arrays = load_npz(tmp_path / "cnn.flax.npz")
    assert {k: v.shape for k, v in arrays.items()} == CNN_KEYS
    variables = unflatten(arrays)
    # The converted tree is exactly the one Flax itself builds for this model.
    init = FlaxCNN().init(jax.random.PRNGKey(0), np.zeros((1, 6, 6, 3), np.float32))
    assert jax.tree_util.tree_map(np.shape, init) == jax.tree_util.tree_map(np.shape, variables)
    x = np.random.default_rng(0).standard_normal((4, 3, 6, 6))
    assert_agree(model, FlaxCNN(), variables, [x], to_flax=nhwc)


def test_flax_to_torch_loads_strictly_and_matches(tmp_path: Path) -> None:
    from ckptkit.formats.writers import write

    rng = np.random.default_rng(1)
    variables = FlaxCNN().init(jax.random.PRNGKey(1), np.zeros((1, 6, 6, 3), np.float32))
    flat = {"/".join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    flat["batch_stats/bn/mean"] = rng.normal(0, 0.5, 8).astype(np.float32)
    flat["batch_stats/bn/var"] = rng.uniform(0.5, 2, 8).astype(np.float32)
    flat["params/norm/bias"] = rng.normal(0, 0.2, 8).astype(np.float32)
    write(tmp_path / "cnn.flax.npz", "npz", flat.items())
    result = run_ckpt("convert", "cnn.flax.npz", "--to", "torch", "-o", "back.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "back.pt", weights_only=True)
    assert state["bn.num_batches_tracked"].dtype == torch.int64  # recreated for strict loading
    model = TorchCNN().eval()
    model.load_state_dict(state, strict=True)
    np.testing.assert_array_equal(state["conv.weight"].numpy(),
                                  flat["params/conv/kernel"].transpose(3, 2, 0, 1))
    x = np.random.default_rng(2).standard_normal((3, 3, 6, 6))
    assert_agree(model, FlaxCNN(), unflatten(flat), [x], to_flax=nhwc)


def test_round_trip_torch_flax_torch_is_bit_exact(tmp_path: Path) -> None:
    from ckptkit.convert.engine import convert

    model = random_cnn(seed=5)
    torch.save({"model": model.state_dict(), "step": 7}, tmp_path / "ckpt.pt")
    convert(tmp_path / "ckpt.pt", "flax", tmp_path / "f.npz")
    report = convert(tmp_path / "f.npz", "torch", tmp_path / "back.pt")
    assert report.layout == "torch"
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    original = model.state_dict()
    assert back.keys() == original.keys()
    for key, value in original.items():
        if key != "bn.num_batches_tracked":  # Flax keeps no counter: it comes back as 0
            assert torch.equal(back[key], value), key


def test_kinds_are_inferred_from_names_and_shapes() -> None:
    shapes = {"enc.embed_tokens.weight": (100, 16), "enc.wte.weight": (100, 16),
              "enc.proj.weight": (16, 16), "enc.proj.bias": (16,),
              "enc.ln.weight": (16,), "enc.ln.bias": (16,), "enc.rms.weight": (16,),
              "enc.bn.weight": (16,), "enc.bn.bias": (16,), "enc.bn.running_mean": (16,),
              "enc.bn.running_var": (16,), "enc.bn.num_batches_tracked": (),
              "enc.c1.weight": (8, 4, 3), "enc.c3.weight": (8, 4, 3, 3, 3), "enc.cls": (1, 16)}
    assert rules.infer_kinds(shapes) == {
        "enc.embed_tokens": "embedding", "enc.wte": "embedding", "enc.proj": "linear",
        "enc.ln": "norm", "enc.rms": "norm", "enc.bn": "batchnorm", "enc.c1": "conv",
        "enc.c3": "conv", "enc": "param"}
    override = [(re.compile(r"embed_tokens$"), "linear")]
    assert rules.infer_kinds(shapes, override)["enc.embed_tokens"] == "linear"


@pytest.mark.parametrize(("name", "kind", "shape", "names", "transform"), [
    ("a.b.0.weight", "linear", (4, 3), ("params/a/b/0/kernel",), "T"),
    ("conv.weight", "conv", (8, 4, 5), ("params/conv/kernel",), "conv"),
    ("ln.weight", "norm", (8,), ("params/ln/scale",), "none"),
    ("bn.running_var", "batchnorm", (8,), ("batch_stats/bn/var",), "none"),
    ("emb.weight", "embedding", (9, 4), ("params/emb/embedding",), "none"),
    ("cls_token", "param", (1, 4), ("params/cls_token",), "none"),
])
def test_torch_to_flax_names(name: str, kind: rules.Kind, shape: tuple[int, ...],
                             names: tuple[str, ...], transform: str) -> None:
    mapped = rules.torch_to_flax(name, kind, shape)
    assert isinstance(mapped, rules.Mapped)
    assert (mapped.names, str(mapped.transform)) == (names, transform)


def test_naming_styles() -> None:
    assert rules.flax_path("features.0.conv", "nested") == ["features", "0", "conv"]
    assert rules.flax_path("features.0.conv", "linen") == ["features_0", "conv"]
    assert rules.flax_path("0.conv", "linen") == ["layers_0", "conv"]
    assert rules.flax_path("layers.3.q_proj", "dotted") == ["layers.3.q_proj"]
    mapped = rules.torch_to_flax("bn.running_mean", "batchnorm", (4,), collections=False)
    assert isinstance(mapped, rules.Mapped) and mapped.names == ("batch_stats/bn/mean",)
    dropped = rules.torch_to_flax("bn.num_batches_tracked", "batchnorm", ())
    assert isinstance(dropped, rules.Dropped)


@pytest.mark.parametrize("shape", [(5, 4), (6, 4, 3), (6, 4, 3, 2), (6, 4, 3, 2, 2)])
def test_transforms_invert_and_agree_with_their_shapes(shape: tuple[int, ...]) -> None:
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    forward = rules.CONV if len(shape) > 2 else rules.TRANSPOSE
    inverse = rules.UNCONV if len(shape) > 2 else rules.TRANSPOSE
    moved = forward.apply(array)
    assert moved.shape == forward.shape(shape) and moved.flags.c_contiguous
    np.testing.assert_array_equal(inverse.apply(moved), array)
    if len(shape) == 4:  # (out, in, kh, kw) -> (kh, kw, in, out), as Flax's nn.Conv wants
        np.testing.assert_array_equal(moved, array.transpose(2, 3, 1, 0))
    assert rules.parse_transform("permute(1,0)").shape((5, 4)) == (4, 5)
    with pytest.raises(ValueError):
        rules.parse_transform("transpose")
    with pytest.raises(ValueError):
        rules.CONV.shape((4, 4))
