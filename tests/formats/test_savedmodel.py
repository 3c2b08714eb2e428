"""SavedModel directories: signatures, tags and variables read by hand match what TensorFlow
itself reports, and damaged files fail with IntegrityError."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit.errors import FormatError, IntegrityError, UsageError
from ckptkit.formats import detect, savedmodel, tf_checkpoint
from ckptkit.model import Signature
from ckptkit.tree import iter_tensors, join
from tests.conftest import run_python

OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"




@pytest.fixture(scope="module")
def model_dir(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tf.Module with mixed-dtype variables, an asset and two signatures."""
    root = tmp_path_factory.mktemp("saved")
    vocab = root / "vocab.txt"
    vocab.write_text("low\nhigh\n")
    rng = np.random.default_rng(1)

    class Scorer(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(rng.standard_normal((3, 2)).astype(np.float32), name="w")
            self.b = tf.Variable(np.array([0.5, -0.25], np.float16), name="b")
            self.count = tf.Variable(np.array([7], np.int64), name="count")
            self.bf = tf.Variable(tf.constant([1.5, -2.0], tf.bfloat16), name="bf")
            self.blocks = [tf.Variable(np.ones(2, np.float32), name="block0"),
                           tf.Variable(np.full(2, 3.0, np.float32), name="block1")]
            self.vocab = tf.saved_model.Asset(str(vocab))

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            scores = tf.matmul(x, self.w) + tf.cast(self.b, tf.float32)
            return {"scores": scores, "best": tf.argmax(scores, axis=-1)}

        @tf.function(input_signature=[tf.TensorSpec([], tf.int64, name="n"),
                                      tf.TensorSpec(None, tf.string, name="tag")])
        def count_up(self, n: Any, tag: Any) -> dict[str, Any]:
            return {"total": self.count + n, "tag": tag}

    model = Scorer()
    tf.saved_model.save(model, str(root / "model"),
                        signatures={"serving_default": model.serve, "count_up": model.count_up})
    return root / "model"


@pytest.fixture(scope="module")
def plain_dir(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel without variables."""
    class Plain(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def double(self, x: Any) -> Any:
            return x * 2.0

    path = tmp_path_factory.mktemp("plain") / "model"
    plain = Plain()
    tf.saved_model.save(plain, str(path), signatures=plain.double)
    return path


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


def shape_of(tf_shape: Any) -> tuple[int, ...] | None:
    """A TensorShape in ckptkit's spelling: None for unknown rank, -1 for unknown dims."""
    if tf_shape.rank is None:
        return None
    return tuple(-1 if d is None else d for d in tf_shape.as_list())


# --- what TensorFlow wrote -----------------------------------------------------------------------

def test_variables_equal_tensorflow(tf: Any, model_dir: Path) -> None:
    raw = savedmodel.read_info(model_dir)
    prefix = str(model_dir / "variables" / "variables")
    listed = [(n, tuple(s)) for n, s in tf.train.list_variables(prefix) if n != OBJECT_GRAPH]
    assert [(n, t.shape) for n, t in raw.tensors] == listed
    dtypes = tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    assert {n: t.dtype for n, t in raw.tensors} == \
        {n: d.name for n, d in dtypes.items() if n != OBJECT_GRAPH}
    assert "blocks/0/.ATTRIBUTES/VARIABLE_VALUE" in dict(raw.tensors)
    assert raw.format == "savedmodel" and raw.separator == "/"
    from_tree = {join(path, "/"): ref for path, ref in iter_tensors(raw.tree)}
    assert from_tree == {f"variables/{n}": ref for n, ref in raw.tensors}


def test_signatures_equal_the_saved_proto(tf: Any, model_dir: Path) -> None:
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((model_dir / "saved_model.pb").read_bytes())
    expected = []
    for graph in proto.meta_graphs:
        tags = tuple(graph.meta_info_def.tags)
        for key, sig in graph.signature_def.items():
            if key == "__saved_model_init_op":
                continue

            def specs(infos: Any) -> dict[str, tuple[str, Any, str]]:
                return {k: (tf.as_dtype(i.dtype).name,
                            None if i.tensor_shape.unknown_rank
                            else tuple(d.size for d in i.tensor_shape.dim), i.name)
                        for k, i in infos.items()}

            expected.append((key, specs(sig.inputs), specs(sig.outputs), sig.method_name, tags))
    ours = [(s.key, {t.name: (t.dtype, t.shape, t.tensor_name) for t in s.inputs},
             {t.name: (t.dtype, t.shape, t.tensor_name) for t in s.outputs}, s.method, s.tags)
            for s in savedmodel.read_info(model_dir).signatures]
    assert sorted(ours, key=lambda s: s[0]) == sorted(expected, key=lambda s: s[0])


def test_signatures_equal_the_loaded_model(tf: Any, model_dir: Path) -> None:
    loaded = tf.saved_model.load(str(model_dir))
    ours: dict[str, Signature] = {s.key: s for s in savedmodel.read_info(model_dir).signatures}
    assert set(ours) == set(loaded.signatures.keys()) == {"serving_default", "count_up"}
    for key, function in loaded.signatures.items():
        inputs = function.structured_input_signature[1]
        assert {t.name: (t.dtype, t.shape) for t in ours[key].inputs} == \
            {k: (v.dtype.name, shape_of(v.shape)) for k, v in inputs.items()}
        assert {t.name: (t.dtype, t.shape) for t in ours[key].outputs} == \
            {k: (v.dtype.name, shape_of(v.shape)) for k, v in function.structured_outputs.items()}
    assert list(ours) == ["count_up", "serving_default"]
    serving = ours["serving_default"]
    assert [(t.name, t.tensor_name, t.shape) for t in serving.inputs] == \
        [("x", "serving_default_x:0", (-1, 3))]
    assert {t.name: t.dtype for t in serving.outputs} == {"scores": "float32", "best": "int64"}
    assert serving.method == "tensorflow/serving/predict" and serving.tags == ("serve",)
    tag_input = {t.name: t for t in ours["count_up"].inputs}["tag"]
    assert tag_input.dtype == "string" and tag_input.shape is None


def test_details(tf: Any, model_dir: Path) -> None:
    details = savedmodel.read_info(model_dir).details
    assert details["tags"] == ["serve"] and details["tag_sets"] == [["serve"]]
    assert details["tensorflow_version"] == tf.__version__
    assert details["saved_model_schema_version"] == 1
    assert details["has_object_graph"] is True and details["has_variables"] is True
    assert details["has_assets"] is True and details["asset_files"] == ["vocab.txt"]
    assert details["has_fingerprint"] is True
    fingerprint = tf.saved_model.experimental.read_fingerprint(str(model_dir))
    assert details["fingerprint"]["saved_model_checksum"] == fingerprint.saved_model_checksum
    assert details["graph_def_bytes"] > 0
    assert details["variables"]["num_shards"] == 1


def test_variable_names_from_the_object_graph(tf: Any, model_dir: Path) -> None:
    loaded = tf.saved_model.load(str(model_dir))
    expected = {f"{attr}/.ATTRIBUTES/VARIABLE_VALUE": var.name.split(":")[0]
                for attr, var in [("w", loaded.w), ("b", loaded.b), ("count", loaded.count),
                                  ("bf", loaded.bf), ("blocks/0", loaded.blocks[0]),
                                  ("blocks/1", loaded.blocks[1])]}
    assert savedmodel.read_info(model_dir).details["variable_names"] == expected


def test_numpy_values_equal_tensorflow(tf: Any, model_dir: Path) -> None:
    arrays = savedmodel.load(model_dir, "numpy")
    reader = tf.train.load_checkpoint(str(model_dir / "variables" / "variables"))
    assert set(arrays) == {n for n, _ in savedmodel.read_info(model_dir).tensors}
    for name, array in arrays.items():
        expected = np.asarray(reader.get_tensor(name))
        assert array.dtype == expected.dtype and array.shape == expected.shape, name
        assert array.tobytes() == expected.tobytes(), name


def test_tf_load_and_unknown_framework(model_dir: Path) -> None:
    loaded = savedmodel.load(model_dir, "tf")
    assert "serving_default" in loaded.signatures
    with pytest.raises(UsageError, match="framework='numpy'"):
        savedmodel.load(model_dir, "torch")


def test_model_without_variables(plain_dir: Path) -> None:
    raw = savedmodel.read_info(plain_dir)
    assert raw.tensors == () and raw.details["has_variables"] is False
    assert [s.key for s in raw.signatures] == ["serving_default"]
    assert raw.signatures[0].inputs[0].shape == (-1,)
    assert savedmodel.load(plain_dir, "numpy") == {}


def test_init_op_is_not_a_signature(model_dir: Path) -> None:
    keys = [s.key for s in savedmodel.read_info(model_dir).signatures]
    assert "__saved_model_init_op" not in keys


# --- sniffing ------------------------------------------------------------------------------------

def test_sniff_and_detect(model_dir: Path) -> None:
    assert savedmodel.sniff(model_dir) and savedmodel.sniff(model_dir / "saved_model.pb")
    assert savedmodel.read_info(model_dir / "saved_model.pb").tensors == \
        savedmodel.read_info(model_dir).tensors
    assert tf_checkpoint.sniff(model_dir) is False
    assert detect(model_dir) is savedmodel
    # The variables folder on its own is an ordinary TF checkpoint.
    assert detect(model_dir / "variables") is tf_checkpoint


def test_sniff_rejects_other_input(tmp_path: Path) -> None:
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(2).randbytes(2048))
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("saved_model.pb", b"\x08\x01")
    empty = tmp_path / "empty"
    empty.mkdir()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "saved_model.pb").write_bytes(b"PK\x03\x04 not a proto")
    for path in (noise, archive, empty, fake, tmp_path / "absent"):
        assert savedmodel.sniff(path) is False, path


