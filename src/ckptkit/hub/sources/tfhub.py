"""TF Hub handles (``https://tfhub.dev/<publisher>/<model>/<version>``), fetched without TensorFlow.

This speaks tensorflow_hub's *compressed* protocol: the handle URL with
``tf-hub-format=compressed`` added to its query redirects to a ``.tar.gz`` of the SavedModel
directory (files at the archive root).  Unlike tensorflow_hub, the archive is downloaded by the
resumable engine (:mod:`ckptkit.hub.download.download`), extracted safely (:mod:`ckptkit.storage.archives`) and
checked to be a SavedModel before anything appears under its final name.

The result is also published in tensorflow_hub's cache layout, so that a later
``hub.load(handle)`` works offline: ``<cache>/<sha1(handle)>/`` holds the tree (hardlinks to the
fetched files) and ``<cache>/<sha1(handle)>.descriptor.txt`` says who wrote it, as in
``tensorflow_hub/resolver.py`` (``atomic_download``, ``_write_module_descriptor_file``) and
``compressed_module_resolver.py`` (``_module_dir``: sha1 of the handle string exactly as passed
to ``hub.load``, UTF-8).  Neither TensorFlow nor tensorflow_hub is imported here.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import socket
import tempfile
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkit.errors import IntegrityError, UsageError
from ckptkit.storage.atomic import write_text
from ckptkit.formats import savedmodel
from ckptkit.storage.mirrors import Mirrors
from ckptkit.hub.sources.archive_url import fetch_tree, replace_dir
from ckptkit.hub.download.transfer_plan import TransferLimits

FORMAT_QUERY = ("tf-hub-format", "compressed")


@dataclass(frozen=True)
class TFHubResult:
    """A fetched TF Hub model.

    Attributes:
        path: the extracted SavedModel directory (the ``dest`` given to :func:`fetch`).
        url: the URL requested (mirror applied, ``tf-hub-format=compressed`` added).
        final_url: where the archive really came from, after redirects.
        archive_sha256: sha256 of the downloaded ``.tar.gz``.
        archive_size: its size in bytes.
        transferred: bytes received over the network in this call (less after a resume).
        tfhub_module_dir: ``<tfhub cache>/<sha1(handle)>``, or None when not published.
        announced: the server stated the archive's size before sending it.
    """

    path: Path
    url: str
    final_url: str
    archive_sha256: str
    archive_size: int
    transferred: int
    tfhub_module_dir: Path | None
    announced: bool = True


def default_tfhub_cache_dir() -> Path:
    """tensorflow_hub's cache directory when neither ``TFHUB_CACHE_DIR`` nor
    ``--tfhub_cache_dir`` is set: ``<tempfile.gettempdir()>/tfhub_modules``
    (``resolver.tfhub_cache_dir(use_temp=True)``).  Callers prefer ``$TFHUB_CACHE_DIR``."""
    return Path(tempfile.gettempdir()) / "tfhub_modules"


def module_key(handle: str) -> str:
    """The cache directory name tensorflow_hub uses for ``handle``: ``sha1(handle)`` in hex."""
    return hashlib.sha1(handle.encode("utf8")).hexdigest()


def compressed_url(url: str) -> str:
    """``url`` with ``tf-hub-format=compressed`` appended to its query, other params kept
    (tensorflow_hub ``HttpResolverBase._append_format_query``)."""
    parsed = list(urllib.parse.urlparse(url))
    query = urllib.parse.parse_qsl(parsed[4])
    query.append(FORMAT_QUERY)
    parsed[4] = urllib.parse.urlencode(query)
    return urllib.parse.urlunparse(parsed)


def fetch(handle: str, dest: Path, *, mirrors: Mirrors, tfhub_cache_dir: Path | None,
          connections: int = 8, timeout: float = 30.0, progress: Any = None,
          limits: TransferLimits | None = None) -> TFHubResult:
    """Download the SavedModel behind a TF Hub ``handle`` into ``dest``.

    Steps: rewrite the handle with ``mirrors``; download ``?tf-hub-format=compressed`` to
    ``.<dest name>.<url tag>.tfhub.tar.gz`` beside ``dest`` (a fixed name, so an interrupted
    fetch resumes); extract it safely; check it is a SavedModel; rename it to ``dest`` (an existing
    ``dest`` is replaced only by a verified tree); delete the archive; then, when
    ``tfhub_cache_dir`` is given, publish the tree there for ``hub.load(handle)``.

    Args:
        handle: the TF Hub handle, e.g. ``https://tfhub.dev/google/musiq/spaq/1``; it is also
            the key of the tensorflow_hub cache entry, so pass it exactly as users load it.
        dest: the directory to create.
        mirrors: URL prefix rewrites (``--mirror``); the handle URL is rewritten.
        tfhub_cache_dir: ``$TFHUB_CACHE_DIR`` or :func:`default_tfhub_cache_dir`; None skips
            publishing.
        connections, timeout, progress, limits: passed to :func:`ckptkit.hub.download.download.download`
            (the archive's size is never known beforehand: ``limits.max_bytes`` bounds it).

    Returns:
        A :class:`TFHubResult`.

    Raises:
        UsageError: the handle is not an http(s) URL.
        NotFoundError: the hub has no such model (HTTP 404).
        SourceError: unreachable, HTTP errors, or an HTML page instead of the archive.
        IntegrityError: truncated/corrupt archive, unsafe members, or not a SavedModel;
            nothing is left at ``dest``.

    Example:
        >>> fetch("https://tfhub.dev/google/musiq/spaq/1", Path("spaq"), mirrors=Mirrors(),
        ...       tfhub_cache_dir=default_tfhub_cache_dir())          # doctest: +SKIP
    """
    if not handle.startswith(("http://", "https://")):
        raise UsageError(f"TF Hub handle {handle!r} is not an http(s) URL",
                         hint="Example: https://tfhub.dev/google/musiq/spaq/1")
    dest = Path(dest)
    url = compressed_url(mirrors.rewrite(handle))

    def check(tree: Path, archive: Path) -> None:
        if not savedmodel.sniff(tree):
            raise IntegrityError(f"the archive from {url} is not a SavedModel "
                                 f"(no {savedmodel.PB_NAME} at its root)",
                                 hint="The handle may name a TF1 Hub module or another "
                                      "format; try the next source", path=str(archive))

    result = fetch_tree(url, dest, label="tfhub", check=check, connections=connections,
                        timeout=timeout, progress=progress, limits=limits)
    module_dir = (publish(handle, dest, Path(tfhub_cache_dir))
                  if tfhub_cache_dir is not None else None)
    return TFHubResult(path=dest, url=url, final_url=result.url,
                       archive_sha256=result.sha256, archive_size=result.size,
                       transferred=result.transferred, tfhub_module_dir=module_dir,
                       announced=result.announced)


def publish(handle: str, model_dir: Path, cache_dir: Path) -> Path:
    """Make ``model_dir`` what ``hub.load(handle)`` finds in ``cache_dir``.

    Builds ``<sha1>.<uuid>.tmp`` (hardlinks, copies across devices), writes
    ``<sha1>.descriptor.txt`` atomically, then renames the tree to ``<sha1>``: tensorflow_hub
    treats any non-empty ``<sha1>`` directory as complete, so it must never see a partial one.
    An existing identical tree is kept; a different one (stale or damaged by a temp cleaner)
    is replaced.

    Returns:
        The module directory ``<cache_dir>/<sha1(handle)>``.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = module_key(handle)
    module_dir = cache_dir / key
    if _same_tree(model_dir, module_dir):
        _write_descriptor(handle, module_dir)
        return module_dir
    # tensorflow_hub's own staging name (its resolver stages ``<sha1>.<uuid>.tmp`` too), kept
    # so that both tools recognise each other's leftovers; see docs/architecture.md.
    tmp = cache_dir / f"{key}.{uuid.uuid4().hex}.tmp"
    try:
        shutil.copytree(model_dir, tmp, symlinks=True, copy_function=_link_or_copy)
        # tensorflow_hub writes the descriptor before the rename too.
        _write_descriptor(handle, module_dir)
        replace_dir(tmp, module_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return module_dir


def _write_descriptor(handle: str, module_dir: Path) -> None:
    # Byte-for-byte the format of tensorflow_hub.resolver._write_module_descriptor_file.
    text = "Module: %s\nDownload Time: %s\nDownloader Hostname: %s (PID:%d)" % (
        handle, str(datetime.datetime.today()), socket.gethostname(), os.getpid())
    write_text(Path(f"{module_dir}.descriptor.txt"), text)


def _same_tree(a: Path, b: Path) -> bool:
    """True when ``b`` holds the same relative files with the same sizes as ``a``."""
    if not b.is_dir() or b.is_symlink():
        return False

    def listing(root: Path) -> dict[str, int]:
        return {str(p.relative_to(root)): p.stat().st_size
                for p in root.rglob("*") if p.is_file()}

    try:
        return listing(a) == listing(b)
    except OSError:
        return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another device, or a filesystem without hardlinks
        shutil.copy2(src, dst)

