"""Tensor bytes of a tensor bundle read from its data shards into numpy arrays, CRC-checked.

Apart from :mod:`ckptkit.formats.tensor_bundle` so that decoding an index stays numpy-free:
numpy and ``ml_dtypes`` are imported inside the functions below, only when arrays are wanted.
"""

from __future__ import annotations

import contextlib
import math
import struct
from typing import Any, BinaryIO

from ckptkit.errors import FormatError, IntegrityError, MissingDependencyError
from ckptkit.storage.location import locate
from ckptkit.formats import protowire
from ckptkit.formats.crc32c import crc32c, crc32c_fast, unmask_crc
from ckptkit.formats.tensor_bundle import OBJECT_GRAPH_KEY, BundleEntry, BundleIndex, check_shards


def numpy_dtype(dtype: str, endianness: str = "little") -> Any:
    """The numpy dtype for a bundle dtype name; ``ml_dtypes`` supplies bfloat16 and float8."""
    import numpy as np

    base = {"qint8": "int8", "quint8": "uint8", "qint16": "int16", "quint16": "uint16",
            "qint32": "int32"}.get(dtype, dtype)
    try:
        result = np.dtype(base)
    except TypeError:
        try:
            import ml_dtypes
        except ImportError:
            raise MissingDependencyError("ml_dtypes", None,
                                         f"Reading {dtype} tensors as numpy") from None
        kind = getattr(ml_dtypes, base, None)
        if kind is None:
            raise FormatError(f"dtype {dtype} has no numpy equivalent",
                              hint="Load it with framework='tf'") from None
        result = np.dtype(kind)
    return result.newbyteorder(">") if endianness == "big" else result


def _strings(entry: BundleEntry, buf: bytes, shard: str, endianness: str) -> Any:
    """Decode a string tensor: varint lengths, a masked CRC of them, then the bytes.

    TensorFlow checksums the lengths as fixed-width integers (not their varint bytes), then the
    stored length checksum, then the string bytes; the same is recomputed here.
    """
    import numpy as np

    def fail(message: str) -> IntegrityError:
        return IntegrityError(f"{shard}: string tensor {entry.name!r} {message}",
                              hint="The data shard is corrupt; re-save or re-download the "
                                   "checkpoint", path=shard)

    count = math.prod(entry.shape)
    if count == 0:
        return np.empty(entry.shape, dtype=object)
    # Every element spends at least one byte on its length, which bounds what count may be.
    if count + 4 > len(buf):
        raise fail(f"claims {count} elements but holds only {len(buf)} bytes")
    # The checksums were computed on the writer's integers, in the writer's byte order.
    order = ">" if endianness == "big" else "<"
    lengths = []
    pos = 0
    crc = 0
    try:
        for _ in range(count):
            length, pos = protowire.read_varint(buf, pos)
            lengths.append(length)
            width = "I" if length <= 0xFFFFFFFF else "Q"
            crc = crc32c(struct.pack(order + width, length), crc)
    except IntegrityError as exc:
        raise fail(f"has a bad element length ({exc.message})") from None
    if pos + 4 + sum(lengths) != len(buf):
        raise fail(f"is {len(buf)} bytes but its element lengths need {pos + 4 + sum(lengths)}")
    stored = buf[pos:pos + 4]
    if entry.crc32c is not None and unmask_crc(struct.unpack(order + "I", stored)[0]) != crc:
        raise fail("fails its length checksum")
    crc = crc32c(stored, crc)
    pos += 4
    if entry.crc32c is not None and crc32c_fast(memoryview(buf)[pos:], crc) != entry.crc32c:
        raise fail("fails its CRC-32C check")
    values = []
    for length in lengths:
        values.append(buf[pos:pos + length])
        pos += length
    out = np.empty(count, dtype=object)
    out[:] = values
    return out.reshape(entry.shape)


class _ShardReader:
    """Reads and checks one entry's bytes at a time, keeping each shard open once."""

    def __init__(self, index: BundleIndex):
        self.index = index
        self.handles: dict[int, BinaryIO] = {}
        self.files = contextlib.ExitStack()

    def close(self) -> None:
        self.files.close()

    def array(self, entry: BundleEntry) -> Any:
        import numpy as np

        shard = self.index.shard_path(entry.shard_id)
        fh = self.handles.get(entry.shard_id)
        if fh is None:
            fh = self.handles[entry.shard_id] = self.files.enter_context(locate(shard).open())
        fh.seek(entry.offset)
        buf = fh.read(entry.size)
        if len(buf) != entry.size:
            raise IntegrityError(f"{shard}: tensor {entry.name!r} is cut short",
                                 hint="The shard is truncated; re-save the checkpoint",
                                 path=shard)
        if entry.dtype == "string":
            return _strings(entry, buf, shard, self.index.header.endianness)
        if entry.crc32c is not None and crc32c_fast(buf) != entry.crc32c:
            raise IntegrityError(f"{shard}: tensor {entry.name!r} fails its CRC-32C check",
                                 hint="The data shard is corrupt; re-save or re-download "
                                      "the checkpoint", path=shard)
        endianness = self.index.header.endianness
        dtype = numpy_dtype(entry.dtype, endianness)
        if math.prod(entry.shape) * dtype.itemsize != entry.size:
            raise IntegrityError(f"{shard}: tensor {entry.name!r} holds {entry.size} bytes, "
                                 f"not {entry.dtype}{list(entry.shape)}", path=shard)
        array = np.frombuffer(bytearray(buf), dtype=dtype).reshape(entry.shape)
        return array.astype(dtype.newbyteorder("=")) if endianness == "big" else array

    def assembled(self, entry: BundleEntry) -> Any:
        """A partitioned tensor put back together from its parts."""
        import numpy as np

        pieces = self.index.parts[entry.name]
        out: Any = None
        for extents, part in pieces:
            piece = self.array(part)
            if out is None:
                out = np.empty(entry.shape, dtype=piece.dtype)
            where = tuple(slice(None) if length == -1 else slice(start, start + length)
                          for start, length in extents)
            out[where] = piece
        return out


def read_arrays(index: BundleIndex) -> dict[str, Any]:
    """Every variable of the bundle as a numpy array, CRC-checked like TensorFlow does.

    Partitioned tensors are reassembled from their parts.  String tensors become object arrays
    of ``bytes``.  ``resource`` and ``variant`` tensors are runtime handles and are left out.

    Raises:
        FormatError: a dtype numpy cannot hold.
        IntegrityError: a shard is short or a tensor fails its CRC-32C.
    """
    check_shards(index)
    arrays: dict[str, Any] = {}
    reader = _ShardReader(index)
    try:
        for entry in index.entries:
            if entry.name == OBJECT_GRAPH_KEY or entry.dtype in ("resource", "variant"):
                continue
            arrays[entry.name] = reader.assembled(entry) if entry.slices else reader.array(entry)
    finally:
        reader.close()
    return arrays
