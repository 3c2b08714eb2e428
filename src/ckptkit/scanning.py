"""``ckpt scan``: a verdict per file on what loading it would run, without running anything.

The verdict comes from the same restricted reading ``ckpt inspect`` does (every pickle in the
file interpreted by :mod:`ckptkit.unpickler`), plus plain pickle/joblib files and the members
of zip and tar archives (a checkpoint inside a hub archive, a zip inside a zip):

``safe``
    Tensors, containers and numbers only (or a format without pickles).
``unknown-objects``
    Loading would construct classes the file names (listed); no dangerous callable.
``unsafe``
    The file names callables that run code, touch files, processes or the network (listed,
    each with the opcode that reached it and the pickle it is in).
``unreadable``
    Not a format ckptkit reads, or corrupt; the message says which.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkit import archive_members, formats, plain_pickle
from ckptkit.errors import CkptkitError, ExitCode, FormatError, NotFoundError, disk_full
from ckptkit.formats import ziparchive
from ckptkit.unpickler import (MAX_STATIC_SCAN, Findings, UnsafePickleError, is_binary_pickle,
                               scan_globals)

VERDICTS = ("safe", "unknown-objects", "unsafe", "unreadable")
#: Archive members are scanned down to this depth (a zip in a zip in a zip).
MAX_DEPTH = 3


@dataclass(frozen=True)
class Danger:
    """One dangerous callable: its name, the opcode that reached it, and the pickle it is in."""

    name: str
    via: str
    where: str

    def describe(self) -> str:
        return f"{self.name} ({self.via} in {self.where})" if self.where else \
            f"{self.name} ({self.via})"


@dataclass(frozen=True)
class ScanResult:
    """The verdict on one file (``path`` uses ``!`` to name a member inside an archive)."""

    path: str
    verdict: str
    format: str | None = None
    unsafe: tuple[Danger, ...] = ()
    objects: tuple[str, ...] = ()
    pickles: int = 0
    note: str = ""
    exit_code: int = ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "verdict": self.verdict, "format": self.format,
                "unsafe": [{"name": d.name, "via": d.via, "where": d.where}
                           for d in self.unsafe],
                "objects": list(self.objects), "pickles": self.pickles, "note": self.note}


@dataclass
class ScanReport:
    """Every file's result plus what the walk passed over."""

    results: list[ScanResult] = field(default_factory=list)
    skipped: int = 0

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(VERDICTS, 0)
        for result in self.results:
            counts[result.verdict] += 1
        return counts

    @property
    def exit_code(self) -> int:
        if any(r.verdict == "unsafe" for r in self.results):
            return ExitCode.UNSAFE
        return max((r.exit_code for r in self.results), default=ExitCode.OK)

    def to_dict(self) -> dict[str, Any]:
        return {"files": [r.to_dict() for r in self.results],
                "summary": {**self.counts(), "skipped": self.skipped}}


def scan(paths: Iterable[str | os.PathLike[str]]) -> ScanReport:
    """Scan files and directories (recursively); nothing in them is imported or called.

    Files named explicitly always get a result; inside directories, files that are neither a
    checkpoint, a pickle nor an archive are counted as skipped.

    Raises:
        NotFoundError: a path does not exist.
    """
    report = ScanReport()
    targets = [Path(raw) for raw in paths]
    for path in targets:  # all checked first: a typo must not hide other files' verdicts
        if not path.exists() and not path.with_name(path.name + ".index").is_file():
            raise NotFoundError(f"{path}: no such file or directory",
                                hint="Check the path; nothing was scanned", path=str(path))
    for path in targets:
        if path.is_dir() and not _is_checkpoint_dir(path):
            for entry in _walk(path):
                result = entry if isinstance(entry, ScanResult) else \
                    scan_file(entry, explicit=False) if entry is not None else None
                if result is None:
                    report.skipped += 1
                else:
                    report.results.append(result)
        else:
            result = scan_file(path, explicit=True)
            if result is not None:  # always a result for a path named explicitly
                report.results.append(result)
    return report


