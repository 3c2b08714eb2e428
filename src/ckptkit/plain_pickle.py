"""Plain pickle, joblib and ``.npy`` files, analysed statically for ``ckpt scan``.

Such files are not checkpoints ckptkit loads, but they travel next to them (``hps.pkl``,
scikit-learn heads saved with joblib, arrays saved with ``np.save``) and run code when loaded.
The stream is read with the same restricted machine as torch pickles; nothing is imported or
called.  A pickle is recognised by what it is, not by its name: a protocol 0 pickle named
``model.pt`` is still what ``torch.load`` would run.

joblib writes each numpy array's bytes straight into the pickle stream after the array's
``NumpyArrayWrapper`` (object arrays as a nested pickle), so the machine used here skips those
bytes (or reads the nested pickle) exactly where joblib's own unpickler would read them.
Compressed joblib files (zlib, gzip, bz2, xz, lzma) are decompressed as a stream.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import pickle
import pickletools
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from ckptkit.errors import IntegrityError
from ckptkit.formats.npz import MAX_HEADER, NPY_MAGIC, parse_header
from ckptkit.model import Opaque, itemsize
from ckptkit.pickle_globals import allowed, numpy_dtype_name
from ckptkit.unpickler import (Findings, InertUnpickler, PickleContext, UnsafePickleError,
                               is_binary_pickle, read_pickle)

SUFFIXES = (".pkl", ".pickle", ".joblib", ".jbl", ".sav", ".pk", ".p")
WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"
CONTEXT = PickleContext(allowed=allowed("joblib"))
#: More consecutive pickles than this in one file is not a file anyone wrote on purpose.
MAX_PICKLES = 10_000
#: Decompressed bytes allowed per compressed byte before the stream counts as a bomb.
MAX_RATIO = 2000
#: Of those, bytes the machine may interpret as opcodes (joblib array bytes are skipped, not
#: interpreted): this bounds the time a small, highly compressible stream of opcodes can take.
INTERPRETED_RATIO = 16
#: joblib object arrays inside object arrays, as deep as this.
MAX_NESTING = 8


#: Bytes of a file without a binary pickle header parsed to decide whether it is a pickle.
SNIFF_BYTES = 1 << 20
_TEXT_OPCODES = (b"(", b"}", b"]", b"c", b"I", b"N", b"V", b"S", b"d", b"l", b"t", b"F", b"L",
                 b"i", b"P", b"p", b"g", b")", b"K", b"J", b"M", b"X", b"U", b"T", b"\x88",
                 b"\x89", b".", b"\x80")


def sniff(path: Path) -> bool:
    """True for a file that is (or decompresses to) a pickle stream: a binary pickle header,
    a compressed stream named like a pickle, or (any name) bytes whose first pickle parses
    to its STOP, as ``pickle.load`` would read them."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            if is_binary_pickle(head):
                return True
            fh.seek(0)
            if any(s in SUFFIXES for s in path.suffixes):
                with _decompressed(fh, path) as stream:
                    first = stream.read(1)
                    if getattr(stream, "compression", ""):
                        return first in (b"\x80",) + _TEXT_OPCODES
                fh.seek(0)
            return head[:1] in _TEXT_OPCODES and _parses(fh.read(SNIFF_BYTES))
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError):
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


