"""MirrorServer (ckptkit.testing.hubs): a mirror directory served on one port — plain files with
ranges, TF Hub's compressed protocol and the Kaggle Models API driven by ckptkit's own sources,
prefixes that are down, and the ``python -m ckptkit.testing.hubs`` entry point."""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from ckptkit.hub.download import download as download_module
from ckptkit.hub.download.download import download
from ckptkit.errors import NotFoundError, SourceError
from ckptkit.formats import savedmodel
from ckptkit.storage.mirrors import Mirrors
from ckptkit.hub.sources import kaggle, tfhub
from ckptkit.testing.hubs import MirrorServer, tree_files
from tests.conftest import SRC

SAMPLE = SRC / "ckptkit" / "samples" / "musiq_saved_model"
HANDLE = "https://tfhub.dev/google/musiq/spaq/1"
KAGGLE_HANDLE = "google/musiq/tensorFlow2/spaq/1"
KAGGLE_VERSION = Path("kaggle/google/musiq/tensorFlow2/spaq/1")
BLOB = bytes(range(256)) * 1200  # 300 KiB, every offset distinguishable


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A mirror directory: one plain file, the sample SavedModel on TF Hub and on Kaggle."""
    mirror = tmp_path / "mirror"
    (mirror / "files" / "data").mkdir(parents=True)
    (mirror / "files" / "data" / "blob.bin").write_bytes(BLOB)
    (mirror / "files" / "other.txt").write_text("other\n")
    shutil.copytree(SAMPLE, mirror / "tfhub" / "google" / "musiq" / "spaq" / "1")
    shutil.copytree(SAMPLE, mirror / KAGGLE_VERSION)
    return mirror


@pytest.fixture
def server(root: Path) -> Iterator[MirrorServer]:
    with MirrorServer(root) as mirror:
        yield mirror




class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the tests look at the 302 itself


def get(url: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body, without following redirects or raising on 4xx/5xx."""
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers.items()), err.read()


