"""`ckpt convert` errors and exit codes, through the real entry point in a subprocess."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tests.conftest import run_ckpt
from tests.convert.test_convert_target import ifvit_layout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_prefix_is_a_usage_error_listing_the_prefixes_that_exist(loftr_ckpt,
                                                                         tmp_path: Path) -> None:
    path = loftr_ckpt[0]
    result = run_ckpt("convert", str(path), "--recipe", "loftr", "--prefix",
                      "loftr_coarse.coarse_transformer", "--to", "flax", cwd=tmp_path)
    assert result.returncode == 2
    for listed in ("loftr_coarse (80)", "loftr_fine (20)", "backbone (6)", "fine_preprocess (2)",
                   "state_dict.matcher."):
        assert listed in result.stderr
    assert not list(tmp_path.iterdir())  # IFViT wrote an empty .npz here and printed success


def test_prefix_may_be_given_with_its_wrappers(loftr_ckpt, tmp_path: Path) -> None:
    path = loftr_ckpt[0]
    for prefix in ("matcher.loftr_fine", "state_dict.matcher.loftr_fine", "loftr_fine."):
        result = run_ckpt("convert", str(path), "--recipe", "loftr", "--prefix", prefix,
                          "--to", "flax", "--json", "--dry-run", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["tensor_count"] == 20


def test_empty_result_is_an_error(loftr_ckpt, tmp_path: Path) -> None:
    path = loftr_ckpt[0]
    result = run_ckpt("convert", str(path), "--recipe", "loftr", "--prefix", "backbone",
                      "--to", "flax", cwd=tmp_path)
    assert result.returncode == 1
    assert "nothing to convert: 0 output arrays from 6 selected tensor(s)" in result.stderr
    assert "no rule of recipe loftr matches" in result.stderr
    assert not list(tmp_path.glob("*.npz"))


def test_layers_that_do_not_exist_are_a_usage_error(loftr_ckpt, tmp_path: Path) -> None:
    result = run_ckpt("convert", str(loftr_ckpt[0]), "--recipe", "loftr", "--layers", "0-9",
                      "--to", "flax", cwd=tmp_path)
    assert result.returncode == 2
    assert "layer(s) 8, 9 do not exist; the source has layers 0-7" in result.stderr
    bad = run_ckpt("convert", str(loftr_ckpt[0]), "--recipe", "loftr", "--layers", "3-1",
                   "--to", "flax", cwd=tmp_path)
    assert bad.returncode == 2 and "is not an index or a range" in bad.stderr


def test_shape_mismatch_fails_unless_partial_is_allowed(loftr_ckpt, tmp_path: Path) -> None:
    layout = ifvit_layout()
    layout["layers.2.1/mlp.2/kernel"] = [256, 512]  # not transposed: a classic converter bug
    (tmp_path / "t.json").write_text(json.dumps(layout))
    args = (str(loftr_ckpt[0]), "--recipe", "loftr", "--target", "t.json", "--layers", "0-3",
            "--to", "flax", "-o", "out.npz")
    refused = run_ckpt("convert", *args, cwd=tmp_path)
    assert refused.returncode == 1
    assert "1 shape mismatch(es) (layers.2.1/mlp.2/kernel [512, 256] vs [256, 512])" in (
        refused.stderr)
    assert "Mismatched  1" in refused.stdout and "--allow-partial" in refused.stderr
    assert not (tmp_path / "out.npz").exists()
    allowed = run_ckpt("convert", *args, "--allow-partial", "--json", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    report = json.loads(allowed.stdout)
    assert report["mismatched"] == [{
        "source": "state_dict.matcher.loftr_coarse.layers.2.mlp.2.weight",
        "target": "layers.2.1/mlp.2/kernel", "shape": [512, 256], "target_shape": [256, 512]}]
    assert report["filled"] == 79 and report["unfilled"] == []
    with np.load(tmp_path / "out.npz") as arrays:
        assert len(arrays.files) == 79 and "layers.2.1/mlp.2/kernel" not in arrays.files


def test_unfilled_target_fails_unless_partial_is_allowed(loftr_ckpt, tmp_path: Path) -> None:
    layout = ifvit_layout()
    # IFViT's nn.Dense has biases LoFTR's Linear layers do not.
    layout.update({f"layers.{i}.{s}/q_proj/bias": [256] for i in range(4) for s in (0, 1)})
    (tmp_path / "t.json").write_text(json.dumps(layout))
    args = (str(loftr_ckpt[0]), "--recipe", "loftr", "--target", "t.json", "--layers", "0-3",
            "--to", "flax")
    refused = run_ckpt("convert", *args, "--json", cwd=tmp_path)
    assert refused.returncode == 1
    report = json.loads(refused.stdout)
    assert report["output"] is None and "8 target param(s) unfilled" in report["error"]
    assert len(report["unfilled"]) == 8 and report["filled"] == 80
    assert not list(tmp_path.glob("*.npz"))
    allowed = run_ckpt("convert", *args, "--allow-partial", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert "Unfilled    8" in allowed.stdout and "layers.0.0/q_proj/bias" in allowed.stdout
    assert (tmp_path / "outdoor_ds.loftr_coarse.flax.npz").is_file()


def test_output_over_the_input_is_refused(loftr_ckpt, tmp_path: Path) -> None:
    source = tmp_path / "copy.ckpt"
    source.write_bytes(loftr_ckpt[0].read_bytes())
    before = sha256(source)
    result = run_ckpt("convert", "copy.ckpt", "--recipe", "loftr", "--to", "flax", "-o",
                      "./copy.ckpt", cwd=tmp_path)
    assert result.returncode == 2 and "over the input" in result.stderr
    assert sha256(source) == before
    np.savez(tmp_path / "plain.npz", w=np.ones(3, np.float32))
    plain = run_ckpt("convert", "plain.npz", "--to", "npz", cwd=tmp_path)  # default name = input
    assert plain.returncode == 2 and "over the input" in plain.stderr


def test_default_output_never_replaces_a_file(tmp_path: Path) -> None:
    arrays = {"params/fc/kernel": np.ones((3, 2), np.float32)}
    np.savez(tmp_path / "cnn.flax.npz", **arrays)
    original = tmp_path / "cnn.pt"  # what cnn.flax.npz was made from, say
    original.write_bytes(b"original")
    first = run_ckpt("convert", "cnn.flax.npz", "--to", "torch", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "cnn.torch.pt").is_file() and original.read_bytes() == b"original"
    again = run_ckpt("convert", "cnn.flax.npz", "--to", "torch", cwd=tmp_path)
    assert again.returncode == 2 and "cnn.torch.pt already exists" in again.stderr
    named = run_ckpt("convert", "cnn.flax.npz", "--to", "torch", "-o", "cnn.torch.pt",
                     cwd=tmp_path)
    assert named.returncode == 0, named.stderr


def test_bad_recipe_file_names_the_file_and_the_rule(loftr_ckpt, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[[rules]]\nfrom = "a"\nto = "b"\n\n'
                                       '[[rules]]\nfrom = "(x"\nto = "y"\n')
    result = run_ckpt("convert", str(loftr_ckpt[0]), "--recipe", "bad.toml", "--to", "flax",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert "recipe bad.toml: rule 2 'from': '(x' is not a valid regular expression" in (
        result.stderr)
    unknown = run_ckpt("convert", str(loftr_ckpt[0]), "--recipe", "lofrt", "--to", "flax",
                       cwd=tmp_path)
    assert unknown.returncode == 2 and "Built-in recipes: default, loftr" in unknown.stderr


def test_unknown_source_is_not_found(tmp_path: Path) -> None:
    result = run_ckpt("convert", "loftr-outdor", "--to", "flax", "--offline", cwd=tmp_path)
    assert result.returncode == 4
    assert "no such file, and no catalogue model" in result.stderr
    assert "loftr-outdoor" in result.stderr  # did you mean


def test_plain_format_change_keeps_names(loftr_ckpt, tmp_path: Path) -> None:
    result = run_ckpt("convert", str(loftr_ckpt[0]), "--to", "safetensors", "--json",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["recipe"] is None and report["tensor_count"] == 108  # 80 + 20 + 8
    assert report["output"] == str(tmp_path / "outdoor_ds.safetensors")
    from safetensors import safe_open

    with safe_open(report["output"], "np") as f:
        assert "state_dict.matcher.loftr_coarse.layers.0.q_proj.weight" in f.keys()


def test_help_ends_with_examples() -> None:
    result = run_ckpt("convert", "--help")
    assert result.returncode == 0
    examples = result.stdout.split("Examples:")[1]
    assert "ckpt convert loftr --to flax" in examples
    assert "--target" in examples and "--layers 0-3" in examples
