"""TensorFlow tensor bundles (``<prefix>.index`` + ``<prefix>.data-NNNNN-of-MMMMM``), read by hand.

The index is a LevelDB-format table (:mod:`ckptkit.formats.sstable`).  The key ``""`` holds a
``BundleHeaderProto`` and each other key names a tensor and holds a ``BundleEntryProto`` saying
where its bytes live.  Only the index is decoded here, so describing a checkpoint never opens
its data shards or imports numpy; :mod:`ckptkit.formats.bundle_arrays` reads the tensors.

Every offset, size and count taken from the index is checked before use: a hostile index cannot
make this module read, allocate or loop beyond what the file itself holds.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkit.errors import CkptkitError, FormatError, IntegrityError, NotFoundError
from ckptkit.storage.location import Location, locate
from ckptkit.formats import protowire, sstable
from ckptkit.formats.crc32c import unmask_crc
from ckptkit.model import checked_shape, itemsize
# The bundle model lives in bundle_model; readers use it through this module.
from ckptkit.formats.bundle_model import (DTYPES, HEADER_KEY, OBJECT_GRAPH_KEY, BundleEntry,
                                          BundleHeader, BundleIndex, Extents, dtype_name,
                                          index_path, shard_path)

__all__ = ["DTYPES", "HEADER_KEY", "OBJECT_GRAPH_KEY", "BundleEntry", "BundleHeader",
           "BundleIndex", "Extents", "check_shards", "decode_entry", "decode_header",
           "dtype_name", "index_path", "looks_like_bundle", "nest", "read_index", "shard_path",
           "slice_key"]

#: First bytes of a block a sniff reads.
_SNIFF_READ = 4096


# --- the protos ----------------------------------------------------------------------------------

def decode_header(value: memoryview) -> BundleHeader:
    """Decode a ``BundleHeaderProto`` (num_shards=1, endianness=2, version=3)."""
    grouped = protowire.fields(value)
    num_shards = protowire.as_int(protowire.last(grouped, 1) or 0, "bundle header num_shards")
    endian = protowire.as_int(protowire.last(grouped, 2) or 0, "bundle header endianness")
    version = min_consumer = 0
    raw_version = protowire.last(grouped, 3)
    if raw_version is not None:
        vgroup = protowire.fields(protowire.as_bytes(raw_version, "bundle header version"))
        version = protowire.as_int(protowire.last(vgroup, 1) or 0, "version producer")
        min_consumer = protowire.as_int(protowire.last(vgroup, 2) or 0, "version min_consumer")
    if endian not in (0, 1):
        raise IntegrityError(f"unknown endianness {endian} in the bundle header")
    return BundleHeader(num_shards, "big" if endian == 1 else "little",
                        protowire.signed64(version), protowire.signed64(min_consumer))


def decode_shape(value: memoryview, what: str) -> tuple[int, ...] | None:
    """Decode a ``TensorShapeProto`` (dim=2 {size=1}, unknown_rank=3); ``None`` if rank unknown.

    Unknown dimensions come back as ``-1``.
    """
    dims: list[int] = []
    unknown_rank = False
    for number, _wire, field_value in protowire.iter_fields(value):
        if number == 2:
            dim = protowire.fields(protowire.as_bytes(field_value, f"{what} dim"))
            size = protowire.as_int(protowire.last(dim, 1) or 0, f"{what} dim size")
            dims.append(protowire.signed64(size))
        elif number == 3:
            unknown_rank = bool(protowire.as_int(field_value, f"{what} unknown_rank"))
    return None if unknown_rank else tuple(dims)


def decode_slice(value: memoryview, what: str) -> Extents:
    """Decode a ``TensorSliceProto`` (extent=1 repeated {start=1, length=2}); an extent without
    a length spans its whole dimension and is returned with length ``-1``."""
    extents = []
    for number, _wire, field_value in protowire.iter_fields(value):
        if number != 1:
            continue
        extent = protowire.fields(protowire.as_bytes(field_value, f"{what} extent"))
        start = protowire.signed64(protowire.as_int(protowire.last(extent, 1) or 0,
                                                    f"{what} start"))
        raw_length = protowire.last(extent, 2)
        length = -1 if raw_length is None else protowire.signed64(
            protowire.as_int(raw_length, f"{what} length"))
        extents.append((start, length))
    return tuple(extents)


# TF keys each part of a partitioned tensor with OrderedCode (strings/ordered_code.h): the
# number 0, the escaped name, the rank, then start and length of every extent.  Encoding the
# expected key and looking it up is simpler and stricter than decoding every binary key.

_ORDERED_ESCAPE = re.compile(rb"[\x00\xff]")
_ORDERED_ESCAPES = {b"\x00": b"\x00\xff", b"\xff": b"\xff\x00"}


def _ordered_unsigned(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(body)]) + body


def _ordered_signed(value: int) -> bytes:
    magnitude = ~value if value < 0 else value
    length = magnitude.bit_length() // 7 + 1
    bits = 8 * length
    header = ((1 << length) - 1) << (bits - length)
    return ((value % (1 << bits)) ^ header).to_bytes(length, "big")


def slice_key(name: bytes, extents: Extents) -> bytes:
    """The table key TF stores part ``extents`` of tensor ``name`` under."""
    escaped = _ORDERED_ESCAPE.sub(lambda m: _ORDERED_ESCAPES[m.group()], name)
    key = _ordered_unsigned(0) + escaped + b"\x00\x01" + _ordered_unsigned(len(extents))
    for start, length in extents:
        key += _ordered_signed(start) + _ordered_signed(length)
    return key


def _resolve_parts(entry: BundleEntry, raw_name: bytes,
                   slice_entries: dict[bytes, BundleEntry]
                   ) -> tuple[tuple[Extents, BundleEntry], ...]:
    """Find and check every part of a partitioned tensor: bounds, shape, dtype, coverage."""
    parts = []
    covered = 0
    for extents in entry.slices:
        label = ", ".join("*" if n < 0 else f"{s}:{s + n}" for s, n in extents)
        what = f"part [{label}] of tensor {entry.name!r}"
        if len(extents) != len(entry.shape):
            raise IntegrityError(f"{what} has rank {len(extents)}, not {len(entry.shape)}")
        shape = []
        for (start, length), dim in zip(extents, entry.shape, strict=True):
            if length == -1 and start == 0:
                length = dim
            if start < 0 or length < 0 or start + length > dim:
                raise IntegrityError(f"{what} lies outside the shape {list(entry.shape)}")
            shape.append(length)
        part = slice_entries.get(slice_key(raw_name, extents))
        if part is None:
            raise IntegrityError(f"{what} has no entry in the index")
        if part.dtype != entry.dtype or part.shape != tuple(shape):
            raise IntegrityError(f"{what} is {part.dtype}{list(part.shape)}, expected "
                                 f"{entry.dtype}{shape}")
        covered += math.prod(shape)
        parts.append((extents, BundleEntry(f"{entry.name}[{label}]", part.dtype, part.shape,
                                           part.shard_id, part.offset, part.size, part.crc32c)))
    if covered != math.prod(entry.shape):
        raise IntegrityError(f"the parts of tensor {entry.name!r} cover {covered} of its "
                             f"{math.prod(entry.shape)} elements")
    return tuple(parts)


def decode_entry(name: str, value: memoryview) -> BundleEntry:
    """Decode a ``BundleEntryProto`` (dtype=1, shape=2, shard_id=3, offset=4, size=5,
    crc32c=6, slices=7) and check that its numbers are self-consistent."""
    what = f"entry {name!r}"
    grouped = protowire.fields(value)
    dtype = dtype_name(protowire.as_int(protowire.last(grouped, 1) or 0, f"{what} dtype"))
    raw_shape = protowire.last(grouped, 2)
    shape: tuple[int, ...] | None = ()
    if raw_shape is not None:
        shape = decode_shape(protowire.as_bytes(raw_shape, f"{what} shape"), f"{what} shape")
    if shape is None or any(d < 0 for d in shape):
        raise IntegrityError(f"{what} has an unknown shape, which a saved tensor cannot have")
    shape = checked_shape(shape, what, dtype)
    shard_id = protowire.as_int(protowire.last(grouped, 3) or 0, f"{what} shard_id")
    offset = protowire.signed64(protowire.as_int(protowire.last(grouped, 4) or 0,
                                                 f"{what} offset"))
    size = protowire.signed64(protowire.as_int(protowire.last(grouped, 5) or 0, f"{what} size"))
    raw_crc = protowire.last(grouped, 6)
    crc = None if raw_crc is None else unmask_crc(protowire.as_int(raw_crc, f"{what} crc32c"))
    slices = tuple(decode_slice(protowire.as_bytes(v, f"{what} slice"), f"{what} slice")
                   for v in grouped.get(7, ()))
    if offset < 0 or size < 0:
        raise IntegrityError(f"{what} has a negative offset ({offset}) or size ({size})")
    width = itemsize(dtype)
    if width and not slices and size != math.prod(shape) * width:
        raise IntegrityError(f"{what} is {dtype}{list(shape)} ({math.prod(shape) * width:g} "
                             f"bytes) but records {size} bytes")
    return BundleEntry(name, dtype, shape, protowire.signed64(shard_id), offset, size,
                       crc, slices)


# --- reading -------------------------------------------------------------------------------------

def read_index(prefix: str, path: Path | Location | None = None) -> BundleIndex:
    """Decode a bundle index: its header and every entry, without opening the data shards.

    The index is ``path`` if given, else ``<prefix>.index``; shards are ``<prefix>.data-*``.

    Raises:
        NotFoundError: the index file does not exist.
        IntegrityError: the table or a proto in it is truncated or inconsistent.
        FormatError: the table uses a compression TensorFlow never writes.
    """
    path = index_path(prefix) if path is None else locate(path)
    try:
        data = path.read(0, path.size())
    except (FileNotFoundError, NotFoundError):
        raise NotFoundError(f"{path}: checkpoint index not found",
                            hint="Pass the checkpoint prefix (e.g. 'ckpt-3') or its .index file",
                            path=str(path)) from None
    except OSError as exc:
        raise NotFoundError(f"{path}: cannot read the checkpoint index ({exc.strerror})",
                            path=str(path)) from None
    table = sstable.Table(path, data)
    header: BundleHeader | None = None
    entries: list[BundleEntry] = []
    slice_entries: dict[bytes, BundleEntry] = {}
    parts: dict[str, tuple[tuple[Extents, BundleEntry], ...]] = {}
    try:
        for key, value in table.items():
            if header is None:
                if key != HEADER_KEY:
                    raise table.fail("first key is not the bundle header; not a TensorFlow "
                                     "tensor bundle")
                header = decode_header(value)
                continue
            name = key.decode("utf-8", "backslashreplace")
            if key[:1] == b"\x00":
                # A part of a partitioned tensor.  Its binary key sorts before every name, so
                # all parts are known by the time their tensor's entry arrives.
                slice_entries[key] = decode_entry(name, value)
                continue
            entry = decode_entry(name, value)
            if entry.slices:
                parts[name] = _resolve_parts(entry, key, slice_entries)
            entries.append(entry)
    except IntegrityError as exc:
        if exc.path:
            raise
        raise table.fail(exc.message) from None
    except FormatError:
        raise
    except (struct.error, IndexError, ValueError) as exc:
        raise table.fail(f"malformed table ({exc})") from None
    if header is None:
        raise table.fail("the table is empty; it holds no bundle header")
    if header.num_shards < 1 and entries:
        raise table.fail(f"the header declares {header.num_shards} data shards")
    for entry in entries:
        if not entry.slices and not 0 <= entry.shard_id < header.num_shards:
            raise table.fail(f"tensor {entry.name!r} is in shard {entry.shard_id} of "
                             f"{header.num_shards}")
    for part_list in parts.values():
        for _extents, part in part_list:
            if not 0 <= part.shard_id < header.num_shards:
                raise table.fail(f"{part.name} is in shard {part.shard_id} of "
                                 f"{header.num_shards}")
    return BundleIndex(path, prefix, header, tuple(entries), parts)


def looks_like_bundle(path: Path | Location) -> bool:
    """Cheap content check for sniffing: table magic, then a first key ``""`` holding a
    plausible bundle header.  Reads only the footer and the start of two blocks (for an index
    under 64 KiB, all three lie inside the location's first, coalesced read)."""
    try:
        path = locate(path)
        if not path.is_file():
            return False
        size = path.size()
        if size < sstable.FOOTER_SIZE:
            return False
        footer = path.read(size - sstable.FOOTER_SIZE, sstable.FOOTER_SIZE)
        if struct.unpack_from("<Q", footer, 40)[0] != sstable.TABLE_MAGIC:
            return False
        _meta, pos = sstable.read_handle(footer, 0, 40)
        (index_offset, index_len), _ = sstable.read_handle(footer, pos, 40)
        if index_offset + index_len + sstable.BLOCK_TRAILER_SIZE > size - sstable.FOOTER_SIZE:
            return False
        head = path.read(index_offset, min(index_len, _SNIFF_READ))
        shared, p = protowire.read_varint(head, 0)
        unshared, p = protowire.read_varint(head, p)
        value_len, p = protowire.read_varint(head, p)
        if shared != 0 or p + unshared + value_len > len(head):
            return False
        (data_offset, data_len), _ = sstable.read_handle(head, p + unshared,
                                                         p + unshared + value_len)
        if data_offset + data_len > size:
            return False
        first = path.read(data_offset, min(data_len, _SNIFF_READ))
        shared, p = protowire.read_varint(first, 0)
        unshared, p = protowire.read_varint(first, p)
        value_len, p = protowire.read_varint(first, p)
        if shared != 0 or unshared != 0 or p + value_len > len(first):
            return False
        decode_header(memoryview(first)[p:p + value_len])
        return True
    except (OSError, CkptkitError, struct.error, ValueError):
        return False


def check_shards(index: BundleIndex) -> None:
    """Every data shard an entry points into exists and is long enough for it.

    Raises:
        IntegrityError: naming the shard, the tensor and the bytes missing.
    """
    needed: dict[int, BundleEntry] = {}
    for entry in index.stored_entries():
        known = needed.get(entry.shard_id)
        if known is None or entry.offset + entry.size > known.offset + known.size:
            needed[entry.shard_id] = entry
    for shard_id, entry in sorted(needed.items()):
        shard = index.shard_path(shard_id)
        try:
            size = locate(shard).size()
        except (OSError, NotFoundError):
            raise IntegrityError(
                f"{shard}: data shard {shard_id} of {index.header.num_shards} is missing "
                f"(tensor {entry.name!r} lives there)",
                hint="Copy every <prefix>.data-* file next to the .index file",
                path=shard) from None
        end = entry.offset + entry.size
        if size < end:
            raise IntegrityError(
                f"{shard}: data shard is {size} bytes but tensor {entry.name!r} needs bytes "
                f"{entry.offset}..{end}",
                hint="The shard is truncated; re-save or re-download the checkpoint", path=shard)


def nest(items: Iterable[tuple[str, Any]], separator: str = "/") -> dict[str, Any]:
    """Nested dicts from ``separator``-joined names, so joining a leaf's path gives its name.

    A name that is also the parent of other names (TF1's ``dense/kernel`` and
    ``dense/kernel/Adam``) stays a leaf; its would-be children keep the rest of their name as
    one key (``"kernel/Adam"``) beside it.
    """
    pairs = list(items)
    leaves = {name for name, _ in pairs}
    root: dict[str, Any] = {}
    for name, leaf in pairs:
        parts = name.split(separator)
        node = root
        depth = 0
        while depth < len(parts) - 1:
            if separator.join(parts[:depth + 1]) in leaves:
                break
            child = node.setdefault(parts[depth], {})
            node = child
            depth += 1
        node[separator.join(parts[depth:])] = leaf
    return root