def test_empty_saved_model_pb_is_reported_not_ignored(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"")
    assert savedmodel.sniff(tmp_path)
    with pytest.raises(IntegrityError, match="empty"):
        savedmodel.read_info(tmp_path)


def test_text_format_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pbtxt").write_text("saved_model_schema_version: 1\n")
    assert savedmodel.sniff(tmp_path)
    with pytest.raises(FormatError, match=re.escape("saved_model.pbtxt")):
        savedmodel.read_info(tmp_path)


# --- damage --------------------------------------------------------------------------------------

def test_truncated_saved_model_pb(model_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(model_dir, tmp_path)
    pb = moved / "saved_model.pb"
    data = pb.read_bytes()
    cuts = sorted(set(range(0, len(data), max(1, len(data) // 300))) | {1, 2, len(data) - 1})
    for cut in cuts:
        pb.write_bytes(data[:cut])
        with pytest.raises(IntegrityError, match=re.escape("saved_model.pb")):
            savedmodel.read_info(moved)


def test_flipped_saved_model_bytes_never_raise_anything_else(model_dir: Path,
                                                              tmp_path: Path) -> None:
    moved = copy_of(model_dir, tmp_path)
    pb = moved / "saved_model.pb"
    data = pb.read_bytes()
    rng = random.Random(11)
    for _ in range(300):
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        pb.write_bytes(bytes(damaged))
        savedmodel.sniff(moved)
        with contextlib.suppress(IntegrityError, FormatError):
            savedmodel.read_info(moved)


def test_truncated_variables_shard(model_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(model_dir, tmp_path)
    shard = moved / "variables" / "variables.data-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(IntegrityError, match=re.escape("variables.data-00000-of-00001")):
        savedmodel.read_info(moved)


def test_missing_variables_index(model_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(model_dir, tmp_path)
    (moved / "variables" / "variables.index").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        savedmodel.read_info(moved)


def test_truncated_variables_index(model_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(model_dir, tmp_path)
    index = moved / "variables" / "variables.index"
    data = index.read_bytes()
    for cut in range(0, len(data), 7):
        index.write_bytes(data[:cut])
        with pytest.raises(IntegrityError, match=re.escape("variables.index")):
            savedmodel.read_info(moved)


# --- no framework needed -------------------------------------------------------------------------

FRAMEWORK_FREE = """
import sys
from pathlib import Path
from ckptkit.formats import detect, savedmodel
path = Path(sys.argv[1])
assert detect(path) is savedmodel
raw = savedmodel.read_info(path)
assert raw.tensors and raw.signatures
print(sorted(m for m in sys.modules
             if m.split('.')[0] in ('tensorflow', 'torch', 'jax', 'numpy')))
"""


def test_read_info_imports_no_framework(model_dir: Path) -> None:
    result = run_python(FRAMEWORK_FREE, str(model_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
