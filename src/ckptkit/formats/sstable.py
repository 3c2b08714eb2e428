"""LevelDB-format tables (sstables), the container format of a tensor bundle's ``.index`` file.

A 48-byte footer (metaindex and index block handles, then the magic ``0xdb4775248b80fb57``)
points at an index block whose values are handles of the data blocks.  Every block ends with a
restart array and a 5-byte trailer (compression byte + masked CRC-32C).  Keys are
prefix-compressed.

TensorFlow writes the index uncompressed, so other compression types are refused.  Every length
and offset is checked against the file size before use: a hostile table cannot make this module
read, allocate or loop beyond what the file itself holds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from ckptkit.errors import FormatError, IntegrityError
from ckptkit.formats import protowire
from ckptkit.formats.crc32c import crc32c, unmask_crc
from ckptkit.storage.location import Location

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
# Prefix compression lets a small block spell very long keys; real indexes stay far below this.
_KEY_BYTES_PER_FILE_BYTE = 64


class Table:
    """The bytes of one ``.index`` file and the checks every read of them goes through."""

    def __init__(self, path: Path | Location, data: bytes):
        # ``path`` only names the file in messages: the caller read ``data`` through it.
        self.path = path
        self.data = data
        self.size = len(data)
        self.key_budget = max(_KEY_BYTES_PER_FILE_BYTE * self.size, 1 << 20)

    def fail(self, message: str) -> IntegrityError:
        return IntegrityError(f"{self.path}: {message}",
                              hint="The index is truncated or corrupt; re-save or re-download "
                                   "the checkpoint", path=str(self.path))

    def footer(self) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.size < FOOTER_SIZE:
            raise self.fail(f"{self.size} bytes is shorter than a table footer "
                            f"({FOOTER_SIZE} bytes)")
        footer = memoryview(self.data)[self.size - FOOTER_SIZE:]
        if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
            raise self.fail("no table magic at the end of the file (truncated, or not a "
                            "TensorFlow checkpoint index)")
        meta, pos = read_handle(footer, 0, 40)
        index, _ = read_handle(footer, pos, 40)
        return meta, index

    def block(self, handle: tuple[int, int], what: str) -> memoryview:
        """The contents of the block at ``handle`` (trailer checked and stripped)."""
        offset, length = handle
        limit = self.size - FOOTER_SIZE
        if offset > limit or length + BLOCK_TRAILER_SIZE > limit - offset:
            raise self.fail(f"{what} at offset {offset} ({length} bytes) runs past the end of "
                            f"the file ({self.size} bytes)")
        view = memoryview(self.data)
        kind = view[offset + length]
        stored = struct.unpack_from("<I", view, offset + length + 1)[0]
        if crc32c(view[offset:offset + length + 1]) != unmask_crc(stored):
            raise self.fail(f"{what} at offset {offset} fails its CRC-32C check")
        if kind != 0:
            raise FormatError(
                f"{self.path}: {what} uses compression type {kind}; TensorFlow writes bundle "
                "indexes uncompressed", hint="Re-save the checkpoint with TensorFlow",
                path=str(self.path))
        return view[offset:offset + length]

    def entries(self, block: memoryview, what: str) -> Iterator[tuple[bytes, memoryview]]:
        """Yield ``(key, value)`` for each entry of a block, undoing prefix compression."""
        if len(block) < 4:
            raise self.fail(f"{what} is {len(block)} bytes, too short for its restart count")
        restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
        if restarts > (len(block) - 4) // 4:
            raise self.fail(f"{what} claims {restarts} restart points in {len(block)} bytes")
        end = len(block) - 4 - 4 * restarts
        key = b""
        pos = 0
        while pos < end:
            shared, pos = protowire.read_varint(block, pos, end)
            unshared, pos = protowire.read_varint(block, pos, end)
            value_len, pos = protowire.read_varint(block, pos, end)
            if shared > len(key):
                raise self.fail(f"{what}: entry at byte {pos} shares {shared} bytes with a "
                                f"{len(key)}-byte key")
            if unshared + value_len > end - pos:
                raise self.fail(f"{what}: entry at byte {pos} runs past the block end")
            key = key[:shared] + bytes(block[pos:pos + unshared])
            pos += unshared
            self.key_budget -= len(key)
            if self.key_budget < 0:
                raise self.fail(f"{what}: keys expand to far more bytes than the file holds")
            yield key, block[pos:pos + value_len]
            pos += value_len

    def items(self) -> Iterator[tuple[bytes, memoryview]]:
        """Every ``(key, value)`` of the table in order; keys must strictly increase."""
        _meta, index_handle = self.footer()
        index = self.block(index_handle, "index block")
        next_free = 0
        previous: bytes | None = None
        for _sep, value in self.entries(index, "index block"):
            handle, _ = read_handle(value, 0, len(value))
            if handle[0] < next_free:
                raise self.fail(f"data block at offset {handle[0]} overlaps the previous block")
            next_free = handle[0] + handle[1] + BLOCK_TRAILER_SIZE
            block = self.block(handle, "data block")
            for key, item in self.entries(block, f"data block at offset {handle[0]}"):
                if previous is not None and key <= previous:
                    raise self.fail(f"key {_show(key)} is out of order or duplicated")
                previous = key
                yield key, item


def read_handle(buf: memoryview | bytes, pos: int, end: int) -> tuple[tuple[int, int], int]:
    offset, pos = protowire.read_varint(buf, pos, end)
    length, pos = protowire.read_varint(buf, pos, end)
    return (offset, length), pos


def _show(key: bytes) -> str:
    return repr(key.decode("utf-8", "backslashreplace"))

