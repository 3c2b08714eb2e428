"""PyTorch zip checkpoints (``torch.save`` since 1.6), read without importing torch.

Layout: ``<prefix>/data.pkl`` (the object, tensors as persistent ids), ``<prefix>/data/<key>``
(one stored record per storage, 64-byte aligned), plus small records (``byteorder``,
``version``, ``.format_version``, ``.storage_alignment``).  The prefix is the file name without
its last suffix, or ``archive`` for buffers, so it is found, never assumed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.storage.location import Location, locate
from ckptkit.errors import IntegrityError
from ckptkit.formats import ziparchive
from ckptkit.model import ByteSpan, RawCheckpoint, SafetyReport, itemsize
from ckptkit.pickles.pickle_globals import StorageRef, StorageType
from ckptkit.pickles.pickle_tree import Resolver
from ckptkit.tree import iter_tensors
from ckptkit.pickles.unpickler import Findings, PickleContext, read_pickle

FORMAT = "torch-zip"
_SMALL_RECORDS = ("byteorder", "version", ".data/version", ".format_version",
                  ".storage_alignment")


def find_prefix(names: list[str]) -> str | None:
    """The archive's folder: the one ``<prefix>/data.pkl`` at depth one, if exactly one
    (a name listed twice is one record to torch: it reads the last)."""
    prefixes = {n[: -len("/data.pkl")] for n in names
                if n.endswith("/data.pkl") and n.count("/") == 1}
    return prefixes.pop() if len(prefixes) == 1 else None


def is_torchscript(names: list[str], prefix: str) -> bool:
    return f"{prefix}/constants.pkl" in names or any(
        n.startswith(f"{prefix}/code/") for n in names)


def sniff(path: Path | Location) -> bool:
    path = locate(path)
    if not ziparchive.is_zip(path):
        return False
    try:
        with ziparchive.zip_of(path) as archive:
            names = archive.namelist()
    except (*ziparchive.ZIP_ERRORS, ValueError):
        # A truncated torch zip still starts like one; let read_info report it properly.
        return _looks_like_torch_zip_start(path)
    pickles = {n for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
    if len(pickles) > 1:
        return True  # ambiguous: read_info refuses it with an integrity error
    prefix = find_prefix(names)
    return prefix is not None and not is_torchscript(names, prefix)


def _looks_like_torch_zip_start(path: Location) -> bool:
    first = ziparchive.first_member_name(path)
    return first.endswith("/data.pkl") or "/data/" in first or first.endswith("/byteorder")


class TorchArchive:
    """An open torch zip: resolves storages to byte spans and interprets its pickles."""

    def __init__(self, path: Path | Location, what: str = "PyTorch zip checkpoint", *,
                 window: tuple[int, int] | None = None):
        """``window=(offset, length)``: the archive is that byte range of ``path`` (a DCP
        item); spans still count from the start of ``path``."""
        self.path = path = locate(path)
        self.base = window[0] if window else 0
        self._file = path.open()
        self.fh: Any = self._file
        if window:
            self.fh = ziparchive.Window(self._file, *window)
            self.size = window[1]
        else:
            self.size = path.size()
        try:
            self.zip = ziparchive.open_zip(path, what, duplicates=True,
                                           window=self.fh if window else None)
        except BaseException:
            self._file.close()
            raise
        self.names = self.zip.namelist()
        prefix = find_prefix(self.names)
        if prefix is None:
            self.close()
            raise IntegrityError(
                f"{path}: zip needs exactly one '<folder>/data.pkl' record",
                hint="Two or more make loaders disagree on which one counts; do not load it",
                path=str(path))
        self.prefix = prefix
        self.findings = Findings()
        self._spans: dict[tuple[str, str], ByteSpan] = {}
        self.referenced: set[str] = set()
        self.crc_mismatch: list[str] = []  # records torch.load reads although their CRC fails

    def close(self) -> None:
        self._file.close()
        self.zip.close()

    def __enter__(self) -> TorchArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, name: str) -> str | None:
        member = f"{self.prefix}/{name}"
        if member not in self.names:
            return None
        info = self.zip.getinfo(member)
        if info.file_size > 4096:
            return None
        data, _crc_ok = ziparchive.read_record(self.fh, info, self.size)
        return data.decode("utf-8", "replace").strip()

    def persistent(self, folder: str):
        def load(pid: Any) -> Any:
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
                self.findings.objects.add("<unknown persistent id>")
                return None
            _tag, storage_type, key, location, numel = pid[:5]
            dtype = storage_type.dtype if isinstance(storage_type, StorageType) else "uint8"
            if not isinstance(numel, int) or numel < 0:
                raise IntegrityError(f"{self.path}: storage {key!r} has invalid size {numel!r}")
            return StorageRef(f"{folder}/{key}", dtype, str(location), numel)

        return load

    def span_for(self, storage: StorageRef) -> ByteSpan:
        cached = self._spans.get((storage.key, storage.dtype))
        if cached is not None:
            return cached
        member = f"{self.prefix}/{storage.key}"
        try:
            info = self.zip.getinfo(member)
        except KeyError:
            raise IntegrityError(f"{self.path}: storage record {member!r} is missing",
                                 hint="The file is incomplete or was edited; re-save it",
                                 path=str(self.path)) from None
        length = int(storage.numel * itemsize(storage.dtype))
        if info.file_size < length:
            raise IntegrityError(
                f"{self.path}: storage {member!r} holds {info.file_size} bytes but its tensor "
                f"needs {length}", hint="The file is corrupt or crafted; do not load it",
                path=str(self.path))
        self.referenced.add(member)
        from ckptkit.storage.location import LocalLocation

        # A remote archive's stored records are found through the zip when read (below).
        remote = not isinstance(self.path, (Path, LocalLocation)) and not self.base \
            and not isinstance(self.fh, ziparchive.Window)
        if info.compress_type == zipfile.ZIP_STORED and not remote:
            span = ByteSpan(str(self.path),
                            self.base + ziparchive.data_offset(self.fh, info, self.size), length)
        elif self.base or isinstance(self.fh, ziparchive.Window):
            raise IntegrityError(f"{self.path}: compressed storage {member!r} inside a stored "
                                 "item (torch.save never compresses)",
                                 hint="The file is corrupt or crafted; do not load it",
                                 path=str(self.path))
        else:
            # Compressed records, and every record of a remote archive, are found through the
            # zip when read: a remote local header costs a round trip each, and inspect needs
            # none of them (only load and diff read the bytes).
            span = ByteSpan(str(self.path), 0, length, member)
        self._spans[(storage.key, storage.dtype)] = span
        return span

    def read_object(self, pickle_name: str, folder: str,
                    context: PickleContext | None = None) -> Any:
        """Interpret a pickle record as ``torch.load`` reads it (see ``read_record``).  A
        name stored twice is read twice: which copy a loader takes depends on the loader (and
        for torch on where the name sorts), so what any copy would run is reported; the tree
        is the last one's."""
        member = f"{self.prefix}/{pickle_name}"
        copies = [i for i in self.zip.infolist() if i.filename == member]
        raw: Any = None
        for number, info in enumerate(copies, 1):
            if info.compress_type != zipfile.ZIP_STORED:  # a zip bomb in data.pkl stops here
                budget.current().charge("decompressed", info.file_size, member)
            data, crc_ok = ziparchive.read_record(self.fh, info, self.size)
            if not crc_ok:
                self.crc_mismatch.append(member)
            location = member if len(copies) == 1 else (
                f"{member} (copy {number} of {len(copies)})")
            raw = read_pickle(data, self.findings, self.persistent(folder),
                              what=f"{member} in {self.path}", context=context,
                              location=location)
        return Resolver(self.span_for).resolve(raw)

    def details(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"zip_prefix": self.prefix}
        for name in _SMALL_RECORDS:
            value = self.record(name)
            if value is not None:
                facts[name.lstrip(".").replace("/", "_")] = value
        data_members = {n for n in self.names if n.startswith(f"{self.prefix}/data/")}
        facts["storages"] = len(self.referenced)
        unreferenced = sorted(data_members - self.referenced)
        if unreferenced:
            facts["unreferenced_records"] = unreferenced[:20]
        if self.crc_mismatch:
            facts["crc_mismatch"] = sorted(set(self.crc_mismatch))
        if len(self.names) != len(set(self.names)):
            facts["duplicate_records"] = sorted({n for n in self.names
                                                 if self.names.count(n) > 1})[:20]
        return facts

    def safety(self) -> SafetyReport:
        return SafetyReport(tuple(sorted(self.findings.objects)),
                            tuple(sorted(self.findings.unsafe)), self.findings.pickles)


@metered
def read_info(path: Path | Location) -> RawCheckpoint:
    with TorchArchive(path) as archive:
        tree = archive.read_object("data.pkl", "data")
        tensors = tuple(iter_tensors(tree))
        details = archive.details()
        details.update(archive.findings.details())
        return RawCheckpoint(FORMAT, tree, tensors, archive.safety(), details)


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    from ckptkit.formats import torch_common

    return torch_common.load(path, framework, unsafe=unsafe, reader=read_info)
