"""Flax msgpack output, the ``flax.serialization.msgpack_serialize`` layout, streamed.

A Flax file is one msgpack map, nested by name (``a/b/kernel`` -> ``{"a": {"b": {"kernel":
...}}}``); each array is ext type 1 holding ``(shape, dtype name, C-order bytes)``, and arrays
over 1 GiB are split into ``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}``
exactly as flax splits them.  Msgpack maps state their size up front, so the tree of names
must be known before the first byte; the array bytes need not be.  With a layout whose order
is the tree's depth-first order (a flat state dict's usually is), arrays are written as they
arrive; otherwise they are spooled to an anonymous temporary file and copied into place at the
end (bounded memory either way).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import msgpack
import numpy as np

from ckptkit.formats.streams import Spool, raw_bytes
from ckptkit.errors import UsageError
from ckptkit.formats.tensor_io import numpy_dtype

EXT_NDARRAY = 1
MAX_CHUNK_SIZE = 2**30  # flax.serialization.MAX_CHUNK_SIZE
CHUNKED = "__msgpack_chunked_array__"

Entry = tuple[str, str, tuple[int, ...]]
Tree = dict[str, "Tree | str"]
#: Writes ``length`` bytes of the current array, starting at ``offset`` within it.
ByteSource = Callable[[int, int], None]


def nest(names: Sequence[str], separator: str) -> Tree:
    """The nested map of ``names`` split on ``separator``; leaves hold the full name."""
    root: Tree = {}
    for name in names:
        parts = name.split(separator) if separator else [name]
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"{child!r} is a tensor and also a prefix of {name!r}",
                                 hint="A Flax tree cannot hold both; rename one of them")
            node = child
        if parts[-1] in node:
            other = node[parts[-1]]
            raise UsageError(f"{name!r} is a prefix of other tensors" if isinstance(other, dict)
                             else f"{name!r} occurs twice",
                             hint="A Flax tree cannot hold both; rename one of them")
        node[parts[-1]] = name
    return root


def walk(tree: Tree) -> Iterator[bytes | str]:
    """Depth-first msgpack framing of ``tree``: bytes to write, and each leaf's name where its
    array goes."""
    packer = msgpack.Packer()
    yield packer.pack_map_header(len(tree))
    for key, value in tree.items():
        yield packer.pack(key)
        if isinstance(value, dict):
            yield from walk(value)
        else:
            yield value


def _ext_header(length: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if length in fixed:
        return bytes([fixed[length], EXT_NDARRAY])
    if length < 0x100:
        return bytes([0xC7, length, EXT_NDARRAY])
    if length < 0x10000:
        return struct.pack(">BHb", 0xC8, length, EXT_NDARRAY)
    return struct.pack(">BIb", 0xC9, length, EXT_NDARRAY)


def _bin_header(length: int) -> bytes:
    if length < 0x100:
        return bytes([0xC4, length])
    if length < 0x10000:
        return struct.pack(">BH", 0xC5, length)
    return struct.pack(">BI", 0xC6, length)


def _write_array(fh: BinaryIO, dtype: str, shape: tuple[int, ...], nbytes: int,
                 data: ByteSource, start: int = 0) -> None:
    """One ext-1 array: ``(shape, dtype, bytes)`` framed, then its bytes from ``data``."""
    inner = b"\x93" + msgpack.packb(list(shape)) + msgpack.packb(dtype) + _bin_header(nbytes)
    fh.write(_ext_header(len(inner) + nbytes) + inner)
    data(start, nbytes)


def write_leaf(fh: BinaryIO, dtype: str, shape: tuple[int, ...], data: ByteSource) -> None:
    """An array leaf, chunked the way flax chunks arrays over :data:`MAX_CHUNK_SIZE`."""
    size = numpy_dtype(dtype).itemsize
    count = 1
    for s in shape:
        count *= s
    nbytes = count * size
    if nbytes <= MAX_CHUNK_SIZE:
        _write_array(fh, dtype, shape, nbytes, data)
        return
    per_chunk = max(1, int(MAX_CHUNK_SIZE / size))
    starts = range(0, count, per_chunk)
    packer = msgpack.Packer()
    fh.write(packer.pack_map_header(3) + packer.pack(CHUNKED) + packer.pack(True)
             + packer.pack("shape") + packer.pack({str(i): s for i, s in enumerate(shape)})
             + packer.pack("chunks") + packer.pack_map_header(len(starts)))
    for i, first in enumerate(starts):
        elements = min(per_chunk, count - first)
        fh.write(packer.pack(str(i)))
        _write_array(fh, dtype, (elements,), elements * size, data, first * size)


class FlaxMsgpackWriter:
    """Writes one Flax msgpack file; see the module docstring for the two modes."""

    def __init__(self, fh: BinaryIO, directory: Path, separator: str,
                 layout: Sequence[Entry] | None):
        self.fh = fh
        self.separator = separator
        self.directory = directory
        self.frames: Iterator[bytes | str] | None = None
        self.spool: Spool | None = None
        self.spooled: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self.order: list[str] = []
        if layout is not None:
            names = [name for name, _d, _s in layout]
            tree = nest(names, separator)
            if [f for f in walk(tree) if isinstance(f, str)] == names:
                self.frames = walk(tree)
                self.expected = {name: (dtype, shape) for name, dtype, shape in layout}
        if self.frames is None:
            self.spool = Spool(directory)

    def _next_leaf(self) -> str | None:
        assert self.frames is not None
        for frame in self.frames:
            if isinstance(frame, str):
                return frame
            self.fh.write(frame)
        return None

    def add(self, name: str, array: np.ndarray) -> None:
        dtype, shape = array.dtype.name, tuple(array.shape)
        if self.spool is not None:
            self.spooled[name] = (dtype, shape, self.spool.put(raw_bytes(array)))
            self.order.append(name)
            return
        leaf = self._next_leaf()
        if leaf != name or self.expected.get(name) != (dtype, shape):
            want = f"{leaf!r} {self.expected.get(leaf or '')}" if leaf else "no more tensors"
            raise UsageError(f"tensor {name!r} {dtype}{list(shape)} arrived where the layout "
                             f"expects {want}", hint="Pass tensors in layout order, or no layout")
        data = raw_bytes(array)
        write_leaf(self.fh, dtype, shape,
                   lambda start, length: self.fh.write(data[start:start + length]))

    def finish(self) -> None:
        if self.spool is None:
            leaf = self._next_leaf()
            if leaf is not None:
                raise UsageError(f"tensor {leaf!r} of the layout never arrived",
                                 hint="The tensor stream ended early")
            return
        for frame in walk(nest(self.order, self.separator)):
            if not isinstance(frame, str):
                self.fh.write(frame)
                continue
            dtype, shape, offset = self.spooled[frame]
            spool = self.spool
            write_leaf(self.fh, dtype, shape,
                       lambda start, length, base=offset: spool.copy_to(self.fh, base + start,
                                                                        length))
        self.spool.close()

    def abort(self) -> None:
        if self.spool is not None:
            self.spool.close()
