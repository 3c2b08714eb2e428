"""Zip plumbing shared by the zip-based formats (torch, TorchScript, npz)."""

from __future__ import annotations

import io
import lzma
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from ckptkit.errors import CkptkitError, IntegrityError
from ckptkit.storage.location import Location, locate

ZIP_MAGIC = b"PK\x03\x04"
#: What zipfile raises for a damaged archive or member: bad magic or CRC (BadZipFile), an
#: unknown compression method or zip version and a set encryption flag (RuntimeError and its
#: subclasses), broken compressed data (zlib.error, LZMAError; bz2 raises OSError), data cut
#: short (EOFError) and a local header name that is not the UTF-8 it claims to be.
#: ValueError itself is left out: IntegrityError is one.
ZIP_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, zlib.error, lzma.LZMAError,
    OSError, EOFError, UnicodeDecodeError)
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def is_zip(path: Path | Location) -> bool:
    """True if ``path`` is a regular file starting with a zip local-file header."""
    try:
        return locate(path).read(0, 4) == ZIP_MAGIC
    except (OSError, CkptkitError):
        return False


class _OwnedZip(zipfile.ZipFile):
    """A ZipFile over a file object it closes itself (zipfile leaves a passed one open)."""

    def __init__(self, fh: BinaryIO):
        self._owned = fh
        try:
            super().__init__(fh)
        except BaseException:
            fh.close()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._owned.close()


def zip_of(path: Path | Location) -> zipfile.ZipFile:
    """``path`` as a :class:`zipfile.ZipFile` read through its location; closing it closes the
    file.  Raises what zipfile raises for a file that is not a (complete) zip."""
    return _OwnedZip(locate(path).open())


class Window(io.RawIOBase):
    """Bytes ``offset .. offset + length`` of an open file, as a seekable file of their own:
    a zip stored inside another file (a DCP item inside a ``.distcp``) is opened through it,
    and nothing outside the window is ever read."""

    def __init__(self, fh: BinaryIO, offset: int, length: int):
        self._fh, self._offset, self._length, self._pos = fh, offset, length, 0
        self.name = getattr(fh, "name", "window")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + pos), self._length)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        n = self._length - self._pos if n is None or n < 0 else min(n, self._length - self._pos)
        self._fh.seek(self._offset + self._pos)
        data = self._fh.read(n)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def open_zip(path: Path | Location, what: str, *, duplicates: bool = False,
             window: Window | None = None) -> zipfile.ZipFile:
    """Open ``path`` as a zip, turning a missing central directory into an IntegrityError.

    Every member's compressed bytes must lie inside the file: zipfile reads a member in
    pieces of up to its declared compressed size, and a buffered read allocates the whole
    piece before it reads, so a damaged size of gigabytes would cost gigabytes.  Two members
    of one name are refused unless ``duplicates`` (the reader then reads every one of them:
    loaders disagree on which one counts).  ``window``: the zip is that part of ``path``.
    """
    loc = locate(path)
    try:
        if window is not None:
            archive = zipfile.ZipFile(window)
            size = window.seek(0, io.SEEK_END)
        else:
            archive = zip_of(loc)
            size = loc.size()
    except (*ZIP_ERRORS, ValueError) as exc:
        raise IntegrityError(
            f"{path}: {what} is truncated or corrupt ({exc})",
            hint="Re-download or re-save the file; a complete zip ends with its central directory",
            path=str(path)) from exc
    names = archive.namelist()
    if not duplicates and len(names) != len(set(names)):
        archive.close()
        raise IntegrityError(f"{path}: zip holds duplicate member names",
                             hint="Such files can hide payloads; do not load it", path=str(path))
    for info in archive.infolist():
        if not 0 <= info.header_offset <= info.header_offset + info.compress_size <= size:
            archive.close()
            raise IntegrityError(
                f"{path}: zip member {info.filename!r} claims {info.compress_size} bytes at "
                f"offset {info.header_offset}, past the end of the {size}-byte file",
                hint="The file is truncated or corrupt; re-download or re-save it",
                path=str(path))
    return archive


def data_offset(fh: BinaryIO, info: zipfile.ZipInfo, file_size: int) -> int:
    """Absolute file offset of a member's data, read from its local header."""
    # zipfile subtracts a guessed prefix length from the recorded offset, so a damaged
    # central directory can yield a negative one (and seek would fail with EINVAL).
    header = b""
    if 0 <= info.header_offset < file_size:
        fh.seek(info.header_offset)
        header = fh.read(_LOCAL_HEADER.size)
    where = getattr(fh, "name", "zip")
    if len(header) < _LOCAL_HEADER.size or header[:4] != ZIP_MAGIC:
        raise IntegrityError(f"{where}: zip member {info.filename!r} has no valid local header",
                             path=str(where))
    name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if offset + info.compress_size > file_size:
        raise IntegrityError(
            f"{where}: zip member {info.filename!r} runs past the end of the file "
            f"({offset + info.compress_size} > {file_size} bytes)", path=str(where))
    return offset


def read_record(fh: BinaryIO, info: zipfile.ZipInfo, file_size: int) -> tuple[bytes, bool]:
    """A member's bytes as torch's zip reader (miniz) gets them, and whether its CRC holds.

    Found through the central directory and located by the local header's own name and
    extra lengths: a local header naming another file, or a wrong CRC, does not stop
    ``torch.load`` (or a pickle read from the start of a large member), so neither stops
    this read.  Raises IntegrityError for data that cannot be located or decompressed."""
    offset = data_offset(fh, info, file_size)
    fh.seek(offset)
    raw = fh.read(info.compress_size)
    where = getattr(fh, "name", "zip")
    try:
        if info.compress_type == zipfile.ZIP_STORED:
            data = raw
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            inflate = zlib.decompressobj(-15)
            data = inflate.decompress(raw, info.file_size + 1)
        else:
            data = zipfile._get_decompressor(info.compress_type).decompress(  # type: ignore[attr-defined]
                raw)[:info.file_size + 1]
    except (*ZIP_ERRORS, NotImplementedError) as exc:
        raise IntegrityError(f"{where}: zip member {info.filename!r} cannot be decompressed "
                             f"({exc})", path=str(where)) from exc
    if len(data) != info.file_size:
        raise IntegrityError(f"{where}: zip member {info.filename!r} holds {len(data)} bytes, "
                             f"its header says {info.file_size}", path=str(where))
    return data, zlib.crc32(data) == info.CRC


def first_member_name(path: Path | Location) -> str:
    """Name in the first local header: identifies a zip whose central directory is lost."""
    head = locate(path).read(0, _LOCAL_HEADER.size + 1024)
    if len(head) < _LOCAL_HEADER.size or head[:4] != ZIP_MAGIC:
        return ""
    name_len = _LOCAL_HEADER.unpack(head[:_LOCAL_HEADER.size])[-2]
    return head[_LOCAL_HEADER.size:_LOCAL_HEADER.size + name_len].decode("utf-8", "replace")
