"""Plain pickle, joblib and ``.npy`` files, analysed statically for ``ckpt scan``.

Such files are not checkpoints ckptkit loads, but they travel next to them (``hps.pkl``,
scikit-learn heads saved with joblib, arrays saved with ``np.save``) and run code when loaded.
The stream is read with the same restricted machine as torch pickles; nothing is imported or
called.  A pickle is recognised by what it is, not by its name: a protocol 0 pickle named
``model.pt`` is still what ``torch.load`` would run.

joblib writes each numpy array's bytes straight into the pickle stream after the array's
``NumpyArrayWrapper`` (object arrays as a nested pickle), so the machine used here skips those
bytes (or reads the nested pickle) exactly where joblib's own unpickler would read them.
Compressed joblib files (zlib, gzip, bz2, xz, lzma) are decompressed as a stream, every byte
charged to the reading budget (:mod:`ckptkit.storage.budget`), as the opcodes are.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import os
import pickle
import pickletools
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from ckptkit.storage import budget
from ckptkit.errors import CkptkitError, IntegrityError
from ckptkit.storage.location import Location, locate
from ckptkit.pickles.npy_header import MAX_HEADER, NPY_MAGIC, parse_header
from ckptkit.model import Opaque, itemsize
from ckptkit.pickles.pickle_globals import allowed, numpy_dtype_name
from ckptkit.pickles.unpickler import Findings, InertUnpickler, PickleContext, is_binary_pickle, read_pickle

SUFFIXES = (".pkl", ".pickle", ".joblib", ".jbl", ".sav", ".pk", ".p")
WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"
CONTEXT = PickleContext(allowed=allowed("joblib"))
#: More consecutive pickles than this in one file is not a file anyone wrote on purpose.
MAX_PICKLES = 10_000
#: joblib object arrays inside object arrays, as deep as this.
MAX_NESTING = 8


#: Bytes of a file without a binary pickle header parsed to decide whether it is a pickle.
SNIFF_BYTES = 1 << 20
_TEXT_OPCODES = (b"(", b"}", b"]", b"c", b"I", b"N", b"V", b"S", b"d", b"l", b"t", b"F", b"L",
                 b"i", b"P", b"p", b"g", b")", b"K", b"J", b"M", b"X", b"U", b"T", b"\x88",
                 b"\x89", b".", b"\x80")


def sniff(path: Path | Location) -> bool:
    """True for a file that is (or decompresses to) a pickle stream: a binary pickle header,
    a compressed stream named like a pickle, or (any name) bytes whose first pickle parses
    to its STOP, as ``pickle.load`` would read them."""
    loc = locate(path)
    try:
        if is_binary_pickle(loc.read(0, 2)):
            return True
        with loc.open() as fh:
            head = fh.read(2)
            fh.seek(0)
            if any(s in SUFFIXES for s in Path(loc.name).suffixes):
                with _decompressed(fh, path) as stream:
                    first = stream.read(1)
                    if getattr(stream, "compression", ""):
                        return first in (b"\x80",) + _TEXT_OPCODES
                fh.seek(0)
            return head[:1] in _TEXT_OPCODES and _parses(fh.read(SNIFF_BYTES))
    except (OSError, CkptkitError, EOFError, ValueError, zlib.error, lzma.LZMAError):
        return False


def _parses(data: bytes) -> bool:
    """True when ``data`` starts with a pickle that reads to its STOP (statically)."""
    try:
        for op, _arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name == "STOP":
                return True
    except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError, OverflowError):
        return False
    return False


def is_npy(path: Path | Location) -> bool:
    """True for a standalone ``.npy`` file (``np.save``), by its magic."""
    try:
        return locate(path).read(0, 6) == NPY_MAGIC
    except (OSError, CkptkitError):
        return False


def analyse_npy(path: Path | Location) -> tuple[Findings, str]:
    """A ``.npy`` file: its header, and for an object array the pickle ``np.load`` runs
    (``allow_pickle=True``) right after it.  Numeric arrays are plain data; an object array
    is listed as an object, as in ``.npz`` files (numpy loads it only when told to)."""
    findings = Findings()
    loc = locate(path)
    header, start = parse_header(loc.read(0, MAX_HEADER + 12), str(path))
    if header["descr"] not in ("|O", "O"):
        return findings, "npy"
    findings.objects.add("numpy.ndarray[object]")
    with loc.open() as fh:
        fh.seek(start)
        read_pickle(fh, findings, what=f"object array in {path}", location="object array")
    return findings, "npy"


def analyse(path: Path | Location) -> tuple[Findings, str]:
    """Read every pickle in ``path`` with the restricted machine; return the findings and a
    short description of the container (``pickle``, ``gzip pickle``, ``xz pickle``, ...).

    Raises:
        IntegrityError: a broken stream (an UnsafePickleError when it also names dangerous
            callables).
    """
    findings = Findings()
    with budget.reading(path), locate(path).open() as fh, _decompressed(fh, path) as stream:
        compression = getattr(stream, "compression", "")
        metered = _Metered(stream, f"{compression} stream" if compression else "")
        count = 0
        while metered.more():
            count += 1
            if count > MAX_PICKLES:
                raise IntegrityError(f"{path}: more than {MAX_PICKLES} pickles in one file")
            read_pickle(metered, findings, what=f"pickle {count}",  # type: ignore[arg-type]
                        context=CONTEXT, location=f"pickle {count}", machine=_JoblibMachine)
        metered.settle()
    return findings, f"{compression} pickle".strip()


class _JoblibMachine(InertUnpickler):
    """The restricted machine, plus joblib's habit of writing array bytes after a wrapper."""

    dispatch = dict(InertUnpickler.dispatch)

    def _joblib_build(self) -> None:
        InertUnpickler.dispatch[pickle.BUILD[0]](self)
        wrapper = self.stack[-1]
        if isinstance(wrapper, Opaque) and wrapper.qualname == WRAPPER:
            self.leave_frame()
            self._skip_array(wrapper.state if isinstance(wrapper.state, dict) else {})

    def _skip_array(self, state: dict[str, Any]) -> None:
        dtype = _dtype_name(state.get("dtype"))
        shape = state.get("shape", ())
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"joblib array with shape {shape!r}")
        if dtype == "object":
            # joblib pickles object arrays right here: a nested pickle that loading runs.
            # Read by a nested machine, not read_pickle: an error ends the whole stream, and
            # the outermost read_pickle scans the rest statically once, not once per level.
            if self._depth >= MAX_NESTING:
                raise pickle.UnpicklingError(f"object arrays nested deeper than {MAX_NESTING}")
            findings, location = self.findings, self.findings.location
            findings.location = f"{location}, object array"
            findings.pickles += 1
            nested = _JoblibMachine(self._stream, findings, None, CONTEXT)
            nested._depth = self._depth + 1
            nested.load()
            findings.location = location
            return
        if state.get("numpy_array_alignment_bytes") is not None:
            pad = self._file_read(1)
            if len(pad) != 1:
                raise EOFError
            self._skip(pad[0])
        self._skip(math.prod(shape) * max(1, int(itemsize(dtype))))

    def _skip(self, count: int) -> None:
        if self._stream.skip(count) != count:
            raise pickle.UnpicklingError("joblib array data is truncated")

    def __init__(self, file: _Metered, *args: Any, **kwargs: Any):
        super().__init__(file, *args, **kwargs)
        self._stream = file
        self._depth = 0

    dispatch[pickle.BUILD[0]] = _joblib_build


