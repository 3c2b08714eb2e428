"""The Hugging Face Hub's control plane, reached through ``huggingface_hub`` itself: where the
Hub and its cache are, the token, and one revision's commit and files.

Nothing here speaks the Hub's HTTP API by hand; :func:`fetch_revision` asks
``huggingface_hub.HfApi.repo_info(..., files_metadata=True)`` and turns its answer and its
exceptions into ckptkit's.  Where things are is what ``huggingface_hub`` says:

* the endpoint: ``huggingface_hub.constants.ENDPOINT`` (``HF_ENDPOINT``);
* the cache: ``huggingface_hub.constants.HF_HUB_CACHE`` (``HF_HUB_CACHE``, else
  ``$HF_HOME/hub``);
* the token: ``huggingface_hub.get_token()`` (``HF_TOKEN``, else the one ``hf auth login``
  stored).

``huggingface_hub.constants`` reads the environment once, when it is first imported (a test
that changes ``HF_*`` variables afterwards must patch the constants too).  The package is the
optional extra ``ckptkit[hf]``; it is imported only here and only when a Hub source is used, and
its HTTP stack only when a token is looked up or a request is sent (``ckpt doctor --offline``
never does either).

The file bytes do not go through ``huggingface_hub``: ckptkit's download engine fetches each
file's ``resolve`` URL.  The token goes only to URLs of the endpoint's origin (scheme, host and
port): never to the CDN a download is redirected to, and never to a ``--mirror`` that moves the
endpoint elsewhere (``HfApi`` is then built with ``token=False``).  It is kept off every
``repr`` and message.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from ckptkit import __version__
from ckptkit.errors import (AuthError, MissingDependencyError, NotFoundError, SourceError,
                            UsageError)
from ckptkit.hub.reasons import http_reason, network_reason
from ckptkit.storage.mirrors import Mirrors

RepoType = Literal["model", "dataset"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset")
RETRIES = 4
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
TOKEN_HINT = ("Set HF_TOKEN=hf_... (a token from https://huggingface.co/settings/tokens) "
              "or run `hf auth login`")


def hub_constants() -> ModuleType:
    """``huggingface_hub.constants`` (no HTTP stack is imported with it).

    Raises:
        MissingDependencyError: huggingface_hub is not installed (exit 1).
    """
    try:
        from huggingface_hub import constants
    except ImportError as exc:
        raise MissingDependencyError("huggingface_hub", "hf",
                                     "The Hugging Face Hub source") from exc
    return constants


@dataclass(frozen=True)
class HubEnv:
    """Endpoint, cache folder and token, as ``huggingface_hub`` finds them."""

    endpoint: str
    hub_cache: Path
    token: str | None = field(default=None, repr=False)
    token_origin: str | None = None  # "HF_TOKEN", the token file's path, or "huggingface_hub"

    @classmethod
    def from_environ(cls, *, with_token: bool = True) -> HubEnv:
        """The Hub ``huggingface_hub`` would talk to; ``with_token=False`` skips the token
        (looking it up imports the client's HTTP stack).

        Raises:
            MissingDependencyError: huggingface_hub is not installed.
        """
        constants = hub_constants()
        endpoint, cache = constants.ENDPOINT.rstrip("/"), Path(constants.HF_HUB_CACHE)
        if not with_token:
            return cls(endpoint, cache)
        from huggingface_hub import get_token

        token = get_token()
        if token is None:
            return cls(endpoint, cache)
        # Only to say where the token came from (huggingface_hub does not tell).
        origin = next((n for n in _TOKEN_VARIABLES if (os.environ.get(n) or "").strip()),
                      constants.HF_TOKEN_PATH if os.path.isfile(constants.HF_TOKEN_PATH)
                      else "huggingface_hub")
        return cls(endpoint, cache, token, origin)

    def headers_for(self, url: str) -> dict[str, str]:
        """``Authorization`` for a URL of the endpoint's own origin; nothing for any other."""
        if self.token and _origin(url) == _origin(self.endpoint):
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def token_for(self, url: str) -> str | bool:
        """The ``token`` argument for a ``huggingface_hub`` call to ``url``: ours for the
        endpoint's origin, else ``False`` (not even the client's own stored token)."""
        return self.token if self.token and self.headers_for(url) else False


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


@dataclass(frozen=True)
class RepoFile:
    """One file of a revision: its size and the Hub's identities for it."""

    path: str
    size: int
    blob_id: str                  # Git's blob id (of the LFS pointer for an LFS file)
    lfs_sha256: str | None        # the LFS object id: the content's sha256

    @property
    def etag(self) -> str:
        """The name ``huggingface_hub`` gives the file's blob in its cache."""
        return self.lfs_sha256 or self.blob_id


@dataclass(frozen=True)
class RepoRevision:
    """A revision resolved to its commit, with the files it holds."""

    repo_id: str
    repo_type: RepoType
    revision: str
    commit: str
    files: tuple[RepoFile, ...]

    @property
    def label(self) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"hf:{prefix}{self.repo_id}@{self.revision}"


def resolve_url(endpoint: str, repo_type: RepoType, repo_id: str, commit: str,
                path: str) -> str:
    """A file's ``resolve`` URL, which ckptkit's engine downloads (the Hub's URL scheme, as
    ``huggingface_hub.hf_hub_url`` writes it; built here so that ``doctor --offline`` shows it
    without loading the client's HTTP stack)."""
    prefix = "datasets/" if repo_type == "dataset" else ""
    return (f"{endpoint}/{prefix}{repo_id}/resolve/{urllib.parse.quote(commit, safe='')}/"
            f"{urllib.parse.quote(path)}")


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts) \
            or any(c.isspace() or c in "\\:@" for c in repo_id):
        raise UsageError(f"{repo_id!r} is not a Hub repo id",
                         hint="Write hf:ORG/REPO[@REVISION], e.g. hf:kornia/loftr@main")
    return repo_id