def rpc(server: MirrorServer, method: str,
        body: Mapping[str, object]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", f"/kaggle/v1/models.ModelApiService/{method}", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw_get(server: MirrorServer, path: str) -> int:
    """Status of a GET sent with ``path`` exactly as written (no client normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


# --- /files ------------------------------------------------------------------------------------

def test_files_range_get_with_validators(server: MirrorServer) -> None:
    url = f"{server.base}/files/data/blob.bin"
    status, headers, body = get(url, {"Range": "bytes=1000-1999"})
    assert status == 206
    assert body == BLOB[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(BLOB)}"
    assert headers["Content-Length"] == "1000" and headers["Accept-Ranges"] == "bytes"
    etag, modified = headers["ETag"], headers["Last-Modified"]
    assert etag.startswith('"') and modified.endswith("GMT")

    # If-Range with either validator keeps the range; a stale one gets the whole file.
    assert get(url, {"Range": "bytes=-10", "If-Range": etag})[2] == BLOB[-10:]
    assert get(url, {"Range": "bytes=-10", "If-Range": modified})[0] == 206
    status, headers, body = get(url, {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (status, body, headers["ETag"]) == (200, BLOB, etag)
    status, headers, _ = get(url, {"Range": f"bytes={len(BLOB)}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(BLOB)}")
    status, headers, body = get(url, method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, str(len(BLOB)), b"")


def test_files_download_resumable_engine(server: MirrorServer, tmp_path: Path) -> None:
    mirrors = Mirrors.parse(f"https://cdn.example.com/models={server.base}/files/data")
    dest = tmp_path / "blob.bin"
    result = download(mirrors.rewrite("https://cdn.example.com/models/blob.bin"), dest)
    assert dest.read_bytes() == BLOB and result.size == len(BLOB)


@pytest.mark.parametrize("path", ["/files/missing.bin", "/files/data", "/files/",
                                  "/files/../tfhub/google/musiq/spaq/1/saved_model.pb",
                                  "/files/data/%2e%2e/other.txt", "/nowhere"])
def test_files_outside_or_missing_are_404(server: MirrorServer, path: str) -> None:
    assert raw_get(server, path) == 404


# --- /tfhub ------------------------------------------------------------------------------------

def test_tfhub_compressed_flow_through_tfhub_fetch(server: MirrorServer, tmp_path: Path) -> None:
    mirrors = Mirrors.parse(f"https://tfhub.dev={server.base}/tfhub")
    dest = tmp_path / "spaq"

    result = tfhub.fetch(HANDLE, dest, mirrors=mirrors, tfhub_cache_dir=tmp_path / "tfhub_cache")

    assert result.url == f"{server.base}/tfhub/google/musiq/spaq/1?tf-hub-format=compressed"
    assert result.final_url == f"{server.base}/tfhub/_archives/google/musiq/spaq/1.tar.gz"
    assert tree_files(dest) == tree_files(SAMPLE)
    assert savedmodel.sniff(dest)
    assert tree_files(result.tfhub_module_dir) == tree_files(SAMPLE)  # type: ignore[arg-type]

    # Packed once: a second fetch gets the very same bytes (gzip stamps the packing time).
    again = tfhub.fetch(HANDLE, tmp_path / "again", mirrors=mirrors, tfhub_cache_dir=None)
    assert again.archive_sha256 == result.archive_sha256


def test_tfhub_archive_has_files_at_its_root(server: MirrorServer, tmp_path: Path) -> None:
    status, headers, _ = get(f"{server.base}/tfhub/google/musiq/spaq/1?tf-hub-format=compressed")
    assert status == 302
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(get(headers["Location"])[2])
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"./saved_model.pb", "./variables/variables.index"} <= names
    assert all(name == "." or name.startswith("./") for name in names)


def test_tfhub_page_and_unknown_handles(server: MirrorServer, tmp_path: Path) -> None:
    status, headers, body = get(f"{server.base}/tfhub/google/musiq/spaq/1")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/google/musiq/spaq/1" in body
    for path in ("google/musiq/spaq/2", "google/musiq", "google/musiq/spaq/1/variables",
                 "_archives/google/musiq/nope.tar.gz"):
        assert get(f"{server.base}/tfhub/{path}?tf-hub-format=compressed")[0] == 404, path
    with pytest.raises(NotFoundError):
        tfhub.fetch("https://tfhub.dev/google/musiq/nope/1", tmp_path / "x",
                    mirrors=Mirrors.parse(f"https://tfhub.dev={server.base}/tfhub"),
                    tfhub_cache_dir=None)


# --- /kaggle -----------------------------------------------------------------------------------

def test_kaggle_flow_through_kaggle_fetch(server: MirrorServer, kaggle_env: Path) -> None:
    result = kaggle.fetch(KAGGLE_HANDLE,
                          mirrors=Mirrors.parse(f"https://api.kaggle.com={server.base}/kaggle"))

    assert result.path == kaggle_env / "models" / "google" / "musiq" / "tensorFlow2" / "spaq" / "1"
    assert tree_files(result.path) == tree_files(SAMPLE)
    posts = server.paths("POST")
    assert "/kaggle/v1/models.ModelApiService/ListModelInstanceVersionFiles" in posts
    assert posts.count("/kaggle/v1/models.ModelApiService/DownloadModelInstanceVersion") \
        == len(tree_files(SAMPLE))
    blobs = [p for p in server.paths("GET") if p.startswith("/kaggle/blob/")]
    assert "/kaggle/blob/google/musiq/tensorFlow2/spaq/1/files/saved_model.pb" in blobs


def test_kaggle_many_files_come_as_one_archive(root: Path, server: MirrorServer,
                                               kaggle_env: Path) -> None:
    extra = root / KAGGLE_VERSION / "assets"
    extra.mkdir(exist_ok=True)
    for i in range(30):  # more than one page of 25: kagglehub asks for the whole version
        (extra / f"vocab_{i:02}.txt").write_text(f"word {i}\n")

    result = kaggle.fetch(KAGGLE_HANDLE,
                          mirrors=Mirrors.parse(f"https://api.kaggle.com={server.base}/kaggle"))

    assert tree_files(result.path) == tree_files(root / KAGGLE_VERSION)
    assert "/kaggle/blob/google/musiq/tensorFlow2/spaq/1/archive.tar.gz" in server.paths("GET")


def test_kaggle_rpcs(root: Path, server: MirrorServer) -> None:
    shutil.copytree(SAMPLE, root / KAGGLE_VERSION.parent / "3")
    body = {"ownerSlug": "google", "modelSlug": "musiq", "instanceSlug": "spaq",
            "framework": "MODEL_FRAMEWORK_TENSOR_FLOW_2"}
    status, _, answer = rpc(server, "GetModelInstance", body)
    assert status == 200
    assert json.loads(answer) == {"id": 1, "slug": "spaq", "versionNumber": 3,
                                  "framework": "MODEL_FRAMEWORK_TENSOR_FLOW_2"}

    status, headers, _ = rpc(server, "DownloadModelInstanceVersion",
                             {**body, "versionNumber": 1, "path": "variables/variables.index"})
    assert status == 302
    status, headers, data = get(headers["Location"], {"Range": "bytes=0-9"})
    index = (SAMPLE / "variables" / "variables.index").read_bytes()
    assert (status, data) == (206, index[:10])
    assert headers["x-goog-hash"].startswith("md5=")

    for missing in ({**body, "versionNumber": 2}, {**body, "instanceSlug": "nope"},
                    {**body, "framework": "MODEL_FRAMEWORK_PY_TORCH"},
                    {**body, "ownerSlug": ".."}):
        status, _, answer = rpc(server, "ListModelInstanceVersionFiles", missing)
        assert (status, json.loads(answer)["code"]) == (404, 404), missing
    status, _, _ = rpc(server, "DownloadModelInstanceVersion",
                       {**body, "versionNumber": 1, "path": "../../../files/other.txt"})
    assert status == 404


# --- down prefixes -----------------------------------------------------------------------------

def test_down_prefix_answers_503_and_others_still_work(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_module, "BACKOFF_BASE", 0.001)  # retries are not the point
    with MirrorServer(root, down=["/tfhub"]) as server:
        assert get(f"{server.base}/tfhub/google/musiq/spaq/1")[0] == 503
        assert get(f"{server.base}/files/other.txt")[2] == b"other\n"
        with pytest.raises(SourceError, match="503"):
            tfhub.fetch(HANDLE, tmp_path / "x", tfhub_cache_dir=None,
                        mirrors=Mirrors.parse(f"https://tfhub.dev={server.base}/tfhub"))

        server.down = {"files/data/"}  # whole segments, slashes optional
        assert get(f"{server.base}/files/data/blob.bin")[0] == 503
        assert get(f"{server.base}/tfhub/google/musiq/spaq/1")[0] == 200
        assert rpc(server, "GetModelInstance", {})[0] == 404  # not down: an unknown model


def test_down_prefix_can_close_the_connection(root: Path) -> None:
    with MirrorServer(root, down=["/files"], down_mode="close") as server:
        with pytest.raises(ConnectionError):  # http.client.RemoteDisconnected, or a reset
            raw_get(server, "/files/other.txt")
        assert raw_get(server, "/tfhub/google/musiq/spaq/1") == 200


# --- python -m ckptkit.testing.hubs ---------------------------------------------------------------

def start_cli(*args: str, module: str = "ckptkit.testing.hubs") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", module, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})


def serving_line(proc: subprocess.Popen[str]) -> str:
    """The first line a started entry point prints (its 'serving' line)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=30), "no 'serving' line within 30 s"
    return proc.stdout.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_entry_point_serves_until_signalled(root: Path, sig: signal.Signals) -> None:
    proc = start_cli(str(root), "--port", "0")
    try:
        line = serving_line(proc)
        match = re.fullmatch(rf"serving {re.escape(str(root))} on (http://127\.0\.0\.1:(\d+))\n",
                             line)
        assert match, line
        assert int(match.group(2)) > 0
        assert get(f"{match.group(1)}/files/data/blob.bin", {"Range": "bytes=5-9"})[2] \
            == BLOB[5:10]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # The handlers are installed before the line is printed, so the exit is always clean.
    assert proc.returncode == 0, err
    assert err == ""


def test_entry_point_rejects_a_missing_root(tmp_path: Path) -> None:
    proc = start_cli(str(tmp_path / "missing"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and out == ""
    assert "is not a directory" in err


def test_package_imports_only_the_standard_library() -> None:
    code = ("import sys\n"
            "import ckptkit.testing.hubs, ckptkit.testing.hf_hub\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)))")
    # -S: no site-packages at all, so a third-party import would fail, not just show up.
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['__main__', 'ckptkit']"
