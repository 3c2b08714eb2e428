"""Recipes as data, and planning: containers, wrappers, prefixes, layers, rule outcomes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ckptkit import formats
from ckptkit.convert.plan import CoverageError, parse_layers, plan_conversion
from ckptkit.convert.recipes import load_recipe, parse_recipe
from ckptkit.errors import UsageError
from tests.convert.reference_models import torch


def raw_of(path: Path):
    return formats.detect(path).read_info(path)


def save(tmp_path: Path, obj: object, name: str = "src.pt") -> Path:
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_builtin_loftr_recipe() -> None:
    recipe = load_recipe("loftr")
    assert (recipe.name, recipe.layout, recipe.select, recipe.fallback) == (
        "loftr", "flax", "loftr_coarse", "none")
    rule, match = recipe.match("layers.7.mlp.2.weight")
    assert rule.names(match) == ("layers.7/mlp.2/kernel",) and str(rule.transform) == "T"
    assert recipe.match("layers.7.attention.eps") is None


def test_user_recipe_renames_ties_drops_and_falls_back(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(r'''
name = "mine"
layout = "flax"
style = "linen"
collections = false
[kinds]
'^head$' = "param"
[[rules]]
from = '^blocks\.(\d+)\.attn\.weight$'
to = ['tower_a/block_\1/attn/kernel', 'tower_b/block_\1/attn/kernel']
transform = "T"
[[rules]]
from = '^.*\.scratch$'
to = []
[[rules]]
from = '^blocks\.(\d+)\.ffn\.weight$'
to = 'block_\g<1>/ffn/kernel'
transform = "permute(1,0)"
''')
    path = save(tmp_path, {"module": {
        "blocks.0.attn.weight": torch.ones(3, 2), "blocks.0.ffn.weight": torch.ones(4, 3),
        "blocks.0.scratch": torch.zeros(1), "blocks.0.ln.weight": torch.ones(3),
        "head.weight": torch.ones(5, 3), "head.bias": torch.zeros(5),
        "blocks.0.bn.running_mean": torch.zeros(3), "blocks.0.bn.running_var": torch.ones(3),
        "blocks.0.bn.weight": torch.ones(3), "blocks.0.bn.bias": torch.zeros(3)}})
    plan = plan_conversion(raw_of(path), tmp_path / "r.toml")
    assert plan.recipe == "mine" and plan.base == "module."
    outputs = {name: shape for name, _dtype, shape in plan.outputs()}
    assert outputs == {
        "tower_a/block_0/attn/kernel": (2, 3), "tower_b/block_0/attn/kernel": (2, 3),
        "block_0/ffn/kernel": (3, 4), "blocks_0/ln/scale": (3,),
        "head/weight": (5, 3), "head/bias": (5,),  # kinds: head is kept as it is
        "batch_stats/blocks_0/bn/mean": (3,), "batch_stats/blocks_0/bn/var": (3,),
        "blocks_0/bn/scale": (3,), "blocks_0/bn/bias": (3,)}
    assert [(u.name, u.reason) for u in plan.unused] == [
        ("module.blocks.0.scratch", "dropped by rule 2 of recipe mine")]
    assert plan.tied == 1


@pytest.mark.parametrize(("text", "message"), [
    ('colour = "red"', "recipe r.toml: colour: unknown key"),
    ('layout = "tf"', "recipe r.toml: layout: 'tf' is not one of 'flax', 'torch'"),
    ('layers = "layers"', "recipe r.toml: layers: needs a group"),
    ('[kinds]\n"x" = "dense"', "recipe r.toml: kinds.x: 'dense' is not one of"),
    ('[[rules]]\nfrom = "a"', "recipe r.toml: rule 1: needs both 'from'"),
    ('[[rules]]\nfrom = "(a)"\nto = "\\\\2"', "rule 1: 'to' refers to group \\2 but 'from' has 1"),
    ('[[rules]]\nfrom = "a"\nto = "b"\ntransform = "flip"', "rule 1: unknown transform 'flip'"),
    ('[[rules]]\nfrom = "a"\nto = "b"\nswap = 1', "rule 1: unknown key 'swap'"),
    ("name = ", "recipe r.toml: not valid TOML"),
])
def test_recipe_schema_errors_name_the_file_and_the_rule(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_recipe(text, origin="r.toml")
    assert message in str(caught.value)


def test_optimizer_state_is_outside_the_model_container(tmp_path: Path) -> None:
    path = save(tmp_path, {"model": {"fc.weight": torch.ones(2, 3), "fc.bias": torch.ones(2)},
                           "optimizer": {"state": {0: {"exp_avg": torch.ones(2, 3)}}},
                           "step": 200})
    plan = plan_conversion(raw_of(path), None)
    assert [n for n, _d, _s in plan.outputs()] == ["params/fc/kernel", "params/fc/bias"]
    assert (plan.base, plan.excluded) == ("model.", 1)


def test_flax_optimizer_tree_converts_back_to_torch(tmp_path: Path) -> None:
    arrays = {"opt/target/fc/kernel": np.ones((3, 2), np.float32),
              "opt/target/fc/bias": np.ones(2, np.float32),
              "opt/state/step": np.zeros((), np.int64)}
    np.savez(tmp_path / "musiq_like.npz", **arrays)
    plan = plan_conversion(raw_of(tmp_path / "musiq_like.npz"), None, layout="torch")
    assert plan.base == "opt/target/"
    assert {n: s for n, _d, s in plan.outputs()} == {"fc.weight": (2, 3), "fc.bias": (2,)}


def test_output_collisions_and_double_targets_are_usage_errors(tmp_path: Path) -> None:
    path = save(tmp_path, {"a.weight": torch.ones(2, 2), "b.weight": torch.ones(2, 2)})
    (tmp_path / "r.toml").write_text('[[rules]]\nfrom = \'.*\\.weight\'\nto = "w"\n')
    with pytest.raises(UsageError, match="would be written from both a.weight and b.weight"):
        plan_conversion(raw_of(path), tmp_path / "r.toml")
    with pytest.raises(UsageError, match="would be filled from both"):
        plan_conversion(raw_of(path), tmp_path / "r.toml", target={"w": (2, 2)})


def test_a_plan_with_nothing_to_write_is_always_an_error(tmp_path: Path) -> None:
    path = save(tmp_path, {"fc.weight": torch.ones(2, 3)})
    with pytest.raises(CoverageError, match="nothing to convert") as caught:
        plan_conversion(raw_of(path), None, target={"other/kernel": (3, 2)},
                        allow_partial=True)
    assert caught.value.plan is not None and caught.value.plan.unfilled == ("other/kernel",)
    assert caught.value.exit_code == 1


def test_parse_layers() -> None:
    assert parse_layers("0-3") == (0, 1, 2, 3)
    assert parse_layers("5, 0-1,3") == (0, 1, 3, 5)
    assert parse_layers([2, 1, 2]) == (1, 2)
    assert parse_layers(None) is None
    for bad in ("a", "3-1", "-1", "1-"):
        with pytest.raises(UsageError):
            parse_layers(bad)
