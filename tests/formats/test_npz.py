"""npz archives: Flax trees with '/' keys, headers only, object arrays refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError, UnsafeContentError


@pytest.fixture(scope="module")
def flax_npz(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A real Flax param tree, flattened with '/' under opt/target as MUSIQ stores it."""
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")
    from flax.traverse_util import flatten_dict

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), name="conv_root")(x)
            x = nn.GroupNorm(num_groups=2, name="gn_root")(x)
            x = nn.Dense(6, name="embedding")(x.reshape(x.shape[0], -1))
            x = nn.LayerNorm(name="encoder_norm")(x)
            return nn.Dense(1, name="head")(x)

    params = Block().init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))["params"]
    flat = {f"opt/target/{k}": np.asarray(v)
            for k, v in flatten_dict(params, sep="/").items()}
    flat["opt/state/step"] = np.array(12, np.int64)
    path = tmp_path_factory.mktemp("npz") / "spaq_ckpt.npz"
    np.savez(path, **flat)
    return path, flat


def test_keys_dtypes_and_shapes_equal_numpy(flax_npz) -> None:
    path, flat = flax_npz
    info = ckptkit.inspect(path)
    assert info.format == "npz" and info.separator == "/"
    with np.load(path) as data:
        expected = {k: (str(data[k].dtype), data[k].shape) for k in data.files}
    assert {t.name: (t.dtype, t.shape) for t in info.tensors} == expected
    assert info.param_count == sum(a.size for a in flat.values())
    assert [g.name for g in info.groups] == ["opt"]
    assert info.details["flax_optimizer_target"] == "opt/target"


def test_compressed_npz_reads_headers_only(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, big=np.zeros((500, 500), np.float32), small=np.arange(3))
    info = ckptkit.inspect(path)
    assert {t.name: t.shape for t in info.tensors} == {"big": (500, 500), "small": (3,)}
    assert info.details["compressed"] is True
    np.testing.assert_array_equal(ckptkit.load(path)["small"], np.arange(3))


def test_flax_loader_returns_the_tree_under_opt_target(flax_npz) -> None:
    path, flat = flax_npz
    tree = ckptkit.load(path, framework="flax")
    np.testing.assert_array_equal(tree["head"]["kernel"], flat["opt/target/head/kernel"])
    assert set(tree) == {"conv_root", "gn_root", "embedding", "encoder_norm", "head"}


def test_bfloat16_saved_as_void_is_named_bfloat16(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    path = tmp_path / "bf.npz"
    np.savez(path, w=np.ones(4, ml_dtypes.bfloat16))
    assert ckptkit.inspect(path).tensors[0].dtype == "bfloat16"
    assert ckptkit.load(path)["w"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_object_arrays_are_reported_and_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, meta=np.array([{"a": 1}], dtype=object), w=np.ones(2))
    info = ckptkit.inspect(path)
    assert "numpy.ndarray[object]" in info.objects and [t.name for t in info.tensors] == ["w"]
    with pytest.raises(ckptkit.FormatError, match="Object arrays"):
        ckptkit.load(path)


def test_truncated_npz_is_an_integrity_error(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, w=np.ones(1000))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(IntegrityError):
        ckptkit.inspect(path)


def test_fixed_width_strings_and_records_have_their_sizes(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, s=np.array(["ab", "c"]), b=np.array([b"x"]),
             st=np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]))
    sizes = {t.name: t.nbytes for t in ckptkit.inspect(path).tensors}
    assert sizes == {"s": 16, "b": 1, "st": 16}
