"""A local stand-in for the Hugging Face Hub that the real ``huggingface_hub`` client talks to
(standard library only).

:class:`HfHubStandIn` runs two servers on 127.0.0.1: the Hub endpoint (point ``HF_ENDPOINT``
at ``endpoint``) and a CDN on another port, which LFS downloads are redirected to, as the Hub
redirects to its CDN.  Repos (models and datasets) are built from in-memory files or local
folders, with branches, tags and commits; gated and private repos want a granted bearer token.
Faults (:mod:`ckptkit.testing.faults`) are injected per file and route, a rate cap limits each
connection, and every request is recorded with its status and body bytes.  The routes are
described in :mod:`ckptkit.testing.hf_server` and ``docs/testing-hub-standins.md``.

Run it from a shell on a folder holding ``models/ORG/NAME/…`` and ``datasets/ORG/NAME/…``::

    python -m ckptkit.testing.hf_hub ROOT [--port N] [--cdn-port N] [--rate BYTES]
        [--gated REPO ...] [--private REPO ...] [--token TOKEN]

It prints ``serving ROOT on http://127.0.0.1:PORT (CDN http://127.0.0.1:PORT)`` (one line,
flushed) and serves until SIGTERM or SIGINT, then exits 0.

Example:
    >>> with HfHubStandIn() as hub:                                       # doctest: +SKIP
    ...     hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": weights})
    ...     env = hub.client_env(tmp_path / "hf")    # HF_ENDPOINT, HF_HOME, HF_HUB_CACHE
    ...     subprocess.run([python, "-c", "import huggingface_hub as h; "
    ...                     "print(h.snapshot_download('org/tiny'))"], env=env)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ckptkit.testing.faults import Fault, FaultQueue
from ckptkit.testing.hf_repos import (REPO_TYPES, HubFile, HubRepo, RepoType, folder_files,
                                      sibling)
from ckptkit.testing.hf_server import (CdnServer, Denied, HubServer, fault_target, signature)
from ckptkit.testing.server import (Logged, entry_point_parser, port_number,
                                    serve_until_signalled)

__all__ = ["Fault", "HfHubStandIn", "HubRepo", "client_constants_now", "main"]

FaultRoute = Literal["api", "resolve", "cdn"]
_PREFIX = {"model": "", "dataset": "datasets/"}
_HF_VARIABLE = re.compile(r"(HF|HUGGING_?FACE)_")


class HfHubStandIn:
    """The Hub endpoint and its CDN, serving the repos added to it.

    Args:
        port, cdn_port: where to listen (0: any free port).
        rate: a cap in bytes per second on every connection of both servers (None: none);
            ``rate`` can be changed later.
        verbose: an access-log line per request on stderr.
        record: keep every request (off for long-running processes).

    Attributes:
        hub, cdn: the two servers; their ``hits(route)`` and ``bytes_sent(route)`` count
            requests and body bytes per path (see :meth:`resolve_route`, :meth:`cdn_route`).
        faults: the queue :meth:`inject` adds to.
        page_size, expanded_page_size: entries per ``/tree`` page (the Hub's 1000 and 50).

    Raises:
        OSError: a port cannot be bound.
    """

    def __init__(self, *, port: int = 0, cdn_port: int = 0, rate: float | None = None,
                 verbose: bool = False, record: bool = True) -> None:
        self.repos: dict[tuple[RepoType, str], HubRepo] = {}
        self.objects: dict[str, HubFile] = {}  # the CDN's store: LFS objects by sha256
        self.tokens: set[str] = set()
        self.faults = FaultQueue()
        self.page_size = 1000
        self.expanded_page_size = 50
        self._secret = os.urandom(16)
        self.hub = HubServer(self, port, rate, verbose, record)
        try:
            self.cdn = CdnServer(self, cdn_port, rate, verbose, record)
        except OSError:
            self.hub.stop()
            raise

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The Hub URL, for ``HF_ENDPOINT``."""
        return self.hub.base

    @property
    def rate(self) -> float | None:
        return self.hub.rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        self.hub.rate = self.cdn.rate = value

    def start(self) -> HfHubStandIn:
        self.hub.start()
        self.cdn.start()
        return self

    def stop(self) -> None:
        self.hub.stop()
        self.cdn.stop()

    def __enter__(self) -> HfHubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- content --------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: Mapping[str, bytes | Path] | Path | None = None, *,
                 repo_type: RepoType = "model", private: bool = False, gated: bool = False,
                 message: str = "Initial commit") -> HubRepo:
        """Create ``repo_id`` with one commit on ``main`` holding ``files`` (path → bytes or
        file), or every file under a folder (served from disk); returns the repo."""
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}, not {repo_type!r}")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"{repo_id!r} is not ORG/NAME")
        repo = HubRepo(repo_id, repo_type, private=private, gated=gated)
        self.repos[(repo_type, repo_id)] = repo
        self.commit(repo_id, files or {}, repo_type=repo_type, message=message)
        return repo

    def commit(self, repo_id: str, files: Mapping[str, bytes | Path] | Path, *,
               repo_type: RepoType = "model", branch: str = "main", message: str = "Update",
               delete: Sequence[str] = (), lfs: Mapping[str, bool] | None = None) -> str:
        """A new commit on ``branch`` (see :meth:`HubRepo.commit`); returns its id."""
        repo = self.repo(repo_id, repo_type)
        tree = folder_files(files) if isinstance(files, Path) else files
        sha = repo.commit(tree, branch=branch, message=message, delete=delete, lfs=lfs)
        for file in repo.commits[sha].files.values():
            if file.lfs:
                self.objects[file.sha256] = file
        return sha

    def tag(self, repo_id: str, name: str, revision: str = "main", *,
            repo_type: RepoType = "model") -> str:
        """Tag ``revision``; returns the commit id."""
        return self.repo(repo_id, repo_type).tag(name, revision)

    def grant(self, token: str, repo_id: str | None = None, *,
              repo_type: RepoType = "model") -> None:
        """Make ``token`` a valid one and, with ``repo_id``, give it access to that repo."""
        self.tokens.add(token)
        if repo_id is not None:
            self.repo(repo_id, repo_type).granted.add(token)

    def repo(self, repo_id: str, repo_type: RepoType = "model") -> HubRepo:
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id} on the stand-in") from None

    def inject(self, fault: Fault, repo_id: str, path: str | None = None, *,
               on: FaultRoute = "cdn", repo_type: RepoType = "model") -> Fault:
        """Queue ``fault`` for the ``api`` of a repo, or for the ``resolve`` or the ``cdn``
        download of its file ``path``; returns it."""
        if (on == "api") != (path is None):
            raise ValueError("api faults take no path; resolve and cdn faults need one")
        return self.faults.add(fault_target(on, self.repo(repo_id, repo_type), path), fault)

    # --- what the servers ask -------------------------------------------------------------------

    def access(self, repo: HubRepo | None, authorization: str | None, *, files: bool,
               name: str) -> Denied | None:
        """Why a request with ``authorization`` may not see ``repo`` (its files, with
        ``files``), as the Hub answers; None when it may."""
        token = _bearer(authorization)
        if token is not None and token not in self.tokens:
            return Denied(401, None, "Invalid credentials in Authorization header")
        allowed = repo is not None and token in repo.granted
        if repo is None or repo.private and not allowed:
            return Denied(401 if token is None else 404, "RepoNotFound", "Repository not found")
        if files and repo.gated and not allowed:
            if token is None:
                return Denied(401, "GatedRepo", f"Access to {name} is restricted. You must have "
                              "access to it and be authenticated to access it. Please log in.")
            return Denied(403, "GatedRepo", f"Access to {name} is restricted and you are not in "
                          f"the authorized list. Visit {self.endpoint}/{_PREFIX[repo.repo_type]}"
                          f"{repo.repo_id} to ask for access.")
        return None

    def repo_info(self, repo: HubRepo, sha: str, blobs: bool) -> dict[str, Any]:
        """The ``/api/{models,datasets}/…/revision/…`` answer at commit ``sha``."""
        commit = repo.commits[sha]
        first = min(repo.commits.values(), key=lambda c: c.serial)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": sha, "lastModified": commit.date,
            "createdAt": first.date, "private": repo.private,
            "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": [],
            "siblings": [sibling(commit.files[p], blobs) for p in sorted(commit.files)],
            "usedStorage": sum(f.size for f in commit.files.values())}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return info

    def cdn_url(self, repo: HubRepo, file: HubFile) -> str:
        """The signed CDN URL ``resolve`` redirects an LFS file to."""
        query = urllib.parse.urlencode({"path": file.path,
                                        "signature": self.sign(repo, file.sha256, file.path)})
        return f"{self.cdn.base}/repos/{repo.repo_type}s/{repo.repo_id}/{file.sha256}?{query}"

    def sign(self, repo: HubRepo, sha256: str, path: str) -> str:
        return signature(self._secret, repo, sha256, path)

    def tree_page_size(self, expand: bool) -> int:
        return self.expanded_page_size if expand else self.page_size

    # --- for assertions -------------------------------------------------------------------------

    def resolve_route(self, repo_id: str, path: str, revision: str = "main", *,
                      repo_type: RepoType = "model") -> str:
        """The (decoded) route of a file's ``resolve``, as ``hub.hits()`` matches it."""
        return f"/{_PREFIX[repo_type]}{repo_id}/resolve/{revision}/{path}"

    def cdn_route(self, repo_id: str, path: str, revision: str = "main", *,
                  repo_type: RepoType = "model") -> str:
        """The route of a file's LFS object on the CDN, as ``cdn.hits()`` matches it."""
        repo = self.repo(repo_id, repo_type)
        sha = repo.resolve(revision)
        if sha is None or path not in repo.commits[sha].files:
            raise KeyError(f"{repo_id} has no {path} at {revision}")
        return f"/repos/{repo_type}s/{repo_id}/{repo.commits[sha].files[path].sha256}"

    def cdn_authorized(self) -> list[Logged]:
        """The CDN requests that carried an ``Authorization`` header (a leaked token)."""
        return [r for r in self.cdn.hits() if r.header("Authorization") is not None]

    def client_env(self, home: Path, *, token: str | None = None, offline: bool = False,
                   environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """A whole environment for a ``huggingface_hub`` process using this stand-in.

        ``environ`` (default ``os.environ``) without any ``HF_*``/``HUGGING_FACE_*`` variable,
        plus ``HF_ENDPOINT``, ``HF_HOME=home`` (no stored token is found elsewhere),
        ``HF_HUB_CACHE=home/hub``, quiet progress and telemetry, ``HF_TOKEN`` when ``token``,
        and ``HF_HUB_OFFLINE=1`` when ``offline``.
        """
        env = {k: v for k, v in (os.environ if environ is None else environ).items()
               if not _HF_VARIABLE.match(k)}
        env.update(HF_ENDPOINT=self.endpoint, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"),
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
        if token is not None:
            env["HF_TOKEN"] = token
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return env


def client_constants_now() -> dict[str, Any]:
    """The values ``huggingface_hub.constants`` would hold if it were imported now.

    The client reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN_PATH``... once,
    at import; a process that changes them afterwards and runs ckpt in-process (a test, the
    in-process demo) patches these into the module, as a fresh process would have read them.

    Raises:
        ImportError: huggingface_hub is not installed.
    """
    spec = importlib.util.find_spec("huggingface_hub.constants")
    if spec is None or spec.loader is None:
        raise ImportError("huggingface_hub is not installed")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return {name: getattr(fresh, name) for name in dir(fresh) if name.isupper()}


def _bearer(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``; another scheme's whole value, which
    no granted token equals, so it is refused as invalid credentials."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else authorization


# --- python -m ckptkit.testing.hf_hub ----------------------------------------------------------

EXAMPLES = """\
examples:
  python -m ckptkit.testing.hf_hub hub/ --port 8100
  python -m ckptkit.testing.hf_hub hub/ --gated org/llm --token hf_demo --rate 16MiB
  HF_ENDPOINT=http://127.0.0.1:8100 hf download org/tiny
"""
_UNITS = {"": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000 ** 2, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1 << 30}


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the repos under ROOT until SIGTERM or SIGINT; returns the exit code.

    Must run in the main thread (it installs signal handlers, restored on return).
    """
    parser = entry_point_parser(
        "ckptkit.testing.hf_hub", "Serve ROOT/models/ORG/NAME and ROOT/datasets/ORG/NAME as a "
        "Hugging Face Hub on 127.0.0.1 (point HF_ENDPOINT at it), LFS files through a CDN port.",
        EXAMPLES, root_help="the folder of repos",
        port_help="Hub port (default 0: any free port, printed)")
    parser.add_argument("--cdn-port", type=port_number, default=0,
                        help="CDN port (default 0: any free port, printed)")
    parser.add_argument("--rate", type=_rate, default=None, metavar="BYTES",
                        help="cap per connection, bytes per second (e.g. 16MiB)")
    parser.add_argument("--gated", action="append", default=[], metavar="REPO",
                        help="a gated repo: ORG/NAME or datasets/ORG/NAME (repeatable)")
    parser.add_argument("--private", action="append", default=[], metavar="REPO",
                        help="a private repo, as for --gated (repeatable)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN",
                        help="a token granted every gated and private repo (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    found = _repo_folders(Path(args.root))
    for name in (*args.gated, *args.private):
        if _repo_key(name) not in found:
            parser.error(f"{name!r} is not a repo under {args.root} "
                         "(expected ROOT/models/ORG/NAME or ROOT/datasets/ORG/NAME)")

    gated = {_repo_key(n) for n in args.gated}
    private = {_repo_key(n) for n in args.private}

    def open_standin() -> HfHubStandIn:
        standin = HfHubStandIn(port=args.port, cdn_port=args.cdn_port, rate=args.rate,
                               verbose=args.verbose, record=False)
        for key, folder in sorted(found.items()):
            standin.add_repo(key[1], folder, repo_type=key[0], gated=key in gated,
                             private=key in private)
        for token in args.token:
            standin.grant(token)
            for repo_type, repo_id in sorted(gated | private):
                standin.grant(token, repo_id, repo_type=repo_type)
        return standin

    return serve_until_signalled(
        open_standin, lambda s: f"serving {args.root} on {s.endpoint} (CDN {s.cdn.base})",
        f"127.0.0.1:{args.port} (CDN 127.0.0.1:{args.cdn_port})")


def _repo_folders(root: Path) -> dict[tuple[RepoType, str], Path]:
    found: dict[tuple[RepoType, str], Path] = {}
    for repo_type in REPO_TYPES:
        for folder in sorted((root / f"{repo_type}s").glob("*/*")):
            if folder.is_dir():
                found[(repo_type, f"{folder.parent.name}/{folder.name}")] = folder
    return found


def _repo_key(name: str) -> tuple[RepoType, str]:
    if name.startswith("datasets/"):
        return "dataset", name[len("datasets/"):]
    return "model", name.removeprefix("models/")


def _rate(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", value.strip())
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rate (e.g. 16MiB, 500000)")
    return float(match.group(1)) * _UNITS[unit]


if __name__ == "__main__":
    sys.exit(main())