def scan_file(path: Path, *, explicit: bool = True, label: str | None = None,
              depth: int = 0) -> ScanResult | None:
    """The verdict on one file (or SavedModel/TF checkpoint); ``None`` for a file found by a
    directory walk that ckptkit has nothing to say about."""
    name = label or str(path)
    if depth < MAX_DEPTH and archive_members.kind(path) == "tar":
        return _archive(path, name, depth)  # before zip readers: a tar may end in a zip
    try:
        reader = formats.detect(path)
    except FormatError as exc:
        return _not_a_checkpoint(path, name, explicit, depth, exc)
    except CkptkitError as exc:  # empty, vanished, a broken link
        return _unreadable(name, exc) if explicit else None
    fmt = reader.__name__.rpartition(".")[2].replace("_", "-")
    try:
        raw = reader.read_info(path)
    except CkptkitError as exc:
        if fmt == "torch-legacy":
            # The legacy reader claims every protocol 2-5 pickle: a plain pickle or a joblib
            # file is read as such; a broken legacy file keeps the legacy reader's verdict.
            plain = _plain(path, name)
            if plain.verdict != "unreadable" or isinstance(exc, FormatError):
                return plain
        if isinstance(exc, UnsafePickleError):
            return _verdict(name, fmt, exc.findings, note=f"corrupt as well: {exc.message}")
        return _unreadable(name, exc, fmt)
    findings = Findings(objects=set(raw.safety.objects), pickles=raw.safety.pickles,
                        unsafe=dict(raw.details.get("unsafe_via", {})),
                        where=dict(raw.details.get("unsafe_where", {})))
    for danger in raw.safety.unsafe:
        findings.unsafe.setdefault(danger, "?")
    note = "no pickle data" if not raw.safety.pickles else ""
    if raw.details.get("code_files"):
        note = (f"{raw.details['code_files']} TorchScript code file(s) that torch.jit.load "
                "runs (not vetted)")
    if raw.format in ("torch-zip", "torchscript"):
        try:
            _hidden_in_members(path, findings, depth)
        except (*ziparchive.ZIP_ERRORS, archive_members.ArchiveBomb) as exc:
            note = "; ".join(x for x in (note, f"a record cannot be read ({exc})") if x)
    return _verdict(name, raw.format, findings, note=note)


def _hidden_in_members(path: Path, findings: Findings, depth: int) -> None:
    """Pickles and zips stored where tensor bytes (or extra records) belong.

    Loading the checkpoint does not run them by itself, but they are a classic way to smuggle
    a payload past scanners that only read ``data.pkl``: whatever such a file hides is
    reported, under the member that holds it."""
    with tempfile.TemporaryDirectory(prefix="ckpt-scan-") as tmp:
        for member in archive_members.members(path):
            if isinstance(member, str) or member.name.endswith(".pkl") or "/code/" in member.name:
                continue
            if is_binary_pickle(member.head):
                nested = Findings(location=f"{member.name} (a pickle inside a tensor record)")
                scan_globals(member.read(MAX_STATIC_SCAN), nested)
            elif member.head.startswith(b"PK\x03\x04") and depth < MAX_DEPTH:
                target = Path(tmp) / "member"
                member.copy_to(target)
                result = scan_file(target, explicit=False, label=member.name, depth=depth + 1)
                target.unlink(missing_ok=True)
                nested = Findings(location=f"{member.name} (a zip inside the zip)")
                for danger in result.unsafe if result else ():
                    nested.flag(danger.name, danger.via)
                    nested.where[danger.name] += f": {danger.where}"
            else:
                continue
            for qualname, via in nested.unsafe.items():
                findings.unsafe.setdefault(qualname, via)
                findings.where.setdefault(qualname, nested.where[qualname])


def _not_a_checkpoint(path: Path, name: str, explicit: bool, depth: int,
                      exc: CkptkitError) -> ScanResult | None:
    if path.is_file() and plain_pickle.sniff(path):
        return _plain(path, name)
    if path.is_file() and depth < MAX_DEPTH and archive_members.kind(path):
        return _archive(path, name, depth)
    return _unreadable(name, exc) if explicit else None


def _plain(path: Path, name: str) -> ScanResult:
    try:
        findings, kind = plain_pickle.analyse(path)
    except UnsafePickleError as exc:
        return _verdict(name, "pickle", exc.findings, note=f"corrupt as well: {exc.message}")
    except CkptkitError as exc:
        return _unreadable(name, exc, "pickle")
    return _verdict(name, kind, findings)


