"""TF checkpoints (tensor bundles): what TensorFlow writes is what ckptkit reports, and hostile
or damaged indexes fail with IntegrityError, never with a stray exception."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit.errors import FormatError, IntegrityError, NotFoundError, UsageError
from ckptkit.formats import crc32c, detect, protowire, sstable, tensor_bundle, tf_checkpoint
from ckptkit.tree import iter_tensors, join
from tests.conftest import run_python

OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


# --- fixtures written by TensorFlow ------------------------------------------------------------



@pytest.fixture(scope="module")
def tf2_dir(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TF2 object checkpoint saved twice (``ckpt-2`` is latest) with many dtypes."""
    root = tmp_path_factory.mktemp("tf2")
    rng = np.random.default_rng(0)

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(rng.standard_normal((4, 3)).astype(np.float32))
            self.half = tf.Variable(rng.standard_normal(5).astype(np.float16))
            self.steps = tf.Variable(np.array([[1, -2], [3, 1 << 40]], np.int64))
            self.brain = tf.Variable(tf.constant([0.5, -1.25, 3.0], tf.bfloat16))
            self.layers = [tf.Variable(np.array([1.5, 2.5, np.nan])),
                           tf.Variable(np.array([True, False]))]
            self.table = {"a.b": tf.Variable(np.array([7, 8], np.int32)),
                          "c/d": tf.Variable(np.array([1, 2, 255], np.uint8))}
            self.text = tf.Variable([b"alpha", b"", b"gam\x00ma"])
            self.wave = tf.Variable(np.array([1 + 2j, -3j], np.complex64))
            self.scalar = tf.Variable(3.5)
            self.empty = tf.Variable(np.zeros((0, 3), np.float32))

    net = Net()
    ckpt = tf.train.Checkpoint(net=net, step=tf.Variable(1, dtype=tf.int64))
    ckpt.save(str(root / "ckpt"))
    net.kernel.assign(net.kernel * 2.0)
    ckpt.step.assign(2)
    ckpt.save(str(root / "ckpt"))
    return root


@pytest.fixture(scope="module")
def sharded_dir(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Several data shards; ``MaxShardSizePolicy`` also splits variables into slices."""
    policy = getattr(tf.train.experimental, "MaxShardSizePolicy", None)
    if policy is None:
        pytest.skip("this TensorFlow has no MaxShardSizePolicy")
    root = tmp_path_factory.mktemp("sharded")
    variables = {f"v{i}": tf.Variable(np.arange(64, dtype=np.float32) + i) for i in range(4)}
    variables["grid"] = tf.Variable(np.arange(96, dtype=np.int64).reshape(16, 6))
    options = tf.train.CheckpointOptions(
        experimental_sharding_callback=policy(max_shard_size=300))
    tf.train.Checkpoint(**variables).save(str(root / "ckpt"), options=options)
    return root


@pytest.fixture(scope="module")
def tf1_dir(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A name-based TF1 ``Saver`` checkpoint with a partitioned variable and nested names."""
    root = tmp_path_factory.mktemp("tf1")
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.get_variable("dense/kernel", shape=[3, 2],
                                  initializer=tf.compat.v1.ones_initializer())
        tf.compat.v1.get_variable("dense/kernel/Adam", shape=[3, 2],
                                  initializer=tf.compat.v1.zeros_initializer())
        tf.compat.v1.get_variable("part", shape=[10, 4],
                                  initializer=tf.compat.v1.random_normal_initializer(seed=1),
                                  partitioner=tf.compat.v1.fixed_size_partitioner(3))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(root / "model.ckpt"), global_step=7)
    return root


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


