"""Deleting exactly the paths a shown plan names, each re-checked right before it goes.

A plan that deletes (``ckpt cleanup``, ``ckpt cache rm|prune``) takes a :class:`Snapshot` of
every path it names when it is made: type, size, mtime and inode of the path and, for a
directory, of every entry inside it.  :func:`change` compares a snapshot with the disk and
says in one phrase what differs; :func:`remove` checks again and then deletes exactly the
snapshot's entries: files and links are unlinked one by one and directories removed with
``rmdir`` once emptied, so an entry that appeared after the plan stops the deletion instead of
vanishing with it.  Nothing is matched by a pattern or prefix, no symlink is followed, and a
directory goes only when the snapshot was taken of a directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ckptkit.errors import DeletionStoppedError
from ckptkit.storage.snapshots import Entry, EntryKind, Snapshot

def _kind(mode: int) -> EntryKind:
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def _entry(rel: str, st: os.stat_result) -> Entry:
    kind = _kind(st.st_mode)
    return Entry(rel, kind, 0 if kind == "dir" else st.st_size, st.st_mtime_ns, st.st_ino,
                 st.st_dev)


def snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Record ``path`` (never followed if it is a symlink) and, for a directory, its tree.

    Raises:
        OSError: ``path`` cannot be read (for instance it is gone).
    """
    if _remote(path):
        from ckptkit.storage import remote_deletion

        return remote_deletion.snapshot(path)
    root = Path(path)
    top = _entry("", os.lstat(root))
    entries = [top]
    if top.kind == "dir":
        for base, dirs, files in os.walk(root):  # os.walk does not descend into linked dirs
            for name in sorted(dirs) + sorted(files):
                full = os.path.join(base, name)
                entries.append(_entry(os.path.relpath(full, root), os.lstat(full)))
    return Snapshot(root, tuple(sorted(entries, key=lambda e: e.rel)))


def _remote(path: object) -> bool:
    """Whether ``path`` is a remote location (deleted by :mod:`remote_deletion`)."""
    return not isinstance(path, (str, os.PathLike)) and hasattr(path, "fingerprint")


def _describe(snap: Snapshot, rel: str) -> str:
    return str(snap.path / rel) if rel else str(snap.path)


def _difference(was: Entry, now: Entry) -> str | None:
    """The first of type, identity and size that differs (mtime is compared last, apart)."""
    if was.kind != now.kind:
        return f"was a {was.kind}, is now a {now.kind}"
    if (was.inode, was.device) != (now.inode, now.device):
        return "replaced by another file (inode changed)"
    if was.size != now.size:
        return f"size {was.size:,} -> {now.size:,} bytes"
    return None


def change(snap: Snapshot, root: Path | None = None) -> str | None:
    """What differs between ``snap`` and the disk now, in one phrase naming the path; None if
    nothing does.  With ``root``, a path whose directory no longer resolves inside ``root``
    (a parent swapped for a symlink) counts as changed too."""
    if _remote(snap.path):
        from ckptkit.storage import remote_deletion

        return remote_deletion.change(snap)
    since = "since the plan was made"
    if root is not None:
        try:
            snap.path.parent.resolve().relative_to(root.resolve())
        except ValueError:
            return f"{snap.path} is no longer inside {root}"
    try:
        now = snapshot(snap.path)
    except FileNotFoundError:
        return f"{snap.path} was removed {since}"
    except OSError as exc:
        return f"{snap.path} cannot be read ({exc.strerror or exc})"
    seen = {e.rel: e for e in now.entries}
    for entry in snap.entries:
        if entry.rel not in seen:
            return f"{_describe(snap, entry.rel)} was removed {since}"
        why = _difference(entry, seen[entry.rel])
        if why:
            return f"{_describe(snap, entry.rel)} changed {since}: {why}"
    extra = sorted(set(seen) - {e.rel for e in snap.entries})
    if extra:
        return f"{_describe(snap, extra[0])} appeared {since}"
    # Last, as a folder's mtime moves with any entry added or removed (named above if so).
    for entry in snap.entries:
        if entry.mtime_ns != seen[entry.rel].mtime_ns:
            return f"{_describe(snap, entry.rel)} changed {since}: modified (mtime changed)"
    return None


def remove(snap: Snapshot, root: Path | None = None) -> None:
    """Delete exactly what ``snap`` recorded, after checking it is unchanged.

    Raises:
        DeletionStoppedError: something changed (nothing of ``snap`` was deleted), or an
            entry could not be removed (those before it in the deletion order are gone).
    """
    if _remote(snap.path):
        from ckptkit.storage import remote_deletion

        remote_deletion.remove(snap)
        return
    why = change(snap, root)
    if why:
        raise DeletionStoppedError(why, path=str(snap.path))
    # Deepest entries first; the snapshot's own path (rel "") sorts first, so it goes last.
    for entry in reversed(snap.entries):
        target = snap.path / entry.rel if entry.rel else snap.path
        try:
            if entry.kind == "dir":
                os.rmdir(target)  # refuses if anything not in the plan is inside
            else:
                os.unlink(target)
        except OSError as exc:
            raise DeletionStoppedError(f"{target} could not be deleted "
                                       f"({exc.strerror or exc})", path=str(target)) from exc


__all__ = ["Entry", "Snapshot", "change", "remove", "snapshot"]
