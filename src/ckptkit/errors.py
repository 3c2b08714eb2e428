"""One error hierarchy for the whole library, and the exit code each error maps to.

Every error carries the concrete values that explain it and a ``hint`` naming the next step;
the CLI turns them into one line on stderr (``cli/errors.py``).  Subclasses also inherit the
matching builtin so that library users can catch them the usual way.
"""

from __future__ import annotations

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

    def __init__(self, message: str, *, hint: str | None = None, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = path

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}. {self.hint}"


class UsageError(CkptkitError, ValueError):
    """A flag, value or combination of them that cannot work."""

    exit_code = ExitCode.USAGE


class FormatError(CkptkitError, ValueError):
    """The input is not in any format ckptkit reads (or not the one asked for)."""


class IntegrityError(CkptkitError, ValueError):
    """The input claims a known format but is truncated, corrupt or fails a hash check."""

    exit_code = ExitCode.INTEGRITY


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


class MissingDependencyError(CkptkitError, ImportError):
    """An optional framework is needed for this operation but is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs {package}, which is not installed",
            hint=f"Install it with: pip install 'ckptkit[{extra}]'",
        )
        self.package = package
        self.extra = extra


class SourceError(CkptkitError):
    """A source answered, but not with the file: HTTP errors after retries, HTML error pages,
    unreachable hosts.  The fallback chain moves on to the next source."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None,
                 hint: str | None = None, path: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.url = url
        self.status = status


class AuthError(SourceError):
    """The source refused our credentials (HTTP 401/403, Kaggle consent not given)."""


class LockTimeoutError(CkptkitError, TimeoutError):
    """Another process held a lock for longer than the caller was willing to wait."""

    def __init__(self, message: str, *, lock_path: str, holder_host: str | None,
                 holder_pid: int | None, hint: str | None = None):
        super().__init__(message, hint=hint, path=lock_path)
        self.lock_path = lock_path
        self.holder_host = holder_host
        self.holder_pid = holder_pid
