"""The results of ``ckpt doctor``, and the verdicts drawn from them.

Every check ends in a :class:`Check` with one of five states, so nothing is ever a silent
blank: ``ok``, ``fail`` (a problem), ``absent`` (nothing there, which is not a problem: a file
not fetched yet), ``not_checked`` (the detail says why: offline, no answer, nothing to compare
with) and ``not_applicable`` (the detail says why: a URL source has no origin cache).

Verdicts (:func:`judge`), worst first, and the exit code each gives:

* ``damaged`` (3, INTEGRITY): a cached copy — in ckptkit's cache or an origin cache — no
  longer matches its catalogue sha256, pin or recorded hash, or vanished;
* ``unavailable`` (4, NOT_FOUND): a file has no verified cached copy and no source that works
  (offline: no local copy);
* ``degraded`` (1, ERROR): every file can be had, but some source failed a check;
* ``ok`` (0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ckptkit.errors import ExitCode

if TYPE_CHECKING:
    from ckptkit.hub.environment import Environment

Status = Literal["ok", "fail", "absent", "not_checked", "not_applicable"]
Verdict = Literal["ok", "degraded", "unavailable", "damaged"]
SCHEMA = 1
EXIT_CODES: dict[Verdict, ExitCode] = {"ok": ExitCode.OK, "degraded": ExitCode.ERROR,
                                       "unavailable": ExitCode.NOT_FOUND,
                                       "damaged": ExitCode.INTEGRITY}
_SEVERITY: tuple[Verdict, ...] = ("ok", "degraded", "unavailable", "damaged")


@dataclass(frozen=True)
class Check:
    """One checked property: its state and a few words on it."""

    status: Status
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"status": self.status, "detail": self.detail}


def not_applicable(why: str) -> Check:
    return Check("not_applicable", why)


def not_checked(why: str) -> Check:
    return Check("not_checked", why)


@dataclass(frozen=True)
class SourceReport:
    """One place a file can come from, checked; ``type == "cache"`` is ckptkit's own cache.

    Attributes:
        target: the URL probed (mirror applied), or the path looked at.
        copy: the cached copy found (ckptkit cache, TF Hub or kagglehub cache, local file).
        http_status, seconds, announced_size: what the probe saw, when one was sent.
        size: bytes of ``copy`` on disk.
        usable: this source would deliver the file now (a fetch would succeed through it,
            verification aside).
    """

    type: str
    ref: str
    target: str | None
    copy: str | None
    reachable: Check
    authenticated: Check
    cached: Check
    verified: Check
    usable: bool = False
    http_status: int | None = None
    seconds: float | None = None
    announced_size: int | None = None
    size: int | None = None

    @property
    def checks(self) -> tuple[Check, ...]:
        return (self.reachable, self.authenticated, self.cached, self.verified)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "ref": self.ref, "target": self.target, "copy": self.copy,
                "usable": self.usable, "http_status": self.http_status,
                "seconds": None if self.seconds is None else round(self.seconds, 3),
                "announced_size": self.announced_size, "size": self.size,
                "reachable": self.reachable.to_dict(),
                "authenticated": self.authenticated.to_dict(),
                "cached": self.cached.to_dict(), "verified": self.verified.to_dict()}


@dataclass(frozen=True)
class FileReport:
    """One catalogue file: what it must match, ckptkit's cached copy, and each source."""

    id: str
    kind: str
    expected_sha256: str | None
    hash_from: str | None  # "catalogue", "pin" or None
    cache: SourceReport
    sources: tuple[SourceReport, ...]

    @property
    def rows(self) -> tuple[SourceReport, ...]:
        return (self.cache, *self.sources)

    @property
    def damaged(self) -> bool:
        return any(r.verified.status == "fail" or r.cached.status == "fail" for r in self.rows)

    @property
    def available(self) -> bool:
        """A verified cached copy, or a source that would deliver it."""
        return any(r.usable for r in self.rows)

    @property
    def failures(self) -> tuple[str, ...]:
        """``type: detail`` of every failed check (for summaries)."""
        return tuple(f"{r.type}: {c.detail}" for r in self.rows for c in r.checks
                     if c.status == "fail")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "expected_sha256": self.expected_sha256,
                "hash_from": self.hash_from, "available": self.available,
                "damaged": self.damaged, "cache": self.cache.to_dict(),
                "sources": [s.to_dict() for s in self.sources]}


@dataclass(frozen=True)
class ModelReport:
    """One catalogue model: its files and the verdict on them."""

    name: str
    files: tuple[FileReport, ...]
    verdict: Verdict
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "summary": self.summary,
                "files": [f.to_dict() for f in self.files]}


@dataclass(frozen=True)
class DoctorReport:
    """Everything ``ckpt doctor`` found; ``exit_code`` is that of the worst model."""

    environment: Environment
    models: tuple[ModelReport, ...]
    offline: bool
    timeout: float
    requests: int  # probes sent over the network (0 offline)

    @property
    def verdict(self) -> Verdict:
        return max((m.verdict for m in self.models), key=_SEVERITY.index, default="ok")

    @property
    def exit_code(self) -> ExitCode:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "verdict": self.verdict, "exit_code": int(self.exit_code),
                "offline": self.offline, "timeout": self.timeout, "requests": self.requests,
                "environment": self.environment.to_dict(),
                "models": [m.to_dict() for m in self.models]}


def judge(name: str, files: tuple[FileReport, ...], offline: bool) -> ModelReport:
    """The verdict on model ``name`` and a one-line summary of why."""
    damaged = [(f.id, r.type) for f in files for r in f.rows
               if r.verified.status == "fail" or r.cached.status == "fail"]
    missing = [f.id for f in files if not f.available]
    failed = list(dict.fromkeys(x for f in files for x in f.failures))
    cached = sum(1 for f in files if f.cache.usable)
    if damaged:
        verdict: Verdict = "damaged"
        where = ", ".join(f"{file_id} ({'ckptkit cache' if kind == 'cache' else kind + ' copy'})"
                          for file_id, kind in damaged)
        summary = f"fails verification: {where}; " + (
            f"fetch again: ckpt cache rm {name} --yes && ckpt fetch {name}"
            if any(kind == "cache" for _, kind in damaged) else "delete the damaged copy")
    elif missing:
        verdict = "unavailable"
        how = "no local copy (offline)" if offline else "no working source"
        summary = f"{', '.join(missing)}: not cached and {how}"
    elif failed:
        verdict = "degraded"
        summary = (f"every file can be had, but some checks failed "
                   f"({'; '.join(failed[:2])}{'; …' if len(failed) > 2 else ''})")
    else:
        verdict = "ok"
        summary = (f"all {len(files)} file(s) cached and verified" if cached == len(files)
                   else f"{cached} of {len(files)} file(s) cached, the others "
                   + ("have local copies" if offline else "can be fetched"))
    return ModelReport(name, files, verdict, summary)