def is_npy(path: Path) -> bool:
    """True for a standalone ``.npy`` file (``np.save``), by its magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(6) == NPY_MAGIC
    except OSError:
        return False


def analyse_npy(path: Path) -> tuple[Findings, str]:
    """A ``.npy`` file: its header, and for an object array the pickle ``np.load`` runs
    (``allow_pickle=True``) right after it.  Numeric arrays are plain data; an object array
    is listed as an object, as in ``.npz`` files (numpy loads it only when told to)."""
    findings = Findings()
    with open(path, "rb") as fh:
        head = fh.read(MAX_HEADER + 12)
        header, start = parse_header(head, str(path))
        if header["descr"] not in ("|O", "O"):
            return findings, "npy"
        findings.objects.add("numpy.ndarray[object]")
        fh.seek(start)
        read_pickle(fh, findings, what=f"object array in {path}", location="object array")
    return findings, "npy"


def analyse(path: Path) -> tuple[Findings, str]:
    """Read every pickle in ``path`` with the restricted machine; return the findings and a
    short description of the container (``pickle``, ``gzip pickle``, ``xz pickle``, ...).

    Raises:
        IntegrityError: a broken stream (an UnsafePickleError when it also names dangerous
            callables).
    """
    findings = Findings()
    size = path.stat().st_size
    with open(path, "rb") as fh, _decompressed(fh, path) as stream:
        compression = getattr(stream, "compression", "")
        budget = _Budget(stream, path, total=size * MAX_RATIO + (64 << 20),
                         interpreted=size * INTERPRETED_RATIO + (1 << 20) if compression
                         else size + 1)
        count = 0
        while budget.more():
            count += 1
            if count > MAX_PICKLES:
                raise IntegrityError(f"{path}: more than {MAX_PICKLES} pickles in one file")
            try:
                read_pickle(budget, findings, what=f"pickle {count}",  # type: ignore[arg-type]
                            context=CONTEXT, location=f"pickle {count}",
                            machine=_JoblibMachine)
            except UnsafePickleError:
                raise
            except IntegrityError as exc:
                if isinstance(exc.__cause__, LimitError):
                    raise exc.__cause__ from None
                raise
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

    def __init__(self, file: _Budget, *args: Any, **kwargs: Any):
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


class LimitError(IntegrityError):
    """The stream went past its byte budget: reported as it is, not as a corrupt pickle."""


class _Budget:
    """A read-only stream that stops a decompression bomb and can peek for another pickle.

    ``interpreted`` caps the bytes handed to the pickle machine (opcodes and their operands),
    ``total`` everything taken from the stream, including skipped joblib array bytes."""

    def __init__(self, stream: BinaryIO, path: Path, *, total: int, interpreted: int):
        self._stream, self._path = stream, path
        self._total, self._interpreted = total, interpreted
        self._read = 0  # position in the (decompressed) stream
        self._used = 0  # interpreted bytes
        self._ahead = b""

    def more(self) -> bool:
        """True when another byte follows (kept to be read next)."""
        if not self._ahead:
            self._ahead = self._stream.read(1)
        return bool(self._ahead)

    def read(self, n: int = -1) -> bytes:
        # Length prefixes (BINBYTES8, BINUNICODE8) can ask for anything: read in pieces and
        # never past the budget, so a claim costs memory only for bytes that are there.
        room = self._interpreted - self._used
        want = room + 1 if n < 0 else min(n, room + 1)
        data = self._ahead[:want] + self._pieces(want - len(self._ahead[:want]))
        self._ahead = self._ahead[want:]
        self._used += len(data)
        self._advance(len(data))
        if self._used > self._interpreted:
            raise LimitError(f"{self._path}: more than {self._interpreted} bytes of pickle "
                             "opcodes", hint="A decompression bomb; do not load it")
        return data

    def skip(self, n: int) -> int:
        """Pass over ``n`` bytes (joblib array data) without keeping them; how many there were."""
        skipped = len(self._ahead[:n])
        self._ahead = self._ahead[n:]
        self._advance(skipped)
        while skipped < n:
            part = self._stream.read(min(n - skipped, 1 << 20))
            if not part:
                break
            skipped += len(part)
            self._advance(len(part))
        return skipped

    def _advance(self, n: int) -> None:
        self._read += n
        if self._read > self._total:
            raise LimitError(f"{self._path}: decompresses to more than {self._total} bytes",
                             hint="A decompression bomb; do not load it")

    def _pieces(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            part = self._stream.read(min(n - got, 1 << 20))
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def readline(self, limit: int = 1 << 20) -> bytes:
        if self._ahead == b"\n":
            self._ahead = b""
            return b"\n"
        line = self._ahead + self._stream.readline(limit if 0 < limit < 1 << 20 else 1 << 20)
        self._ahead = b""
        self._used += len(line)
        self._advance(len(line))
        if self._used > self._interpreted:
            raise LimitError(f"{self._path}: more than {self._interpreted} bytes of pickle "
                             "opcodes", hint="A decompression bomb; do not load it")
        return line

    def tell(self) -> int:
        return self._read

    def reread(self, start: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``start`` of a file that is not decompressed, read outside
        the budget and leaving the stream where it is (pickles whose frames loaders read
        differently are read again); nothing for a compressed one."""
        if isinstance(self._stream, _Named):
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
        # to the end would inflate everything (a bomb's whole payload), so it is refused.
        if whence == io.SEEK_END and isinstance(self._stream, _Named):
            raise OSError("cannot seek to the end of a compressed stream")
        where = self._stream.seek(pos, whence)
        self._ahead = b""
        self._read = where
        return where


class _decompressed:  # noqa: N801 - used as a context manager, like open()
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
