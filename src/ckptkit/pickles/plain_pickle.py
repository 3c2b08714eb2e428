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

import io
import lzma
import math
import pickle
import pickletools
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkit.storage import budget
from ckptkit.errors import CkptkitError, IntegrityError
from ckptkit.storage.location import Location, locate
from ckptkit.pickles.pickle_streams import Metered, decompressed
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
                with decompressed(fh, path) as stream:
                    first = stream.read(1)
                    if getattr(stream, "compression", ""):
                        return first in (b"\x80",) + _TEXT_OPCODES
                fh.seek(0)
            return head[:1] in _TEXT_OPCODES and _parses(fh.read(SNIFF_BYTES))
    except (OSError, CkptkitError, EOFError, ValueError, zlib.error, lzma.LZMAError,
            pickle.UnpicklingError):
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
    with budget.reading(path):
        read = read_stream(path)
    return read.findings, f"{read.compression} pickle".strip()


@dataclass
class StreamRead:
    """Every pickle of a file as the restricted machine left it, and where array bytes are.

    ``payloads`` (kept only when asked for) maps ``id()`` of a bytes value or a joblib array
    wrapper to ``(the object, offset, length)``: its bytes' place in the file, or in the
    stream the file inflates to when ``compression`` is set.  The objects are held so that
    their ids stay theirs.
    """

    values: list[Any]
    findings: Findings
    compression: str
    payloads: dict[int, tuple[Any, int, int]] = field(default_factory=dict)


def read_stream(path: Path, *, record: bool = False) -> StreamRead:
    """Read every pickle in ``path`` (inside the caller's budget); ``record`` keeps where
    each bytes value and joblib array sits, for readers that load them later.

    Raises:
        IntegrityError: a broken stream (an UnsafePickleError when it also names dangerous
            callables).
    """
    findings = Findings()
    values: list[Any] = []
    with locate(path).open() as fh, decompressed(fh, path) as stream:
        compression = getattr(stream, "compression", "")
        metered = Metered(stream, f"{compression} stream" if compression else "")
        metered.payloads = {} if record else None
        try:
            while metered.more():
                if len(values) >= MAX_PICKLES:
                    raise IntegrityError(f"{path}: more than {MAX_PICKLES} pickles in one file")
                count = len(values) + 1
                values.append(read_pickle(metered, findings,  # type: ignore[arg-type]
                                          what=f"pickle {count}", context=CONTEXT,
                                          location=f"pickle {count}", machine=_JoblibMachine))
        except pickle.UnpicklingError as exc:  # the decompressor, between two pickles
            raise IntegrityError(f"{path}: {exc}", hint="The file is truncated or corrupt",
                                 path=str(path)) from None
        metered.settle()
    return StreamRead(values, findings, compression, metered.payloads or {})


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
        size = math.prod(shape) * max(1, int(itemsize(dtype)))
        self._record(self.stack[-1], self._stream.tell(), size)
        self._skip(size)

    def _record(self, value: Any, offset: int, length: int) -> None:
        payloads = self._stream.payloads
        if payloads is not None:
            payloads[id(value)] = (value, offset, length)

    # Bytes values: numpy arrays pickled without joblib carry their data in one of these.
    def _bytes_of(self, width: int, fmt: str, kind: type) -> None:
        (size,) = struct.unpack(fmt, self.read(width))
        start = self._stream.tell()
        value = self._counted(size)
        value = kind(value) if kind is not bytes else value
        self._record(value, start, len(value))
        self.append(value)

    def _short_binbytes(self) -> None:
        self._bytes_of(1, "<B", bytes)

    def _binbytes(self) -> None:
        self._bytes_of(4, "<I", bytes)

    def _binbytes8(self) -> None:
        self._bytes_of(8, "<Q", bytes)

    def _bytearray8(self) -> None:
        self._bytes_of(8, "<Q", bytearray)

    def _skip(self, count: int) -> None:
        if self._stream.skip(count) != count:
            raise pickle.UnpicklingError("joblib array data is truncated")

    def __init__(self, file: Metered, *args: Any, **kwargs: Any):
        super().__init__(file, *args, **kwargs)
        self._stream = file
        self._depth = 0

    dispatch[pickle.BUILD[0]] = _joblib_build
    dispatch[pickle.SHORT_BINBYTES[0]] = _short_binbytes
    dispatch[pickle.BINBYTES[0]] = _binbytes
    dispatch[pickle.BINBYTES8[0]] = _binbytes8
    dispatch[pickle.BYTEARRAY8[0]] = _bytearray8


def _dtype_name(dtype: Any) -> str:
    """The dtype a joblib wrapper records (a pickled ``numpy.dtype``, kept as an Opaque)."""
    code = dtype.args[0] if isinstance(dtype, Opaque) and dtype.args else None
    if not isinstance(code, str) or len(code) > 32:
        raise pickle.UnpicklingError(f"joblib array with dtype {dtype!r}")
    return "object" if code in ("O", "O8", "O4") else numpy_dtype_name(code)


