"""``ckpt scan``: a verdict per file on what loading it would run, without running anything.

The verdict comes from the same restricted reading ``ckpt inspect`` does (every pickle in the
file interpreted by :mod:`ckptkit.pickles.unpickler`), plus plain pickle, joblib and ``.npy`` files,
the members of zip and tar archives (:mod:`ckptkit.scan.scan_members`) and checkpoint directories
read as one unit (:mod:`ckptkit.scan.checkpoint_dirs`: SavedModel, PyTorch DCP, Orbax):

``safe``
    Tensors, containers and numbers only (or a format without pickles).
``unknown-objects``
    Loading would construct classes the file names (listed), or run code ckptkit does not
    vet (TorchScript); nothing dangerous is named.
``unsafe``
    The file names callables that run code, touch files, processes or the network (listed,
    each with the opcode that reached it, the pickle it is in and its byte offset).
``unreadable``
    No loader could read it (corrupt, truncated), or the reader gave up on it; the note says
    which.  In a folder, files that are none of the formats above are listed as skipped.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ckptkit.scan import archive_members, checkpoint_dirs, scan_members
from ckptkit.storage import budget
from ckptkit.storage.location import locate
from ckptkit import config, formats
from ckptkit.pickles import plain_pickle
from ckptkit.errors import (BudgetError, CkptkitError, DiskFullError, ExitCode, FormatError,
                            NotFoundError, UsageError)
from ckptkit.pickles.unpickler import Findings, UnsafePickleError
from ckptkit.scan.verdicts import (FAIL_ON, UNVETTED_CODE, VERDICTS, Danger, FailOn, ScanReport,
                                   ScanResult, Skipped, findings_of, unreadable, verdict)

@dataclass(frozen=True)
class ScanOptions:
    """``trust_torchscript``: count TorchScript code as vetted (a verdict of ``safe`` for an
    archive whose pickles are plain data)."""

    trust_torchscript: bool = False


def scan(paths: Iterable[str | os.PathLike[str]], options: ScanOptions = ScanOptions(), *,
         jobs: int = 1, on_result: Callable[[ScanResult | Skipped], None] | None = None
         ) -> ScanReport:
    """Scan files and directories (recursively); nothing in them is imported or called.

    Files named explicitly always get a result; inside directories, files that are neither a
    checkpoint, a pickle nor an archive are listed as skipped, with the reason.  A path may be
    a URL (``s3://bucket/prefix/``, ``gs://``, ``hf://``, ``https://`` for one file): a prefix
    is walked with the store's listing and each object read with ranged requests.

    Args:
        jobs: files read at once (a bounded pool; results stream to ``on_result`` as they
            finish, and the report lists them in walk order).
        on_result: called with each result or skip as it is known (progress).

    Raises:
        NotFoundError: a path does not exist.
    """
    report = ScanReport()
    targets = [_target(raw) for raw in paths]
    for path in targets:  # all checked first: a typo must not hide other files' verdicts
        if not path.exists() and not (isinstance(path, Path) and
                                      path.with_name(path.name + ".index").is_file()):
            raise NotFoundError(f"{path}: no such file or directory",
                                hint="Check the path; nothing was scanned", path=str(path))
    work: list[tuple[Any, bool] | ScanResult | Skipped] = []
    for path in targets:
        if not isinstance(path, Path) and path.is_dir():
            work.extend((obj, False) for obj in path.walk())  # an object store's prefix
        elif isinstance(path, Path) and path.is_dir() and not checkpoint_dirs.unit_kind(path):
            work.extend(entry if not isinstance(entry, Path) else (entry, False)
                        for entry in _walk(path))
        else:
            work.append((path, True))
    for entry in _run(work, jobs, options, on_result):
        (report.skipped if isinstance(entry, Skipped) else report.results).append(
            entry)  # type: ignore[arg-type]
    return report


def _target(raw: str | os.PathLike[str]) -> Any:
    """A local Path, or a remote location for a URL (``file://`` becomes a Path)."""
    from ckptkit.storage.location import LocalLocation, is_url, locate

    if isinstance(raw, (str, os.PathLike)) and not is_url(raw):
        return Path(raw)
    found = locate(raw)
    return found.path if isinstance(found, LocalLocation) else found


def _run(work: list[Any], jobs: int, options: ScanOptions,
         on_result: Callable[[ScanResult | Skipped], None] | None
         ) -> list[ScanResult | Skipped]:
    """Scan every ``(path, explicit)`` of ``work`` with at most ``jobs`` at once; results
    already known (listing errors, skips) pass through.  Returned in ``work`` order."""
    def one(item: Any) -> ScanResult | Skipped:
        result = item if isinstance(item, (ScanResult, Skipped)) else scan_file(
            item[0], explicit=item[1], options=options)
        if on_result is not None:
            on_result(result)
        return result

    if jobs <= 1 or len(work) <= 1:
        return [one(item) for item in work]
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    results: dict[int, ScanResult | Skipped] = {}
    pending: dict[Any, int] = {}
    items = iter(enumerate(work))
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="ckpt-scan") as pool:
        # At most 2 x jobs submitted at once: a prefix of a million objects never queues
        # a million futures.
        for index, item in items:
            pending[pool.submit(one, item)] = index
            if len(pending) >= 2 * jobs:
                break
        try:
            while pending:
                # Short waits: Ctrl-C reaches this thread at once, not after a slow file.
                done, _rest = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    results[pending.pop(future)] = future.result()
                    following = next(items, None)
                    if following is not None:
                        pending[pool.submit(one, following[1])] = following[0]
        except BaseException:
            for future in pending:  # not started yet: never started
                future.cancel()
            raise
    return [results[i] for i in range(len(work))]


def scan_file(path: Path, *, explicit: bool = True, label: str | None = None, depth: int = 0,
              options: ScanOptions = ScanOptions()) -> ScanResult | Skipped:
    """The verdict on one file or checkpoint directory; a :class:`Skipped` for a file found
    by a walk that no loader reads as a checkpoint.  A reader that fails in a way it should
    not (a crash, memory or recursion exhausted) makes the file unreadable, not the scan.

    The file is read within one budget (:mod:`ckptkit.storage.budget`), shared by everything inside
    it: archive members, zips in zips, pickles hidden in tensor records.  A file that would
    cost more is unreadable, with the limit it ran over (a member over budget makes the whole
    file so: the rest of it was not examined)."""
    name = label or str(path)
    try:
        with budget.reading(path):
            return _scan_file(path, name, explicit, depth, options)
    except DiskFullError:
        raise
    except BudgetError as exc:
        if depth:
            raise
        return unreadable(name, exc)
    except Exception as exc:  # noqa: BLE001 - one crafted file must not end the whole scan
        if config.debug():
            raise  # CKPTKIT_DEBUG=1: the reader's own traceback
        return ScanResult(name, "unreadable", note=f"the reader failed on it "
                          f"({type(exc).__name__}: {str(exc)[:200]}); do not load it",
                          exit_code=ExitCode.INTEGRITY)


def _scan_file(path: Path, name: str, explicit: bool, depth: int,
               options: ScanOptions) -> ScanResult | Skipped:
    kind = checkpoint_dirs.unit_kind(path)
    if kind in ("dcp", "orbax", "hf-sharded"):
        fmt = checkpoint_dirs.FORMATS[kind]
        try:
            findings, note = checkpoint_dirs.scan_unit(path, kind, _member_scanner(depth, options))
        except UnsafePickleError as exc:
            return verdict(name, fmt, exc.findings, note=f"corrupt as well: {exc.message}")
        except BudgetError:
            raise
        except CkptkitError as exc:
            return unreadable(name, exc, fmt)
        return verdict(name, fmt, findings, note)
    if depth < scan_members.MAX_DEPTH and archive_members.kind(path) == "tar":
        return scan_members.archive(path, name, depth, _member_scanner(depth, options))
    try:
        reader = formats.detect(path)
    except FormatError as exc:
        return _not_a_checkpoint(path, name, explicit, depth, exc, options)
    except CkptkitError as exc:  # empty, vanished, a broken link
        return unreadable(name, exc) if explicit else Skipped(name, _skip_reason(path, exc))
    if reader.FORMAT in ("pickle", "npy"):  # read as scan always read them: every pickle
        return _plain(path, name, npy=reader.FORMAT == "npy")
    fmt = reader.__name__.rpartition(".")[2].replace("_", "-")
    try:
        raw = reader.read_info(path)
    except BudgetError:
        raise
    except CkptkitError as exc:
        if fmt == "torch-legacy" or path.is_file() and plain_pickle.sniff(path):
            # The legacy reader claims every protocol 2-5 pickle (and msgpack's first byte
            # can be a pickle's): a plain pickle or a joblib file is read as such; a broken
            # legacy file keeps the legacy reader's verdict.
            plain = _plain(path, name)
            if plain.verdict != "unreadable" or isinstance(exc, FormatError):
                return plain
        if isinstance(exc, UnsafePickleError):
            return verdict(name, fmt, exc.findings, note=f"corrupt as well: {exc.message}")
        return unreadable(name, exc, fmt)
    findings = findings_of(raw.safety, raw.details)
    notes = ["no pickle data" if not raw.safety.pickles else ""]
    if raw.details.get("code_files") and options.trust_torchscript:
        notes.append(f"{raw.details['code_files']} TorchScript code file(s) that "
                     "torch.jit.load runs, trusted (--trust-torchscript)")
    elif raw.details.get("code_files"):
        findings.objects.add(UNVETTED_CODE.format(raw.details["code_files"]))
    if raw.details.get("crc_mismatch"):
        notes.append(f"CRC wrong in {', '.join(raw.details['crc_mismatch'])} "
                     "(torch.load reads it anyway; analysed as read)")
    if raw.details.get("duplicate_records"):
        notes.append(f"records stored twice: {', '.join(raw.details['duplicate_records'])} "
                     "(every copy analysed)")
    if raw.format in ("torch-zip", "torchscript"):
        notes.append(scan_members.hidden_in_records(path, findings, depth,
                                                    _member_scanner(depth, options)))
    return verdict(name, raw.format, findings, note="; ".join(n for n in notes if n))


def _member_scanner(depth: int, options: ScanOptions):
    def scan_member(path: Path, label: str) -> ScanResult | Skipped:
        return scan_file(path, explicit=False, label=label, depth=depth + 1, options=options)

    return scan_member


def _not_a_checkpoint(path: Path, name: str, explicit: bool, depth: int, exc: CkptkitError,
                      options: ScanOptions) -> ScanResult | Skipped:
    if path.is_file() and plain_pickle.is_npy(path):
        return _plain(path, name, npy=True)
    if path.is_file() and plain_pickle.sniff(path):
        return _plain(path, name)
    if path.is_file() and depth < scan_members.MAX_DEPTH and archive_members.kind(path):
        return scan_members.archive(path, name, depth, _member_scanner(depth, options))
    return unreadable(name, exc) if explicit else Skipped(name, _skip_reason(path, exc))


def _plain(path: Path, name: str, npy: bool = False) -> ScanResult:
    fmt = "npy" if npy else "pickle"
    try:
        findings, kind = plain_pickle.analyse_npy(path) if npy else plain_pickle.analyse(path)
    except UnsafePickleError as exc:
        return verdict(name, fmt, exc.findings, note=f"corrupt as well: {exc.message}")
    except BudgetError:
        raise
    except CkptkitError as exc:
        return unreadable(name, exc, fmt)
    return verdict(name, kind, findings, note="" if findings.pickles else "no pickle data")


# --- walking directories ---------------------------------------------------------------------

def _walk(root: Path) -> Iterator[Path | ScanResult | Skipped]:
    """Files under ``root`` in a stable order, checkpoint directories as units; a folder
    that cannot be listed becomes an unreadable result, a linked folder is skipped (links
    can loop or lead out of the tree)."""
    errors: list[OSError] = []
    for folder, dirs, files in os.walk(root, onerror=errors.append):
        while errors:
            error = errors.pop()
            yield ScanResult(str(error.filename or folder), "unreadable",
                             note=f"cannot list the folder ({error.strerror or error})",
                             exit_code=ExitCode.ERROR)
        here = Path(folder)
        shards = checkpoint_dirs.sharded_members(here)  # scanned through their index
        dirs.sort()
        for d in list(dirs):
            if (here / d).is_symlink():
                dirs.remove(d)
                yield Skipped(str(here / d), "a link to a folder (not followed)")
            elif checkpoint_dirs.unit_kind(here / d):
                dirs.remove(d)
                yield here / d
        for f in sorted(files):
            path = here / f
            if not checkpoint_dirs.part_of_a_tf_checkpoint(path) and f not in shards:
                yield path
    for error in errors:  # the root itself could not be listed
        yield ScanResult(str(error.filename or root), "unreadable",
                         note=f"cannot list the folder ({error.strerror or error})",
                         exit_code=ExitCode.ERROR)


def _skip_reason(path: Path, exc: CkptkitError) -> str:
    """Why a file a walk found is not scanned, in a few words."""
    if not isinstance(path, Path):  # an object: no links, devices or folders among them
        return "an empty file" if path.size() == 0 else \
            f"not a checkpoint, pickle or archive ({_content_kind(path)})"
    try:
        info = path.lstat()
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISLNK(info.st_mode) and not path.exists():
        return "a broken link"
    if path.is_dir():
        return "a folder that is not a checkpoint"
    if not path.is_file():
        return "not a regular file (a pipe, socket or device)"
    if locate(path).size() == 0:
        return "an empty file"
    return f"not a checkpoint, pickle or archive ({_content_kind(path)})"


def _content_kind(path: Path) -> str:
    try:
        head = locate(path).read(0, 512)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if head.lstrip()[:1] in (b"{", b"[") and b"\x00" not in head:
        return "JSON or other text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    return "text"
