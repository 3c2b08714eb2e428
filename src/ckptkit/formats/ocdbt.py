"""OCDBT databases (TensorStore's Optionally-Cooperative Distributed B+Tree), read as a key list.

Orbax writes each checkpoint item as one OCDBT database by default: ``manifest.ocdbt`` names
the latest B+tree root; the tree's nodes and the out-of-line values live in data files
(``d/<hex>``, and ``ocdbt.process_<i>/d/<hex>`` for per-process trees merged into the root).
Each zarr array is a handful of keys: ``<param>/.zarray`` (or ``zarr.json``) and its chunks.

This module decodes the manifest and walks the latest version's B+tree, giving every key with
its value inline (small values: zarr metadata, small chunks) or as a :class:`ValueRef` (data
file, offset, length).  It reads only tree nodes, never chunk data, and needs neither
TensorStore nor JAX.  Each record's CRC-32C is checked; nodes are zstd-compressed
(:mod:`ckptkit.formats.zstd`).  The format is described in TensorStore's documentation
(``kvstore/ocdbt``), which this follows field by field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ckptkit.errors import CkptkitError, IntegrityError
from ckptkit.formats.crc32c import crc32c_fast
from ckptkit.formats.zstd import decompress
from ckptkit.storage import budget
from ckptkit.storage.location import Location

MANIFEST = "manifest.ocdbt"
_MANIFEST_MAGIC = 0x0CDB3A2A
_VERSION_MAGIC = 0x0CDB1234
_BTREE_MAGIC = 0x0CDB20DE
#: Deepest B+tree a database may have (a tree of 2**60 keys is far shallower).
_MAX_HEIGHT = 32
#: Largest decoded node accepted when the manifest gives no smaller limit.
_MAX_NODE = 64 << 20


@dataclass(frozen=True)
class ValueRef:
    """An out-of-line value: ``length`` bytes at ``offset`` in the data file ``file`` (a path
    relative to the database root)."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Database:
    """The latest version of an OCDBT database: every key and where its value is.

    ``nodes`` lists the node records read, as ValueRefs, so a verifier can name them;
    ``generation`` is the version's generation number.
    """

    entries: dict[bytes, bytes | ValueRef]
    nodes: tuple[ValueRef, ...] = ()
    generation: int = 0
    config: dict[str, int] = field(default_factory=dict)


