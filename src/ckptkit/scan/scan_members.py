"""Members scanned one by one for ``ckpt scan``: zip and tar archives, and the records of a
torch zip that are not its pickles.

An archive gets one result merged from its members' results (worst verdict wins); each
member that could hold a pickle is copied out and scanned like a file, within the caps of
:mod:`ckptkit.scan.archive_members`.  A torch zip's other records (where tensor bytes belong) are
checked for pickles and zips hidden in them.  What is inflated, and the opcodes scanned, are
charged to the file's reading budget (:mod:`ckptkit.storage.budget`), shared by nested archives.
"""

from __future__ import annotations

import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ckptkit.scan import archive_members
from ckptkit.storage import budget
from ckptkit.storage.location import locate
from ckptkit.errors import BudgetError, ExitCode, IntegrityError, disk_full
from ckptkit.formats import ziparchive
from ckptkit.pickles.unpickler import MAX_STATIC_SCAN, Findings, is_binary_pickle, scan_globals

if TYPE_CHECKING:
    from ckptkit.scan.verdicts import ScanResult, Skipped

#: Archive members are scanned down to this depth (a zip in a zip in a zip).
MAX_DEPTH = 3
#: Scans a member copied out to a path, under a label naming it inside its container.
MemberScanner = Callable[[Path, str], "ScanResult | Skipped"]


def absorb(findings: Findings, result: Any, within: str) -> None:
    """Add a member's result to its container's findings, its places prefixed ``within``."""
    findings.objects |= set(getattr(result, "objects", ()))
    findings.pickles += getattr(result, "pickles", 0)
    for danger in getattr(result, "unsafe", ()):
        if danger.name not in findings.unsafe:
            findings.unsafe[danger.name] = danger.via
            findings.where[danger.name] = f"{within}{danger.where}"
            if danger.offset is not None:
                findings.offset[danger.name] = danger.offset


def archive(path: Path, name: str, depth: int, scan_member: MemberScanner) -> ScanResult:
    """One result for an archive, merged from its members' results (worst verdict wins)."""
    from ckptkit.scan.verdicts import ScanResult, verdict

    results = []
    passed = 0
    try:
        with tempfile.TemporaryDirectory(prefix="ckpt-scan-") as tmp:
            target = Path(tmp) / "member"
            for member in archive_members.members(path):
                if isinstance(member, str):
                    passed += 1
                    continue
                member.copy_to(target)
                result = scan_member(target, f"{name}!{member.name}")
                target.unlink(missing_ok=True)
                if isinstance(result, ScanResult):
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
        inner = member.path[len(name) + 1:]
        absorb(findings, member, f"{inner}{'!' if member.format == 'archive' else ': '}")
        if member.verdict == "unreadable":
            notes.append(f"{inner} unreadable ({member.note})")
    scanned = f"{len(results)} member(s) scanned, {passed} without pickles"
    return verdict(name, "archive", findings, note="; ".join([scanned, *notes[:3]]))


def hidden_in_records(path: Path, findings: Findings, depth: int,
                      scan_member: MemberScanner) -> str:
    """Pickles and zips stored where tensor bytes (or extra records) of a torch zip belong.

    Loading the checkpoint does not run them by itself, but they are a classic way to smuggle
    a payload past scanners that only read ``data.pkl``: whatever such a file hides is
    reported, under the record that holds it.  Records are read as torch reads them (local
    header names and CRCs not checked).  Returns a note on records that cannot be read."""
    from ckptkit.scan.verdicts import ScanResult

    problems: list[str] = []
    loc = locate(path)
    size = loc.size()
    with ziparchive.open_zip(loc, "zip", duplicates=True) as archive, loc.open() as fh:
        for info in archive.infolist():
            if info.is_dir() or info.filename.endswith(".pkl") or "/code/" in info.filename:
                continue
            try:
                head = _record_head(fh, info, size, 4)
                if is_binary_pickle(head):
                    nested = Findings(location=f"{info.filename} (a pickle inside a tensor record)")
                    try:
                        scan_globals(_record_head(fh, info, size, MAX_STATIC_SCAN), nested)
                    finally:  # what was found before the budget ran out is reported too
                        _absorb_unsafe(findings, nested)
                elif head == ziparchive.ZIP_MAGIC and depth < MAX_DEPTH:
                    budget.current().charge("decompressed", info.file_size, info.filename)
                    with tempfile.TemporaryDirectory(prefix="ckpt-scan-") as tmp:
                        target = Path(tmp) / "member"
                        target.write_bytes(ziparchive.read_record(fh, info, size)[0])
                        result = scan_member(target, info.filename)
                    if isinstance(result, ScanResult):
                        absorb(findings, result, f"{info.filename} (a zip inside the zip): ")
            except BudgetError as exc:
                if not findings.unsafe:
                    raise  # not every record was examined: the file is unreadable
                problems.append(f"not every record was examined: {exc.message}")
                break
            except IntegrityError as exc:
                problems.append(f"{info.filename}: {exc.message}")
    return f"a record cannot be read ({problems[0]})" if problems else ""


def _absorb_unsafe(findings: Findings, nested: Findings) -> None:
    for qualname, via in nested.unsafe.items():
        if qualname not in findings.unsafe:
            findings.unsafe[qualname] = via
            findings.where[qualname] = nested.where[qualname]
            if qualname in nested.offset:
                findings.offset[qualname] = nested.offset[qualname]


def _record_head(fh: Any, info: Any, size: int, limit: int) -> bytes:
    """The first ``limit`` bytes of a record, without reading the rest of a stored one."""
    if info.compress_type == zipfile.ZIP_STORED:
        fh.seek(ziparchive.data_offset(fh, info, size))
        return fh.read(min(limit, info.compress_size))
    if info.file_size > MAX_STATIC_SCAN << 2:
        return b""  # a compressed tensor record that large is not read back for a check
    budget.current().charge("decompressed", info.file_size, info.filename)  # inflated whole
    return ziparchive.read_record(fh, info, size)[0][:limit]
