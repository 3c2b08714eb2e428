"""The Hugging Face Hub's API, as ``ckpt fetch hf:`` needs it: one revision's commit and files.

Where things are is found the way ``huggingface_hub`` finds them:

* the endpoint: ``HF_ENDPOINT`` (default ``https://huggingface.co``);
* the token: ``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``), else the file
  ``HF_TOKEN_PATH`` (default ``$HF_HOME/token``), which ``hf auth login`` writes;
* the cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub`` (``HF_HOME`` defaulting to
  ``$XDG_CACHE_HOME/huggingface``, then ``~/.cache/huggingface``).

The token goes only to URLs of the endpoint's origin (scheme, host and port): never to the CDN
a download is redirected to (requests drops ``Authorization`` on such a redirect, and the
download engine sends none with the pieces it then fetches from the CDN directly) and never
to a ``--mirror`` that moves the endpoint elsewhere.  It is kept off every
``repr`` and message.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckptkit import __version__
from ckptkit.errors import AuthError, NotFoundError, SourceError, UsageError
from ckptkit.hub.reasons import http_reason, network_reason
from ckptkit.storage.mirrors import Mirrors

if TYPE_CHECKING:  # requests is imported only when a request is sent (doctor --offline never)
    import requests

RepoType = Literal["model", "dataset"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset")
DEFAULT_ENDPOINT = "https://huggingface.co"
RETRIES = 4
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TOKEN_HINT = ("Set HF_TOKEN=hf_... (a token from https://huggingface.co/settings/tokens) "
              "or run `hf auth login`")


@dataclass(frozen=True)
class HubEnv:
    """Endpoint, token and cache folder, from the environment."""

    endpoint: str
    hub_cache: Path
    token: str | None = field(default=None, repr=False)
    token_origin: str | None = None  # "HF_TOKEN" or the token file's path

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HubEnv:
        env = os.environ if environ is None else environ
        endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        home = Path(env.get("HF_HOME") or Path(
            env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface").expanduser()
        cache = Path(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
                     or home / "hub").expanduser()
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            if env.get(name, "").strip():
                return cls(endpoint, cache, env[name].strip(), name)
        token_file = Path(env.get("HF_TOKEN_PATH") or home / "token").expanduser()
        try:
            stored = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            stored = ""
        return cls(endpoint, cache, stored or None, str(token_file) if stored else None)

    def headers_for(self, url: str) -> dict[str, str]:
        """``Authorization`` for a URL of the endpoint's own origin; nothing for any other."""
        if self.token and _origin(url) == _origin(self.endpoint):
            return {"Authorization": f"Bearer {self.token}"}
        return {}


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


def api_url(endpoint: str, repo_type: RepoType, repo_id: str, revision: str) -> str:
    rev = urllib.parse.quote(revision, safe="")
    return f"{endpoint}/api/{repo_type}s/{repo_id}/revision/{rev}?blobs=true"


def resolve_url(endpoint: str, repo_type: RepoType, repo_id: str, commit: str,
                path: str) -> str:
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


def fetch_revision(env: HubEnv, repo_id: str, revision: str, repo_type: RepoType, *,
                   mirrors: Mirrors = Mirrors(), timeout: float = 30.0,
                   backoff: Any = None) -> RepoRevision:
    """Ask the Hub which commit ``revision`` is and which files it holds (with LFS sha256).

    Raises:
        AuthError: a gated or private repo without a token (the message says how to set one),
            or a token the Hub refuses or that has no access.
        NotFoundError: no such repo or revision.
        SourceError: the Hub unreachable, or answering 429/5xx, after retries.
    """
    url = mirrors.rewrite(api_url(env.endpoint, repo_type, repo_id, revision))
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"the Hub API {url} is not an http(s) URL",
                         hint="Point --mirror for the Hub endpoint at an http(s) server")
    name = f"hf:{repo_id}"
    answer = _get(url, env.headers_for(url), timeout, backoff)
    if answer.status_code != 200:
        raise _api_error(answer, env, name, revision)
    try:
        info = answer.json()
        commit = str(info["sha"])
        files = tuple(_repo_file(s) for s in info.get("siblings") or [])
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{name}: the Hub answered {url} with something that is not a repo "
                          f"listing ({exc})", url=url, reason="not a Hub API answer") from exc
    return RepoRevision(repo_id, repo_type, revision, commit, files)


def _repo_file(sibling: dict[str, Any]) -> RepoFile:
    lfs = sibling.get("lfs") or None
    size = int(lfs["size"] if lfs else sibling["size"])
    return RepoFile(str(sibling["rfilename"]), size, str(sibling["blobId"]),
                    str(lfs["sha256"]).lower() if lfs else None)


def _get(url: str, headers: dict[str, str], timeout: float, backoff: Any) -> requests.Response:
    """GET with retries on dropped connections, 429 and 5xx (``Retry-After`` honoured)."""
    import requests

    if backoff is None:
        from ckptkit.hub.download import download as knobs

        backoff = knobs._backoff
    from ckptkit.hub.download.transfer_plan import parse_retry_after

    sent = {"User-Agent": f"ckptkit/{__version__}", **headers}
    for attempt in range(RETRIES + 1):
        try:
            answer = requests.get(url, headers=sent, timeout=(timeout, timeout))
        except requests.RequestException as exc:
            if attempt == RETRIES:
                raise SourceError(f"the Hub at {url} is unreachable: {exc}", url=url,
                                  reason=network_reason(exc)) from exc
            time.sleep(backoff(attempt, None))
            continue
        if answer.status_code not in _RETRY_STATUSES or attempt == RETRIES:
            return answer
        time.sleep(backoff(attempt, parse_retry_after(answer.headers.get("Retry-After"))))
    raise AssertionError("unreachable")  # pragma: no cover


def _api_error(answer: requests.Response, env: HubEnv, name: str,
               revision: str) -> SourceError:
    code = answer.headers.get("X-Error-Code")
    status = answer.status_code
    if status in (401, 403) or code == "GatedRepo":
        return access_error(env, name, status, code, answer.url)
    if code == "RevisionNotFound":
        return NotFoundError(f"{name} has no revision {revision!r}",
                             hint="Name a branch, a tag or a full commit id",
                             reason="revision not found")
    if status == 404:
        return NotFoundError(f"{name}: no such repo on {env.endpoint}",
                             hint="Check the name, or --repo-type dataset for a dataset",
                             reason="repo not found")
    return SourceError(f"{name}: the Hub answered HTTP {status}", url=answer.url, status=status,
                       reason=http_reason(status))


def access_error(env: HubEnv, name: str, status: int | None, code: str | None,
                 url: str) -> AuthError:
    """The one-line error for a repo the Hub will not show: no token (and how to give one),
    a refused token, or a token without access.  Never the token itself."""
    if env.token is None:
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