def _verdict(name: str, fmt: str | None, findings: Findings, note: str = "") -> ScanResult:
    dangers = tuple(Danger(n, findings.unsafe[n], findings.where.get(n, ""))
                    for n in sorted(findings.unsafe))
    verdict = "unsafe" if dangers else "unknown-objects" if findings.objects else "safe"
    return ScanResult(name, verdict, fmt, dangers, tuple(sorted(findings.objects)),
                      findings.pickles, note,
                      ExitCode.UNSAFE if dangers else ExitCode.OK)


def _unreadable(name: str, exc: CkptkitError, fmt: str | None = None) -> ScanResult:
    message = exc.message.removeprefix(f"{name}: ")
    return ScanResult(name, "unreadable", fmt, note=message, exit_code=exc.exit_code)


# --- archives: each member that could hold a pickle is scanned on its own --------------------

def _archive(path: Path, name: str, depth: int) -> ScanResult:
    """One result for an archive, merged from its members' results (worst verdict wins)."""
    results: list[ScanResult] = []
    passed = 0
    try:
        with tempfile.TemporaryDirectory(prefix="ckpt-scan-") as tmp:
            target = Path(tmp) / "member"
            for member in archive_members.members(path):
                if isinstance(member, str):
                    passed += 1
                    continue
                member.copy_to(target)
                result = scan_file(target, explicit=False, label=f"{name}!{member.name}",
                                   depth=depth + 1)
                target.unlink(missing_ok=True)
                if result is not None:
                    results.append(result)
    except (*ziparchive.ZIP_ERRORS, tarfile.TarError, archive_members.ArchiveBomb) as exc:
        full = disk_full(exc, Path(tempfile.gettempdir()) / "ckpt-scan", "unpacking a member",
                         hint="Free space there, or point TMPDIR at a larger disk")
        if full is not None:
            raise full from exc
        return ScanResult(name, "unreadable", "archive", note=f"archive cannot be read: {exc}",
                          exit_code=ExitCode.INTEGRITY)
    findings = Findings()
    notes = []
    for member in results:
        findings.objects |= set(member.objects)
        findings.pickles += member.pickles
        for d in member.unsafe:
            findings.unsafe.setdefault(d.name, d.via)
            glue = "!" if member.format == "archive" else ": "
            findings.where.setdefault(d.name, f"{member.path[len(name) + 1:]}{glue}{d.where}")
        if member.verdict == "unreadable":
            notes.append(f"{member.path[len(name) + 1:]} unreadable ({member.note})")
    scanned = f"{len(results)} member(s) scanned, {passed} without pickles"
    return _verdict(name, "archive", findings, note="; ".join([scanned, *notes[:3]]))


# --- walking directories ---------------------------------------------------------------------

def _walk(root: Path) -> Iterator[Path | ScanResult | None]:
    """Files under ``root`` in a stable order, SavedModel directories as units; a folder that
    cannot be listed becomes an unreadable result, a linked folder None (skipped, not
    followed: links can loop or lead out of the tree)."""
    errors: list[OSError] = []
    for folder, dirs, files in os.walk(root, onerror=errors.append):
        while errors:
            error = errors.pop()
            yield ScanResult(str(error.filename or folder), "unreadable",
                             note=f"cannot list the folder ({error.strerror or error})",
                             exit_code=ExitCode.ERROR)
        here = Path(folder)
        dirs.sort()
        for d in list(dirs):
            if (here / d).is_symlink():
                dirs.remove(d)
                yield None
            elif _is_checkpoint_dir(here / d):
                dirs.remove(d)
                yield here / d
        for f in sorted(files):
            path = here / f
            if _is_part_of_a_tf_checkpoint(path):
                continue
            yield path
    for error in errors:  # the root itself could not be listed
        yield ScanResult(str(error.filename or root), "unreadable",
                         note=f"cannot list the folder ({error.strerror or error})",
                         exit_code=ExitCode.ERROR)


def _is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "saved_model.pb").is_file()


def _is_part_of_a_tf_checkpoint(path: Path) -> bool:
    """Data shards and the ``checkpoint`` state file: scanned once, through the index."""
    if path.name == "checkpoint":
        return any(path.parent.glob("*.index"))
    if ".data-" not in path.name:
        return False
    prefix = path.name.split(".data-", 1)[0]
    return (path.with_name(prefix + ".index")).is_file()

