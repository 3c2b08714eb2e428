"""``file://`` URLs: a mirror on a mounted disk, a share or a USB stick, read with the checks a
download gets.

A ``--mirror`` rule may point at a directory (``https://tfhub.dev=file:///mnt/mirror/tfhub.dev``,
as ``ckpt mirror export`` prints); :func:`ckptkit.hub.download.download.download` hands the rewritten URLs
here.  The file is copied into a temporary file beside ``dest``, hashed while it is copied,
checked against the expected size and sha256, and only then renamed to ``dest``: what an HTTP
download guarantees, without the resuming (a local copy cut short starts again).  The query of a
URL is ignored, as static web servers ignore it (TF Hub's ``?tf-hub-format=compressed``).
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ckptkit.errors import IntegrityError, NotFoundError, SourceError, UsageError
from ckptkit.hub.download.transfer import DownloadResult
from ckptkit.storage.atomic import atomic_file

CHUNK = 1 << 20


def is_file_url(url: str) -> bool:
    """``url`` names a local file (``file:`` scheme, any case)."""
    return url[:5].lower() == "file:"


def local_path(url: str) -> Path:
    """The path a ``file:`` URL names (percent-escapes decoded, query and fragment left out).

    Raises:
        UsageError: the URL names another host (``file://server/share`` is not read here;
            mount the share and name its path).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"{url}: a file URL must name a path on this machine, not on host "
                         f"{parts.netloc!r}",
                         hint="Mount the share and use file:///path/to/it (three slashes)")
    return Path(urllib.request.url2pathname(parts.path))


def size_of(url: str) -> int | None:
    """The size of the file a ``file:`` URL names, or None when there is none."""
    try:
        path = local_path(url)
        return path.stat().st_size if path.is_file() else None
    except (OSError, UsageError):
        return None


def copy(url: str, dest: Path, *, expected_size: int | None, expected_sha256: str | None,
         progress: Any = None) -> DownloadResult:
    """Copy the file ``url`` names to ``dest``, verified and atomic (see the module docstring).

    Raises:
        NotFoundError: no such file (what HTTP 404 is for a web server).
        SourceError: it cannot be read.
        IntegrityError: size or sha256 differ from the expected ones; ``dest`` is untouched.
        DiskFullError: ``dest``'s disk filled up; nothing is left behind.
    """
    source = local_path(url)
    if not source.is_file():
        raise NotFoundError(f"{url}: no such file", hint="Check the mirror's path and rules",
                            path=str(source))
    digest, size = hashlib.sha256(), 0
    try:
        src = open(source, "rb")
    except OSError as exc:
        raise SourceError(f"{url}: cannot read it ({exc.strerror or exc})", url=url,
                          hint="Check the mirror's permissions") from exc
    # Checked inside the atomic write: a copy that fails its checks never reaches ``dest``.
    with src, atomic_file(dest) as out:
        if progress is not None:
            progress.set_total(os.fstat(src.fileno()).st_size)
        while chunk := src.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress.update(len(chunk))
        sha256 = digest.hexdigest()
        if expected_size is not None and size != expected_size:
            raise IntegrityError(f"{url} has {size} bytes, expected {expected_size}",
                                 path=str(source))
        if expected_sha256 is not None and sha256 != expected_sha256.lower():
            raise IntegrityError(f"{url} has sha256 {sha256}, expected {expected_sha256}",
                                 path=str(source))
    return DownloadResult(path=dest, size=size, sha256=sha256, url=url, transferred=size,
                          resumed_from=0)
