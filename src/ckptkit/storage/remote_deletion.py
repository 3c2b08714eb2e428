"""Deleting remote objects a shown plan names, each re-checked right before it goes.

The remote counterpart of :mod:`ckptkit.storage.deletion` (which dispatches here for
locations that are not local paths).  Object stores have no inodes, mtimes that a rewrite of
the same bytes may keep, and no real directories, so a snapshot records, for the object or
every object under the prefix, its size and validator (the ETag for S3 and GCS, else the
modification time).  :func:`change` lists the prefix again, fresh, and compares;
:func:`remove` deletes the recorded objects one by one, each right after a fresh ``HEAD``
shows it unchanged, so an object rewritten since the plan is never deleted, and an object
that appeared under the prefix since then stops the deletion before anything goes.
"""

from __future__ import annotations

from typing import Any

from ckptkit.errors import DeletionStoppedError, NotFoundError
from ckptkit.storage.snapshots import Entry, Snapshot


def snapshot(location: Any) -> Any:
    """Record ``location`` (an object, or a prefix and every object under it).

    Raises:
        FileNotFoundError: nothing is there.
    """
    try:  # a HEAD: an object's size and ETag, none of its bytes
        size, validator = location.fingerprint()
        return Snapshot(location, (Entry("", "file", size, 0, 0, 0, validator),))
    except NotFoundError:
        pass
    if not location.is_dir():
        raise FileNotFoundError(2, "no such object or prefix", str(location))
    entries = [Entry("", "dir", 0, 0, 0, 0)]
    for rel, size, validator in _objects(location):
        entries.append(Entry(rel, "file", size, 0, 0, 0, validator))
    return Snapshot(location, tuple(sorted(entries, key=lambda e: e.rel)))


def _objects(prefix: Any) -> list[tuple[str, int, str | None]]:
    """``(relative name, size, validator)`` of every object under ``prefix``, listed fresh."""
    from ckptkit.storage.fsspec_location import _validator

    prefix._forget()
    found = prefix._call(prefix.fs.find, prefix.path, withdirs=False, detail=True)
    base = prefix.path.rstrip("/") + "/"
    return [(name[len(base):], int(info.get("size") or 0), _validator(info))
            for name, info in sorted(found.items()) if name.startswith(base)]


def change(snap: Any) -> str | None:
    """What differs between ``snap`` and the store now, in one phrase; None if nothing."""
    since = "since the plan was made"
    where = snap.path
    try:
        now = snapshot(where)
    except (FileNotFoundError, NotFoundError):
        return f"{where} was removed {since}"
    seen = {e.rel: e for e in now.entries}
    for entry in snap.entries:
        name = f"{where}{'/' if entry.rel else ''}{entry.rel}" if entry.rel else str(where)
        if entry.rel not in seen:
            return f"{name} was removed {since}"
        current = seen[entry.rel]
        if current.kind != entry.kind:
            return f"{name} changed {since}: was a {entry.kind}, is now a {current.kind}"
        if current.size != entry.size:
            return f"{name} changed {since}: size {entry.size:,} -> {current.size:,} bytes"
        if current.validator != entry.validator:
            return f"{name} changed {since}: rewritten (ETag or mtime changed)"
    extra = sorted(set(seen) - {e.rel for e in snap.entries})
    if extra:
        return f"{where}/{extra[0]} appeared {since}"
    return None


def remove(snap: Any) -> None:
    """Delete exactly the objects ``snap`` recorded, each after a fresh check.

    Raises:
        DeletionStoppedError: something changed (checked before the first deletion: nothing
            deleted), or an object changed or could not be deleted midway.
    """
    why = change(snap)
    if why:
        raise DeletionStoppedError(why, path=str(snap.path))
    files = [e for e in snap.entries if e.kind == "file"]
    for entry in files:
        target = snap.path.child(entry.rel) if entry.rel else snap.path
        try:
            size, validator = target.fingerprint()
        except NotFoundError:
            raise DeletionStoppedError(f"{target} was removed since the plan was made",
                                       path=str(target)) from None
        if (size, validator) != (entry.size, entry.validator):
            raise DeletionStoppedError(f"{target} changed since the plan was made",
                                       path=str(target))
        try:
            target.fs.rm_file(target.path)
        except Exception as exc:
            raise DeletionStoppedError(f"{target} could not be deleted ({exc})",
                                       path=str(target)) from exc


__all__ = ["change", "remove", "snapshot"]
