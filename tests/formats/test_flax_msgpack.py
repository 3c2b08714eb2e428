"""Flax msgpack checkpoints read without JAX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
serialization = pytest.importorskip("flax.serialization")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(5, name="hidden", param_dtype=jnp.bfloat16)(x)
            return nn.Dense(2, name="out")(nn.LayerNorm(name="norm")(x))

    variables = MLP().init(jax.random.PRNGKey(0), np.zeros((1, 3), np.float32))
    path = tmp_path_factory.mktemp("flax") / "params.msgpack"
    path.write_bytes(serialization.to_bytes(variables))
    return path, flatten_dict(variables, sep="/")


def test_tree_matches_flax(written) -> None:
    path, flat = written
    info = ckptkit.inspect(path)
    assert info.format == "flax-msgpack"
    assert {t.name: (t.dtype, t.shape) for t in info.tensors} == {
        k: (str(v.dtype), tuple(v.shape)) for k, v in flat.items()}


def test_load_equals_flax_restore(written) -> None:
    path, _ = written
    ours = ckptkit.load(path, framework="flax")
    theirs = serialization.msgpack_restore(path.read_bytes())
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_truncated_file_is_an_integrity_error(written, tmp_path: Path) -> None:
    path, _ = written
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IntegrityError):
        ckptkit.inspect(cut)


def test_numpy_scalars_are_read(tmp_path: Path) -> None:
    path = tmp_path / "scalar.msgpack"
    path.write_bytes(serialization.to_bytes({"s": np.float32(1.5), "step": np.int64(7)}))
    info = ckptkit.inspect(path)
    assert {t.name: (t.dtype, t.shape) for t in info.tensors} == {"s": ("float32", ()),
                                                                  "step": ("int64", ())}
    loaded = ckptkit.load(path, framework="flax")
    assert float(loaded["s"]) == 1.5 and int(loaded["step"]) == 7


def test_a_map_as_a_map_key_is_not_flax_msgpack(tmp_path: Path) -> None:
    """msgpack raises TypeError for an unhashable key: the sniff says no, never crashes."""
    from ckptkit.formats import flax_msgpack

    path = tmp_path / "odd.msgpack"
    path.write_bytes(b"\x81\x81\x81\xa1a\x01\x02\x03")  # {{{"a": 1}: 2}: 3}
    assert flax_msgpack.sniff(path) is False
