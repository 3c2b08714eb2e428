"""Protocol-buffer wire format, decoded by hand so that reading TF files needs no protobuf.

Only the wire layer lives here: a message is a sequence of ``(field number, wire type, value)``
records.  What the numbers mean is the caller's business (``tensor_bundle``, ``savedmodel``).
Length-delimited values come back as ``memoryview`` slices of the input, so skipping a large
field (a SavedModel's ``graph_def``) costs nothing.  Every malformed input raises
:class:`~ckptkit.errors.IntegrityError`; nothing here reads past the buffer it was given.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from ckptkit.errors import IntegrityError

VARINT = 0
FIXED64 = 1
LENGTH = 2
START_GROUP = 3
END_GROUP = 4
FIXED32 = 5

Buffer = bytes | bytearray | memoryview
Value = int | memoryview

_MAX_VARINT_BYTES = 10
_MAX_FIELD_NUMBER = (1 << 29) - 1


def read_varint(buf: Buffer, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decode the varint at ``pos``; return ``(value, position after it)``.

    Raises:
        IntegrityError: the varint runs past ``end`` or is longer than 10 bytes.
    """
    limit = len(buf) if end is None else end
    result = 0
    shift = 0
    for count in range(_MAX_VARINT_BYTES):
        if pos >= limit:
            raise IntegrityError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            # A 10th byte may only carry the top bit of a 64-bit value.
            if count == _MAX_VARINT_BYTES - 1 and byte > 1:
                raise IntegrityError(f"varint overflows 64 bits at byte {pos - 1}")
            return result, pos
        shift += 7
    raise IntegrityError(f"varint longer than {_MAX_VARINT_BYTES} bytes at byte {pos}")


def iter_fields(buf: Buffer) -> Iterator[tuple[int, int, Value]]:
    """Yield ``(field_number, wire_type, value)`` for each record of the message ``buf``.

    Varints and fixed-width values are ``int`` (unsigned; see :func:`signed64`);
    length-delimited values are ``memoryview`` slices of ``buf``.  Groups are refused: no
    message TensorFlow writes today uses them.
    """
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    end = len(view)
    pos = 0
    while pos < end:
        start = pos
        key, pos = read_varint(view, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise IntegrityError(f"invalid field number {number} at byte {start}")
        value: Value
        if wire == VARINT:
            value, pos = read_varint(view, pos, end)
        elif wire == FIXED64:
            if pos + 8 > end:
                raise IntegrityError(f"truncated 64-bit field {number} at byte {start}")
            value = struct.unpack_from("<Q", view, pos)[0]
            pos += 8
        elif wire == FIXED32:
            if pos + 4 > end:
                raise IntegrityError(f"truncated 32-bit field {number} at byte {start}")
            value = struct.unpack_from("<I", view, pos)[0]
            pos += 4
        elif wire == LENGTH:
            length, pos = read_varint(view, pos, end)
            if length > end - pos:
                raise IntegrityError(
                    f"field {number} at byte {start} declares {length} bytes but only "
                    f"{end - pos} remain")
            value = view[pos:pos + length]
            pos += length
        else:
            raise IntegrityError(f"unsupported wire type {wire} (field {number}) at byte {start}")
        yield number, wire, value


def fields(buf: Buffer) -> dict[int, list[Value]]:
    """All records of ``buf`` grouped by field number, each list in wire order."""
    grouped: dict[int, list[Value]] = {}
    for number, _wire, value in iter_fields(buf):
        grouped.setdefault(number, []).append(value)
    return grouped


def signed64(value: int) -> int:
    """Reinterpret an unsigned 64-bit varint as the ``int64`` it encodes (-1: unknown dim)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def as_int(value: Value, what: str) -> int:
    """``value`` as an integer, or IntegrityError if the wire gave a length-delimited field."""
    if not isinstance(value, int):
        raise IntegrityError(f"{what}: expected a number, found a length-delimited field")
    return value


def as_bytes(value: Value, what: str) -> memoryview:
    """``value`` as a byte slice, or IntegrityError if the wire gave a number."""
    if isinstance(value, int):
        raise IntegrityError(f"{what}: expected a length-delimited field, found a number")
    return value


def as_str(value: Value, what: str) -> str:
    """``value`` as UTF-8 text (proto3 ``string``), IntegrityError if it is not."""
    data = as_bytes(value, what)
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{what}: not valid UTF-8 ({exc.reason} at byte {exc.start})") \
            from None


def last(grouped: dict[int, list[Value]], number: int) -> Value | None:
    """The effective value of a singular field: protobuf keeps the last one on the wire."""
    values = grouped.get(number)
    return values[-1] if values else None


Span = tuple[int, int]  # (offset, length) of a length-delimited value, in the outer buffer


def iter_spans(read: Callable[[int, int], bytes], start: int, end: int
               ) -> Iterator[tuple[int, int, int | Span]]:
    """Like :func:`iter_fields`, for a message too large to hold in memory (an ONNX model with
    its weights inline): ``read(offset, length)`` fetches bytes of the outer buffer, and
    length-delimited values come back as ``(offset, length)`` spans, unread, so the caller
    reads only the fields it wants (and descends into sub-messages with another call).

    Raises:
        IntegrityError: as :func:`iter_fields`, with offsets in the outer buffer.
    """
    pos = start
    while pos < end:
        head = read(pos, min(_MAX_VARINT_BYTES * 2, end - pos))
        key, used = read_varint(head, 0)
        number, wire = key >> 3, key & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise IntegrityError(f"invalid field number {number} at byte {pos}")
        at = pos
        pos += used
        value: int | Span
        if wire == VARINT:
            value, used = read_varint(read(pos, min(_MAX_VARINT_BYTES, end - pos)), 0)
            pos += used
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            if pos + width > end:
                raise IntegrityError(f"truncated {width * 8}-bit field {number} at byte {at}")
            value = struct.unpack("<Q" if width == 8 else "<I", read(pos, width))[0]
            pos += width
        elif wire == LENGTH:
            length, used = read_varint(read(pos, min(_MAX_VARINT_BYTES, end - pos)), 0)
            pos += used
            if length > end - pos:
                raise IntegrityError(f"field {number} at byte {at} declares {length} bytes but "
                                     f"only {end - pos} remain")
            value = (pos, length)
            pos += length
        else:
            raise IntegrityError(f"unsupported wire type {wire} (field {number}) at byte {at}")
        yield number, wire, value
