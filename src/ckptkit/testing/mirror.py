"""One local server for a whole mirror directory: plain files, TF Hub and the Kaggle Models API.

A mirror directory ``ROOT`` is laid out as::

    ROOT/files/<path>                                             → /files/<path>
    ROOT/tfhub/<handle path>/saved_model.pb, variables/, …        → /tfhub/<handle path>
    ROOT/kaggle/<owner>/<model>/<framework>/<variation>/<version>/… → /kaggle/v1/…

so every ``--mirror`` rule of a demo can point at the same port:
``https://tfhub.dev=<base>/tfhub``, ``https://api.kaggle.com=<base>/kaggle`` and, for direct
URLs, ``https://host/dir=<base>/files/dir``.

Routes (GET and HEAD unless said otherwise):

* ``/files/<path>`` — the file, with ``Content-Length``, ``Accept-Ranges``, ``ETag``,
  ``Last-Modified``, and ``Range``/``If-Range`` → 206.
* ``/tfhub/<handle path>?tf-hub-format=compressed`` — 302 to ``/tfhub/_archives/<handle
  path>.tar.gz``: the directory packed as TF Hub serves it (files at the archive root, names
  starting ``./``), once, then kept in memory.  Without the query: a small HTML page, as
  tfhub.dev answers browsers.  A handle is the shallowest directory on its path that directly
  holds a file; anything else is 404.
* ``POST /kaggle/v1/models.ModelApiService/<Rpc>`` (and ``/kaggle/api/v1/…``) — the three RPCs
  kagglesdk sends (see :mod:`ckptkit.testing.stubs`).  The framework directory is matched
  loosely (``tensorFlow2`` ≡ ``MODEL_FRAMEWORK_TENSOR_FLOW_2``); more than ``pageSize`` (25)
  files answer a next-page token, so kagglehub takes the version as one archive.  Downloads
  redirect to ``/kaggle/blob/…``, served with ranges and ``x-goog-hash: md5=…``.
* ``/`` — a one-line text answer, handy as a readiness check.

Any path under a prefix in ``down`` answers 503 (``down_mode="503"``) or has its connection
closed without an answer (``"close"``), to show a source failing and the next one taken.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ckptkit.testing.server import StubServer, blob_etag
from ckptkit.testing.stubs import (RPC_PATH, TFHUB_NOT_FOUND, KaggleRpcHandler, _tar_gz,
                                   md5_b64, tfhub_archive, tfhub_page)

DownMode = Literal["503", "close"]
ARCHIVES = "_archives"  # under /tfhub/; no TF Hub publisher name starts with "_"


@dataclass(frozen=True)
class _Packed:
    """An archive built once: its bytes and the headers that depend on them."""

    data: bytes
    etag: str
    md5: str


class _MirrorHandler(KaggleRpcHandler):
    stub: MirrorServer

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        if self._refused(path):
            return
        top, _, rest = path.lstrip("/").partition("/")
        if top == "files":
            self._get_file(rest)
        elif top == "tfhub":
            self._get_tfhub(rest, urllib.parse.parse_qs(parsed.query))
        elif top == "kaggle" and rest.startswith("blob/"):
            self._get_kaggle_blob(rest[len("blob/"):])
        elif path == "/":
            self._send(200, f"ckptkit mirror of {self.stub.root}: /files/ /tfhub/ /kaggle/\n"
                       .encode())
        else:
            self._send(404, b"not found\n")

    def do_POST(self) -> None:
        body = self._read_json()
        self._record(body)
        path = urllib.parse.urlsplit(self.path).path
        if self._refused(path):
            return
        match = RPC_PATH.fullmatch(path[len("/kaggle"):]) if path.startswith("/kaggle/") \
            else None
        if match is None or not isinstance(body, dict):
            self._error(404, f"no route {path}")
            return
        self._answer_rpc(match.group(1), body, _DiskKaggle(self.stub.root / "kaggle",
                                                           f"{self._origin()}/kaggle"))

    def _refused(self, path: str) -> bool:
        """Play dead when ``path`` is under a prefix in ``stub.down``."""
        prefix = self.stub.down_prefix(path)
        if prefix is None:
            return False
        if self.stub.down_mode == "close":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self._send(503, f"{prefix} is down\n".encode())
        return True

    def _origin(self) -> str:
        # Redirect to the host the client used, so "localhost:PORT" keeps working too.
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.stub.base

    def _get_file(self, rel: str) -> None:
        self._send_under(self.stub.root / "files", safe_parts(rel))

    def _get_tfhub(self, rel: str, query: dict[str, list[str]]) -> None:
        if rel.startswith(ARCHIVES + "/") and rel.endswith(".tar.gz"):
            model_dir = self.stub.tfhub_model(rel[len(ARCHIVES) + 1:-len(".tar.gz")])
            if model_dir is None:
                self._send(404, b"no such archive")
                return
            packed = self.stub.packed(f"tfhub:{model_dir}",
                                      lambda: tfhub_archive(model_dir, dereference=True))
            self._send_blob(packed.data, etag=packed.etag)
            return
        handle_path = "/" + rel.strip("/")
        if self.stub.tfhub_model(rel) is None:
            self._send(404, TFHUB_NOT_FOUND, "text/html")
        elif "compressed" in query.get("tf-hub-format", []):
            quoted = urllib.parse.quote(handle_path.lstrip("/"))
            self._redirect(f"{self._origin()}/tfhub/{ARCHIVES}/{quoted}.tar.gz")
        else:
            self._send(200, tfhub_page(handle_path), "text/html; charset=utf-8")

    def _get_kaggle_blob(self, rel: str) -> None:
        # <owner>/<model>/<framework>/<variation>/<version>/(archive.tar.gz|files/<path>)
        parts = safe_parts(rel)
        if parts is None or len(parts) < 6:
            self._send(404, b"not found\n")
            return
        version_dir = self.stub.root.joinpath("kaggle", *parts[:5])
        if parts[5:] == ["archive.tar.gz"] and version_dir.is_dir():
            packed = self.stub.packed(f"kaggle:{version_dir}", lambda: _tar_gz(
                {name: (version_dir / name).read_bytes() for name, _ in listing(version_dir)}))
            self._send_blob(packed.data, {"x-goog-hash": f"md5={packed.md5}"}, packed.etag)
            return
        target = version_dir.joinpath(*parts[6:])
        if parts[5] != "files" or len(parts) < 7 or not target.is_file():
            self._send(404, b"not found\n")
            return
        self._send_file(target, {"x-goog-hash": f"md5={self.stub.file_md5(target)}"})


@dataclass(frozen=True)
class _DiskVersion:
    """One ``<owner>/<model>/<framework dir>/<variation>/<version>`` directory."""

    owner: str
    model: str
    framework: str  # as the request named it, e.g. MODEL_FRAMEWORK_TENSOR_FLOW_2
    framework_dir: str  # as the directory is named, e.g. tensorFlow2
    instance: str
    version: int
    directory: Path


class _DiskKaggle:
    """The Kaggle catalogue of a mirror's ``kaggle/`` directory, read afresh per request so a
    running mirror sees models added to it.  ``blob_base`` is ``<origin>/kaggle``."""

    def __init__(self, root: Path, blob_base: str) -> None:
        self.root = root
        self.blob_base = blob_base

    def find(self, body: dict[str, Any], version: int | None) -> list[_DiskVersion]:
        owner, model, instance = (_slug(body.get(key))
                                  for key in ("ownerSlug", "modelSlug", "instanceSlug"))
        framework = body.get("framework")
        if owner is None or model is None or instance is None or not isinstance(framework, str):
            return []
        model_root = self.root / owner / model
        if not model_root.is_dir():
            return []
        found: list[_DiskVersion] = []
        for framework_dir in sorted(model_root.iterdir()):
            instance_dir = framework_dir / instance
            if framework_key(framework_dir.name) != framework_key(framework) \
                    or not instance_dir.is_dir():
                continue
            for version_dir in sorted(instance_dir.iterdir()):
                name = version_dir.name
                if version_dir.is_dir() and name.isascii() and name.isdigit() and int(name) >= 1 \
                        and (version is None or int(name) == version):
                    found.append(_DiskVersion(owner, model, framework, framework_dir.name,
                                              instance, int(name), version_dir))
        return found

    def list_files(self, model: _DiskVersion, page_size: int) -> tuple[list[tuple[str, int]], str]:
        # Only the first page: kagglehub only asks whether there is a next one.
        files = listing(model.directory)
        return files[:page_size], ("page-2" if len(files) > page_size else "")

    def blob_url(self, model: _DiskVersion, name: str | None) -> str | None:
        base = "/".join([self.blob_base, "blob", model.owner, model.model, model.framework_dir,
                         model.instance, str(model.version)])
        if name is None:
            return f"{base}/archive.tar.gz"
        parts = safe_parts(name)
        if parts is None or not model.directory.joinpath(*parts).is_file():
            return None
        return f"{base}/files/{urllib.parse.quote('/'.join(parts))}"


class MirrorServer(StubServer):
    """Serve the mirror directory ``root`` on ``127.0.0.1:port`` (0: ephemeral).

    Args:
        root: the mirror directory (layout in the module docstring); read per request, so
            files added while it runs are served, except that an archive (a TF Hub model, a
            Kaggle version asked for whole) is packed on first request and then kept.
        port: the port to listen on; ``base`` is the URL to put in ``--mirror`` rules.
        down: path prefixes that fail (e.g. ``["/tfhub"]``); a mutable set afterwards.
        down_mode: ``"503"`` answers ``503 Service Unavailable``; ``"close"`` drops the
            connection without an answer.
        verbose: write an access log line per request to stderr.
        record: keep every request in ``requests`` (off for long-running processes).

    Raises:
        OSError: the port cannot be bound.

    Example:
        >>> with MirrorServer("mirror", down=["/tfhub"]) as server:    # doctest: +SKIP
        ...     mirrors = Mirrors.parse(f"https://api.kaggle.com={server.base}/kaggle")
    """

    handler_class = _MirrorHandler

    def __init__(self, root: str | os.PathLike[str], *, port: int = 0, down: Iterable[str] = (),
                 down_mode: DownMode = "503", verbose: bool = False, record: bool = True) -> None:
        if down_mode not in ("503", "close"):
            raise ValueError(f"down_mode must be '503' or 'close', not {down_mode!r}")
        self.root = Path(root)
        self.down: set[str] = set(down)
        self.down_mode: DownMode = down_mode
        self.verbose = verbose
        self.record = record
        self._packed: dict[str, _Packed] = {}
        self._md5: dict[tuple[str, int, int], str] = {}
        self._pack_lock = threading.Lock()
        super().__init__(port)

    def down_prefix(self, path: str) -> str | None:
        """The prefix in ``down`` that ``path`` falls under (whole segments), or None."""
        for prefix in sorted(self.down):
            stem = "/" + prefix.strip("/")
            if path == stem or path.startswith(stem.rstrip("/") + "/"):
                return stem
        return None

    def tfhub_model(self, handle_path: str) -> Path | None:
        """``root/tfhub/<handle path>`` when it is a model: the shallowest directory on the
        path that directly holds a file (so ``…/1/variables`` is not a handle of its own)."""
        parts = safe_parts(handle_path)
        if parts is None:
            return None
        for depth in range(1, len(parts) + 1):
            folder = self.root.joinpath("tfhub", *parts[:depth])
            if not folder.is_dir():
                return None
            if any(child.is_file() for child in folder.iterdir()):
                return folder if depth == len(parts) else None
        return None

    def packed(self, key: str, pack: Callable[[], bytes]) -> _Packed:
        """The archive cached under ``key``, built by ``pack()`` on first use."""
        # One lock for all: concurrent range requests for a new archive must not pack it
        # several times over (a large SavedModel takes seconds and its size in memory).
        with self._pack_lock:
            if key not in self._packed:
                data = pack()
                self._packed[key] = _Packed(data, blob_etag(data), md5_b64(data))
            return self._packed[key]

    def file_md5(self, path: Path) -> str:
        """Base64 md5 of the file at ``path``, cached while its size and mtime stay."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._md5:
            digest = hashlib.md5()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            self._md5[key] = base64.b64encode(digest.digest()).decode()
        return self._md5[key]


