"""The streams a plain pickle is read from: compressed or not, metered, able to skip.

joblib compresses a whole file (zlib by default, or gzip, bz2, xz, lzma); :func:`decompressed`
opens the stream inside by its magic.  :class:`Metered` is what the pickle machine reads:
buffered, charging every inflated byte to the reading budget (:mod:`ckptkit.storage.budget`),
and able to skip joblib's array bytes without keeping them.  :func:`read_inflated` reads a
byte range of such a stream again later (an array's bytes, for ``load`` and ``convert``).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from ckptkit.errors import IntegrityError
from ckptkit.storage import budget
from ckptkit.storage.location import locate

class Metered:
    """A read-only stream for the pickle machine: buffered (one opcode is one slice, not a
    trip through the decompressor), able to peek for another pickle, and charging what a
    decompressing stream inflates to the reading budget (``what`` names the stream; empty
    for a plain file, whose bytes are on disk already)."""

    def __init__(self, stream: BinaryIO, what: str):
        self._stream, self._what = stream, what
        self._account = budget.current()
        self._size = None if what else _size_of(stream)
        self._buffer, self._pos = b"", 0
        self._read = 0  # position in the (decompressed) stream
        self._pending = 0  # inflated bytes not charged yet
        #: Where values sit, for readers that record it (see plain_pickle.read_stream).
        self.payloads: dict[int, tuple[Any, int, int]] | None = None

    def more(self) -> bool:
        """True when another byte follows (kept to be read next)."""
        return self._pos < len(self._buffer) or self._fill()

    def read(self, n: int = -1) -> bytes:
        buffer, pos = self._buffer, self._pos
        if 0 <= n <= len(buffer) - pos:
            self._pos = pos + n
            self._read += n
            return buffer[pos:pos + n]
        data = buffer[pos:]
        self._buffer, self._pos = b"", 0
        if n < 0 or n - len(data) > _BLOCK:
            data += self._claim(n - len(data) if n >= 0 else -1)
        else:
            while len(data) < n and self._fill():
                take = min(n - len(data), len(self._buffer))
                data += self._buffer[:take]
                self._pos = take
        self._read += len(data)
        return data

    def _claim(self, n: int) -> bytes:
        # Length prefixes (BINBYTES8, BINUNICODE8) can ask for anything, and one read call
        # allocates what it is asked for: a plain file is asked only for what it has left, a
        # decompressing stream only for what the budget has left (a larger claim is refused
        # before a byte is inflated).
        if self._size is not None:
            left = self._size - self._read
            want = left if n < 0 else min(n, left)
        else:
            room = self._account.room("decompressed") - self._pending
            want = room + 1 if n < 0 else n
            if want > room:
                self.settle()
                raise self._account.over("decompressed", f"the {self._what}, for a value of "
                                                         f"{want:,} bytes")
        data = self._stream.read(max(0, want))
        self._inflated(len(data))
        return data

    def skip(self, n: int) -> int:
        """Pass over ``n`` bytes (joblib array data) without keeping them; how many there were."""
        skipped = min(n, len(self._buffer) - self._pos)
        self._pos += skipped
        while skipped < n:
            part = self._stream.read(min(n - skipped, 1 << 20))
            if not part:
                break
            skipped += len(part)
            self._inflated(len(part))
        self._read += skipped
        return skipped

    def readline(self, limit: int = 1 << 20) -> bytes:
        limit = limit if 0 < limit < 1 << 20 else 1 << 20
        line = b""
        while not line.endswith(b"\n") and len(line) < limit:
            end = self._buffer.find(b"\n", self._pos)
            stop = len(self._buffer) if end < 0 else end + 1
            line += self._buffer[self._pos:stop]
            self._pos = stop
            if end < 0 and not self._fill():
                break
        self._read += len(line)
        return line

    def settle(self) -> None:
        """Charge what was inflated since the last charge."""
        if self._what and self._pending:
            pending, self._pending = self._pending, 0
            self._account.charge("decompressed", pending, self._what)

    def _fill(self) -> bool:
        """Replace the (used up) buffer with the next block; False at the end."""
        self._buffer, self._pos = self._stream.read(_BLOCK), 0
        self._inflated(len(self._buffer))
        return bool(self._buffer)

    def _inflated(self, n: int) -> None:
        self._pending += n
        if self._pending >= _BLOCK:
            self.settle()

    def tell(self) -> int:
        return self._read

    def reread(self, start: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``start`` of a file that is not decompressed, leaving the
        stream where it is (pickles whose frames loaders read differently are read again);
        nothing for a compressed one."""
        if self._what:
            return b""
        here = self._stream.tell()
        try:
            self._stream.seek(start)
            # A buffered read allocates all it is asked for: ask for what the file has.
            return self._stream.read(max(0, min(limit, (self._size or 0) - start)))
        finally:
            self._stream.seek(here)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        # Only read_pickle's fallback scan of a broken pickle seeks: to the end to learn how
        # much is left, then back to the pickle's start.  On a decompressing stream, seeking
        # would inflate everything again (a bomb's whole payload), so it is refused.
        if self._what:
            raise OSError("cannot seek in a compressed stream")
        where = self._stream.seek(pos, whence)
        self._buffer, self._pos = b"", 0
        self._read = where
        return where


