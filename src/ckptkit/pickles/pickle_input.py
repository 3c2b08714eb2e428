"""The bytes a pickle machine reads, the way CPython's unpicklers read them.

``pickle.loads(data)`` reads a pickle as one contiguous buffer: a ``FRAME`` opcode only checks
that its declared length is there.  ``pickle.load(file)`` (the C unpickler, used by
``torch.load`` and ``numpy.load`` too) reads a frame with one ``read(length)`` from the file
unless the file can ``peek`` that far; an opcode whose operand runs past the end of such a
frame gets its bytes from *after* the frame, and the frame's last bytes are dropped.  So a
frame that declares fewer bytes than its opcodes read is one opcode stream to ``pickle.loads``
and another to ``torch.load``.

:class:`StreamInput` is the contiguous reading (``pickle.loads``, and any file that can peek
far enough); it notes when a pickle's frames would make a file-reading loader diverge.
:class:`FileInput` reproduces the C unpickler's buffer over a real file object (``read``,
``readline``, ``readinto``, ``peek``) call for call, so that what it reads is what
``pickle.load`` reads from the same object.  Both offer ``read``, ``read_counted`` (BINBYTES
and BYTEARRAY8 operands), ``readline``, ``tell``, ``frame`` and ``stop``.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO, Callable

#: The C unpickler peeks this far ahead when the file supports it (_pickle.c, PREFETCH).
PREFETCH = 8192 * 16
#: Longer lines (GLOBAL names, INT digits) are not a pickle anyone wrote.
MAX_LINE = 1 << 20
#: Reads up to this size go straight to the stream; larger ones are made in pieces, so a
#: length prefix costs memory only for bytes that are there.
_PIECE = 1 << 16


def truncated() -> pickle.UnpicklingError:
    return pickle.UnpicklingError("pickle data was truncated")


class StreamInput:
    """Contiguous reading of a stream (bytes go in an ``io.BytesIO``), as ``pickle.loads``
    reads bytes.  Its methods are the stream's own (no wrapper on the per-opcode path); the
    machine tracks frames itself to notice where a frame-reading loader would diverge."""

    def __init__(self, stream: BinaryIO):
        self.read = _bounded_reader(stream)
        self.read_counted = self.read
        self.tell: Callable[[], int] = stream.tell
        self._stream = stream

    def readline(self) -> bytes:
        return self._stream.readline(MAX_LINE)

    def remaining(self) -> int | None:
        """Bytes left after the current position, when the stream knows (bytes do)."""
        if isinstance(self._stream, io.BytesIO):
            return self._stream.getbuffer().nbytes - self._stream.tell()
        return None

    def frame(self, size: int) -> None:
        """Nothing to read ahead: contiguous reading only checks the length (the machine)."""

    def stop(self) -> None:
        """Nothing to do: a contiguous reader stands right after the STOP already."""


class FileInput:
    """The C unpickler's input buffer over ``file`` (_pickle.c, ``_Unpickler_Read`` and
    friends), calling the same methods of the same object in the same order."""

    def __init__(self, file: BinaryIO, base: int = 0, size: int | None = None):
        self._file = file
        self._size = size  # bytes the file holds, when known: no reads past them are tried
        self._peek: Callable[[int], bytes] | None = getattr(file, "peek", None)
        self._readinto: Callable[[Any], int] | None = getattr(file, "readinto", None)
        self._buf = b""
        self._idx = 0
        self._prefetched = 0  # how much of the buffer the file position is already past
        self._buf_start = 0  # file offset of the buffer's first byte
        self._file_pos = 0
        self._base = base

    def tell(self) -> int:
        return self._base + self._buf_start + self._idx

    def remaining(self) -> None:
        return None  # the frame's own read finds out, as in the C unpickler

    def read(self, n: int) -> bytes:
        if self._idx + n <= len(self._buf):
            data = self._buf[self._idx:self._idx + n]
            self._idx += n
            return data
        if self._fill(n) < n:
            raise truncated()
        self._idx = n
        return self._buf[:n]

    def read_counted(self, n: int) -> bytes:
        head = self._buf[self._idx:self._idx + n]
        self._idx += len(head)
        if len(head) == n:
            return head
        self._skip_consumed()
        want = n - len(head)
        if self._size is not None and self._file_pos + want > self._size:
            raise truncated()  # before allocating what a damaged length asks for
        if self._readinto is not None:
            rest = bytearray(want)
            got = self._readinto(rest)
            self._file_pos += got
        else:
            rest = bytearray(self._file_read(want))
            got = len(rest)
        self._buf_start, self._buf, self._idx, self._prefetched = self._file_pos, b"", 0, 0
        if got < want:
            raise truncated()
        return head + bytes(rest)

    def readline(self) -> bytes:
        end = self._buf.find(b"\n", self._idx)
        if end >= 0:
            line = self._buf[self._idx:end + 1]
            self._idx = end + 1
            return line
        got = self._fill(-1)
        if got == 0 or not self._buf.endswith(b"\n"):
            raise truncated()
        self._idx = got
        return self._buf

    def frame(self, size: int) -> None:
        """``load_frame``: the frame is read (or found in the buffer), then rewound to."""
        self.read(size)
        self._idx -= size

    def stop(self) -> None:
        self.finish()


    def finish(self) -> None:
        """Leave the file right after the pickle, as ``pickle.load`` does."""
        self._skip_consumed()

    def _skip_consumed(self) -> None:
        consumed = self._idx - self._prefetched
        if consumed > 0:
            self._file_read(consumed)
            self._prefetched = self._idx

    def _fill(self, n: int) -> int:
        """``_Unpickler_ReadFromFile``: a new buffer from the file (``n < 0``: one line);
        what was left of a buffer that was read rather than peeked is dropped."""
        self._skip_consumed()
        start = self._file_pos
        if n < 0:
            data = self._file.readline(MAX_LINE)
            self._file_pos += len(data)
        else:
            if self._peek is not None and n < PREFETCH:
                ahead = self._peek(PREFETCH)
                self._buf, self._idx, self._prefetched = ahead, 0, 0
                self._buf_start = start
                if n <= len(ahead):
                    return n
            data = self._file_read(n)
        self._buf, self._idx, self._prefetched = data, 0, len(data)
        self._buf_start = start
        return len(data)

    def _file_read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            part = self._file.read(min(n - got, _PIECE))
            if not part:
                break
            parts.append(part)
            got += len(part)
        self._file_pos += got
        return b"".join(parts)


class RawBytes(io.RawIOBase):
    """``data`` as a raw stream, for an ``io.BufferedReader`` that buffers it like a file."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        chunk = self._data[self._pos:self._pos + len(buffer)]
        buffer[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


#: How loaders read a pickle when its frames make them diverge: (who, file over the bytes).
LOADER_VIEWS: tuple[tuple[str, Callable[[bytes], BinaryIO]], ...] = (
    ("torch.load of a zip record, or any file without peek", io.BytesIO),
    ("pickle.load of a file with a 4 KiB buffer",
     lambda data: io.BufferedReader(RawBytes(data), 4096)),
    ("pickle.load of a file with an 8 KiB buffer",
     lambda data: io.BufferedReader(RawBytes(data), 8192)),
    ("pickle.load of a file with a 128 KiB buffer",
     lambda data: io.BufferedReader(RawBytes(data), 128 << 10)),
)


def _bounded_reader(stream: BinaryIO) -> Callable[[int], bytes]:
    """``stream.read``, except that a large request is cut to what a plain file has left: a
    buffered file allocates the whole request before it finds out how much is there, so four
    bytes of a damaged pickle could cost gigabytes.  Streams that are not plain files (bytes,
    the byte budget of plain_pickle) pass through: they only return what they hold."""
    if isinstance(stream, io.BytesIO):
        return stream.read
    try:
        end = os.fstat(stream.fileno()).st_size
        tell = stream.tell
        tell()
    except (AttributeError, OSError, ValueError):
        return stream.read
    raw_read = stream.read

    def read(n: int) -> bytes:
        if n > _PIECE:
            n = min(n, max(0, end - tell()))
        return raw_read(n)

    return read
