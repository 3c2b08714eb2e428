"""In-memory stand-ins for TF Hub and the Kaggle Models API, and the archives they serve.

Both are real HTTP servers on ``127.0.0.1:<ephemeral port>`` (:mod:`ckptkit.testing.server`),
so the code under test — ckptkit's downloader, and kagglehub/kagglesdk themselves — speaks its
ordinary protocol to them:

* :class:`TFHubStub` behaves like tfhub.dev for the *compressed* protocol (as tensorflow_hub's
  own ``test_utils.py`` does): ``GET <handle path>?tf-hub-format=compressed`` → 302 to
  ``/archives/<name>.tar.gz``; ``GET <handle path>`` → an HTML page; unknown handles → 404.
* :class:`KaggleStub` answers the ``models.ModelApiService`` RPCs kagglesdk 0.1.37 sends
  (POST JSON to ``/api/v1/…`` outside PROD, ``/v1/…`` on PROD; both accepted):
  ``GetModelInstance``, ``ListModelInstanceVersionFiles`` and ``DownloadModelInstanceVersion``
  (302 to ``/blob/…``, as the real service redirects to a signed GCS URL).

Blobs and archives are served with ``Content-Length``, ``Accept-Ranges``, ``ETag``, and
``Range``/``If-Range`` → 206.  Every request is logged in ``.requests`` for assertions.

Example::

    stub = KaggleStub()
    stub.add_model("google/musiq/tensorFlow2/spaq/1", tree_files(model_dir))
    with stub:
        kaggle.fetch("google/musiq/tensorFlow2/spaq/1",
                     mirrors=Mirrors.parse(f"https://api.kaggle.com={stub.base}"))
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ckptkit.testing.server import StubHandler, StubServer

#: Handle framework names → the ``ModelFramework`` enum names kagglesdk sends.
FRAMEWORKS = {"tensorflow2": "MODEL_FRAMEWORK_TENSOR_FLOW_2",
              "tensorflow1": "MODEL_FRAMEWORK_TENSOR_FLOW_1",
              "pytorch": "MODEL_FRAMEWORK_PY_TORCH", "jax": "MODEL_FRAMEWORK_JAX",
              "keras": "MODEL_FRAMEWORK_KERAS", "flax": "MODEL_FRAMEWORK_FLAX"}
#: The RPC paths kagglesdk posts to: ``/v1/…`` on PROD, ``/api/v1/…`` elsewhere.
RPC_PATH = re.compile(r"(?:/api)?/v1/models\.ModelApiService/(\w+)")


# --- TF Hub ------------------------------------------------------------------------------------

def tfhub_page(handle_path: str) -> bytes:
    """tfhub.dev's model page (and its answer for models gone to Kaggle), in miniature."""
    return (f"<!DOCTYPE html><html><head><title>TensorFlow Hub</title></head>"
            f"<body><h1>{handle_path}</h1></body></html>").encode()


#: What tfhub.dev answers for an unknown handle.
TFHUB_NOT_FOUND = b"<html><body>404 Not Found</body></html>"


class _TFHubHandler(StubHandler):
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
            self._send(404, TFHUB_NOT_FOUND, "text/html")
            return
        if query.get("tf-hub-format") == "compressed" and handle_path not in stub.html_instead:
            self._redirect(f"{stub.base}/archives/{stub.models[handle_path]}")
            return
        self._send(200, tfhub_page(handle_path), "text/html; charset=utf-8")


class TFHubStub(StubServer):
    """tfhub.dev for the compressed protocol: ``add(path, archive_bytes)`` to publish.

    ``archives`` (name → bytes) can be replaced to serve damaged archives; handle paths in
    ``html_instead`` answer the HTML page even to ``?tf-hub-format=compressed``.
    """

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

class KaggleVersion(Protocol):
    """What the RPC answers need of one model version."""

    @property
    def instance(self) -> str: ...

    @property
    def framework(self) -> str: ...

    @property
    def version(self) -> int: ...


class KaggleCatalogue(Protocol):
    """Where :class:`KaggleRpcHandler` looks models up: in memory, or a mirror directory."""

    def find(self, body: dict[str, Any], version: int | None) -> Sequence[KaggleVersion]:
        """Versions matching the request's owner/model/framework/instance (and version)."""

    def list_files(self, model: Any, page_size: int) -> tuple[list[tuple[str, int]], str]:
        """``([(name, size), ...], next_page_token)`` of one version."""

    def blob_url(self, model: Any, name: str | None) -> str | None:
        """Where to download file ``name`` (None: the whole version as a tar.gz) from, or
        None when the version has no such file."""


@dataclass
class KaggleModel:
    """One version of a Kaggle model held in memory by :class:`KaggleStub`."""

    owner: str
    model: str
    framework: str  # the enum name kagglesdk sends, e.g. MODEL_FRAMEWORK_TENSOR_FLOW_2
    instance: str
    version: int
    files: dict[str, bytes] = field(default_factory=dict)
    archive: bytes | None = None  # served as the whole-version archive instead of ``files``


