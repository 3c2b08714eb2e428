"""Zip-based outputs: NumPy ``.npz`` and PyTorch zip checkpoints, one stored member per tensor.

Members are written with :mod:`zipfile` into the open output file, each streamed straight
from the array's buffer (zipfile computes the CRC as it goes).  PyTorch's data records are
64-byte aligned the way ``torch.save`` aligns them: the local header's extra field is padded
with an ``FB`` field so that the record's first byte falls on the boundary, which is what
``torch.load(mmap=True)`` relies on.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from ckptkit.formats.streams import raw_bytes
from ckptkit.formats.torch_pickle import StoredTensor, state_dict_pickle
from ckptkit.errors import FormatError

ALIGNMENT = 64
#: Where :class:`TorchZipWriter` keeps metadata: a record torch.load never opens.
TORCH_METADATA_RECORD = "extra/ckptkit_metadata.json"
_LOCAL_HEADER = 30
_ZIP64_LOCAL_EXTRA = 20  # what zipfile appends to the local header of a zip64 member
_PAD_FIELD = 0x4246  # "FB", the extra-field id PyTorch pads with
_EXTENDED = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                       "float8_e5m2fnuz", "float8_e8m0fnu", "float8_e4m3b11fnuz"})


def archive_stem(target: Path) -> str:
    """The folder inside a torch zip written to ``target``: the file name without its last
    suffix, as ``torch.save`` names it, with every character that is not printable UTF-8 (a
    raw byte of a name that is not UTF-8, a control) as ``_``; zip member names must encode,
    and readers take the folder as it comes."""
    stem = os.path.splitext(target.name)[0] or "archive"
    return "".join(c if c.isprintable() else "_" for c in stem)


def add_member(archive: zipfile.ZipFile, name: str, pieces: Iterable[bytes | memoryview], *,
               align: int | None = None, force_zip64: bool = False,
               size: int | None = None) -> None:
    """Append a stored member made of ``pieces`` (bytes), optionally with aligned data.

    Pass ``size`` (the total byte count) to stream ``pieces`` lazily, e.g. from a generator
    that reads another file in chunks; without it ``pieces`` must be a sequence.
    """
    if size is None:
        pieces = list(pieces)
        size = sum(len(p) for p in pieces)
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size  # lets zipfile decide on zip64 up front, as we did below
    if align:
        zip64 = force_zip64 or size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule
        # ``start_dir`` is where zipfile writes the next local header.
        header = (_LOCAL_HEADER + len(name.encode("utf-8"))
                  + (_ZIP64_LOCAL_EXTRA if zip64 else 0) + 4)
        pad = -(archive.start_dir + header) % align
        info.extra = struct.pack("<HH", _PAD_FIELD, pad) + b"Z" * pad
    with archive.open(info, "w", force_zip64=force_zip64) as member:
        for piece in pieces:
            member.write(piece)


def npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The ``.npy`` header and data of ``array``, as ``np.save`` would write them.

    Fortran-ordered arrays stay Fortran-ordered (no copy); other non-contiguous arrays are
    written in C order.  bfloat16 and float8 get numpy's own ``|V2``/``|V1`` descriptions.
    """
    header = np.lib.format.header_data_from_array_1_0(array)
    if array.dtype.name in _EXTENDED:
        # numpy spells most ml_dtypes types as raw voids, but float8_e5m2 as "<f1", which
        # np.load then rejects: all of them become voids, read back with a view.
        header["descr"] = f"<V{array.dtype.itemsize}"
    data = raw_bytes(array.T if header["fortran_order"] else array)
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # a header over 64 KiB (huge rank or names): version 2.0
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue(), data


class NpzWriter:
    """An ``np.savez``-compatible archive: one stored ``<name>.npy`` member per tensor."""

    def __init__(self, fh: BinaryIO, path: Path | None = None):
        self.archive = zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.path = path  # named in errors

    def add(self, name: str, array: np.ndarray) -> None:
        if "\x00" in name:
            # zipfile cuts member names at NUL: the array would land under another name.
            where = f"{self.path}: " if self.path else ""
            raise FormatError(f"{where}tensor name {name!r} holds a NUL character, which an "
                              "npz member name cannot", hint="Rename it with a recipe rule, "
                              "or convert --to safetensors",
                              path=str(self.path) if self.path else None)
        header, data = npy_parts(array)
        # zip64 for every member, as np.savez does: sizes are not known to fit beforehand.
        add_member(self.archive, f"{name}.npy", (header, data), force_zip64=True)

    def finish(self) -> None:
        self.archive.close()

    def abort(self) -> None:
        _abandon(self.archive)


class TorchZipWriter:
    """A ``torch.save`` zip of a flat state dict, one aligned ``data/<key>`` record per tensor.

    Records come in this order: the small format records (the first record names the archive
    folder for torch's reader), each tensor's bytes as it arrives, then ``data.pkl`` (which
    needs every tensor's dtype and shape), ``version`` and the optional metadata record.
    Zip readers go by the central directory, so the order is free.
    """

    def __init__(self, fh: BinaryIO, stem: str, metadata: dict[str, str]):
        self.archive = zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.stem = stem
        self.metadata = metadata
        self.entries: list[StoredTensor] = []
        for name, text in ((".format_version", "1"), (".storage_alignment", str(ALIGNMENT)),
                           ("byteorder", "little")):
            self._record(name, text.encode("ascii"))

    def _record(self, name: str, data: bytes | memoryview) -> None:
        add_member(self.archive, f"{self.stem}/{name}", (data,), align=ALIGNMENT)

    def add(self, name: str, array: np.ndarray) -> None:
        key = str(len(self.entries))
        self._record(f"data/{key}", raw_bytes(array))
        self.entries.append(StoredTensor(name, array.dtype.name, tuple(array.shape), key))

    def finish(self) -> None:
        self._record("data.pkl", state_dict_pickle(self.entries))
        self._record("version", b"3\n")
        if self.metadata:
            text = json.dumps(self.metadata, indent=1, sort_keys=True)
            self._record(TORCH_METADATA_RECORD, text.encode("utf-8"))
        self.archive.close()

    def abort(self) -> None:
        _abandon(self.archive)


def _abandon(archive: zipfile.ZipFile) -> None:
    # Closed now, while the output file is still open: left to the garbage collector, the
    # ZipFile would try to write its directory into a closed file and warn.
    with contextlib.suppress(Exception):
        archive.close()
