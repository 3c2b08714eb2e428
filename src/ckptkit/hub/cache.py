"""The download cache: one verified copy of every catalogue file, keyed by its id.

Layout under the cache root::

    files/<id>            the file (or SavedModel directory); ids never collide, so three
                          different prior_level_2.pth.tar files live side by side
    meta/<id>.json        written last, after the file is in place: the commit marker
    locks/<sha1(id)>.lock one process fetches a file at a time, others wait and reuse
    tmp/                  staging for directories and archives
    CACHEDIR.TAG          tells backup tools to skip the cache

A file counts as cached only when its meta record exists and its size matches; ``verify``
re-hashes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ckptkit.storage import deletion
from ckptkit.storage.deletion import Snapshot
from ckptkit.errors import DeletionStoppedError, NotFoundError, UsageError
from ckptkit.storage.hashing import sha256_file, tree_sha256, tree_size
from ckptkit.storage.atomic import fsync_dir, write_text

CACHEDIR_TAG = ("Signature: 8a477f597d28d172789f06886806bc55\n"
                "# This file is a cache directory tag created by ckptkit.\n")


@dataclass(frozen=True)
class CacheEntry:
    """What the cache knows about one stored file."""

    id: str
    kind: str
    path: str
    size: int
    sha256: str
    source: str
    url: str
    fetched_at: float
    mtime_ns: int = 0  # of the file (newest file of a tree) when it was verified


def _signature(path: Path) -> int:
    """Changes whenever the file (or any file of a tree) is written to."""
    if path.is_dir():
        return max((p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()), default=0)
    return path.stat().st_mtime_ns


class Cache:
    """The cache rooted at ``root`` (created on first write)."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, file_id: str) -> Path:
        return _inside(self.root / "files", file_id)

    def _meta(self, file_id: str) -> Path:
        return _inside(self.root / "meta", f"{file_id}.json")

    def lock_path(self, file_id: str) -> Path:
        # surrogateescape: an id read back from a file name that is not UTF-8 still hashes.
        digest = hashlib.sha1(file_id.encode("utf-8", "surrogateescape")).hexdigest()
        return self.root / "locks" / (digest + ".lock")

    def tmp_dir(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            write_text(tag, CACHEDIR_TAG)

    def record(self, file_id: str) -> CacheEntry | None:
        """The commit record for ``file_id`` as written, whatever became of the file since."""
        try:
            return CacheEntry(**json.loads(self._meta(file_id).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def entry(self, file_id: str) -> CacheEntry | None:
        """The committed entry for ``file_id``, or None when absent, incomplete or changed.

        A file written to since it was verified (its mtime moved) is hashed again: the entry
        stands only if the bytes are still the verified ones.
        """
        entry = self.record(file_id)
        if entry is None:
            return None
        path = Path(entry.path)
        if not path.exists():
            return None
        size = tree_size(path) if path.is_dir() else path.stat().st_size
        if size != entry.size:
            return None
        if entry.mtime_ns != _signature(path):
            if self.hash_of(path) != entry.sha256:
                return None
            entry = CacheEntry(**{**asdict(entry), "mtime_ns": _signature(path)})
            self._write_meta(file_id, entry)
        return entry

    def status(self) -> list[tuple[str, str]]:
        """Every recorded file id with ``ok``, ``missing`` or ``changed`` (size differs)."""
        out = []
        for file_id in sorted(self._committed_ids()):
            entry = self.record(file_id)
            path = Path(entry.path) if entry else None
            if entry is None or path is None or not path.exists():
                out.append((file_id, "missing"))
            else:
                size = tree_size(path) if path.is_dir() else path.stat().st_size
                out.append((file_id, "ok" if size == entry.size else "changed"))
        return out

    def entries(self) -> list[CacheEntry]:
        meta_root = self.root / "meta"
        ids = sorted(str(p.relative_to(meta_root))[:-len(".json")]
                     for p in meta_root.rglob("*.json")) if meta_root.is_dir() else []
        return [e for e in (self.entry(i) for i in ids) if e is not None]

    def commit(self, file_id: str, kind: str, staged: Path, *, sha256: str, source: str,
               url: str) -> CacheEntry:
        """Move a verified ``staged`` file or directory into place, then write its marker.

        The marker is written last, so an interruption leaves either no entry or a complete one.
        """
        final = self.path(file_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir() and staged.resolve() != final.resolve():
            shutil.rmtree(final)
        if staged.resolve() != final.resolve():
            os.replace(staged, final)
        fsync_dir(final.parent)
        size = tree_size(final) if final.is_dir() else final.stat().st_size
        entry = CacheEntry(file_id, kind, str(final), size, sha256, source, url, time.time(),
                           _signature(final))
        self._write_meta(file_id, entry)
        return entry

    def _write_meta(self, file_id: str, entry: CacheEntry) -> None:
        write_text(self._meta(file_id), json.dumps(asdict(entry), indent=2), make_parents=True)

    def hash_of(self, path: Path) -> str:
        return tree_sha256(path) if path.is_dir() else sha256_file(path)

    def verify(self, file_id: str) -> tuple[CacheEntry, str]:
        """Re-hash a cached file: returns the entry and the sha256 found now."""
        entry = self.record(file_id)
        if entry is None or not Path(entry.path).exists():
            raise NotFoundError(f"{file_id} is not in the cache at {self.root}",
                                hint="Fetch it first: ckpt fetch <model>")
        return entry, self.hash_of(Path(entry.path))

    def forget(self, file_id: str) -> None:
        """Delete the commit record of ``file_id``: the file stops counting as cached.  Done
        before the file itself goes, so a crash never leaves a record without its file."""
        self._meta(file_id).unlink(missing_ok=True)

    def leftovers(self) -> list[Path]:
        """Partial downloads, staging and unmarked files, found by where they lie, never by
        name (a committed id may well end in ``.part`` or ``.lock``): the entries of ``tmp/``,
        every file under ``staging/``, and the files under ``files/`` that no commit record
        (``meta/<id>.json``) covers."""
        found: list[Path] = []
        tmp = self.root / "tmp"
        if tmp.is_dir():
            found.extend(sorted(tmp.iterdir()))
        staging = self.root / "staging"
        if staging.is_dir():
            found.extend(sorted(p for p in staging.rglob("*") if p.is_file()))
        files = self.root / "files"
        if files.is_dir():
            committed = self._committed_ids()
            for path in sorted(files.rglob("*")):
                rel = path.relative_to(files).as_posix()
                if path.is_file() and not any(rel == e or rel.startswith(e + "/")
                                              for e in committed):
                    found.append(path)
        return found

    def _committed_ids(self) -> set[str]:
        meta_root = self.root / "meta"
        if not meta_root.is_dir():
            return set()
        return {str(p.relative_to(meta_root))[:-len(".json")] for p in meta_root.rglob("*.json")}


def _inside(folder: Path, rel: str) -> Path:
    """``folder / rel``, refusing ids that would leave the cache (a hostile catalogue)."""
    target = folder / rel
    if ".." in Path(rel).parts or Path(rel).is_absolute() or not rel:
        raise UsageError(f"cache id {rel!r} would leave the cache directory",
                         hint="Catalogue ids must be relative paths without '..'")
    return target




@dataclass(frozen=True)
class Removal:
    """One path a removal plan deletes, why, and how it looked when planned."""

    path: str
    bytes: int
    reason: str
    snapshot: Snapshot
    file_id: str | None = None


@dataclass(frozen=True)
class RemovalPlan:
    """What ``cache rm`` / ``cache prune`` will delete (``--dry-run`` prints it), and what it
    keeps on purpose."""

    remove: tuple[Removal, ...]
    kept: tuple[str, ...] = ()

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.remove)

    def execute(self, cache: Cache) -> int:
        """Delete exactly the planned paths; returns the bytes freed.

        Before the first deletion every path is compared with its snapshot (type, size,
        mtime, inode) and every leftover is checked not to have become part of a running
        download; if anything changed nothing is deleted.  Each path is checked again right
        before it goes; a cached file loses its commit record first.

        Raises:
            DeletionStoppedError: what changed or could not be deleted (``.deleted`` lists the
                paths already gone).
        """
        problems = [why for r in self.remove if (why := deletion.change(r.snapshot, cache.root))]
        problems += [f"{r.path} now belongs to a download in progress" for r in self.remove
                     if r.file_id is None and _in_use(cache, Path(r.path))]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DeletionStoppedError(f"nothing deleted: {problems[0]}{more}", hint=_AGAIN,
                                       path=str(cache.root))
        gone: list[str] = []
        for item in self.remove:
            try:
                if item.file_id is not None:
                    why = deletion.change(item.snapshot, cache.root)
                    if why:
                        raise DeletionStoppedError(why, path=item.path)
                    cache.forget(item.file_id)
                deletion.remove(item.snapshot, cache.root)
            except DeletionStoppedError as exc:
                raise DeletionStoppedError(
                    f"deleted {len(gone)} of {len(self.remove)} item(s), then stopped: "
                    f"{exc.message}", deleted=tuple(gone), hint=_AGAIN, path=exc.path) from exc
            gone.append(item.path)
        return self.freed_bytes


_AGAIN = "Run the command again to see the new plan"


def _planned(path: Path, reason: str, file_id: str | None = None) -> Removal | None:
    """A removal of ``path`` as it is now; None when it vanished meanwhile."""
    try:
        snap = deletion.snapshot(path)
    except FileNotFoundError:
        return None
    return Removal(str(path), snap.size, reason, snap, file_id)


def plan_removal(cache: Cache, file_ids: list[str], still_needed: dict[str, list[str]]
                 ) -> RemovalPlan:
    """Remove ``file_ids`` except those ``still_needed`` by other fully cached models
    (a shared Jukebox upsampler stays while another bundle uses it)."""
    remove, kept = [], []
    for file_id in file_ids:
        entry = cache.entry(file_id)
        if entry is None:
            continue
        users = still_needed.get(file_id, [])
        if users:
            kept.append(f"{file_id} (still used by {', '.join(users)})")
        elif (item := _planned(cache.path(file_id), "requested", file_id)) is not None:
            remove.append(item)
    return RemovalPlan(tuple(remove), tuple(kept))


def plan_prune(cache: Cache, known_ids: set[str] | None) -> RemovalPlan:
    """Leftovers (partial downloads, staging, unmarked files: :meth:`Cache.leftovers`); with
    ``known_ids``, also committed files no catalogue names (a file fetched through a
    ``--catalog`` entry is "unknown" when that catalogue is not passed, so this is opt-in).

    A leftover of a download whose lock a live process holds is in use and left alone.
    """
    planned = [_planned(path, "incomplete or unreferenced") for path in cache.leftovers()
               if not _in_use(cache, path)]
    for entry in cache.entries() if known_ids is not None else ():
        if entry.id not in known_ids:
            planned.append(_planned(cache.path(entry.id), "not in any catalogue", entry.id))
    return RemovalPlan(tuple(item for item in planned if item is not None))


#: What a download adds to its staged file's name for its own files (ckptkit.hub.download.download).
_DOWNLOAD_SIBLINGS = (".part.json", ".part", ".lock")


def _owners(cache: Cache, path: Path) -> set[str]:
    """The ids ``path`` may belong to, read from where it lies: ``files/<id>[/...]`` or
    ``staging/<id>[/...]`` plus a download's own ``<id>.part|.part.json|.lock`` there."""
    for area in ("files", "staging"):
        try:
            parts = path.relative_to(cache.root / area).parts
        except ValueError:
            continue
        ids = {"/".join(parts[:n]) for n in range(1, len(parts) + 1)}
        if area == "staging":
            whole = "/".join(parts)
            ids |= {whole[: -len(s)] for s in _DOWNLOAD_SIBLINGS if whole.endswith(s)}
        return ids
    return set()


def _in_use(cache: Cache, path: Path) -> bool:
    """True when ``path`` belongs to a fetch or download whose lock a live process holds."""
    from ckptkit.storage.locks import STALE_AFTER, read_holder, stale_reason

    locks = []
    for file_id in _owners(cache, path):
        locks.append(cache.lock_path(file_id))
        locks.append(cache.root / "staging" / (file_id + ".lock"))
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            continue
        if stale_reason(read_holder(lock), age, stale_after=STALE_AFTER) is None:
            return True
    return False
