"""Orbax checkpoints written by ``orbax.checkpoint`` with arrays sharded over 8 host devices:
structure without JAX or TensorStore, data bit for bit as Orbax restores it, verify and
inspect on broken copies."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError, UsageError
from ckptkit.formats import orbax
from ckptkit.formats.ocdbt import ValueRef, read_database
from ckptkit.storage.location import locate
from tests.conftest import SRC, run_ckpt_without, run_python

WRITER = Path(__file__).with_name("orbax_writer.py")
LAYOUTS = ("ocdbt", "per_array", "zarr3")
SAMPLE = SRC / "ckptkit" / "samples" / "orbax_step_3"

needs_orbax = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("orbax", "jax", "tensorstore")),
    reason="needs orbax-checkpoint, JAX and TensorStore (test extra)")


@pytest.fixture(scope="session")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoints of ``orbax_writer.py``, written once per session in a subprocess (JAX
    takes its device count from XLA_FLAGS at import)."""
    out = tmp_path_factory.mktemp("orbax")
    result = subprocess.run([sys.executable, str(WRITER), str(out)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _restored(written: Path, layout: str) -> dict[str, dict]:
    return json.loads((written / f"{layout}.restored.json").read_text())


def _leaf(tree, name: str):
    for part in name.split("/"):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


@needs_orbax
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_matches_orbax_restore_bit_for_bit(written: Path, layout: str) -> None:
    ours = ckptkit.load(written / layout, framework="numpy")
    expected = _restored(written, layout)
    assert len(expected) >= 10
    for name, want in expected.items():
        got = _leaf(ours, name)
        if want["type"] == "str":
            assert got == want["value"]
            continue
        assert type(got).__name__ in {"int": ("int",), "float": ("float",)}.get(
            want["type"], ("ndarray",)), name
        array = np.asarray(got)
        if want["type"] in ("int", "float"):
            assert array.item() == np.frombuffer(bytes.fromhex(want["hex"]),
                                                 want["dtype"]).item(), name
            continue
        assert str(array.dtype) == want["dtype"] and list(array.shape) == want["shape"], name
        assert array.tobytes().hex() == want["hex"], name


@needs_orbax
@pytest.mark.parametrize("layout", LAYOUTS)
def test_structure_matches_what_orbax_restores(written: Path, layout: str) -> None:
    info = ckptkit.inspect(written / layout)
    assert info.format == "orbax"
    expected = _restored(written, layout)
    shapes = {t.name: (t.dtype, list(t.shape)) for t in info.tensors}
    arrays = {k: v for k, v in expected.items() if v["type"] not in ("str",)}
    # Python scalars are stored as 0-d arrays; Orbax hands them back as Python numbers.
    assert set(shapes) == set(arrays)
    for name, want in arrays.items():
        if want["type"] in ("int", "float"):
            assert shapes[name][1] == []
        else:
            assert shapes[name] == (want["dtype"], want["shape"]), name
    assert info.details["layout"] == ("per-array" if layout == "per_array" else "ocdbt")
    kernel = info.details["arrays"]["params/encoder/layer_0/kernel"]
    assert kernel["sharding"]["partition_spec"] == ["data", "model"]
    assert kernel["sharding"]["shape"] == [4, 2]
    assert kernel["chunks"] == 8 and kernel["chunk_shape"] == [16, 16]
    assert "data=4 x model=2" in info.details["placement"]["params/encoder/layer_0/kernel"]
    assert info.details["files"] > 3 and info.details["data_bytes"] > 64 * 1024


@needs_orbax
def test_inspect_needs_neither_jax_nor_tensorstore(written: Path) -> None:
    for layout in LAYOUTS:
        result = run_ckpt_without(("jax", "jaxlib", "tensorstore", "orbax"), "inspect",
                                  "--json", str(written / layout))
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert {t["name"]: t["shape"] for t in data["tensors"]}["params/big"] == [256, 64]


_LOAD_WITHOUT_TENSORSTORE = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'tensorstore':
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import ckptkit
from ckptkit.errors import MissingDependencyError
try:
    ckptkit.load(sys.argv[1], framework="numpy")
except MissingDependencyError as exc:
    print(exc.extra, exc.package, '|', exc)
"""


@needs_orbax
def test_reading_data_without_tensorstore_names_the_extra(written: Path) -> None:
    result = run_python(_LOAD_WITHOUT_TENSORSTORE, str(written / "ocdbt"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("orbax tensorstore |")
    assert "pip install 'ckptkit[orbax]'" in result.stdout
    # Structure needs no TensorStore: inspect still works on the same machine.
    cli = run_ckpt_without(("tensorstore",), "inspect", str(written / "ocdbt"))
    assert cli.returncode == 0, cli.stderr


@needs_orbax
def test_load_as_jax_gives_jax_arrays(written: Path) -> None:
    result = run_python("import sys, ckptkit; t = ckptkit.load(sys.argv[1], framework='jax');"
                        "print(type(t['params']['big']).__module__.split('.')[0], "
                        "t['params']['big'].shape)", str(written / "ocdbt"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["jaxlib", "(256,", "64)"]


@needs_orbax
def test_checkpoint_root_names_its_steps(written: Path) -> None:
    steps = orbax.list_steps(written / "run")
    assert [(s.step, s.complete) for s in steps] == [(1, True), (2, True)]
    with pytest.raises(UsageError, match=r"steps 1, 2") as exc:
        ckptkit.inspect(written / "run")
    assert str(written / "run" / "2") in str(exc.value)
    result = run_ckpt_without((), "inspect", str(written / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # A step of a CheckpointManager (its one item is `default/`) reads as that item.
    info = ckptkit.inspect(written / "run" / "2")
    assert [t.name for t in info.tensors] == ["w"] and info.details["step"] == 2
    assert orbax.verify(written / "run" / "2") == []
    assert np.array_equal(ckptkit.load(written / "run" / "2")["w"], np.full(4, 2))


@needs_orbax
def test_unfinished_step_is_listed_as_incomplete(written: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    shutil.copytree(written / "run", root)
    (root / "2").rename(root / "3.orbax-checkpoint-tmp")
    (root / "3.orbax-checkpoint-tmp" / "_CHECKPOINT_METADATA").unlink()
    steps = orbax.list_steps(root)
    assert [(s.step, s.complete) for s in steps] == [(1, True), (3, False)]
    kinds = {p.kind for p in orbax.verify(root / "3.orbax-checkpoint-tmp")}
    assert "incomplete" in kinds


@needs_orbax
def test_step_with_several_items(written: Path) -> None:
    info = ckptkit.inspect(written / "items" / "5")
    assert [t.name for t in info.tensors] == ["params/w"]
    loaded = ckptkit.load(written / "items" / "5")
    assert loaded["extra"] == {"dataset": "c4", "seen": 1200}
    assert loaded["params"]["w"].tolist() == [0, 1, 2, 3]


@needs_orbax
@pytest.mark.parametrize("layout", LAYOUTS)
def test_complete_checkpoints_verify_clean(written: Path, layout: str) -> None:
    assert orbax.verify(written / layout) == []
    assert orbax.verify(written / layout, hashes=True) == []


def _value_file(step: Path) -> Path:
    """The data file holding the out-of-line chunk values (the big array's)."""
    db = read_database(locate(step))
    files = sorted({v.file for v in db.entries.values() if isinstance(v, ValueRef)})
    assert files, "the fixture should have values too large to inline"
    return step / files[0]


def _damage(step: Path, how: str) -> Path:
    """Break a copy of ``step`` one way; returns the file the problem should name."""
    if how == "missing-data-file":
        target = _value_file(step)
        target.unlink()
    elif how == "truncated-data-file":
        target = _value_file(step)
        target.write_bytes(target.read_bytes()[:target.stat().st_size // 3])
    elif how == "missing-metadata":
        target = step / "_METADATA"
        target.unlink()
    elif how == "missing-manifest":
        target = step / "manifest.ocdbt"
        target.unlink()
    elif how == "missing-node":
        target = next((step / "d").iterdir())
        target.unlink()
    elif how == "missing-chunk":
        target = step / "params.big" / "1.0"
        target.unlink()
    else:  # truncated-chunk
        target = step / "params.big" / "0.0"
        target.write_bytes(target.read_bytes()[:-7])
    return target


BROKEN = [("ocdbt", "missing-data-file", "missing-file"),
          ("ocdbt", "truncated-data-file", "truncated"),
          ("ocdbt", "missing-metadata", "missing-metadata"),
          ("ocdbt", "missing-manifest", "missing-file"),
          ("ocdbt", "missing-node", "missing-file"),
          ("per_array", "missing-chunk", "missing-chunk"),
          ("per_array", "truncated-chunk", "truncated"),
          ("per_array", "missing-metadata", "missing-metadata")]


@needs_orbax
@pytest.mark.parametrize("layout, how, kind", BROKEN)
def test_broken_copies_are_named_by_verify(written: Path, tmp_path: Path, layout: str,
                                           how: str, kind: str) -> None:
    step = tmp_path / layout
    shutil.copytree(written / layout, step)
    target = _damage(step, how)
    problems = orbax.verify(step)
    assert [p.kind for p in problems] == [kind], problems
    assert problems[0].file == str(target)
    assert str(target) in problems[0].message or str(target.parent) in problems[0].message


@needs_orbax
@pytest.mark.parametrize("layout, how, kind", [b for b in BROKEN if b[1] != "truncated-chunk"])
def test_broken_copies_fail_inspect_in_one_line(written: Path, tmp_path: Path, layout: str,
                                                how: str, kind: str) -> None:
    step = tmp_path / layout
    shutil.copytree(written / layout, step)
    target = _damage(step, how)
    result = run_ckpt_without((), "inspect", str(step))
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(target.name) in lines[0]
    with pytest.raises(IntegrityError):
        ckptkit.inspect(step)


def test_bundled_sample_reads_without_any_framework() -> None:
    info = ckptkit.inspect(SAMPLE)
    assert info.format == "orbax" and info.details["step"] == 3
    assert {t.name: t.dtype for t in info.tensors}["params/embed/embedding"] == "bfloat16"
    assert "data=4 x model=2" in info.details["placement"]["params/dense/kernel"]
    assert orbax.verify(SAMPLE) == []


@needs_orbax
def test_arrays_one_at_a_time_under_inspect_names(written: Path) -> None:
    names = [t.name for t in ckptkit.inspect(written / "ocdbt").tensors]
    expected = _restored(written, "ocdbt")
    seen = []
    for name, array in orbax.iter_arrays(written / "ocdbt"):
        seen.append(name)
        want = expected[name]
        if want["type"] in ("int", "float"):  # stored dtype kept; Orbax restores a number
            assert array.shape == () and array.item() == np.frombuffer(
                bytes.fromhex(want["hex"]), want["dtype"]).item(), name
        else:
            assert array.tobytes().hex() == want["hex"], name
    assert seen == names
