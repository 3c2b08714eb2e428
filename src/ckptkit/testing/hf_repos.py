"""Hugging Face Hub repositories held by the stand-in (:mod:`ckptkit.testing.hf_hub`): files,
commits, branches and tags, and the JSON views of them the Hub API answers with.

A file is stored in Git or, like weights on the Hub, in Git LFS (:func:`is_lfs`: the suffixes
of the Hub's default ``.gitattributes``, or 10 MiB and more).  Its identities are those the Hub
exposes:

* ``oid`` — the Git blob id: ``sha1("blob <size>\\0" + bytes)`` of the content, or of the LFS
  pointer file for an LFS file (what ``blobId`` and the tree's ``oid`` carry);
* ``sha256`` — the LFS object id, also the ETag of an LFS file's ``resolve``.

Commit ids are derived from the parent, the tree and the message, so the same history always
gives the same ids; dates count minutes from a fixed epoch (no wall clock).
"""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

RepoType = Literal["model", "dataset"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset")
#: The suffixes the Hub's default ``.gitattributes`` sends to LFS (the weight and archive ones).
LFS_PATTERNS = ("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz",
                "*.h5", "*.joblib", "*.keras", "*.mlmodel", "*.model", "*.msgpack", "*.npy",
                "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
                "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm",
                "*.xz", "*.zip", "*.zst", "*tfevents*")
LFS_MIN_SIZE = 10 << 20  # the Hub refuses larger files outside LFS
_EPOCH = "2026-01-01"
_HASH_BLOCK = 1 << 20
COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub would store ``path`` (of ``size`` bytes) in LFS."""
    name = posixpath.basename(path)
    return size >= LFS_MIN_SIZE or any(fnmatch.fnmatchcase(name, p) for p in LFS_PATTERNS)


def git_blob_id(data: bytes) -> str:
    """Git's object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file Git stores in place of an LFS object."""
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


@dataclass(frozen=True)
class HubFile:
    """One file of a commit: its content (bytes, or a file read when served) and identities."""

    path: str
    source: bytes | Path
    size: int
    sha256: str
    content_oid: str  # Git blob id of the content itself
    lfs: bool

    @classmethod
    def of(cls, path: str, source: bytes | Path, lfs: bool | None = None) -> HubFile:
        """Hash ``source`` once (streamed for a file) and decide LFS by :func:`is_lfs`
        unless ``lfs`` says."""
        sha256 = hashlib.sha256()
        if isinstance(source, Path):
            size = source.stat().st_size
            sha1 = hashlib.sha1(b"blob %d\0" % size)
            with open(source, "rb") as fh:
                while block := fh.read(_HASH_BLOCK):
                    sha1.update(block)
                    sha256.update(block)
        else:
            size = len(source)
            sha1 = hashlib.sha1(b"blob %d\0" % size + source)
            sha256.update(source)
        return cls(path, source, size, sha256.hexdigest(), sha1.hexdigest(),
                   is_lfs(path, size) if lfs is None else lfs)

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @property
    def oid(self) -> str:
        """The Git blob id the Hub lists: of the pointer for an LFS file."""
        return git_blob_id(self.pointer) if self.lfs else self.content_oid

    @property
    def etag(self) -> str:
        """The value (unquoted) ``resolve`` gives as ETag: sha256 for LFS, else the blob id."""
        return self.sha256 if self.lfs else self.content_oid


@dataclass(frozen=True)
class Commit:
    """One commit: id, parent, message, its whole tree and its position in the repo's history."""

    sha: str
    parent: str | None
    message: str
    files: Mapping[str, HubFile]
    serial: int

    @property
    def date(self) -> str:
        hours, minutes = divmod(self.serial, 60)
        return f"{_EPOCH}T{hours % 24:02d}:{minutes:02d}:00.000Z"


@dataclass
class HubRepo:
    """A repository: commits, branches and tags, visibility, and the tokens granted access.

    ``gated`` repos list their files to anyone but serve them only with a granted token;
    ``private`` repos answer as if they did not exist without one.
    """

    repo_id: str
    repo_type: RepoType = "model"
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def commit(self, files: Mapping[str, bytes | Path | HubFile], *, branch: str = "main",
               message: str = "Upload files", delete: Iterable[str] = (),
               lfs: Mapping[str, bool] | None = None) -> str:
        """Add or replace ``files`` and remove ``delete`` on top of ``branch`` (created from
        ``main`` when new); returns the new commit id."""
        parent = self.branches.get(branch, self.branches.get("main"))
        tree = dict(self.commits[parent].files) if parent else {}
        for path in delete:
            tree.pop(path, None)
        for path, source in files.items():
            path = check_path(path)
            tree[path] = source if isinstance(source, HubFile) else HubFile.of(
                path, source, (lfs or {}).get(path))
        digest = hashlib.sha1(f"{parent}\n{message}\n".encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{tree[path].oid}\n".encode())
        sha = digest.hexdigest()
        # Copy on write: handler threads may be iterating over the old mappings.
        self.commits = {**self.commits, sha: Commit(sha, parent, message, tree,
                                                    len(self.commits))}
        self.branches = {**self.branches, branch: sha}
        return sha

    def tag(self, name: str, revision: str = "main") -> str:
        """Tag the commit ``revision`` resolves to; returns its id."""
        sha = self.resolve(revision)
        if sha is None:
            raise KeyError(f"{self.repo_id} has no revision {revision!r}")
        self.tags = {**self.tags, name: sha}
        return sha

    def resolve(self, revision: str) -> str | None:
        """The commit a branch, tag or commit id names, or None."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        for prefix in ("refs/heads/", "refs/tags/"):
            if revision.startswith(prefix):
                refs = self.branches if prefix == "refs/heads/" else self.tags
                return refs.get(revision[len(prefix):])
        return revision if revision in self.commits else None

    def last_change(self, sha: str, path: str) -> Commit:
        """The newest commit up to ``sha`` in which ``path`` (a file or folder) last changed."""
        commit = self.commits[sha]
        state = _subtree(commit.files, path)
        while commit.parent is not None:
            parent = self.commits[commit.parent]
            if _subtree(parent.files, path) != state:
                break
            commit = parent
        return commit


def _subtree(files: Mapping[str, HubFile], path: str) -> list[tuple[str, str]]:
    return sorted((p, f.oid) for p, f in files.items()
                  if p == path or p.startswith(path + "/"))


def check_path(path: str) -> str:
    """``path`` if it is a clean relative POSIX path, else ValueError."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or any(p in ("", ".", "..") for p in path.split("/")):
        raise ValueError(f"{path!r} is not a relative path inside a repository")
    return path


def folder_files(root: Path) -> dict[str, Path]:
    """Every regular file under ``root`` as repo path → file (served from disk, not loaded)."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(root).parts}


# --- JSON views ---------------------------------------------------------------------------------

def sibling(file: HubFile, blobs: bool) -> dict[str, Any]:
    """A ``siblings`` entry of the repo info; sizes and ids only when ``?blobs=true``."""
    entry: dict[str, Any] = {"rfilename": file.path}
    if blobs:
        entry.update(size=file.size, blobId=file.oid)
        if file.lfs:
            entry["lfs"] = {"sha256": file.sha256, "size": file.size,
                            "pointerSize": len(file.pointer)}
    return entry


def tree_entries(repo: HubRepo, sha: str, base: str, recursive: bool,
                 expand: bool) -> list[dict[str, Any]] | None:
    """The ``/tree`` listing of folder ``base`` ("" for the root) at commit ``sha``: folders,
    then files, by path; None when ``base`` is not a folder of that commit."""
    files = repo.commits[sha].files
    prefix = base + "/" if base else ""
    folders: set[str] = set()
    listed: list[HubFile] = []
    for path, file in files.items():
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):].split("/")
        for depth in range(1, len(rest)):
            if depth > 1 and not recursive:
                break
            folders.add(prefix + "/".join(rest[:depth]))
        if recursive or len(rest) == 1:
            listed.append(file)
    if base and not listed and not folders:
        return None
    entries = [folder_entry(repo, sha, path, expand) for path in sorted(folders)]
    entries += [file_entry(repo, sha, file, expand) for file in sorted(listed, key=_path)]
    return entries


def path_info(repo: HubRepo, sha: str, path: str, expand: bool) -> dict[str, Any] | None:
    """The ``paths-info`` entry of ``path`` at commit ``sha`` (a file or a folder), or None."""
    files = repo.commits[sha].files
    if path in files:
        return file_entry(repo, sha, files[path], expand)
    if any(p.startswith(path + "/") for p in files):
        return folder_entry(repo, sha, path, expand)
    return None


def file_entry(repo: HubRepo, sha: str, file: HubFile, expand: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": file.oid, "size": file.size,
                             "path": file.path}
    if file.lfs:
        entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": len(file.pointer)}
    if expand:
        entry["lastCommit"] = _commit_summary(repo.last_change(sha, file.path))
    return entry


def folder_entry(repo: HubRepo, sha: str, path: str, expand: bool) -> dict[str, Any]:
    files = repo.commits[sha].files
    digest = hashlib.sha1()
    for name, oid in _subtree(files, path):
        digest.update(f"{name}\0{oid}\n".encode())
    entry: dict[str, Any] = {"type": "directory", "oid": digest.hexdigest(), "size": 0,
                             "path": path}
    if expand:
        entry["lastCommit"] = _commit_summary(repo.last_change(sha, path))
    return entry


def _commit_summary(commit: Commit) -> dict[str, str]:
    return {"id": commit.sha, "title": commit.message, "date": commit.date}


def _path(file: HubFile) -> str:
    return file.path
