"""What reading pickles found: the names they asked for, by how and where, and the error for a
broken pickle that also names dangerous callables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckptkit.errors import ExitCode, IntegrityError


def is_binary_pickle(head: bytes) -> bool:
    """True when ``head`` starts like a protocol 2-5 pickle (``PROTO`` then 2..5)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


#: Cap on one read or frame; what a pickle may cost in all is the budget's (ckptkit.storage.budget).
MAX_STATIC_SCAN = 64 << 20


@dataclass
class Findings:
    """What one or more pickles asked for, by how they asked for it."""

    objects: set[str] = field(default_factory=set)
    unsafe: dict[str, str] = field(default_factory=dict)  # qualname -> how it was reached
    pickles: int = 0
    where: dict[str, str] = field(default_factory=dict)  # qualname -> which pickle named it
    location: str = "pickle"  # the pickle being read now
    offset: dict[str, int] = field(default_factory=dict)  # qualname -> opcode's byte offset

    def flag(self, qualname: str, via: str, offset: int | None = None) -> None:
        """Record a dangerous callable, with the opcode, the pickle and the byte offset (in
        that pickle's record or file) where it was first reached."""
        if qualname not in self.unsafe:
            self.unsafe[qualname] = via
            self.where[qualname] = self.location
            if offset is not None:
                self.offset[qualname] = offset

    def merge(self, other: Findings, within: str) -> None:
        """Add what a nested read found (a file inside this pickle), placed ``within`` it."""
        self.objects |= other.objects
        self.pickles += other.pickles
        for qualname, via in other.unsafe.items():
            if qualname not in self.unsafe:
                self.unsafe[qualname] = via
                self.where[qualname] = f"{within}: {other.where.get(qualname, '')}"
                if qualname in other.offset:
                    self.offset[qualname] = other.offset[qualname]

    def details(self) -> dict[str, dict[str, Any]]:
        """The per-name facts readers put into ``RawCheckpoint.details``."""
        return {"unsafe_via": dict(self.unsafe), "unsafe_where": dict(self.where),
                "unsafe_offset": dict(self.offset)}


class UnsafePickleError(IntegrityError):
    """A corrupt pickle that also names dangerous callables: exits like unsafe content (5).

    An :class:`IntegrityError`, so readers that skip broken pickles (npz object arrays) still
    do, and report the names through their findings."""

    exit_code = ExitCode.UNSAFE

    def __init__(self, message: str, *, findings: Findings):
        super().__init__(message, hint="Do not load it with pickle or torch.load")
        self.findings = findings
        self.unsafe = sorted(findings.unsafe)
