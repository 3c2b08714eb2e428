"""ckptkit.testing.loftr: a LoFTR-shaped Lightning checkpoint written without torch, which the
demo's mirror serves where the catalogue expects the outdoor weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.testing.hubs import MirrorServer
from ckptkit.testing.loftr import (LIGHTNING_FACTS, LIGHTNING_PREFIX, state_dict,
                                   state_dict_layout, write_checkpoint)
from tests.conftest import run_ckpt, run_python

#: Where the catalogue's first LoFTR source puts the file, below a mirror's files/.
HF_PATH = "kornia/loftr/resolve/main/loftr_outdoor.ckpt"

WRITE_WITHOUT_FRAMEWORKS = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'tensorflow', 'jax', 'flax', 'safetensors'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
from ckptkit.testing.loftr import main
sys.exit(main(sys.argv[1:]))
"""


def test_layout_counts_are_those_of_the_released_weights() -> None:
    layout = state_dict_layout()
    for prefix, arrays, params in (("loftr_coarse.", 80, 5_251_072), ("loftr_fine.", 20, 328_704)):
        mine = [shape for name, _dtype, shape in layout if name.startswith(prefix)]
        assert (len(mine), sum(int(np.prod(s)) for s in mine)) == (arrays, params)
    assert len({name for name, _d, _s in layout}) == len(layout)


def test_written_without_torch_then_converted_by_catalogue_name(tmp_path: Path) -> None:
    out = tmp_path / "mirror" / "files" / HF_PATH
    out.parent.mkdir(parents=True)
    result = run_python(WRITE_WITHOUT_FRAMEWORKS, str(out), "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no scratch file left
    with MirrorServer(tmp_path / "mirror") as server:
        mirror = (f"https://huggingface.co={server.base}/files,"
                  f"http://cmp.felk.cvut.cz={server.base}/gone")
        converted = run_ckpt("convert", "loftr", "--to", "flax", "-o", "loftr_flax.msgpack",
                             "--mirror", mirror, "--json", cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    report = json.loads(converted.stdout)
    assert (report["tensor_count"], report["param_count"]) == (80, 5_251_072)
    assert (report["filled"], report["unfilled"], report["unused"], report["mismatched"]) == (
        80, [], [], [])
    assert report["base"] == "state_dict.matcher."
    tree = ckptkit.load(tmp_path / "loftr_flax.msgpack")
    source = state_dict(5)
    np.testing.assert_array_equal(tree["layers.3"]["mlp.2"]["kernel"],
                                  source["loftr_coarse.layers.3.mlp.2.weight"].T)
    np.testing.assert_array_equal(tree["layers.7"]["norm2"]["scale"],
                                  source["loftr_coarse.layers.7.norm2.weight"])


def test_torch_loads_it_as_a_lightning_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = write_checkpoint(tmp_path / "outdoor_ds.ckpt", seed=2)
    ckpt = torch.load(path, weights_only=True)
    assert {k: v for k, v in ckpt.items() if k != "state_dict"} == LIGHTNING_FACTS
    arrays = state_dict(2)
    assert list(ckpt["state_dict"]) == [LIGHTNING_PREFIX + k for k in arrays]
    for name, array in arrays.items():
        tensor = ckpt["state_dict"][LIGHTNING_PREFIX + name]
        np.testing.assert_array_equal(tensor.numpy(), array)
        assert not tensor.requires_grad
