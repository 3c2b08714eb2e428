"""Local stand-ins for TF Hub and the Kaggle Models API, plus a tiny real SavedModel to serve.

Both servers are real HTTP servers on ``127.0.0.1:<ephemeral port>`` (threaded
:mod:`http.server`), so the code under test — ckptkit's downloader, and kagglehub/kagglesdk
themselves — speaks its ordinary protocol to them:

* :class:`TFHubStub` behaves like tfhub.dev for the *compressed* protocol (as tensorflow_hub's
  own ``test_utils.py`` does): ``GET <handle path>?tf-hub-format=compressed`` → 302 to
  ``/archives/<name>.tar.gz``; ``GET <handle path>`` → an HTML page; unknown handles → 404.
* :class:`KaggleStub` answers the ``models.ModelApiService`` RPCs kagglesdk 0.1.37 sends
  (POST JSON to ``/api/v1/…`` outside PROD, ``/v1/…`` on PROD; both accepted):
  ``GetModelInstance``, ``ListModelInstanceVersionFiles`` and ``DownloadModelInstanceVersion``
  (302 to ``/blob/…``, as the real service redirects to a signed GCS URL).

Blobs and archives are served with ``Content-Length``, ``Accept-Ranges``, ``ETag``, and
``Range``/``If-Range`` → 206.  Every request is logged in ``.requests`` for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import tarfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

HANDLE = "https://tfhub.dev/google/musiq/spaq/1"
KAGGLE_HANDLE = "google/musiq/tensorFlow2/spaq/1"
#: The stand-in SavedModel's serving signature: score = x · [1, 2, 3] + 0.5.
SAMPLE_INPUT = [[1.0, 1.0, 1.0]]
SAMPLE_SCORE = 6.5

_FRAMEWORKS = {"tensorflow2": "MODEL_FRAMEWORK_TENSOR_FLOW_2",
               "tensorflow1": "MODEL_FRAMEWORK_TENSOR_FLOW_1",
               "pytorch": "MODEL_FRAMEWORK_PY_TORCH", "jax": "MODEL_FRAMEWORK_JAX",
               "keras": "MODEL_FRAMEWORK_KERAS", "flax": "MODEL_FRAMEWORK_FLAX"}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Logged:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class StubServer:
    """A threaded HTTP server on 127.0.0.1:0 running ``handler_class`` with ``self`` as
    ``handler.stub``; use as a context manager or call start/stop."""

    def __init__(self) -> None:
        self.requests: list[Logged] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(self.handler_class):  # type: ignore[name-defined,misc]
            pass

        Handler.stub = stub
        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    handler_class: type[BaseHTTPRequestHandler] = BaseHTTPRequestHandler

    def start(self) -> StubServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket: later connections are refused."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, entry: Logged) -> None:
        with self._lock:
            self.requests.append(entry)

    def paths(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [r.path for r in self.requests if method is None or r.method == method]


class _Handler(BaseHTTPRequestHandler):
    stub: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass  # keep pytest output clean; requests are in stub.requests

    def _record(self, body: Any = None) -> None:
        self.stub.log(Logged(self.command, self.path, dict(self.headers.items()), body))

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", headers={"Location": location})

    def _send_blob(self, data: bytes, extra: dict[str, str] | None = None) -> None:
        """Serve ``data`` honouring ``Range`` (one range) and ``If-Range``."""
        etag = '"%s"' % hashlib.sha256(data).hexdigest()[:16]
        headers = {"Accept-Ranges": "bytes", "ETag": etag, **(extra or {})}
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and (if_range is None or if_range == etag):
            match = _RANGE.match(wanted.strip())
            if not match or (not match.group(1) and not match.group(2)):
                self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
                return
            if match.group(1):
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(data) - 1
            else:
                start, end = max(0, len(data) - int(match.group(2))), len(data) - 1
            end = min(end, len(data) - 1)
            if start >= len(data) or start > end:
                self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start:end + 1], "application/octet-stream", headers)
            return
        self._send(200, data, "application/octet-stream", headers)


# --- TF Hub ------------------------------------------------------------------------------------

class _TFHubHandler(_Handler):
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        stub: TFHubStub = self.stub
        parsed = urllib.parse.urlparse(self.path)
        if parsed.path.startswith("/archives/"):
            data = stub.archives.get(parsed.path[len("/archives/"):])
            if data is None:
                self._send(404, b"no such archive")
            else:
                self._send_blob(data)
            return
        handle_path = parsed.path.rstrip("/")
        query = dict(urllib.parse.parse_qsl(parsed.query))
        if handle_path not in stub.models:
            self._send(404, b"<html><body>404 Not Found</body></html>", "text/html")
            return
        if query.get("tf-hub-format") == "compressed" and handle_path not in stub.html_instead:
            self._redirect(f"{stub.base}/archives/{stub.models[handle_path]}")
            return
        # tfhub.dev's model page (and its answer for models gone to Kaggle).
        page = (f"<!DOCTYPE html><html><head><title>TensorFlow Hub</title></head>"
                f"<body><h1>{handle_path}</h1></body></html>").encode()
        self._send(200, page, "text/html; charset=utf-8")


class TFHubStub(StubServer):
    """tfhub.dev for the compressed protocol: ``add(path, archive_bytes)`` to publish."""

    handler_class = _TFHubHandler

    def __init__(self) -> None:
        self.models: dict[str, str] = {}
        self.archives: dict[str, bytes] = {}
        self.html_instead: set[str] = set()
        super().__init__()

    def add(self, path: str, archive: bytes) -> None:
        """Publish ``archive`` (tar.gz bytes) under the handle path, e.g. ``/google/x/1``."""
        path = "/" + path.strip("/")
        name = path.strip("/").replace("/", "_") + ".tar.gz"
        self.models[path] = name
        self.archives[name] = archive


# --- Kaggle ------------------------------------------------------------------------------------

@dataclass
class KaggleModel:
    owner: str
    model: str
    framework: str  # the enum name kagglesdk sends, e.g. MODEL_FRAMEWORK_TENSOR_FLOW_2
    instance: str
    version: int
    files: dict[str, bytes] = field(default_factory=dict)


class _KaggleHandler(_Handler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        self._record(body)
        stub: KaggleStub = self.stub
        path = urllib.parse.urlparse(self.path).path
        match = re.fullmatch(r"(?:/api)?/v1/models\.ModelApiService/(\w+)", path)
        if match is None or not isinstance(body, dict):
            self._error(404, f"no route {path}")
            return
        if stub.forbidden:
            self._error(403, "User has not consented to terms of use for this model")
            return
        method = match.group(1)
        if method == "GetModelInstance":
            versions = stub.find(body, version=None)
            if not versions:
                self._error(404, "Not found")
                return
            latest = max(versions, key=lambda m: m.version)
            self._json({"id": 1, "slug": latest.instance, "framework": latest.framework,
                        "versionNumber": latest.version})
            return
        found = stub.find(body, version=body.get("versionNumber"))
        if not found:
            self._error(404, "Not found")
            return
        model = found[0]
        if method == "ListModelInstanceVersionFiles":
            files = [{"name": name, "size": len(data)}
                     for name, data in sorted(model.files.items())]
            self._json({"files": files, "nextPageToken": stub.next_page_token})
        elif method == "DownloadModelInstanceVersion":
            name = body.get("path")
            if name is None:
                self._redirect(f"{stub.base}/blob/{model.owner}/{model.model}/{model.instance}/"
                               f"{model.version}/archive.tar.gz")
            elif name not in model.files:
                self._error(404, f"no file {name}")
            else:
                self._redirect(f"{stub.base}/blob/{model.owner}/{model.model}/{model.instance}/"
                               f"{model.version}/files/{urllib.parse.quote(name)}")
        else:
            self._error(404, f"unknown method {method}")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        stub: KaggleStub = self.stub
        parts = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).split("/")
        # /blob/<owner>/<model>/<instance>/<version>/(files/<path>|archive.tar.gz)
        if len(parts) < 7 or parts[1] != "blob":
            self._send(404, b"not found")
            return
        owner, model_slug, instance, version = parts[2:6]
        model = next((m for m in stub.models if (m.owner, m.model, m.instance, str(m.version))
                      == (owner, model_slug, instance, version)), None)
        if model is None:
            self._send(404, b"not found")
            return
        if parts[6] == "archive.tar.gz":
            data = _tar_gz(model.files)
        else:
            data = model.files.get("/".join(parts[7:]))
            if data is None:
                self._send(404, b"not found")
                return
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        self._send_blob(data, {"x-goog-hash": f"md5={md5}"})

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"code": status, "message": message}, status)


class KaggleStub(StubServer):
    """The Kaggle Models API as kagglesdk speaks it.  ``forbidden = True`` answers every RPC
    with 403 (terms not accepted); models not added answer 404; a non-empty
    ``next_page_token`` (Kaggle's signal for more than 25 files) makes kagglehub download the
    whole version as one tar.gz instead of file by file."""

    handler_class = _KaggleHandler

    def __init__(self) -> None:
        self.models: list[KaggleModel] = []
        self.forbidden = False
        self.next_page_token = ""
        super().__init__()

    def add_model(self, handle: str, files: dict[str, bytes]) -> None:
        """Publish ``files`` (relative path → bytes) as ``owner/model/framework/instance/ver``."""
        owner, model, framework, instance, version = handle.split("/")
        self.models.append(KaggleModel(owner, model, _FRAMEWORKS[framework.lower()], instance,
                                       int(version), dict(files)))

    def find(self, body: dict[str, Any], version: int | None) -> list[KaggleModel]:
        return [m for m in self.models
                if (m.owner, m.model, m.framework, m.instance)
                == (body.get("ownerSlug"), body.get("modelSlug"), body.get("framework"),
                    body.get("instanceSlug"))
                and (version is None or m.version == version)]

    def rpc_bodies(self, method: str) -> list[tuple[str, dict[str, Any]]]:
        """(path, JSON body) of every POST to ``method``."""
        return [(r.path, r.body) for r in self.requests
                if r.method == "POST" and r.path.endswith("/" + method)]


# --- Sample model --------------------------------------------------------------------------------

def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tfhub_archive(model_dir: Path) -> bytes:
    """``model_dir`` packed as TF Hub serves it: a tar.gz whose names start with ``./``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(model_dir, arcname=".")
    return buf.getvalue()


def archive_of(files: dict[str, bytes]) -> bytes:
    """A tar.gz holding ``files`` (relative path → bytes)."""
    return _tar_gz(files)


def tree_files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` as relative POSIX path → bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


_SAVED_MODEL: dict[str, Path] = {}


def build_saved_model(root: Path) -> Path:
    """Write the stand-in SavedModel (a tf.Module with two variables and a serving
    signature ``score = x · w + b``) under ``root/saved_model`` and return that directory."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")

    class Scorer(tf.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable([[1.0], [2.0], [3.0]], name="w")
            self.b = tf.Variable([0.5], name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"score": tf.matmul(x, self.w) + self.b}

    scorer = Scorer()
    out = root / "saved_model"
    tf.saved_model.save(scorer, str(out), signatures={"serving_default": scorer.serve})
    return out


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in SavedModel directory, built once per test session (one TF import)."""
    # Modules import this fixture separately; the cache keeps it to one build per session.
    if "dir" not in _SAVED_MODEL:
        _SAVED_MODEL["dir"] = build_saved_model(tmp_path_factory.mktemp("hub_model"))
    return _SAVED_MODEL["dir"]

