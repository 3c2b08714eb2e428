"""OCDBT databases written by TensorStore, read key by key without it: many versions, a
B+tree several levels deep, inline and out-of-line values; damage is named by file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptkit.errors import IntegrityError
from ckptkit.formats.ocdbt import DataFileError, ValueRef, read_database, read_value
from ckptkit.storage.location import locate

ts = pytest.importorskip("tensorstore")


def _write(root: Path) -> dict[bytes, bytes]:
    """500 keys in nodes of at most 300 bytes (a deep tree), rewritten over many commits."""
    spec = {"driver": "ocdbt", "base": f"file://{root}",
            "config": {"max_decoded_node_bytes": 300, "max_inline_value_bytes": 16}}
    store = ts.KvStore.open(spec).result()
    expected = {}
    for i in range(500):
        expected[b"array.%03d/%d" % (i // 10, i % 10)] = bytes([i % 251]) * (i % 40)
        store[b"array.%03d/%d" % (i // 10, i % 10)] = bytes([i % 251]) * (i % 40)
    again = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{root}"}).result()
    for i in range(0, 500, 7):
        key = b"array.%03d/%d" % (i // 10, i % 10)
        expected[key] = b"rewritten %d" % i
        again[key] = expected[key]
    return expected


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, bytes]]:
    root = tmp_path_factory.mktemp("ocdbt")
    return root, _write(root)


def test_every_key_and_value_as_tensorstore_wrote_them(database) -> None:
    root, expected = database
    db = read_database(locate(root))
    assert set(db.entries) == set(expected)
    values = {k: read_value(locate(root), v) if isinstance(v, ValueRef) else v
              for k, v in db.entries.items()}
    assert values == expected
    assert sum(isinstance(v, ValueRef) for v in db.entries.values()) > 100
    assert len(db.nodes) > 20 and db.generation > 500  # several levels, many versions


def test_a_flipped_byte_fails_the_crc(database, tmp_path: Path) -> None:
    root, _ = database
    manifest = (root / "manifest.ocdbt").read_bytes()
    copy = tmp_path / "db"
    copy.mkdir()
    for item in root.iterdir():
        if item.is_dir():
            (copy / item.name).symlink_to(item)
    (copy / "manifest.ocdbt").write_bytes(manifest[:30] + bytes([manifest[30] ^ 1])
                                          + manifest[31:])
    with pytest.raises(IntegrityError, match="CRC-32C mismatch"):
        read_database(locate(copy))


def test_lost_nodes_are_collected_when_asked(database, tmp_path: Path) -> None:
    root, _ = database
    copy = tmp_path / "db"
    (copy / "d").mkdir(parents=True)
    (copy / "manifest.ocdbt").write_bytes((root / "manifest.ocdbt").read_bytes())
    db = read_database(locate(root))
    root_file = db.nodes[0].file
    (copy / root_file).write_bytes((root / root_file).read_bytes())  # only the root's file
    with pytest.raises(DataFileError) as exc:
        read_database(locate(copy))
    assert exc.value.kind == "missing-file"
    problems: list[IntegrityError] = []
    partial = read_database(locate(copy), problems)
    assert problems and all(isinstance(p, DataFileError) for p in problems)
    assert len(partial.entries) < 500
