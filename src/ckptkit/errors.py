"""One error hierarchy for the whole library, and the exit code each error maps to.

Every error carries the concrete values that explain it and a ``hint`` naming the next step;
the CLI turns them into one line on stderr (``cli/errors.py``).  Subclasses also inherit the
matching builtin so that library users can catch them the usual way.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``ckpt`` command, the same for every subcommand."""

    OK = 0
    ERROR = 1
    USAGE = 2
    INTEGRITY = 3
    NOT_FOUND = 4
    UNSAFE = 5
    INTERRUPTED = 130


class CkptkitError(Exception):
    """Base of every error ckptkit raises on purpose."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None, path: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = path
        #: A few words for a person, without the names the context already shows (e.g.
        #: "host not found", "HTTP 404"): what ``ckpt fetch`` prints per failed source.
        self.reason = reason

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}. {self.hint}"


@contextmanager
def naming(path: object) -> Iterator[None]:
    """Name ``path`` in any ckptkit error raised inside that does not name a file yet.

    Deep readers (pickle walking, protobuf, tensor views) do not know which file they read;
    the caller does.  Example::

        with naming(path):
            raw = formats.detect(path).read_info(path)
    """
    try:
        yield
    except CkptkitError as exc:
        where = str(path)  # a path, or a storage Location (which prints as its path or URL)
        if exc.path is None and where not in exc.message:
            exc.message = f"{where}: {exc.message}"
            exc.args = (exc.message, *exc.args[1:])
            exc.path = where
        raise


class UsageError(CkptkitError, ValueError):
    """A flag, value or combination of them that cannot work."""

    exit_code = ExitCode.USAGE


class FormatError(CkptkitError, ValueError):
    """The input is not in any format ckptkit reads (or not the one asked for)."""


class CatalogueError(FormatError):
    """A catalogue file is not valid TOML or breaks the schema: a bad input the user wrote,
    so it exits 2 like a bad flag.  The message names the file, the entry and the field."""

    exit_code = ExitCode.USAGE


class IntegrityError(CkptkitError, ValueError):
    """The input claims a known format but is truncated, corrupt or fails a hash check."""

    exit_code = ExitCode.INTEGRITY


class BudgetError(IntegrityError):
    """Reading the input would cost more work or memory than its size allows (see
    :mod:`ckptkit.storage.budget`): a decompression bomb, a pickle that expands, a view that would
    materialise gigabytes.  ``variable`` is the ``CKPTKIT_MAX_*`` setting that raises the limit."""

    def __init__(self, message: str, *, limit: str, variable: str, hint: str | None = None,
                 path: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.limit = limit
        self.variable = variable


class NotFoundError(CkptkitError, FileNotFoundError):
    """A file, model or source that does not exist or cannot be reached."""

    exit_code = ExitCode.NOT_FOUND


class UnsafeContentError(CkptkitError):
    """The input would run code if loaded; raised instead of loading it."""

    exit_code = ExitCode.UNSAFE

    def __init__(self, message: str, *, unsafe: list[str], hint: str | None = None,
                 path: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.unsafe = unsafe


class DeletionStoppedError(CkptkitError):
    """A deletion plan stopped before deleting a path: the path changed since the plan was
    shown (rewritten, replaced, gone, or the checkpoint kept to resume from is no longer
    complete), or it could not be removed.  ``deleted`` lists what had already gone: empty
    when the checks made before the first deletion failed, which is when nothing is deleted."""

    def __init__(self, message: str, *, deleted: tuple[str, ...] = (), hint: str | None = None,
                 path: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.deleted = deleted


class MissingDependencyError(CkptkitError, ImportError):
    """A package this operation needs is not installed: an optional framework (``extra`` names
    the ckptkit extra that installs it), or a core dependency missing from a broken install
    (``extra`` None).  Exit code 1, like any error that is not the user's flags."""

    def __init__(self, package: str, extra: str | None, purpose: str):
        super().__init__(
            f"{purpose} needs {package}, which is not installed",
            hint=(f"Install it with: pip install 'ckptkit[{extra}]'" if extra else
                  f"It is a core dependency of ckptkit; install it with: pip install {package}"),
        )
        self.package = package
        self.extra = extra


class SourceError(CkptkitError):
    """A source answered, but not with the file: HTTP errors after retries, HTML error pages,
    unreachable hosts.  The fallback chain moves on to the next source."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None,
                 hint: str | None = None, path: str | None = None, reason: str | None = None):
        super().__init__(message, hint=hint, path=path, reason=reason)
        self.url = url
        self.status = status


class AuthError(SourceError):
    """The source refused our credentials (HTTP 401/403, Kaggle consent not given)."""


class DiskFullError(CkptkitError, OSError):
    """Writing failed for want of space: the device is full, or a quota or file size limit
    was reached.  What was being written has been removed (a download keeps its resumable
    ``.part``); whatever the target held before is untouched."""

    def __init__(self, message: str, *, path: str | None, errno_: int | None = None,
                 hint: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.errno = errno_


#: errno values meaning "no room to write": full device, exhausted quota, file size limit.
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None),
                                         errno.EFBIG) if e is not None)


def disk_full(exc: BaseException, path: str | os.PathLike[str] | None, doing: str,
              hint: str | None = None) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``exc`` if it, or an error it arose from, is a disk-full
    ``OSError`` (torch.save, for one, wraps it in a RuntimeError); else None, also when ``exc``
    already is a :class:`DiskFullError` (re-raise it as it is).

    Args:
        exc: the exception that ended the write.
        path: the file being written (named in the message).
        doing: what was going on, e.g. ``"writing it"`` or ``"downloading <url>"``.
        hint: the next step when space ran out [default: free space in the file's directory
            or use another]; a file size limit always gets its own.
    """
    if isinstance(exc, DiskFullError):
        return None
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            break
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    else:
        return None
    code = cause.errno
    where = os.path.dirname(os.fspath(path)) if path is not None else None
    subject = f"{os.fspath(path)}: " if path is not None else ""
    if code == errno.EFBIG:
        # The disk may have room: a per-process limit (ulimit -f) or the filesystem's own.
        return DiskFullError(f"{subject}the file size limit was reached while {doing}",
                             path=None if path is None else os.fspath(path), errno_=code,
                             hint="Raise the limit (ulimit -f) or write to another filesystem")
    what = ("the disk quota is exhausted (no space left)"
            if code == getattr(errno, "EDQUOT", None) else "no space left on device")
    try:
        free = f", {shutil.disk_usage(where or '.').free:,} bytes free in {where or '.'}"
    except OSError:
        free = ""
    return DiskFullError(f"{subject}{what} while {doing}{free}", path=None if path is None
                         else os.fspath(path), errno_=code,
                         hint=hint or (f"Free some space in {where}, or write to another "
                                       "directory" if where else
                                       "Free some disk space, or write to another directory"))


class LockTimeoutError(CkptkitError, TimeoutError):
    """Another process held a lock for longer than the caller was willing to wait."""

    def __init__(self, message: str, *, lock_path: str, holder_host: str | None,
                 holder_pid: int | None, hint: str | None = None):
        super().__init__(message, hint=hint, path=lock_path)
        self.lock_path = lock_path
        self.holder_host = holder_host
        self.holder_pid = holder_pid
