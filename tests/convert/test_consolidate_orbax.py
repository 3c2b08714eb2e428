"""Consolidating Orbax checkpoints (arrays sharded over 8 host devices) to one file: every array
bit for bit as ``orbax.checkpoint`` restores it, tree paths joined by ``/``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ckptkit.convert.consolidate import plan_consolidation
from tests.formats.test_orbax import LAYOUTS, needs_orbax, written  # noqa: F401 (fixture)


@needs_orbax
@pytest.mark.parametrize("layout", LAYOUTS)
def test_orbax_consolidates_as_orbax_restores(written: Path, layout: str,  # noqa: F811
                                              tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    expected = json.loads((written / f"{layout}.restored.json").read_text())
    arrays = {k: v for k, v in expected.items() if v["type"] != "str"}
    out = tmp_path / f"{layout}.safetensors"
    plan_consolidation(written / layout, "safetensors", out).execute()
    import ml_dtypes  # noqa: F401 (safetensors' numpy loader reads bfloat16 through it)

    got = load_file(out)
    assert set(got) == set(arrays)
    for name, want in arrays.items():
        array = got[name]
        if want["type"] in ("int", "float"):  # a Python scalar leaf: Orbax stores it 0-d
            assert array.shape == () and array.item() == np.frombuffer(
                bytes.fromhex(want["hex"]), want["dtype"]).item(), name
            continue
        assert str(array.dtype) == want["dtype"] and list(array.shape) == want["shape"], name
        assert array.tobytes().hex() == want["hex"], name
    npz = tmp_path / f"{layout}.npz"
    plan_consolidation(written / layout, "npz", npz).execute()
    with np.load(npz) as stored:
        assert {k: stored[k].tobytes() for k in stored.files} == {
            k: got[k].tobytes() for k in got}  # the same bytes in both outputs