def tf_view(tf: Any, prefix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """What TensorFlow's own reader says: name -> (dtype, shape), object graph left out."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    return {name: (dtypes[name].name, tuple(shapes[name])) for name in shapes
            if name != OBJECT_GRAPH}


def assert_same_values(tf: Any, prefix: str, arrays: dict[str, Any]) -> None:
    reader = tf.train.load_checkpoint(prefix)
    assert set(arrays) == set(tf_view(tf, prefix))
    for name, array in arrays.items():
        expected = reader.get_tensor(name)
        expected = np.asarray(expected)
        assert array.shape == expected.shape, name
        if expected.dtype == object:
            assert array.tolist() == expected.tolist(), name
        else:
            assert array.dtype == expected.dtype, name
            assert array.tobytes() == expected.tobytes(), name


# --- reading what TensorFlow wrote -------------------------------------------------------------

def test_names_dtypes_shapes_equal_tensorflow(tf: Any, tf2_dir: Path) -> None:
    raw = tf_checkpoint.read_info(tf2_dir)
    prefix = str(tf2_dir / "ckpt-2")
    assert raw.format == "tf-checkpoint" and raw.separator == "/"
    assert {n: (t.dtype, t.shape) for n, t in raw.tensors} == tf_view(tf, prefix)
    listed = [n for n, _ in tf.train.list_variables(prefix) if n != OBJECT_GRAPH]
    assert [n for n, _ in raw.tensors] == listed
    assert "net/table/a..b/.ATTRIBUTES/VARIABLE_VALUE" in listed  # escaped names kept as stored
    assert raw.details["prefix"] == prefix
    assert raw.details["num_shards"] == 1 and raw.details["version"] == 1
    assert raw.details["has_object_graph"] is True
    assert raw.details["all_checkpoints"][-1] == "ckpt-2"


def test_spans_point_into_the_shard(tf2_dir: Path) -> None:
    raw = tf_checkpoint.read_info(tf2_dir)
    for name, ref in raw.tensors:
        assert ref.span is not None, name
        assert ref.span.path == str(tf2_dir / "ckpt-2.data-00000-of-00001")
        assert ref.span.offset + ref.span.length <= Path(ref.span.path).stat().st_size
        if ref.dtype != "string":
            assert ref.span.length == ref.nbytes, name


def test_tree_paths_join_back_to_the_stored_names(tf2_dir: Path, tf1_dir: Path) -> None:
    for directory in (tf2_dir, tf1_dir):
        raw = tf_checkpoint.read_info(directory)
        from_tree = {join(path, "/"): ref for path, ref in iter_tensors(raw.tree)}
        assert from_tree == dict(raw.tensors)
    tf1 = tf_checkpoint.read_info(tf1_dir)
    assert set(tf1.tree["dense"]) == {"kernel", "kernel/Adam"}


def test_every_way_of_naming_the_checkpoint(tf2_dir: Path) -> None:
    expected = tf_checkpoint.read_info(tf2_dir).tensors
    for path in (tf2_dir / "ckpt-2.index", tf2_dir / "ckpt-2.data-00000-of-00001",
                 tf2_dir / "ckpt-2", tf2_dir / "checkpoint"):
        assert tf_checkpoint.sniff(path), path
        assert tf_checkpoint.read_info(path).tensors == expected
    older = tf_checkpoint.read_info(tf2_dir / "ckpt-1")
    assert older.details["prefix"] == str(tf2_dir / "ckpt-1")


def test_numpy_values_equal_tensorflow(tf: Any, tf2_dir: Path) -> None:
    arrays = tf_checkpoint.load(tf2_dir, "numpy")
    assert_same_values(tf, str(tf2_dir / "ckpt-2"), arrays)
    assert arrays["step/.ATTRIBUTES/VARIABLE_VALUE"] == 2
    assert arrays["net/text/.ATTRIBUTES/VARIABLE_VALUE"].tolist() == [b"alpha", b"", b"gam\x00ma"]


def test_tf_load_returns_a_checkpoint_reader(tf2_dir: Path) -> None:
    reader = tf_checkpoint.load(tf2_dir, "tf")
    assert reader.has_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")
    with pytest.raises(UsageError, match="framework='tf'"):
        tf_checkpoint.load(tf2_dir, "torch")


def test_sharded_and_sliced_checkpoint(tf: Any, sharded_dir: Path) -> None:
    raw = tf_checkpoint.read_info(sharded_dir)
    prefix = str(sharded_dir / "ckpt-1")
    assert raw.details["num_shards"] > 1
    assert {n: (t.dtype, t.shape) for n, t in raw.tensors} == tf_view(tf, prefix)
    assert raw.details.get("partitioned_tensors"), "the policy should have split a variable"
    for name in raw.details["partitioned_tensors"]:
        assert dict(raw.tensors)[name].span is None
    assert_same_values(tf, prefix, tf_checkpoint.load(sharded_dir, "numpy"))


def test_tf1_saver_checkpoint(tf: Any, tf1_dir: Path) -> None:
    raw = tf_checkpoint.read_info(tf1_dir)
    prefix = str(tf1_dir / "model.ckpt-7")
    assert raw.details["prefix"] == prefix and raw.details["has_object_graph"] is False
    assert {n: (t.dtype, t.shape) for n, t in raw.tensors} == tf_view(tf, prefix)
    assert raw.details["partitioned_tensors"] == {"part": 3}
    assert_same_values(tf, prefix, tf_checkpoint.load(tf1_dir, "numpy"))


def test_state_file_with_a_foreign_absolute_path(tf1_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(tf1_dir, tmp_path)
    (moved / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/run/model.ckpt-7"\n')
    assert tf_checkpoint.read_info(moved).details["prefix"] == str(moved / "model.ckpt-7")


def test_state_file_naming_a_missing_prefix(tf2_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(tf2_dir, tmp_path)
    (moved / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    assert tf_checkpoint.sniff(moved)
    with pytest.raises(NotFoundError, match="ckpt-9"):
        tf_checkpoint.read_info(moved)


def test_several_checkpoints_and_no_state_file(tf2_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(tf2_dir, tmp_path)
    (moved / "checkpoint").unlink()
    assert tf_checkpoint.sniff(moved)
    with pytest.raises(UsageError, match="2 checkpoints"):
        tf_checkpoint.read_info(moved)
    for path in moved.glob("ckpt-1.*"):
        path.unlink()
    assert tf_checkpoint.read_info(moved).details["prefix"] == str(moved / "ckpt-2")


def test_detect_picks_tf_checkpoint(tf2_dir: Path) -> None:
    assert detect(tf2_dir) is tf_checkpoint
    assert detect(tf2_dir / "ckpt-2.index") is tf_checkpoint


# --- damage --------------------------------------------------------------------------------------

def test_every_truncation_of_the_index_is_an_integrity_error(tf2_dir: Path,
                                                             tmp_path: Path) -> None:
    moved = copy_of(tf2_dir, tmp_path)
    index = moved / "ckpt-2.index"
    data = index.read_bytes()
    for cut in range(len(data)):
        index.write_bytes(data[:cut])
        assert not tf_checkpoint.sniff(index)
        with pytest.raises(IntegrityError):
            tf_checkpoint.read_info(index)


def test_flipped_index_bytes_never_raise_anything_else(tf2_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(tf2_dir, tmp_path)
    index = moved / "ckpt-2.index"
    data = index.read_bytes()
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x5A
        index.write_bytes(bytes(damaged))
        tf_checkpoint.sniff(index)
        with contextlib.suppress(IntegrityError, FormatError):
            tf_checkpoint.read_info(index)


def test_truncated_or_missing_shard(tf2_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(tf2_dir, tmp_path)
    shard = moved / "ckpt-2.data-00000-of-00001"
    data = shard.read_bytes()
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        shard.write_bytes(data[:cut])
        with pytest.raises(IntegrityError, match=re.escape("ckpt-2.data-00000-of-00001")):
            tf_checkpoint.read_info(moved)
    shard.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        tf_checkpoint.read_info(moved)


def test_corrupt_shard_bytes_fail_the_crc_on_load(tf2_dir: Path, tmp_path: Path) -> None:
    moved = copy_of(tf2_dir, tmp_path)
    raw = tf_checkpoint.read_info(moved)
    kernel = dict(raw.tensors)["net/kernel/.ATTRIBUTES/VARIABLE_VALUE"].span
    shard = Path(kernel.path)
    data = bytearray(shard.read_bytes())
    data[kernel.offset] ^= 0x01
    shard.write_bytes(bytes(data))
    tf_checkpoint.read_info(moved)  # structure is intact; only the values are wrong
    with pytest.raises(IntegrityError, match="CRC-32C"):
        tf_checkpoint.load(moved, "numpy")


# --- no framework needed -------------------------------------------------------------------------

FRAMEWORK_FREE = """
import sys
from pathlib import Path
from ckptkit.formats import detect, tf_checkpoint
path = Path(sys.argv[1])
assert detect(path) is tf_checkpoint
assert tf_checkpoint.sniff(path)
raw = tf_checkpoint.read_info(path)
assert raw.tensors
print(sorted(m for m in sys.modules
             if m.split('.')[0] in ('tensorflow', 'torch', 'jax', 'numpy')))
"""


def test_read_info_imports_no_framework(tf2_dir: Path) -> None:
    result = run_python(FRAMEWORK_FREE, str(tf2_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- sniffing unrelated input --------------------------------------------------------------------

def test_sniff_rejects_other_input(tmp_path: Path) -> None:
    noise = tmp_path / "noise.index"
    noise.write_bytes(random.Random(3).randbytes(4096))
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x.index", b"hello")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "checkpoint").write_text("epoch: 3\n")
    empty_file = tmp_path / "zero.index"
    empty_file.write_bytes(b"")
    for path in (noise, archive, empty_dir, stray, empty_file, tmp_path / "absent"):
        assert tf_checkpoint.sniff(path) is False, path
    with pytest.raises(IntegrityError, match=re.escape("noise.index")):
        tf_checkpoint.read_info(noise)


# --- hand-built hostile tables -------------------------------------------------------------------

def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def block(entries: list[tuple[bytes, bytes]], *, kind: int = 0,
          raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else b"".join(
        varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in entries
    ) + struct.pack("<II", 0, 1)
    crc = crc32c.crc32c(body + bytes([kind]))
    return body + bytes([kind]) + struct.pack("<I", masked(crc))


def table(data_blocks: list[bytes], *, handles: list[tuple[int, int]] | None = None) -> bytes:
    out = bytearray()
    computed = []
    for data in data_blocks:
        computed.append((len(out), len(data) - 5))
        out += data
    index_entries = [(b"k%03d" % i, varint(o) + varint(n))
                     for i, (o, n) in enumerate(handles or computed)]
    meta = (len(out), 8)
    out += block([])
    index = block(index_entries)
    index_handle = (len(out), len(index) - 5)
    out += index
    footer = varint(meta[0]) + varint(meta[1]) + varint(index_handle[0]) + varint(index_handle[1])
    return bytes(out) + footer.ljust(40, b"\0") + struct.pack("<Q", sstable.TABLE_MAGIC)


HEADER = (b"", b"\x08\x01\x1a\x02\x08\x01")  # num_shards=1, version{producer=1}


def float_entry(shape: list[int], offset: int, size: int, crc: int | None = None) -> bytes:
    dims = b"".join(b"\x12" + varint(len(d)) + d for d in (b"\x08" + varint(n) for n in shape))
    proto = b"\x08\x01" + b"\x12" + varint(len(dims)) + dims + b"\x20" + varint(offset) \
        + b"\x28" + varint(size)
    if crc is not None:
        proto += b"\x35" + struct.pack("<I", masked(crc))
    return proto


def write_bundle(tmp_path: Path, index: bytes, data: bytes = b"") -> Path:
    (tmp_path / "h.index").write_bytes(index)
    (tmp_path / "h.data-00000-of-00001").write_bytes(data)
    return tmp_path / "h.index"


def test_hand_built_bundle_reads_without_tensorflow(tmp_path: Path) -> None:
    values = np.array([[1.0, 2.0], [3.0, -4.5]], np.float32).tobytes()
    entry = float_entry([2, 2], 0, 16, crc32c.crc32c(values))
    path = write_bundle(tmp_path, table([block([HEADER, (b"w", entry)])]), values)
    assert tf_checkpoint.sniff(path)
    raw = tf_checkpoint.read_info(path)
    assert [(n, t.dtype, t.shape) for n, t in raw.tensors] == [("w", "float32", (2, 2))]
    assert tf_checkpoint.load(path, "numpy")["w"].tolist() == [[1.0, 2.0], [3.0, -4.5]]


@pytest.mark.parametrize("case, error, match", [
    ("compressed", FormatError, "compression type 1"),
    ("bad_crc", IntegrityError, "CRC-32C"),
    ("handle_past_end", IntegrityError, "runs past the end"),
    ("overlapping_blocks", IntegrityError, "overlaps"),
    ("no_header", IntegrityError, "not the bundle header"),
    ("size_mismatch", IntegrityError, "records 4 bytes"),
    ("shard_out_of_range", IntegrityError, "shard 3 of 1"),
    ("unknown_rank", IntegrityError, "unknown shape"),
    ("shared_too_long", IntegrityError, "shares 9 bytes"),
    ("restart_count", IntegrityError, "restart points"),
    ("key_bomb", IntegrityError, "far more bytes"),
    ("bad_varint", IntegrityError, "varint"),
])
def test_hostile_tables(tmp_path: Path, case: str, error: type, match: str) -> None:
    good = block([HEADER, (b"w", float_entry([1], 0, 4))])
    if case == "compressed":
        index = table([block([HEADER], kind=1)])
    elif case == "bad_crc":
        damaged = bytearray(good)
        damaged[3] ^= 0xFF
        index = table([bytes(damaged)])
    elif case == "handle_past_end":
        index = table([good], handles=[(0, 1 << 30)])
    elif case == "overlapping_blocks":
        index = table([good], handles=[(0, len(good) - 5), (0, len(good) - 5)])
    elif case == "no_header":
        index = table([block([(b"w", float_entry([1], 0, 4))])])
    elif case == "size_mismatch":
        index = table([block([HEADER, (b"w", float_entry([2], 0, 4))])])
    elif case == "shard_out_of_range":
        index = table([block([HEADER, (b"w", float_entry([1], 0, 4) + b"\x18\x03")])])
    elif case == "unknown_rank":
        index = table([block([HEADER, (b"w", b"\x08\x01\x12\x02\x18\x01")])])
    elif case == "shared_too_long":
        body = varint(0) + varint(0) + varint(6) + HEADER[1] + varint(9) + varint(1) \
            + varint(0) + b"x" + struct.pack("<II", 0, 1)
        index = table([block([], raw=body)])
    elif case == "restart_count":
        index = table([block([], raw=struct.pack("<I", 1 << 30))])
    elif case == "key_bomb":
        # Each entry repeats the whole previous key and adds one byte: quadratic key bytes.
        body = bytearray(varint(0) + varint(0) + varint(6) + HEADER[1])
        for length in range(5000):
            body += varint(length) + varint(1) + varint(0) + b"a"
        index = table([block([], raw=bytes(body) + struct.pack("<II", 0, 1))])
    else:
        body = varint(0) + b"\xff" * 11 + struct.pack("<II", 0, 1)
        index = table([block([], raw=body)])
    path = write_bundle(tmp_path, index, b"\0" * 4)
    with pytest.raises(error, match=match):
        tf_checkpoint.read_info(path)


def test_hostile_string_tensor_does_not_allocate_its_claimed_size(tmp_path: Path) -> None:
    # A string tensor claiming 2**40 elements backed by 8 bytes.
    shape = b"\x12\x07\x08" + varint(1 << 40)
    entry = b"\x08\x07\x12" + varint(len(shape)) + shape + b"\x28\x08"
    path = write_bundle(tmp_path, table([block([HEADER, (b"s", entry)])]), b"\1" * 8)
    raw = tf_checkpoint.read_info(path)
    assert dict(raw.tensors)["s"].shape == (1 << 40,)
    with pytest.raises(IntegrityError, match="claims"):
        tf_checkpoint.load(path, "numpy")


# --- the wire-format decoder ---------------------------------------------------------------------

def test_protowire_decodes_every_wire_type() -> None:
    message = (b"\x08\x96\x01" + b"\x11" + struct.pack("<Q", 7) + b"\x1a\x03abc"
               + b"\x25" + struct.pack("<I", 9) + b"\x28" + b"\xff" * 9 + b"\x01")
    fields = [(n, w, v if isinstance(v, int) else bytes(v))
              for n, w, v in protowire.iter_fields(message)]
    assert fields == [(1, 0, 150), (2, 1, 7), (3, 2, b"abc"), (4, 5, 9), (5, 0, (1 << 64) - 1)]
    assert protowire.signed64((1 << 64) - 1) == -1


@pytest.mark.parametrize("message, match", [
    (b"\x08", "truncated varint"),
    (b"\x08" + b"\x80" * 10 + b"\x01", "longer than 10 bytes"),
    (b"\x08" + b"\xff" * 9 + b"\x02", "overflows 64 bits"),
    (b"\x00\x01", "invalid field number 0"),
    (b"\x0b", "unsupported wire type 3"),
    (b"\x0f", "unsupported wire type 7"),
    (b"\x12\x05ab", "declares 5 bytes"),
    (b"\x11\x01\x02", "truncated 64-bit"),
    (b"\x15\x01", "truncated 32-bit"),
])
def test_protowire_refuses_garbage(message: bytes, match: str) -> None:
    with pytest.raises(IntegrityError, match=match):
        list(protowire.iter_fields(message))


def test_crc32c_known_answer() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283
    data = random.Random(5).randbytes(300_001)
    assert crc32c.crc32c_fast(data) == crc32c.crc32c(data)
    assert crc32c.crc32c_fast(data, 77) == crc32c.crc32c(data, 77)


def test_slice_key_matches_tensorflow_encoding() -> None:
    # Keys as TF wrote them for a fixed_size_partitioner split of "part" [10, 4].
    assert tensor_bundle.slice_key(b"part", ((0, 5), (0, 4))) == \
        b"\x00part\x00\x01\x01\x02\x80\x85\x80\x84"
    assert tensor_bundle.slice_key(b"v", ((0, -1),)) == b"\x00v\x00\x01\x01\x01\x80\x7f"
    assert tensor_bundle.slice_key(b"a\x00b\xff", ((100, 1 << 20),))[:9] == \
        b"\x00a\x00\xffb\xff\x00\x00\x01"
