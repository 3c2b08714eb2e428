"""What a deletion plan records of each path it names (local or remote), to re-check it
right before deleting: :mod:`ckptkit.storage.deletion` and
:mod:`ckptkit.storage.remote_deletion` both take and compare these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

EntryKind = Literal["file", "dir", "link", "other"]


@dataclass(frozen=True)
class Entry:
    """One path of a snapshot as it was: ``rel`` is ``""`` for the snapshot's own path."""

    rel: str
    kind: EntryKind
    size: int
    mtime_ns: int
    inode: int
    device: int
    #: An object store's ETag (or mtime) for remote entries; None on local disks.
    validator: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """A path to delete and everything under it, as the plan saw them."""

    path: Any  # a Path, or a remote location
    entries: tuple[Entry, ...]

    @property
    def kind(self) -> EntryKind:
        return self.entries[0].kind

    @property
    def size(self) -> int:
        """Bytes freed by deleting it (files and links; directories count nothing)."""
        return sum(e.size for e in self.entries if e.kind != "dir")



__all__ = ["Entry", "EntryKind", "Snapshot"]
