"""Content hashes: sha256 of a file, and of a directory tree (SavedModels)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted by relative path (the order the hash uses)."""
    return sorted((p for p in root.rglob("*") if p.is_file() and not p.is_symlink()),
                  key=lambda p: p.relative_to(root).as_posix())


def tree_sha256(root: Path) -> str:
    """sha256 over ``relative/path  size  sha256`` lines of every file, sorted by path.

    Two trees hash alike exactly when they hold the same files with the same bytes, however
    they were delivered (a TF Hub tar.gz or Kaggle's file-by-file download).
    """
    return _tree_sha256_and_size(root)[0]


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in tree_files(root))


def sha256_and_size(path: Path) -> tuple[str, int]:
    """The sha256 of a file or of a tree (:func:`tree_sha256`) and its bytes, from one walk:
    for callers that report the size of what they verify (``ckpt doctor``)."""
    if path.is_dir():
        return _tree_sha256_and_size(path)
    return sha256_file(path), path.stat().st_size


def _tree_sha256_and_size(root: Path) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    for path in tree_files(root):
        rel, size = path.relative_to(root).as_posix(), path.stat().st_size
        digest.update(f"{rel}\0{size}\0{sha256_file(path)}\n".encode())
        total += size
    return digest.hexdigest(), total