def api_endpoint(env: HubEnv, mirrors: Mirrors) -> str:
    """The endpoint the API calls go to: ``env.endpoint`` with ``--mirror`` applied (a rule
    must move the endpoint as a whole, as it moves every ``/api/`` and ``resolve`` URL)."""
    moved = mirrors.rewrite(f"{env.endpoint}/api/")
    if not moved.startswith(("http://", "https://")) or not moved.endswith("/api/"):
        raise UsageError(f"--mirror moves the Hub API {env.endpoint}/api/ to {moved}, which is "
                         "not an http(s) Hub endpoint",
                         hint="Map the endpoint itself, e.g. --mirror "
                              f"{env.endpoint}=http://HOST:PORT")
    return moved[:-len("/api/")]


def fetch_revision(env: HubEnv, repo_id: str, revision: str, repo_type: RepoType, *,
                   mirrors: Mirrors = Mirrors(), timeout: float = 30.0) -> RepoRevision:
    """Ask the Hub, through ``HfApi.repo_info(files_metadata=True)``, which commit
    ``revision`` is and which files it holds (sizes, Git blob ids, LFS sha256).

    Dropped connections, 429 and 5xx are retried (``Retry-After`` honoured): ``repo_info``
    itself sends one request.

    Raises:
        MissingDependencyError: huggingface_hub is not installed.
        AuthError: a gated or private repo without a token (the message says how to set one),
            or a token the Hub refuses or that has no access.
        NotFoundError: no such repo or revision.
        SourceError: the Hub unreachable, or answering 429/5xx, after retries.
    """
    hub_constants()  # the one-line "pip install 'ckptkit[hf]'" before anything else
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    transport_error = _transport_error()

    endpoint = api_endpoint(env, mirrors)
    api = HfApi(endpoint=endpoint, token=env.token_for(endpoint), library_name="ckptkit",
                library_version=__version__)
    name, where = f"hf:{repo_id}", f"{endpoint}/api/{repo_type}s/{repo_id}"
    from ckptkit.hub.download.download import _backoff as backoff  # the engine's knobs
    from ckptkit.hub.download.transfer_plan import parse_retry_after

    for attempt in range(RETRIES + 1):
        try:
            info = api.repo_info(repo_id, revision=revision, repo_type=repo_type,
                                 files_metadata=True, timeout=timeout)
            break
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in _RETRY_STATUSES or attempt == RETRIES:
                raise _api_error(exc, env, endpoint, name, revision, where) from None
            wait = parse_retry_after(exc.response.headers.get("Retry-After"))
            time.sleep(backoff(attempt + 1, wait))
        except transport_error as exc:
            if attempt == RETRIES:
                raise SourceError(f"the Hub at {endpoint} is unreachable: "
                                  f"{network_reason(exc, timeout)}", url=where,
                                  reason=network_reason(exc, timeout)) from exc
            time.sleep(backoff(attempt + 1, None))
        except OfflineModeIsEnabled:
            raise NotFoundError(f"{name}: HF_HUB_OFFLINE is set, so huggingface_hub sends "
                                "nothing to the Hub", reason="HF_HUB_OFFLINE is set",
                                hint="Pass --offline to use the Hub cache only, or unset "
                                     "HF_HUB_OFFLINE") from None
    try:
        files = tuple(_repo_file(s) for s in info.siblings or ())
        return RepoRevision(repo_id, repo_type, revision, str(info.sha), files)
    except (ValueError, TypeError) as exc:
        raise SourceError(f"{name}: the Hub's listing at {where} lacks file sizes or ids "
                          f"({exc})", url=where, reason="not a Hub API answer") from exc