#: Bytes taken from the (decompressed) stream at a time.
_BLOCK = 1 << 16


class decompressed:  # noqa: N801 - used as a context manager, like open()
    """The pickle stream inside ``fh``: as is, or through the decompressor its magic names."""

    def __init__(self, fh: BinaryIO, path: Path):
        self._fh, self._path = fh, path
        self._stream: Any = None

    def __enter__(self) -> Any:
        head = self._fh.read(6)
        self._fh.seek(0)
        if head.startswith(b"\x1f\x8b"):
            self._stream, name = gzip.GzipFile(fileobj=self._fh, mode="rb"), "gzip"
        elif head.startswith(b"BZh"):
            self._stream, name = bz2.BZ2File(self._fh, "rb"), "bz2"
        elif head.startswith(b"\xfd7zXZ"):
            self._stream, name = lzma.LZMAFile(self._fh, "rb"), "xz"
        elif head.startswith(b"\x5d\x00\x00"):
            self._stream = lzma.LZMAFile(self._fh, "rb", format=lzma.FORMAT_ALONE)
            name = "lzma"
        elif head[:1] == b"\x78" and len(head) > 1 and (head[0] << 8 | head[1]) % 31 == 0:
            self._stream, name = _ZlibStream(self._fh), "zlib"
        else:
            self._stream, name = self._fh, ""
        if name:
            self._stream = _Named(self._stream, name)
        return self._stream

    def __exit__(self, *exc: Any) -> None:
        if self._stream is not None and self._stream is not self._fh:
            self._stream.close()


class _Named:
    """A decompressing stream that also says which compression it undoes."""

    def __init__(self, stream: Any, compression: str):
        self._stream, self.compression = stream, compression

    def read(self, n: int = -1) -> bytes:
        try:
            return self._stream.read(n)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise pickle.UnpicklingError(f"{self.compression} stream: {exc}") from exc

    def readline(self, limit: int = -1) -> bytes:
        try:
            return self._stream.readline(limit)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise pickle.UnpicklingError(f"{self.compression} stream: {exc}") from exc

    def seek(self, pos: int) -> None:
        self._stream.seek(pos)

    def close(self) -> None:
        self._stream.close()


class _ZlibStream:
    """A raw zlib stream (joblib's default compressor) read incrementally."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh
        self._z = zlib.decompressobj()
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            want = 0 if n < 0 else n - len(self._buf)
            if self._z.unconsumed_tail:  # input left over from a bounded call comes first
                self._buf += self._z.decompress(self._z.unconsumed_tail, want)
                continue
            chunk = self._fh.read(1 << 16)
            if not chunk:
                self._buf += self._z.flush()
                break
            self._buf += self._z.decompress(chunk, want)
        data, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        return data

    def readline(self, limit: int = -1) -> bytes:
        out = b""
        while not out.endswith(b"\n") and (limit < 0 or len(out) < limit):
            c = self.read(1)
            if not c:
                break
            out += c
        return out

    def close(self) -> None:
        pass


def read_inflated(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of the stream the compressed file ``path`` inflates to;
    everything inflated on the way is charged to the budget as ``decompressed``."""
    account = budget.current()
    account.charge("decompressed", offset + length, f"the compressed stream of {path}")
    with locate(path).open() as fh, decompressed(fh, Path(path)) as stream:
        try:
            left = offset
            while left:
                part = stream.read(min(left, 1 << 20))
                if not part:
                    break
                left -= len(part)
            data = stream.read(length) if not left else b""
        except pickle.UnpicklingError as exc:
            raise IntegrityError(f"{path}: {exc}", hint="The file is truncated or corrupt",
                                 path=path) from None
    if len(data) != length:
        raise IntegrityError(f"{path}: expected {length} bytes at inflated offset {offset}, "
                             f"found {len(data)} (file truncated?)",
                             hint="The file is truncated or corrupt", path=path)
    return data


def _size_of(stream: BinaryIO) -> int:
    """The size of a plain (seekable) file: its descriptor's, or, for a remote file object
    without one, the offset of its end."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        stream.seek(here)
        return end
