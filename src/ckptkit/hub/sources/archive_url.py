"""A directory published as one ``.tar.gz`` at one URL: TF Hub's compressed format, a Kaggle
model version's download, or either of them on a static mirror (``ckpt mirror export``).

:func:`fetch_tree` downloads the archive with the resumable engine (:mod:`ckptkit.hub.download.download`) to
a fixed name beside ``dest``, so an interrupted fetch resumes; extracts it safely
(:mod:`ckptkit.storage.archives`); lets the caller check the tree; and only then renames it to ``dest``.
The archive is deleted either way: a corrupt one must not be resumed, a good one is not needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptkit.storage import archives

if TYPE_CHECKING:
    from ckptkit.hub.download.download import DownloadResult
    from ckptkit.hub.download.transfer_plan import TransferLimits


def fetch_tree(url: str, dest: Path, *, label: str, check: Callable[[Path, Path], None],
               connections: int = 8, timeout: float = 30.0, progress: Any = None,
               limits: TransferLimits | None = None) -> DownloadResult:
    """Download the archive at ``url`` and make its tree ``dest``.

    Args:
        url: the archive's URL, mirror rules already applied.
        dest: the directory to create; an existing one is replaced only by a checked tree.
        label: names the archive file beside ``dest`` (``.<dest>.<tag>.<label>.tar.gz``).
        check: ``check(tree, archive)`` raises (an IntegrityError, say) when the extracted
            ``tree`` is not what the source promised.
        connections, timeout, progress, limits: passed to :func:`ckptkit.hub.download.download.download`
            (an archive's size is never known beforehand: ``limits.max_bytes`` bounds it).

    Returns:
        The download's result (the archive's size and sha256, the final URL).

    Raises:
        What :func:`ckptkit.hub.download.download.download`, :func:`ckptkit.storage.archives.extract` and ``check``
        raise; nothing is left at ``dest`` then, or the old ``dest`` is left as it was.
    """
    # Imported here: planning code (ckpt doctor) imports the sources without requests.
    from ckptkit.hub.download.download import download

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Fixed per (dest, URL) so an interrupted download resumes, and never mixes two models.
    tag = hashlib.sha1(url.encode("utf8")).hexdigest()[:12]
    archive = dest.parent / f".{dest.name}.{tag}.{label}.tar.gz"
    result = download(url, archive, connections=connections, timeout=timeout,
                      progress=progress, limits=limits)
    try:
        # A directory staged under its own name (not storage.atomic's): replace_dir must move
        # an existing tree aside, which os.replace cannot do for a non-empty directory.
        staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
        archives.extract(archive, staging)
        try:
            check(staging, archive)
            replace_dir(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        archive.unlink(missing_ok=True)
    return result


def replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    try:
        os.rename(new, target)
        return
    except OSError:
        if not target.exists() and not target.is_symlink():
            raise
    old = target.with_name(f"{target.name}.{uuid.uuid4().hex}.old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