def _transport_error() -> type[Exception]:
    """The base of the connection errors of the HTTP client ``huggingface_hub`` sends with
    (``httpx``, or ``httpx2`` in recent releases): asked of its session, not guessed."""
    import importlib

    from huggingface_hub import get_session

    package = type(get_session()).__module__.split(".")[0]
    return importlib.import_module(package).TransportError  # type: ignore[no-any-return]


def _repo_file(sibling: Any) -> RepoFile:
    """A ``RepoSibling`` (with ``files_metadata=True``) as ckptkit keeps it."""
    lfs = sibling.lfs
    size = lfs.size if lfs is not None else sibling.size
    if size is None or sibling.blob_id is None:
        raise ValueError(f"no size or blob id for {sibling.rfilename}")
    return RepoFile(str(sibling.rfilename), int(size), str(sibling.blob_id),
                    str(lfs.sha256).lower() if lfs is not None else None)


def _api_error(exc: Any, env: HubEnv, endpoint: str, name: str, revision: str,
               where: str) -> SourceError:
    """One of huggingface_hub's HTTP errors as ckptkit's one-line error."""
    from huggingface_hub.errors import (GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    response = exc.response
    status = response.status_code if response is not None else None
    code = response.headers.get("X-Error-Code") if response is not None else None
    if status == 401 and code == "RepoNotFound" and not env.headers_for(endpoint):
        # Without a token the Hub cannot tell a missing repo from a private one.
        return AuthError(f"{name}: no such repo on {endpoint}, or a private one that needs a "
                         "Hugging Face token", hint=TOKEN_HINT, url=where, status=status,
                         reason="not found, or a token is needed")
    if isinstance(exc, GatedRepoError) or status in (401, 403):
        return access_error(env, name, status, "GatedRepo" if isinstance(exc, GatedRepoError)
                            else code, where)
    if isinstance(exc, RevisionNotFoundError):
        return NotFoundError(f"{name} has no revision {revision!r}",
                             hint="Name a branch, a tag or a full commit id",
                             reason="revision not found")
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return NotFoundError(f"{name}: no such repo on {endpoint}",
                             hint="Check the name, or --repo-type dataset for a dataset",
                             reason="repo not found")
    return SourceError(f"{name}: the Hub answered HTTP {status} at {where}", url=where,
                       status=status, reason=http_reason(status) if status else "no answer")


def access_error(env: HubEnv, name: str, status: int | None, code: str | None,
                 url: str) -> AuthError:
    """The one-line error for a repo the Hub will not show: no token (and how to give one),
    a refused token, or a token without access.  Never the token itself."""
    if env.token is None or not env.headers_for(url):
        return AuthError(f"{name} needs a Hugging Face token", hint=TOKEN_HINT, url=url,
                         status=status, reason="a token is needed")
    if code is None and status == 401:
        return AuthError(f"{name}: the Hub refused the token from {env.token_origin} "
                         "(invalid or expired)", url=url, status=status,
                         hint="Create a new one at https://huggingface.co/settings/tokens",
                         reason="token refused")
    return AuthError(f"{name}: the token from {env.token_origin} has no access to this repo",
                     url=url, status=status, hint=f"Ask for access on {env.endpoint}/{name[3:]}",
                     reason="no access with this token")
