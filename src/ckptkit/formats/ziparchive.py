"""Zip plumbing shared by the zip-based formats (torch, TorchScript, npz)."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

from ckptkit.errors import IntegrityError

ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def is_zip(path: Path) -> bool:
    """True if ``path`` is a regular file starting with a zip local-file header."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == ZIP_MAGIC
    except (IsADirectoryError, PermissionError, OSError):
        return False


def open_zip(path: Path, what: str) -> zipfile.ZipFile:
    """Open ``path`` as a zip, turning a missing central directory into an IntegrityError."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise IntegrityError(
            f"{path}: {what} is truncated or corrupt ({exc})",
            hint="Re-download or re-save the file; a complete zip ends with its central directory",
            path=str(path)) from exc
    names = archive.namelist()
    if len(names) != len(set(names)):
        archive.close()
        raise IntegrityError(f"{path}: zip holds duplicate member names",
                             hint="Such files can hide payloads; do not load it", path=str(path))
    return archive


def data_offset(fh: BinaryIO, info: zipfile.ZipInfo, file_size: int) -> int:
    """Absolute file offset of a member's data, read from its local header."""
    fh.seek(info.header_offset)
    header = fh.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != ZIP_MAGIC:
        raise IntegrityError(f"zip member {info.filename!r} has no valid local header")
    name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if offset + info.compress_size > file_size:
        raise IntegrityError(
            f"zip member {info.filename!r} runs past the end of the file "
            f"({offset + info.compress_size} > {file_size} bytes)")
    return offset


def first_member_name(path: Path) -> str:
    """Name in the first local header: identifies a zip whose central directory is lost."""
    with open(path, "rb") as fh:
        head = fh.read(_LOCAL_HEADER.size + 1024)
    if len(head) < _LOCAL_HEADER.size or head[:4] != ZIP_MAGIC:
        return ""
    name_len = _LOCAL_HEADER.unpack(head[:_LOCAL_HEADER.size])[-2]
    return head[_LOCAL_HEADER.size:_LOCAL_HEADER.size + name_len].decode("utf-8", "replace")