class KaggleRpcHandler(StubHandler):
    """Handler base answering the three ``models.ModelApiService`` RPCs from a catalogue."""

    def _read_json(self) -> Any:
        """The request's JSON body, or None when it is not JSON."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return None

    def _answer_rpc(self, method: str, body: dict[str, Any], catalogue: KaggleCatalogue) -> None:
        if method == "GetModelInstance":
            versions = catalogue.find(body, version=None)
            if not versions:
                self._error(404, "Not found")
                return
            latest = max(versions, key=lambda m: m.version)
            self._json({"id": 1, "slug": latest.instance, "framework": latest.framework,
                        "versionNumber": latest.version})
            return
        found = catalogue.find(body, version=body.get("versionNumber"))
        if not found:
            self._error(404, "Not found")
            return
        model = found[0]
        if method == "ListModelInstanceVersionFiles":
            page_size = body.get("pageSize")
            files, token = catalogue.list_files(
                model, page_size if isinstance(page_size, int) and page_size > 0 else 25)
            self._json({"files": [{"name": name, "size": size} for name, size in files],
                        "nextPageToken": token})
        elif method == "DownloadModelInstanceVersion":
            name = body.get("path")
            url = catalogue.blob_url(model, name)
            if url is None:
                self._error(404, f"no file {name}")
            else:
                self._redirect(url)
        else:
            self._error(404, f"unknown method {method}")

    def _send_kaggle_blob(self, data: bytes) -> None:
        """``data`` with the ``x-goog-hash`` md5 kagglehub checks downloads against."""
        self._send_blob(data, {"x-goog-hash": f"md5={md5_b64(data)}"})


class _KaggleHandler(KaggleRpcHandler):
    def do_POST(self) -> None:
        body = self._read_json()
        self._record(body)
        stub: KaggleStub = self.stub
        path = urllib.parse.urlparse(self.path).path
        match = RPC_PATH.fullmatch(path)
        if match is None or not isinstance(body, dict):
            self._error(404, f"no route {path}")
            return
        if stub.forbidden:
            self._error(403, "User has not consented to terms of use for this model")
            return
        self._answer_rpc(match.group(1), body, stub)

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
        data: bytes | None
        if parts[6] == "archive.tar.gz":
            data = model.archive if model.archive is not None else _tar_gz(model.files)
        else:
            data = model.files.get("/".join(parts[7:]))
            if data is None:
                self._send(404, b"not found")
                return
        self._send_kaggle_blob(data)


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

    def add_model(self, handle: str, files: dict[str, bytes],
                  archive: bytes | None = None) -> None:
        """Publish ``files`` (relative path → bytes) as ``owner/model/framework/instance/ver``.

        ``archive`` (tar.gz or zip bytes) is served when the whole version is asked for
        instead of one built from ``files``: a test's damaged or hostile archive.
        """
        owner, model, framework, instance, version = handle.split("/")
        self.models.append(KaggleModel(owner, model, FRAMEWORKS[framework.lower()], instance,
                                       int(version), dict(files), archive))

    def find(self, body: dict[str, Any], version: int | None) -> list[KaggleModel]:
        """The added models an RPC ``body`` names (any version when ``version`` is None)."""
        return [m for m in self.models
                if (m.owner, m.model, m.framework, m.instance)
                == (body.get("ownerSlug"), body.get("modelSlug"), body.get("framework"),
                    body.get("instanceSlug"))
                and (version is None or m.version == version)]

    def list_files(self, model: KaggleModel, page_size: int) -> tuple[list[tuple[str, int]], str]:
        """Every file of ``model`` in one page; ``next_page_token`` decides what kagglehub
        believes (the page size is ignored on purpose, so tests control it)."""
        return [(name, len(data)) for name, data in sorted(model.files.items())], \
            self.next_page_token

    def blob_url(self, model: KaggleModel, name: str | None) -> str | None:
        """``/blob/…/files/<name>`` or, for no name, ``/blob/…/archive.tar.gz``."""
        base = f"{self.base}/blob/{model.owner}/{model.model}/{model.instance}/{model.version}"
        if name is None:
            return f"{base}/archive.tar.gz"
        if name not in model.files:
            return None
        return f"{base}/files/{urllib.parse.quote(name)}"

    def rpc_bodies(self, method: str) -> list[tuple[str, dict[str, Any]]]:
        """(path, JSON body) of every POST to ``method``."""
        return [(r.path, r.body) for r in self.requests
                if r.method == "POST" and r.path.endswith("/" + method)]


# --- Archives ------------------------------------------------------------------------------------

def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tfhub_archive(model_dir: Path, *, dereference: bool = False) -> bytes:
    """``model_dir`` packed as TF Hub serves it: a tar.gz whose names start with ``./``.

    ``dereference`` stores the files symlinks point to instead of the links (a mirror
    directory may link to large files kept elsewhere).
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", dereference=dereference) as tar:
        tar.add(model_dir, arcname=".")
    return buf.getvalue()


def archive_of(files: dict[str, bytes]) -> bytes:
    """A tar.gz holding ``files`` (relative path → bytes)."""
    return _tar_gz(files)


def tree_files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` as relative POSIX path → bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def md5_b64(data: bytes) -> str:
    """The base64 md5 digest GCS puts in ``x-goog-hash: md5=…``."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()
