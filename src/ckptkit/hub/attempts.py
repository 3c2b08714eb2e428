"""What ``ckpt fetch`` reports when sources fail: each attempt, in a few words, and the short
error they add up to when every source of a file failed.

:meth:`ckptkit.hub.fetch.FetchPlan.execute` logs each :class:`Attempt` as it happens
(:meth:`Attempt.line`); :class:`FetchError` keeps them all and its own message is one short
line: which files, how many attempts, and the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptkit.errors import CkptkitError, ExitCode, NotFoundError
from ckptkit.hub.reasons import shorten


@dataclass(frozen=True)
class Attempt:
    """One source tried for one file, and why it did not deliver (a few words)."""

    source: str
    error: str
    integrity: bool = False

    def line(self, file_id: str) -> str:
        """How the attempt is logged: ``<file id>: <source> failed: <reason>``."""
        return f"{file_id}: {self.source} failed: {self.error}"


class FetchError(NotFoundError):
    """Every source of one or more files failed.

    The message is one short line (which files, how many attempts) and the hint the next step;
    each attempt is in ``failures`` (:meth:`attempt_lines`), logged by :meth:`FetchPlan.execute`
    as it happened.
    """

    def __init__(self, failures: dict[str, list[Attempt]], offline: bool = False):
        ids = list(failures)
        # One line whatever the bundle: the first file by name, the others counted.
        named = ids[0] + (f" and {len(ids) - 1} more file{'s' if len(ids) > 2 else ''}"
                          if len(ids) > 1 else "")
        tried = sum(len(attempts) for attempts in failures.values())
        why = (f"every source failed ({tried} attempt{'' if tried == 1 else 's'})" if tried
               else "no source to try")
        hint = ("Offline: pass --local-dir with the files, or fetch once online" if offline else
                "Check the network or --mirror, or pass --local-dir "
                "(`ckpt fetch --dry-run` lists the sources)")
        super().__init__(f"could not fetch {named}: {why}", hint=hint)
        self.failures = failures
        if any(a.integrity for attempts in failures.values() for a in attempts):
            self.exit_code = ExitCode.INTEGRITY

    def attempt_lines(self) -> list[str]:
        """One line per failed attempt, as :meth:`FetchPlan.execute` logs them."""
        return [a.line(file_id) for file_id, attempts in self.failures.items()
                for a in attempts]


def attempt_reason(exc: CkptkitError, ref: str) -> str:
    """The few words an attempt line gives for ``exc``: its ``reason``, else its message
    without the source the line already names, shortened."""
    if exc.reason:
        return exc.reason
    text = " ".join(exc.message.split())
    for prefix in (ref, ref.rstrip("/")):
        if prefix and text.startswith(prefix + ": "):
            text = text[len(prefix) + 2:]
    return shorten(text)