def _dtype_name(dtype: Any) -> str:
    """The dtype a joblib wrapper records (a pickled ``numpy.dtype``, kept as an Opaque)."""
    code = dtype.args[0] if isinstance(dtype, Opaque) and dtype.args else None
    if not isinstance(code, str) or len(code) > 32:
        raise pickle.UnpicklingError(f"joblib array with dtype {dtype!r}")
    return "object" if code in ("O", "O8", "O4") else numpy_dtype_name(code)


class _Metered:
    """A read-only stream for the pickle machine: buffered (one opcode is one slice, not a
    trip through the decompressor), able to peek for another pickle, and charging what a
    decompressing stream inflates to the reading budget (``what`` names the stream; empty
    for a plain file, whose bytes are on disk already)."""

    def __init__(self, stream: BinaryIO, what: str):
        self._stream, self._what = stream, what
        self._account = budget.current()
        self._size = None if what else os.fstat(stream.fileno()).st_size
        self._buffer, self._pos = b"", 0
        self._read = 0  # position in the (decompressed) stream
        self._pending = 0  # inflated bytes not charged yet

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
            return self._stream.read(limit)
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


class _decompressed:  # noqa: N801 - used as a context manager, like open()
    """The pickle stream inside ``fh``: as is, or through the decompressor its magic names."""

    def __init__(self, fh: BinaryIO, path: Path | Location):
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
