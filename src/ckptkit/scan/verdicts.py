"""Verdicts: what ``ckpt scan`` says of one file, and the report over many.

The policy lives here, apart from the walking and reading in :mod:`ckptkit.scan.scanning`, so
that every scanner (files, archive members, checkpoint directories) turns findings into the
same verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit.errors import BudgetError, CkptkitError, ExitCode
from ckptkit.pickles.unpickler import Findings

VERDICTS = ("safe", "unknown-objects", "unsafe", "unreadable")
#: What ``--fail-on`` accepts: the mildest verdict that fails the command.
FailOn = Literal["unsafe", "unreadable", "unknown"]
FAIL_ON: tuple[str, ...] = ("unsafe", "unreadable", "unknown")
#: Listed among a file's objects when it holds TorchScript code that was not vetted.
UNVETTED_CODE = "<{} TorchScript code file(s) that torch.jit.load runs, not vetted>"


@dataclass(frozen=True)
class Danger:
    """One dangerous callable: its name, the opcode that reached it, the pickle it is in and
    the opcode's byte offset in that pickle's record or file (None where not known)."""

    name: str
    via: str
    where: str
    offset: int | None = None

    def describe(self) -> str:
        place = f" in {self.where}" if self.where else ""
        at = f" at byte {self.offset}" if self.offset is not None else ""
        return f"{self.name} ({self.via}{place}{at})"

    def to_dict(self) -> dict[str, Any]:
        return {"callable": self.name, "opcode": self.via, "pickle": self.where,
                "offset": self.offset}


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
                "unsafe": [d.to_dict() for d in self.unsafe],
                "objects": list(self.objects), "pickles": self.pickles, "note": self.note}


@dataclass(frozen=True)
class Skipped:
    """A path a folder walk found that no loader reads as a checkpoint, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class ScanReport:
    """Every file's result plus what the walk passed over."""

    results: list[ScanResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(VERDICTS, 0)
        for result in self.results:
            counts[result.verdict] += 1
        return counts

    @property
    def exit_code(self) -> int:
        return self.exit_code_for("unreadable")

    def exit_code_for(self, fail_on: str) -> int:
        """The command's exit code when verdicts from ``fail_on`` up fail it: ``unsafe``
        (only unsafe files: 5), ``unreadable`` (also unreadable ones: 3, or 1 for a file named
        explicitly that is no checkpoint) or ``unknown`` (anything not proven safe; an
        ``unknown-objects`` file exits 5 like an unsafe one)."""
        if fail_on not in FAIL_ON:
            raise UsageError(f"--fail-on {fail_on!r} is not one of {', '.join(FAIL_ON)}")
        failing = {"unsafe"} | ({"unknown-objects"} if fail_on == "unknown" else set())
        if any(r.verdict in failing for r in self.results):
            return ExitCode.UNSAFE
        if fail_on == "unsafe":
            return ExitCode.OK
        return max((r.exit_code for r in self.results), default=ExitCode.OK)

    def to_dict(self) -> dict[str, Any]:
        return {"files": [r.to_dict() for r in self.results],
                "skipped": [s.to_dict() for s in self.skipped],
                "summary": {**self.counts(), "skipped": len(self.skipped)}}


def findings_of(safety: Any, details: dict[str, Any]) -> Findings:
    """A reader's safety report and details as :class:`Findings`."""
    findings = Findings(objects=set(safety.objects), pickles=safety.pickles,
                        unsafe=dict(details.get("unsafe_via", {})),
                        where=dict(details.get("unsafe_where", {})),
                        offset=dict(details.get("unsafe_offset", {})))
    for danger in safety.unsafe:
        findings.unsafe.setdefault(danger, "?")
    return findings


def verdict(name: str, fmt: str | None, findings: Findings, note: str = "") -> ScanResult:
    """The result for ``findings``: unsafe if anything dangerous is named, else
    unknown-objects if any class (or unvetted code) is, else safe."""
    dangers = tuple(Danger(n, findings.unsafe[n], findings.where.get(n, ""),
                           findings.offset.get(n)) for n in sorted(findings.unsafe))
    result = "unsafe" if dangers else "unknown-objects" if findings.objects else "safe"
    return ScanResult(name, result, fmt, dangers, tuple(sorted(findings.objects)),
                      findings.pickles, note, ExitCode.UNSAFE if dangers else ExitCode.OK)


def unreadable(name: str, exc: CkptkitError, fmt: str | None = None) -> ScanResult:
    message = exc.message.removeprefix(f"{name}: ")
    if isinstance(exc, BudgetError):
        message += f"; raise {exc.variable} if the file is genuine"
    return ScanResult(name, "unreadable", fmt, note=message, exit_code=exc.exit_code)