class _Reader:
    """A cursor over one decoded record."""

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def bad(self, why: str) -> IntegrityError:
        return IntegrityError(f"{self.what}: {why}", hint="The OCDBT database is corrupt or "
                              "truncated; re-save the checkpoint or restore it from a copy")

    def varint(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data):
                raise self.bad("record ends inside a number")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise self.bad("number longer than 64 bits")

    def varints(self, count: int) -> list[int]:
        return [self.varint() for _ in range(count)]

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.bad("record ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.bad(f"record ends early ({n} bytes wanted, {len(self.data) - self.pos} left)")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def count(self, what: str) -> int:
        n = self.varint()
        # Every counted item takes at least one byte, so a count past the bytes left is a lie.
        if n > len(self.data) - self.pos + 1:
            raise self.bad(f"{n:,} {what} cannot fit in the record")
        return n


def _record(raw: bytes, magic: int, what: str, limit: int) -> _Reader:
    """Check the outer header and CRC of a manifest or node, and decode its body."""
    if len(raw) < 18:
        raise IntegrityError(f"{what}: {len(raw)} bytes is too short for an OCDBT record",
                             hint="The file is truncated or corrupt")
    (found,) = struct.unpack_from(">I", raw, 0)
    (length,) = struct.unpack_from("<Q", raw, 4)
    if found != magic:
        raise IntegrityError(f"{what}: not an OCDBT record (magic {found:#010x})",
                             hint="The file is corrupt, or not written by TensorStore")
    if length != len(raw):
        raise IntegrityError(f"{what}: record says {length:,} bytes, {len(raw):,} found",
                             hint="The file is truncated or corrupt")
    (crc,) = struct.unpack_from("<I", raw, len(raw) - 4)
    if crc32c_fast(memoryview(raw)[:-4]) != crc:
        raise IntegrityError(f"{what}: CRC-32C mismatch", hint="The file is corrupt")
    head = _Reader(raw, what)
    head.pos = 12
    if head.varint() != 0:
        raise head.bad("unknown record version")
    method = head.varint()
    body = raw[head.pos:-4]
    if method == 1:
        budget.current().charge("decompressed", len(body), what)
        body = decompress(body, limit)
        budget.current().charge("decompressed", len(body), what)
    elif method != 0:
        raise head.bad(f"unknown compression {method}")
    return _Reader(body, what)


def _file_table(r: _Reader, transitive: str) -> list[tuple[str, str]]:
    """The data file table: (full path, transitive path for children) per file id."""
    count = r.count("data files")
    prefix = r.varints(max(0, count - 1))
    suffix = r.varints(count)
    base = r.varints(count)
    files: list[tuple[str, str]] = []
    previous = b""
    for i in range(count):
        keep = prefix[i - 1] if i else 0
        path = previous[:keep] + r.take(suffix[i])
        if base[i] > len(path):
            raise r.bad("data file base path longer than its path")
        text = path.decode("utf-8", "replace")
        files.append((transitive + text, transitive + path[:base[i]].decode("utf-8", "replace")))
        previous = path
    return files


def _pick(files: list[tuple[str, str]], index: int, r: _Reader) -> tuple[str, str]:
    if index >= len(files):
        raise r.bad(f"data file #{index} is not in its table of {len(files)}")
    return files[index]


class DataFileError(IntegrityError):
    """A data file is missing (``kind`` ``missing-file``) or shorter than a record in it needs
    (``truncated``)."""

    def __init__(self, message: str, *, kind: str, path: str, hint: str):
        super().__init__(message, hint=hint, path=path)
        self.kind = kind


def read_database(root: Location, problems: list[IntegrityError] | None = None) -> Database:
    """Every key of the latest version of the OCDBT database at ``root``.

    With ``problems`` (a list), a B+tree node that cannot be read is appended there and its
    subtree left out, so a verifier sees every broken node; without it the first one raises.

    Raises:
        IntegrityError: no ``manifest.ocdbt`` (:class:`DataFileError`), or a record is missing, truncated, fails its CRC or does not decode; the
            message names the file.
    """
    manifest = root.child(MANIFEST)
    if not manifest.is_file():
        raise DataFileError(f"{manifest}: missing", kind="missing-file", path=str(manifest),
                            hint="An OCDBT database needs its manifest.ocdbt; the checkpoint "
                                 "is incomplete")
    size = manifest.size()
    budget.current().check("header", size, "manifest.ocdbt")
    r = _record(manifest.read(0, size), _MANIFEST_MAGIC, str(manifest), _MAX_NODE)
    uuid = r.take(16)
    if r.varint() != 0:
        # Numbered manifests keep versions in manifest.<n> files; TensorStore writes them only
        # when asked to, and Orbax never does.
        raise r.bad("numbered manifests (manifest_kind 1) are not read by ckptkit")
    max_inline = r.varint()
    max_node = r.varint()
    arity = r.byte()
    compression = r.varint()
    if compression:
        r.take(4)  # zstd level: how to write, not how to read
    config = {"max_inline_value_bytes": max_inline, "max_decoded_node_bytes": max_node,
              "version_tree_arity_log2": arity, "compression": compression}
    del uuid
    limit = min(max_node or _MAX_NODE, _MAX_NODE)
    files = _file_table(r, "")
    versions = r.count("versions")
    generations = r.varints(versions)
    heights = [r.byte() for _ in range(versions)]
    ids, offsets, lengths = r.varints(versions), r.varints(versions), r.varints(versions)
    r.varints(3 * versions)  # statistics: keys, tree bytes, indirect bytes
    if not versions:
        return Database({}, (), 0, config)
    latest = versions - 1
    entries: dict[bytes, bytes | ValueRef] = {}
    nodes: list[ValueRef] = []
    if lengths[latest]:
        path, transitive = _pick(files, ids[latest], r)
        _walk(root, ValueRef(path, offsets[latest], lengths[latest]), transitive,
              heights[latest], b"", limit, entries, nodes, problems)
    return Database(entries, tuple(nodes), generations[latest], config)


def read_value(root: Location, ref: ValueRef) -> bytes:
    """The bytes of an out-of-line value (or a node record).

    Raises:
        IntegrityError: the data file is missing or too short (its name is in the message).
    """
    check_extent(root, ref.file, ref.offset + ref.length)
    return root.child(ref.file).read(ref.offset, ref.length)


def check_extent(root: Location, file: str, end: int) -> None:
    """Raise :class:`DataFileError` unless data file ``file`` exists and holds ``end`` bytes."""
    where = root.child(file)
    hint = "The checkpoint is incomplete; re-save it or restore the file from a copy"
    try:
        size = where.size()
    except CkptkitError:
        raise DataFileError(f"{where}: data file is missing", kind="missing-file",
                            path=str(where), hint=hint) from None
    if end > size:
        raise DataFileError(f"{where}: records in it reach byte {end:,} but the file has "
                            f"{size:,} (truncated)", kind="truncated", path=str(where),
                            hint=hint)


def _walk(root: Location, ref: ValueRef, transitive: str, height: int, prefix: bytes,
          limit: int, entries: dict[bytes, bytes | ValueRef], nodes: list[ValueRef],
          problems: list[IntegrityError] | None) -> None:
    """Read the node at ``ref`` and its subtree into ``entries``."""
    if problems is None:
        _node(root, ref, transitive, height, prefix, limit, entries, nodes, problems)
        return
    try:
        _node(root, ref, transitive, height, prefix, limit, entries, nodes, problems)
    except IntegrityError as exc:
        problems.append(exc)


def _node(root: Location, ref: ValueRef, transitive: str, height: int, prefix: bytes,
          limit: int, entries: dict[bytes, bytes | ValueRef], nodes: list[ValueRef],
          problems: list[IntegrityError] | None) -> None:
    if height > _MAX_HEIGHT:
        raise IntegrityError(f"{root}: OCDBT tree deeper than {_MAX_HEIGHT} levels")
    nodes.append(ref)
    budget.current().charge("nodes", 1, "OCDBT nodes")
    what = f"{root.child(ref.file)} (B+tree node at {ref.offset:,})"
    r = _record(read_value(root, ref), _BTREE_MAGIC, what, limit)
    if r.byte() != height:
        raise r.bad(f"node height differs from the {height} its parent gives")
    files = _file_table(r, transitive)
    count = r.count("entries")
    budget.current().charge("nodes", count, "OCDBT entries")
    keep = r.varints(max(0, count - 1))
    suffix = r.varints(count)
    common = r.varints(count) if height else []
    keys: list[bytes] = []
    previous = b""
    for i in range(count):
        kept = keep[i - 1] if i else 0
        if kept > len(previous):
            raise r.bad("key shares more bytes than the previous key has")
        previous = previous[:kept] + r.take(suffix[i])
        keys.append(previous)
    if height:
        ids, offsets, lengths = r.varints(count), r.varints(count), r.varints(count)
        r.varints(3 * count)  # statistics
        for i in range(count):
            path, below = _pick(files, ids[i], r)
            if common[i] > len(keys[i]):
                raise r.bad("subtree prefix longer than its key")
            _walk(root, ValueRef(path, offsets[i], lengths[i]), below, height - 1,
                  prefix + keys[i][:common[i]], limit, entries, nodes, problems)
        return
    lengths = r.varints(count)
    kinds = r.varints(count)
    indirect = [i for i in range(count) if kinds[i] == 1]
    if any(k not in (0, 1) for k in kinds):
        raise r.bad("unknown value kind")
    ids = r.varints(len(indirect))
    offsets = r.varints(len(indirect))
    for i, file_id, offset in zip(indirect, ids, offsets, strict=True):
        path, _below = _pick(files, file_id, r)
        entries[prefix + keys[i]] = ValueRef(path, offset, lengths[i])
    for i in range(count):
        if kinds[i] == 0:
            entries[prefix + keys[i]] = r.take(lengths[i])
