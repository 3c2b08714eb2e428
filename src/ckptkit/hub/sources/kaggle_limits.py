"""The limits ckptkit puts around kagglehub's own downloading and unpacking.

kagglehub writes into its cache itself, with none of the limits ckptkit's downloader keeps: it
unpacks a whole-version archive with ``tarfile.extractall`` and no size cap, streams each file
for as long as the server sends, and sends its API requests without any timeout.  While
:func:`guarded` is active (the Kaggle source holds its module lock), kagglehub runs with:

* **the extraction caps of TF Hub archives**: ``http_resolver._extract_archive`` is replaced by
  :func:`ckptkit.storage.archives.extract` (member and byte caps, no traversal, links or devices),
  building the tree beside its final place and renaming it in only when complete;
* **the body limits of every download**: ``clients._download_file`` is replaced by one that
  refuses a file over the size ceiling (announced or streamed) and a body below the low-speed
  limit (:class:`~ckptkit.hub.download.stalls.SpeedWatch`);
* **the header deadline and a timeout** on kagglesdk's session (:func:`ckptkit.hub.download.stalls.bound`).

:func:`footprint` undoes what a failed call wrote in ``KAGGLEHUB_CACHE``: the version directory,
its ``.archive`` and the folders above them, when they did not exist before the call.

The replaced functions are kagglehub's private ones; a kagglehub without them is refused
(:class:`~ckptkit.errors.SourceError`), never run without the caps.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ckptkit.storage import archives
from ckptkit.hub import reasons
from ckptkit.errors import SourceError
from ckptkit.hub.sources.archive_url import replace_dir
from ckptkit.hub.download.stalls import SpeedWatch, bound
from ckptkit.hub.download.transfer_plan import TransferLimits

_CHUNK = 1 << 20


class Guard:
    """The limits of one ``model_download`` call, and what it saw.

    Attributes:
        unannounced: a file came without a ``Content-Length`` (so the version's size was never
            stated before its bytes: it is not pinned unless the user asks).
    """

    def __init__(self, handle: str, limits: TransferLimits, timeout: float) -> None:
        self.handle = handle
        self.limits = limits
        self.timeout = timeout
        self.unannounced = False
        self._lock = threading.Lock()
        self._bound: weakref.WeakSet[Any] = weakref.WeakSet()

    def extract(self, archive_path: str, out_path: str) -> None:
        """kagglehub's ``_extract_archive(archive_path, out_path)``, with the TF Hub caps."""
        archive, out = Path(archive_path), Path(out_path)
        if not (out.is_dir() and any(out.iterdir())):
            archives.extract(archive, out)
            return
        # A copy kagglehub left without its completion marker: replaced only by a whole tree.
        fresh = out.with_name(f".{out.name}.{uuid.uuid4().hex}.new")
        archives.extract(archive, fresh)
        try:
            replace_dir(fresh, out)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            raise

    def download_body(self, response: Any, out_file: str, size_read: int,
                      total_size: int | None, hash_object: Any) -> None:
        """kagglehub's ``_download_file``: append the body of ``response`` to ``out_file``
        (from ``size_read``), within the size ceiling and above the low-speed limit."""
        ceiling = self.limits.max_bytes
        if total_size is None:
            with self._lock:
                self.unannounced = True
        elif ceiling is not None and total_size > ceiling:
            raise self._too_large(response)
        watch = SpeedWatch(self.limits.min_speed, self.limits.speed_window)
        with open(out_file, "ab" if size_read > 0 else "wb") as out:
            for chunk in response.iter_content(_CHUNK):
                size_read += len(chunk)
                if total_size is None and ceiling is not None and size_read > ceiling:
                    raise self._too_large(response)
                out.write(chunk)
                if hash_object is not None:
                    hash_object.update(chunk)
                if watch.add(len(chunk)):
                    reason = reasons.stalled(self.limits.min_speed, self.limits.speed_window)
                    raise SourceError(f"Kaggle download of {self.handle} {reason}",
                                      url=getattr(response, "url", None), reason=reason,
                                      hint="The server is too slow; try another source, or "
                                           "lower CKPTKIT_LOW_SPEED_LIMIT")

    def bind(self, client: Any) -> None:
        """Put the header deadline and the timeout on a kagglesdk client's session."""
        session = getattr(client, "_session", None)
        if session is not None and session not in self._bound:
            bound(session, self.limits.header_timeout, self.timeout)
            self._bound.add(session)

    def _too_large(self, response: Any) -> SourceError:
        assert self.limits.max_bytes is not None
        reason = reasons.too_large(self.limits.max_bytes)
        return SourceError(f"a file of the Kaggle model {self.handle} is {reason}",
                           url=getattr(response, "url", None), reason=reason,
                           hint="If it is genuine, raise CKPTKIT_MAX_DOWNLOAD; otherwise try "
                                "another source")


@contextlib.contextmanager
def guarded(guard: Guard) -> Iterator[None]:
    """Run kagglehub with ``guard``'s limits while the block runs (patches undone after)."""
    from kagglehub import clients, http_resolver

    try:
        from kagglesdk.kaggle_http_client import KaggleHttpClient
    except ImportError:  # kagglehub < 0.4 talks to the API without kagglesdk
        KaggleHttpClient = None  # noqa: N806 - a class or nothing
    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: ModuleType | type, name: str, value: Any) -> None:
        original = getattr(owner, name, None)
        if original is None:
            raise SourceError(f"this kagglehub has no {getattr(owner, '__name__', owner)}.{name}; "
                              "ckptkit cannot apply its download limits to it", hint=(
                                  "Install a kagglehub ckptkit supports "
                                  "(pip install 'ckptkit[kaggle]'), or use another source"),
                              reason="unsupported kagglehub version")
        patches.append((owner, name, original))
        setattr(owner, name, value)

    try:
        patch(http_resolver, "_extract_archive", guard.extract)
        patch(clients, "_download_file", guard.download_body)
        if KaggleHttpClient is not None and hasattr(KaggleHttpClient, "_init_session"):
            original_init = KaggleHttpClient._init_session

            def init_session(client: Any) -> Any:
                result = original_init(client)
                guard.bind(client)
                return result

            patch(KaggleHttpClient, "_init_session", init_session)
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


@contextlib.contextmanager
def footprint(handle: str) -> Iterator[None]:
    """On an exception in the block, remove what the download of ``handle`` added to
    kagglehub's cache: the version directory, its ``.archive``, and folders left empty above
    them, each only if it did not exist when the block began.  (Ctrl-C keeps them: kagglehub
    resumes an interrupted archive.)"""
    from kagglehub.cache import get_cached_archive_path, get_cached_path
    from kagglehub.handle import parse_model_handle

    parsed = parse_model_handle(handle)
    version = Path(get_cached_path(parsed))
    archive = Path(get_cached_archive_path(parsed))
    folders = [version.parent, *version.parent.parents]
    existed = {p for p in (version, archive, *folders) if p.exists() or p.is_symlink()}
    try:
        yield
    except Exception:
        if version not in existed:
            shutil.rmtree(version, ignore_errors=True)
        if archive not in existed:
            archive.unlink(missing_ok=True)
        for folder in folders:  # deepest first
            if folder in existed:
                break
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise
