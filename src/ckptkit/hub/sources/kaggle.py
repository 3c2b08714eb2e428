"""Kaggle Models handles (``owner/model/framework/variation/version``), fetched by kagglehub.

kagglehub does the work, so its credentials (``kagglehub.login()``, ``KAGGLE_API_TOKEN``,
``KAGGLE_USERNAME``/``KAGGLE_KEY``, ``~/.kaggle``) and its cache (``$KAGGLEHUB_CACHE``, default
``~/.cache/kagglehub``, with ``<version>.complete`` markers) are shared with every other tool
that uses it.  This module adds what kagglehub lacks for ckptkit:

* **Mirrors.**  kagglehub ≥ 0.4 talks to ``https://api.kaggle.com`` through kagglesdk and
  ignores ``KAGGLE_API_ENDPOINT``.  When a ``--mirror`` rule rewrites that URL, kagglesdk is
  pointed at the rewritten base for the duration of the call: ``KAGGLE_API_ENVIRONMENT=PROD``
  and ``kagglesdk.kaggle_env._env_to_endpoint[KaggleEnv.PROD]`` patched, then both restored.
  The mirror receives ``<base>/v1/models.ModelApiService/…``, i.e. the real request path with
  the prefix rewritten, so a plain reverse proxy of api.kaggle.com works.  The patched
  attribute is private; a missing one is reported, never silently bypassed (that would reach
  kaggle.com).
* **Static mirrors.**  A static tree (``ckpt mirror export``) cannot answer kagglesdk's RPCs, so
  when a ``--mirror`` rule rewrites a version's archive URL, the Kaggle REST download
  ``https://www.kaggle.com/api/v1/models/<handle>/download`` (a ``.tar.gz`` of the version, what
  ``curl -L`` and older kagglehub fetch), that archive is downloaded by ckptkit's own engine
  and extracted (:func:`fetch_archive`); kagglehub is neither needed nor asked.
* **Pinned versions only.**  An unversioned handle makes kagglehub ask the API for the latest
  version before it looks at its cache, so it fails offline; the catalogue pins versions.
* **Limits.**  Archives are unpacked with the caps of TF Hub archives, bodies are held to the
  size ceiling and the low-speed limit, requests to the header deadline and a timeout, and a
  failed call leaves nothing new in kagglehub's cache (:mod:`ckptkit.hub.sources.kaggle_limits`).
* **Errors.**  kagglehub's multi-line ``requests`` errors become one-line ckptkit errors with
  a short reason (:func:`ckptkit.hub.reasons.network_reason`).
* **Quiet.**  kagglehub logs to *stdout* and draws tqdm bars; both are silenced (or its log is
  sent to stderr) so that ckpt's stdout stays for results.

kagglehub and kagglesdk change global state (environment, module attributes), so calls are
serialised by a module lock; kagglehub still downloads a model's files in parallel.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ckptkit.errors import (AuthError, CkptkitError, IntegrityError, MissingDependencyError,
                            NotFoundError, SourceError, UsageError)
from ckptkit.storage.mirrors import Mirrors
from ckptkit.hub.reasons import http_reason, network_reason
from ckptkit.hub.download.transfer_plan import TransferLimits

if TYPE_CHECKING:
    from ckptkit.hub.download.download import DownloadResult

KAGGLE_API = "https://api.kaggle.com"
#: Kaggle's REST download of a model version as one .tar.gz: ``<ARCHIVE_API>/<handle>/download``.
ARCHIVE_API = "https://www.kaggle.com/api/v1/models"
ENVIRONMENT_VAR = "KAGGLE_API_ENVIRONMENT"
AUTH_HINT = ("Sign in with `python -c 'import kagglehub; kagglehub.login()'` or set "
             "KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY), and accept the model's "
             "terms on its Kaggle page")
_VERSIONED_PARTS = 5
_LOCK = threading.Lock()


@dataclass(frozen=True)
class KaggleResult:
    """A model version in kagglehub's cache: ``path`` as returned by ``model_download``;
    ``announced`` is False when a file of it came without a ``Content-Length``."""

    path: Path
    handle: str
    announced: bool = True


def fetch(handle: str, *, mirrors: Mirrors, quiet: bool = True,
          limits: TransferLimits | None = None, timeout: float = 30.0) -> KaggleResult:
    """Download (or find in kagglehub's cache) the Kaggle model ``handle``.

    Args:
        handle: ``owner/model/framework/variation/version``, e.g.
            ``google/musiq/tensorFlow2/spaq/1``; the version is required.
        mirrors: when a rule rewrites ``https://api.kaggle.com``, kagglehub talks to the
            rewritten base instead (see the module docstring).
        quiet: silence kagglehub's log and progress bars; otherwise its log goes to stderr.
        limits: the size ceiling (per file), low-speed limit and header deadline
            [default: :class:`~ckptkit.hub.download.transfer_plan.TransferLimits`'s defaults].
        timeout: seconds to connect, and of silence, for kagglesdk's requests.

    Returns:
        A :class:`KaggleResult`; ``path`` is kagglehub's cache directory for the version.

    Raises:
        UsageError: not a 5-part handle, no version, or an unknown framework.
        MissingDependencyError: kagglehub is not installed.
        NotFoundError: Kaggle has no such model or version (HTTP 404).
        AuthError: HTTP 401/403 (not signed in, or the model's terms not accepted).
        IntegrityError: kagglehub found an md5 mismatch, or the version's archive is unsafe
            or over the extraction caps (nothing of it is left in kagglehub's cache).
        SourceError: unreachable API, other HTTP errors, a file over the size ceiling or
            below the low-speed limit, anything else kagglehub raised, or a mirror rule
            or limit this kagglehub cannot honour.

    Example:
        >>> fetch("google/musiq/tensorFlow2/spaq/1", mirrors=Mirrors()).path  # doctest: +SKIP
        PosixPath('/home/me/.cache/kagglehub/models/google/musiq/tensorFlow2/spaq/1')
    """
    from ckptkit.hub.sources.kaggle_limits import Guard, footprint, guarded

    check_handle(handle)
    kagglehub = _import_kagglehub()
    check_framework(handle)
    base = api_base(mirrors)
    guard = Guard(handle, limits or TransferLimits(), timeout)
    with _LOCK, _endpoint(base), _output(quiet), guarded(guard), footprint(handle):
        try:
            path = kagglehub.model_download(handle)
        except CkptkitError:
            raise  # a limit ckptkit put on kagglehub (kaggle_limits): already one line
        except Exception as exc:  # every kagglehub failure becomes one line; see _translate
            raise _translate(exc, handle, base or KAGGLE_API, timeout) from exc
    return KaggleResult(path=Path(path), handle=handle, announced=not guard.unannounced)


def archive_url(handle: str) -> str:
    """Kaggle's own URL of the ``.tar.gz`` of the model version ``handle``."""
    return f"{ARCHIVE_API}/{handle}/download"


def mirrored_archive(handle: str, mirrors: Mirrors) -> str | None:
    """Where a ``--mirror`` rule sends :func:`archive_url` of ``handle``, or None without one."""
    url = archive_url(handle)
    rewritten = mirrors.rewrite(url)
    return None if rewritten == url else rewritten


def fetch_archive(handle: str, dest: Path, *, mirrors: Mirrors, connections: int = 8,
                  timeout: float = 30.0, progress: Any = None,
                  limits: TransferLimits | None = None) -> DownloadResult:
    """Download the version ``handle`` as its archive from the mirror a rule names, and make
    its tree ``dest`` (see the module docstring); returns the archive's download result.

    Raises:
        UsageError: not a 5-part versioned handle, or no mirror rule rewrites its archive URL.
        NotFoundError: the mirror has no such archive.
        SourceError: unreachable, HTTP errors, an HTML page instead of the archive.
        IntegrityError: a truncated or corrupt archive, unsafe or no members.
    """
    from ckptkit.hub.sources.archive_url import fetch_tree

    check_handle(handle)
    url = mirrored_archive(handle, mirrors)
    if url is None:
        raise UsageError(f"no --mirror rule rewrites {archive_url(handle)}",
                         hint=f"Add a rule for {ARCHIVE_API} (ckpt mirror export prints one)")

    def check(tree: Path, archive: Path) -> None:
        if not any(tree.iterdir()):
            raise IntegrityError(f"the archive from {url} is empty", path=str(archive),
                                 hint="Export the model to the mirror again")

    return fetch_tree(url, Path(dest), label="kaggle", check=check, connections=connections,
                      timeout=timeout, progress=progress, limits=limits)


def check_handle(handle: str) -> None:
    """Raise UsageError unless ``handle`` is ``owner/model/framework/variation/<version ≥ 1>``."""
    parts = handle.split("/")
    example = "Example: google/musiq/tensorFlow2/spaq/1"
    if len(parts) == _VERSIONED_PARTS - 1 and all(parts):
        raise UsageError(f"Kaggle handle {handle!r} has no version",
                         hint=f"Pin one, e.g. {handle}/1: an unversioned handle needs the "
                              "network even when the model is cached")
    if len(parts) != _VERSIONED_PARTS or not all(parts):
        raise UsageError(f"{handle!r} is not a Kaggle model handle "
                         "(owner/model/framework/variation/version)", hint=example)
    if not (parts[4].isascii() and parts[4].isdigit()) or int(parts[4]) < 1:
        raise UsageError(f"Kaggle handle {handle!r}: version {parts[4]!r} is not a number ≥ 1",
                         hint=example)


def api_base(mirrors: Mirrors) -> str | None:
    """The base URL a mirror rule gives ``https://api.kaggle.com``, or None without one."""
    rewritten = mirrors.rewrite(KAGGLE_API + "/")
    if rewritten == KAGGLE_API + "/":
        return None
    return rewritten.rstrip("/")


def endpoint_table() -> tuple[dict[Any, str], Any]:
    """kagglesdk's private ``_env_to_endpoint`` dict and its ``KaggleEnv.PROD`` key.

    Raises:
        MissingDependencyError: kagglesdk is not installed (kagglehub < 0.4).
        SourceError: this kagglesdk no longer has them; the mirror cannot be honoured.
    """
    try:
        from kagglesdk import kaggle_env
    except ImportError as exc:
        raise MissingDependencyError("kagglesdk", "kaggle",
                                     "Fetching Kaggle models through a mirror") from exc
    table = getattr(kaggle_env, "_env_to_endpoint", None)
    # PROD, not LOCAL: kagglesdk sends PROD requests to <base>/v1/..., exactly "TO + the rest
    # of the URL" for a rule FROM=https://api.kaggle.com; other environments add /api.
    local = getattr(getattr(kaggle_env, "KaggleEnv", None), "PROD", None)
    if not isinstance(table, dict) or local is None or local not in table:
        raise SourceError(
            f"kagglesdk {_version('kagglesdk')} has no kaggle_env._env_to_endpoint"
            "[KaggleEnv.PROD]; ckptkit cannot point kagglehub at a Kaggle API mirror",
            url=KAGGLE_API, hint="Install kagglesdk 0.1.37 (pip install 'kagglesdk==0.1.37'), "
                                 "or fetch through another source")
    return table, local


@contextlib.contextmanager
def _endpoint(base: str | None) -> Iterator[None]:
    """Point kagglesdk at ``base`` while the block runs (nothing to do for None)."""
    if base is None:
        yield
        return
    table, local = endpoint_table()
    saved_value, saved_env = table[local], os.environ.get(ENVIRONMENT_VAR)
    # kagglesdk reads both when each client is built, i.e. inside model_download.
    table[local] = base
    os.environ[ENVIRONMENT_VAR] = "PROD"
    try:
        yield
    finally:
        table[local] = saved_value
        if saved_env is None:
            os.environ.pop(ENVIRONMENT_VAR, None)
        else:
            os.environ[ENVIRONMENT_VAR] = saved_env


@contextlib.contextmanager
def _output(quiet: bool) -> Iterator[None]:
    """Send kagglehub's log to stderr (or mute it) and hide its tqdm bars when ``quiet``."""
    logger = logging.getLogger("kagglehub")
    saved_level = logger.level
    streams = [(h, h.stream) for h in logger.handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    patches: list[tuple[ModuleType, str, Any]] = []
    try:
        # kagglehub configures a stdout handler at import; ckpt's stdout carries results.
        for handler, _ in streams:
            handler.setStream(sys.stderr)
        if quiet:
            logger.setLevel(logging.ERROR)
            patches = _mute_progress()
        yield
    finally:
        for module, name, value in reversed(patches):
            setattr(module, name, value)
        for handler, stream in streams:
            handler.setStream(stream)
        logger.setLevel(saved_level)


def _mute_progress() -> list[tuple[ModuleType, str, Any]]:
    """Replace the tqdm entry points kagglehub's model download uses by disabled ones.

    tqdm's own switch (``TQDM_DISABLE``) is read once, when tqdm is imported, so it cannot be
    flipped per call.  Returns ``(module, name, original)`` for restoring.
    """
    from kagglehub import clients, http_resolver

    patches: list[tuple[ModuleType, str, Any]] = []
    for module, name in ((clients, "tqdm"), (http_resolver, "thread_map")):
        original = getattr(module, name, None)
        if original is not None:
            patches.append((module, name, original))
            setattr(module, name, functools.partial(original, disable=True))
    # Printed straight to stdout once per process when the server advertises a newer kagglehub.
    if hasattr(clients, "already_printed_version_warning"):
        patches.append((clients, "already_printed_version_warning",
                        clients.already_printed_version_warning))
        clients.already_printed_version_warning = True
    return patches


def _import_kagglehub() -> ModuleType:
    try:
        import kagglehub
    except ImportError as exc:
        raise MissingDependencyError("kagglehub", "kaggle", "Fetching from Kaggle Models") from exc
    return kagglehub


def check_framework(handle: str) -> None:
    """Raise UsageError unless kagglehub knows the framework ``handle`` names (kagglehub must
    be installed)."""
    from kagglehub.handle import parse_model_handle

    try:
        parse_model_handle(handle).framework_enum()
    except ValueError as exc:
        raise UsageError(f"Kaggle handle {handle!r}: {_one_line(exc)}",
                         hint="Frameworks are e.g. tensorFlow2, pyTorch, jax, keras") from exc


def _translate(exc: Exception, handle: str, base: str, timeout: float | None = None
               ) -> CkptkitError:
    """The ckptkit error for whatever kagglehub (or requests under it) raised."""
    import requests
    from kagglehub import exceptions as kex

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = rpc_status(exc.response)
        url = exc.response.url
        if status == 404:
            return NotFoundError(f"Kaggle has no model {handle} (HTTP 404 from {url})",
                                 hint="Check the handle's owner/model/framework/variation/"
                                      "version on kaggle.com/models",
                                 reason=f"{http_reason(404)} (no such model)")
        if status in (401, 403):
            return AuthError(f"Kaggle refused {handle} (HTTP {status}): not signed in, or the "
                             "model's terms were not accepted", url=url, status=status,
                             hint=AUTH_HINT, reason=f"{http_reason(status)} (sign-in or the "
                                                    "model's terms needed)")
        return SourceError(f"Kaggle answered HTTP {status} for {handle} ({url})", url=url,
                           status=status, hint="Try again later or use another source",
                           reason=http_reason(status))
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        reason = network_reason(exc, timeout)
        return SourceError(f"cannot reach the Kaggle API at {base} ({reason})", url=base,
                           hint="Check the network or the mirror, or use another source",
                           reason=reason)
    if isinstance(exc, kex.NotFoundError):
        return NotFoundError(f"Kaggle has no model {handle}", hint="Check the handle",
                             reason="no such model")
    if isinstance(exc, kex.DataCorruptionError):
        return IntegrityError(f"kagglehub found a corrupt download of {handle} (md5 mismatch)",
                              hint="Run the fetch again; the corrupt file was deleted",
                              reason="md5 mismatch (corrupt download)")
    if isinstance(exc, (kex.UnauthenticatedError, kex.CredentialError)):
        return AuthError(f"Kaggle credentials are missing or invalid for {handle}: "
                         f"{_one_line(exc)}", url=base, status=401, hint=AUTH_HINT,
                         reason="credentials missing or invalid")
    return SourceError(f"kagglehub failed for {handle}: {type(exc).__name__}: "
                       f"{_one_line(exc)}", url=base, hint="Set CKPTKIT_DEBUG=1 for the traceback")


def rpc_status(response: Any) -> int:
    """The status of a Kaggle API answer as kagglesdk sees it: the HTTP status, or the ``code``
    (≥ 400) of a JSON error body sent with a non-error status, which kagglesdk raises on."""
    status = int(response.status_code)
    if status < 400:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            code = response.json().get("code")
            if isinstance(code, int) and code >= 400:
                return code
    return status


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
