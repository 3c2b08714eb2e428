"""The Hugging Face Hub client's cache layout, written so ``huggingface_hub`` reads it offline.

For a repo ``ORG/NAME`` of type ``model`` under the cache folder (``HF_HUB_CACHE``)::

    models--ORG--NAME/
        blobs/<etag>                      the bytes: etag = LFS sha256, else Git's blob id
        snapshots/<commit>/<path>         relative symlinks into blobs/
        refs/<revision>                   the commit a branch or tag pointed to

ckpt only ever puts complete, verified files under ``blobs/`` (renamed in from its own staging
folder), links a snapshot only once every file of the fetch is in ``blobs/``, and writes the
ref last: an interrupted fetch never looks like a snapshot to either tool.

Each snapshot ckpt wrote is also recorded in ckpt's cache (``hf/<repo folder>/<commit>.json``:
the files with size, sha256 and etag), which ``ckpt cache ls`` and ``ckpt cache verify`` read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ckptkit.storage import atomic
from ckptkit.storage.hashing import sha256_file

from ckptkit.hub.sources.hf_api import RepoFile, RepoType

_BLOCK = 1 << 20


def repo_folder_name(repo_type: RepoType, repo_id: str) -> str:
    return f"{repo_type}s--{repo_id.replace('/', '--')}"


def git_blob_id(path: Path) -> str:
    """Git's object id of the blob holding the file's bytes."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def identity_matches(path: Path, file: RepoFile) -> tuple[bool, str | None]:
    """Whether ``path`` holds ``file``'s bytes (size, then sha256 for LFS, Git blob id
    otherwise); also returns the sha256 when it was computed."""
    try:
        if not path.is_file() or path.stat().st_size != file.size:
            return False, None
    except OSError:
        return False, None
    if file.lfs_sha256 is not None:
        digest = sha256_file(path)
        return digest == file.lfs_sha256, digest
    return git_blob_id(path) == file.blob_id, None


@dataclass(frozen=True)
class HubRepoCache:
    """One repo's folder in the Hub client's cache."""

    hub_cache: Path
    repo_type: RepoType
    repo_id: str

    @property
    def root(self) -> Path:
        return self.hub_cache / repo_folder_name(self.repo_type, self.repo_id)

    def blob(self, file: RepoFile) -> Path:
        return self.root / "blobs" / file.etag

    def snapshot(self, commit: str) -> Path:
        return self.root / "snapshots" / commit

    def ref(self, revision: str) -> Path:
        return self.root / "refs" / revision

    def read_ref(self, revision: str) -> str | None:
        try:
            return self.ref(revision).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def put_blob(self, staged: Path, file: RepoFile) -> Path:
        """Move a verified file from staging into ``blobs/`` (rename, else copy then rename)."""
        target = self.blob(file)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, target)
        except OSError:  # another file system: copy beside the target, then rename
            with atomic.atomic_file(target, doing="copying into the Hub cache") as out, \
                    open(staged, "rb") as src:
                while block := src.read(_BLOCK):
                    out.write(block)
            staged.unlink()
        return target

    def link(self, commit: str, file: RepoFile) -> Path:
        """``snapshots/<commit>/<path>`` as a relative symlink to the blob, as the client makes
        it (a link already right is kept; a wrong one is replaced atomically)."""
        pointer = self.snapshot(commit) / file.path
        pointer.parent.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(self.blob(file), pointer.parent)
        if pointer.is_symlink() and os.readlink(pointer) == relative:
            return pointer
        with atomic.staged(pointer) as temp:
            os.symlink(relative, temp)
        return pointer

    def write_ref(self, revision: str, commit: str) -> None:
        """``refs/<revision>`` = commit, as the client writes it (no newline); not for a
        revision that is the commit itself."""
        if revision != commit:
            atomic.write_text(self.ref(revision), commit, make_parents=True)


@dataclass(frozen=True)
class SnapshotFile:
    path: str
    size: int
    sha256: str
    etag: str


@dataclass(frozen=True)
class SnapshotRecord:
    """What ckpt wrote into the Hub cache for one commit (its files, as verified)."""

    repo_id: str
    repo_type: RepoType
    commit: str
    revision: str
    hub_cache: str
    files: tuple[SnapshotFile, ...]
    ckpt_cache: str = ""  # where the record lies (set when read)

    @property
    def snapshot(self) -> Path:
        return HubRepoCache(Path(self.hub_cache), self.repo_type, self.repo_id).snapshot(
            self.commit)

    @property
    def name(self) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"hf:{prefix}{self.repo_id}@{self.commit[:12]}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def fetched_at(self) -> float:
        """When the record was last written (a fetch adding to it)."""
        try:
            return record_path(Path(self.ckpt_cache), self.repo_type, self.repo_id,
                               self.commit).stat().st_mtime
        except OSError:
            return 0.0


def record_path(cache_dir: Path, repo_type: RepoType, repo_id: str, commit: str) -> Path:
    return cache_dir / "hf" / repo_folder_name(repo_type, repo_id) / f"{commit}.json"


def write_record(cache_dir: Path, record: SnapshotRecord) -> None:
    """Add ``record``'s files to what is recorded for its commit (fetches with different
    ``--include`` patterns add up)."""
    path = record_path(cache_dir, record.repo_type, record.repo_id, record.commit)
    old = read_record(path)
    files = {f.path: f for f in (old.files if old else ())}
    files.update({f.path: f for f in record.files})
    merged = SnapshotRecord(record.repo_id, record.repo_type, record.commit, record.revision,
                            record.hub_cache, tuple(files[p] for p in sorted(files)))
    data = asdict(merged)
    data.pop("ckpt_cache")
    atomic.write_text(path, json.dumps(data, indent=1, sort_keys=True), make_parents=True)


def read_record(path: Path) -> SnapshotRecord | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = tuple(SnapshotFile(**f) for f in data.pop("files"))
        return SnapshotRecord(files=files, ckpt_cache=str(path.parents[2]), **data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def records(cache_dir: Path) -> list[SnapshotRecord]:
    """Every Hub snapshot ckpt recorded in ``cache_dir``."""
    root = cache_dir / "hf"
    found = (read_record(p) for p in sorted(root.glob("*/*.json"))) if root.is_dir() else ()
    return [r for r in found if r is not None]


def verify_record(record: SnapshotRecord) -> list[tuple[SnapshotFile, str]]:
    """Each file with its state: ``ok``, ``MISSING`` (link or blob gone) or ``CHANGED``."""
    states = []
    for file in record.files:
        target = record.snapshot / file.path
        if not target.is_file():
            states.append((file, "MISSING"))
        elif target.stat().st_size != file.size or sha256_file(target) != file.sha256:
            states.append((file, "CHANGED"))
        else:
            states.append((file, "ok"))
    return states