def safe_parts(rel: str) -> list[str] | None:
    """The segments of the relative URL path ``rel``, or None when any could leave the
    directory it is resolved in (``..``, ``.``, backslashes, NUL) or there are none."""
    parts = [part for part in rel.split("/") if part]
    if not parts or any(part in (".", "..") or "\\" in part or "\0" in part for part in parts):
        return None
    return parts


def _slug(value: object) -> str | None:
    """``value`` when it can name one directory level (a string, no ``/``, not ``..``)."""
    return value if isinstance(value, str) and safe_parts(value) == [value] else None


def listing(directory: Path) -> list[tuple[str, int]]:
    """``(relative POSIX path, size)`` of every file under ``directory``, sorted; symlinks
    are followed (a mirror may link to large files kept elsewhere)."""
    files: list[tuple[str, int]] = []
    for folder, _, names in os.walk(directory, followlinks=True):
        for name in names:
            path = Path(folder, name)
            if path.is_file():
                files.append((path.relative_to(directory).as_posix(), path.stat().st_size))
    return sorted(files)


def framework_key(name: str) -> str:
    """A framework name compared loosely: ``tensorFlow2``, ``TENSOR_FLOW_2`` and
    ``MODEL_FRAMEWORK_TENSOR_FLOW_2`` all give ``TENSORFLOW2`` (as kagglehub's to_enum)."""
    return name.upper().removeprefix("MODEL_FRAMEWORK_").replace("_", "")
