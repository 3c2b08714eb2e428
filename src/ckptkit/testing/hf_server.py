"""The two HTTP servers of the Hugging Face Hub stand-in (:mod:`ckptkit.testing.hf_hub`): the Hub
endpoint (API and ``resolve``) and the CDN that LFS downloads are redirected to.

Hub routes (``{t}`` is ``models`` or ``datasets``; revisions and folder paths arrive
percent-encoded, ``refs%2Fpr%2F1``):

* ``GET /api/{t}/{org}/{name}[/revision/{rev}][?blobs=true]`` — repo info: ``sha``, ``siblings``
  (with ``size``, ``blobId`` and ``lfs`` when ``blobs``), ``private``, ``gated``.
* ``GET /api/{t}/{org}/{name}/tree/{rev}[/{path}]?recursive=&expand=`` — the listing, paged by
  a ``Link: <…&cursor=N>; rel="next"`` header.
* ``POST /api/{t}/{org}/{name}/paths-info/{rev}`` (form ``paths=…&expand=…``).
* ``GET /api/{t}/{org}/{name}/refs`` — branches and tags.
* ``HEAD|GET /[datasets/]{org}/{name}/resolve/{rev}/{path}`` — a Git file: 200 with ``ETag``
  (its blob id), ranges; an LFS file: 302 to a signed CDN URL with ``X-Linked-Etag``
  (sha256) and ``X-Linked-Size``.  Both carry ``X-Repo-Commit``.

Errors answer as the Hub does, with ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``,
``RevisionNotFound``, ``EntryNotFound``) and ``X-Error-Message``.  No response ever carries
Xet headers, so the real client downloads over plain HTTP.

CDN route: ``HEAD|GET /repos/{t}/{org}/{name}/{sha256}?path=…&signature=…`` — the object, with
ranges; an unsigned or tampered URL gets 403.  Bearer tokens play no part here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptkit.testing.faults import BODY_KINDS, Fault
from ckptkit.testing.hf_repos import (REPO_TYPES, HubFile, HubRepo, RepoType, path_info,
                                      tree_entries)
from ckptkit.testing.server import StubHandler, StubServer

if TYPE_CHECKING:
    from ckptkit.testing.hf_hub import HfHubStandIn

_PLURAL: dict[str, RepoType] = {f"{t}s": t for t in REPO_TYPES}
_EARLY_KINDS = ("status", "ignore-range")
_LAST_MODIFIED = "Thu, 01 Jan 2026 00:00:00 GMT"


@dataclass(frozen=True)
class Denied:
    """Why a request may not see a repo: status, ``X-Error-Code`` and message."""

    status: int
    code: str | None
    message: str


def fault_target(on: str, repo: HubRepo, path: str | None = None) -> str:
    """The key faults for one route are queued under, e.g. ``cdn:model/org/x/w.safetensors``."""
    key = f"{on}:{repo.repo_type}/{repo.repo_id}"
    return f"{key}/{path}" if path else key


class _Handler(StubHandler):
    stub: _StandInServer
    _ignore_range = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        if self.stub.verbose:
            sys.stderr.write(f"{self.stub.name} {self.address_string()} - {format % args}\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _early_faults(self, target: str) -> bool:
        """Answer a queued ``status`` fault (True: answered); an ``ignore-range`` one is kept
        in ``self._ignore_range`` for the body."""
        taken = self.stub.standin.faults.take(target, _EARLY_KINDS)
        self._ignore_range = any(f.kind == "ignore-range" for f in taken)
        status = next((f for f in taken if f.kind == "status"), None)
        if status is None:
            return False
        headers = {"Retry-After": status.retry_after} if status.retry_after else {}
        self._hub_error(Denied(status.status, None, f"injected fault: HTTP {status.status}"),
                        headers)
        return True

    def _send_hub_file(self, file: HubFile, target: str, headers: dict[str, str]) -> None:
        def body_faults(start: int, stop: int) -> list[Fault]:
            return self.stub.standin.faults.take(target, BODY_KINDS, start, stop)

        self._send_span(file.size, lambda start, stop: _content(file, start, stop),
                        {"Accept-Ranges": "bytes", **headers},
                        ranges=not self._ignore_range, faults=body_faults)

    def _hub_error(self, denied: Denied, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": denied.message, **(headers or {})}
        if denied.code:
            extra["X-Error-Code"] = denied.code
        self._send(denied.status, json.dumps({"error": denied.message}).encode(),
                   "application/json", extra)


def _content(file: HubFile, start: int, stop: int) -> Iterator[bytes]:
    if isinstance(file.source, bytes):
        yield file.source[start:stop]
        return
    with open(file.source, "rb") as fh:
        yield from StubHandler._chunks(fh, start, stop)


class _HubHandler(_Handler):
    def do_GET(self) -> None:
        self._record()
        self._route(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        self._record(form)
        self._route(form)

    def _route(self, form: dict[str, list[str]] | None) -> None:
        split = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in split.path.split("/")[1:]]
        query = urllib.parse.parse_qs(split.query)
        if parts == [""]:
            self._send(200, b"ckptkit Hugging Face Hub stand-in\n")
        elif parts[0] == "api" and len(parts) >= 4 and parts[1] in _PLURAL:
            self._api(_PLURAL[parts[1]], "/".join(parts[2:4]), parts[4:], query, form)
        elif parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
            self._resolve("dataset", "/".join(parts[1:3]), parts[4], "/".join(parts[5:]))
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("model", "/".join(parts[0:2]), parts[3], "/".join(parts[4:]))
        else:
            self._send(404, b"not found\n")

    def _repo(self, repo_type: RepoType, repo_id: str, files: bool) -> HubRepo | None:
        """The repo if this request may see it (its files, with ``files``), else answer."""
        standin = self.stub.standin
        repo = standin.repos.get((repo_type, repo_id))
        denied = standin.access(repo, self.headers.get("Authorization"), files=files,
                                name=f"{repo_type} {repo_id}")
        if denied is not None:
            self._hub_error(denied)
            return None
        return repo

    def _commit(self, repo: HubRepo, revision: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._hub_error(Denied(404, "RevisionNotFound", f"Invalid rev id: {revision}"))
        return sha

    def _api(self, repo_type: RepoType, repo_id: str, rest: list[str],
             query: dict[str, list[str]], form: dict[str, list[str]] | None) -> None:
        repo = self._repo(repo_type, repo_id, files=False)
        if repo is None or self._early_faults(fault_target("api", repo)):
            return
        what = rest[0] if rest else "revision"
        revision = rest[1] if len(rest) > 1 else "main"  # /api/{t}/ORG/NAME: the main branch
        posted = what == "paths-info"  # the only POST; the others are GETs
        if rest == ["refs"] and form is None:
            self._json(_refs(repo))
            return
        if what not in ("revision", "tree", "paths-info") or len(rest) == 1 \
                or (what == "revision" and len(rest) > 2) or posted != (form is not None):
            self._send(404, b"not found\n")
            return
        sha = self._commit(repo, revision)
        if sha is None:
            return
        if what == "revision":
            self._json(self.stub.standin.repo_info(repo, sha, _flag(query, "blobs")))
        elif what == "tree":
            self._tree(repo, sha, "/".join(rest[2:]).strip("/"), query)
        else:
            expand = _flag(form or {}, "expand")
            found = (path_info(repo, sha, p.strip("/"), expand)
                     for p in (form or {}).get("paths", []))
            self._json([entry for entry in found if entry is not None])

    def _tree(self, repo: HubRepo, sha: str, base: str, query: dict[str, list[str]]) -> None:
        expand = _flag(query, "expand")
        entries = tree_entries(repo, sha, base, _flag(query, "recursive"), expand)
        if entries is None:
            self._hub_error(Denied(404, "EntryNotFound", f"{base} does not exist on {sha}"),
                            {"X-Repo-Commit": sha})
            return
        size = self.stub.standin.tree_page_size(expand)
        start = int(query.get("cursor", ["0"])[0] or 0)
        headers = {}
        if start + size < len(entries):
            page = {k: v[0] for k, v in query.items() if k != "cursor"}
            page["cursor"] = str(start + size)
            url = f"{self.stub.base}{urllib.parse.urlsplit(self.path).path}?" \
                  f"{urllib.parse.urlencode(page)}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._send(200, json.dumps(entries[start:start + size]).encode(), "application/json",
                   headers)

    def _resolve(self, repo_type: RepoType, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id, files=True)
        if repo is None:
            return
        sha = self._commit(repo, revision)
        if sha is None:
            return
        target = fault_target("resolve", repo, path)
        if self._early_faults(target):
            return
        file = repo.commits[sha].files.get(path)
        commit = {"X-Repo-Commit": sha}
        if file is None:
            self._hub_error(Denied(404, "EntryNotFound", f"{path} does not exist on {sha}"),
                            commit)
        elif file.lfs:
            location = self.stub.standin.cdn_url(repo, file)
            self._send(302, f"Found. Redirecting to {location}".encode(), headers={
                **commit, "Location": location, "ETag": f'"{file.sha256}"',
                "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)})
        else:
            self._send_hub_file(file, target, {**commit, "ETag": f'"{file.oid}"'})


class _CdnHandler(_Handler):
    def do_GET(self) -> None:
        self._record()
        split = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in split.path.split("/")[1:]]
        query = {k: v[0] for k, v in urllib.parse.parse_qs(split.query).items()}
        standin = self.stub.standin
        if len(parts) != 5 or parts[0] != "repos" or parts[1] not in _PLURAL:
            self._send(404, b"NoSuchKey\n")
            return
        repo = standin.repos.get((_PLURAL[parts[1]], "/".join(parts[2:4])))
        path, sha256 = query.get("path", ""), parts[4]
        if repo is None or not hmac.compare_digest(
                query.get("signature", ""), standin.sign(repo, sha256, path)):
            self._send(403, b"AccessDenied: bad signature\n")
            return
        file = standin.objects.get(sha256)
        if file is None:
            self._send(404, b"NoSuchKey\n")
            return
        target = fault_target("cdn", repo, path)
        if self._early_faults(target):
            return
        name = urllib.parse.quote(path.rsplit("/", 1)[-1])
        self._send_hub_file(file, target, {
            "ETag": f'"{file.sha256}"', "Last-Modified": _LAST_MODIFIED,
            "Content-Disposition": f"attachment; filename*=UTF-8''{name}; filename=\"{name}\";"})


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return (query.get(name) or ["false"])[0].lower() in ("1", "true")


def _refs(repo: HubRepo) -> dict[str, Any]:
    def ref(kind: str, name: str, sha: str) -> dict[str, str]:
        return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

    return {"branches": [ref("heads", n, s) for n, s in sorted(repo.branches.items())],
            "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())],
            "converts": []}


def signature(secret: bytes, repo: HubRepo, sha256: str, path: str) -> str:
    """The CDN URL signature: only the Hub, which knows ``secret``, can issue one."""
    message = f"{repo.repo_type}/{repo.repo_id}/{sha256}/{path}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


class _StandInServer(StubServer):
    """One of the stand-in's two servers; ``standin`` holds the repos, tokens and faults."""

    name = "hub"

    def __init__(self, standin: HfHubStandIn, port: int, rate: float | None,
                 verbose: bool, record: bool) -> None:
        self.standin = standin
        self.verbose = verbose
        self.record = record
        super().__init__(port, rate=rate)


class HubServer(_StandInServer):
    """The Hub endpoint: the API and ``resolve``."""

    handler_class = _HubHandler


class CdnServer(_StandInServer):
    """The CDN host LFS downloads are redirected to (another port: another origin)."""

    handler_class = _CdnHandler
    name = "cdn"
