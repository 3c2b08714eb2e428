"""Kaggle source: real kagglehub/kagglesdk talking to a local Kaggle Models API stand-in
through a mirror rule; kagglehub's cache layout, offline reuse, error mapping, quiet output,
and a guard on the private kagglesdk attribute the mirror support relies on."""

from __future__ import annotations

import gzip
import io
import logging
import os
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("kagglehub")

from ckptkit.storage import archives  # noqa: E402
from ckptkit.errors import (AuthError, IntegrityError, MissingDependencyError,  # noqa: E402
                            NotFoundError, SourceError, UsageError)
from ckptkit.formats import savedmodel  # noqa: E402
from ckptkit.storage.mirrors import Mirrors  # noqa: E402
from ckptkit.hub.sources import kaggle  # noqa: E402
from ckptkit.hub.download.transfer_plan import TransferLimits  # noqa: E402
from ckptkit.testing.server import StubHandler, StubServer  # noqa: E402
from tests.hub.sources.hubs import KAGGLE_HANDLE, KaggleStub, tree_files  # noqa: E402

__all__ = ["saved_model"]  # the session fixture, re-exported for pytest

LIST_BODY = {"ownerSlug": "google", "modelSlug": "musiq", "instanceSlug": "spaq",
             "framework": "MODEL_FRAMEWORK_TENSOR_FLOW_2", "versionNumber": 1, "pageSize": 25}

pytestmark = pytest.mark.usefixtures("kaggle_env")




@pytest.fixture
def api(saved_model: Path) -> Iterator[KaggleStub]:
    stub = KaggleStub()
    stub.add_model(KAGGLE_HANDLE, tree_files(saved_model))
    with stub:
        yield stub


def mirror(stub: StubServer) -> Mirrors:
    return Mirrors.parse(f"https://api.kaggle.com={stub.base}")


def test_fetch_fills_kagglehub_cache_and_is_reused_offline(
        api: KaggleStub, kaggle_env: Path, saved_model: Path) -> None:
    result = kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api))

    version_dir = kaggle_env / "models" / "google" / "musiq" / "tensorFlow2" / "spaq" / "1"
    assert result.path == version_dir and result.handle == KAGGLE_HANDLE
    assert (version_dir.parent / "1.complete").is_file()
    assert tree_files(version_dir) == tree_files(saved_model)
    assert savedmodel.sniff(result.path)
    # What kagglesdk actually sent: the real api.kaggle.com path, prefix rewritten.
    (path, body), = api.rpc_bodies("ListModelInstanceVersionFiles")
    assert path == "/v1/models.ModelApiService/ListModelInstanceVersionFiles"
    assert body == LIST_BODY
    downloads = api.rpc_bodies("DownloadModelInstanceVersion")
    assert sorted(b["path"] for _, b in downloads) == sorted(tree_files(saved_model))
    assert not api.rpc_bodies("GetModelInstance")  # versioned: no "latest version" lookup
    assert all("Authorization" not in r.headers for r in api.requests)
    # The override is undone.
    from kagglesdk import kaggle_env as sdk_env
    assert sdk_env.get_endpoint(sdk_env.KaggleEnv.PROD) == "https://api.kaggle.com"
    assert "KAGGLE_API_ENVIRONMENT" not in os.environ

    api.stop()
    again = kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api))
    assert again.path == version_dir


def test_large_versions_come_as_one_archive(api: KaggleStub, saved_model: Path) -> None:
    api.next_page_token = "more"  # what Kaggle answers for more than 25 files
    result = kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api))
    assert tree_files(result.path) == tree_files(saved_model)
    (_, body), = api.rpc_bodies("DownloadModelInstanceVersion")
    assert "path" not in body
    assert not (result.path.parent / "1.archive").exists()  # kagglehub deleted it


def test_quiet_prints_nothing_and_verbose_logs_to_stderr(
        api: KaggleStub, capfd: pytest.CaptureFixture[str], kaggle_env: Path) -> None:
    kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api), quiet=True)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")

    import shutil
    shutil.rmtree(kaggle_env)
    kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api), quiet=False)
    out, err = capfd.readouterr()
    assert out == ""  # ckpt's stdout is for results
    assert "Downloading" in err
    assert logging.getLogger("kagglehub").level != logging.ERROR  # restored


def test_forbidden_is_auth_error(api: KaggleStub) -> None:
    api.forbidden = True
    with pytest.raises(AuthError) as err:
        kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api))
    assert err.value.status == 403
    assert "kagglehub.login()" in str(err.value) and "KAGGLE_API_TOKEN" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_model_is_not_found(api: KaggleStub) -> None:
    with pytest.raises(NotFoundError) as err:
        kaggle.fetch("google/musiq/tensorFlow2/nope/1", mirrors=mirror(api))
    assert "\n" not in str(err.value)
    with pytest.raises(NotFoundError):
        kaggle.fetch("google/musiq/tensorFlow2/spaq/7", mirrors=mirror(api))


def test_server_down_is_source_error(api: KaggleStub) -> None:
    api.stop()
    with pytest.raises(SourceError) as err:
        kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api))
    assert type(err.value) is SourceError
    assert api.base in str(err.value) and "refused" in str(err.value).lower()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("handle", ["google/musiq/tensorFlow2/spaq", "google/musiq/tf2/spaq/x",
                                    "google/musiq/tensorFlow2/spaq/0", "musiq", "a//b/c/1",
                                    "google/musiq/NoSuchFramework/spaq/1"])
def test_bad_handles_are_usage_errors(handle: str, api: KaggleStub) -> None:
    with pytest.raises(UsageError):
        kaggle.fetch(handle, mirrors=mirror(api))
    assert api.requests == []


def test_unversioned_handle_hint_names_the_version() -> None:
    with pytest.raises(UsageError, match="no version") as err:
        kaggle.check_handle("google/musiq/tensorFlow2/spaq")
    assert "google/musiq/tensorFlow2/spaq/1" in str(err.value)


def test_missing_kagglehub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match="kagglehub") as err:
        kaggle.fetch(KAGGLE_HANDLE, mirrors=Mirrors())
    assert "ckptkit[kaggle]" in str(err.value)


def test_api_base_only_for_rules_targeting_the_kaggle_api() -> None:
    assert kaggle.api_base(Mirrors()) is None
    assert kaggle.api_base(Mirrors.parse("https://tfhub.dev=http://127.0.0.1:1")) is None
    assert kaggle.api_base(Mirrors.parse("https://api.kaggle.com=http://127.0.0.1:1")) \
        == "http://127.0.0.1:1"
    assert kaggle.api_base(Mirrors.parse("https://api.kaggle.com/=http://m/kaggle/")) \
        == "http://m/kaggle"


# --- guards on kagglesdk/kagglehub internals we depend on ---------------------------------------

def test_kagglesdk_private_endpoint_override_still_works() -> None:
    """Fails loudly when kagglesdk changes what the mirror support patches (kagglesdk 0.1.37)."""
    from kagglesdk import kaggle_env
    from kagglesdk.kaggle_http_client import KaggleHttpClient

    table, local = kaggle.endpoint_table()
    assert table is kaggle_env._env_to_endpoint
    assert local is kaggle_env.KaggleEnv.PROD
    with kaggle._endpoint("http://127.0.0.1:9"):
        assert kaggle_env.get_env() is kaggle_env.KaggleEnv.PROD
        client = KaggleHttpClient()  # reads env and table when built, as kagglehub does per call
        assert client._get_request_url("models.ModelApiService", "GetModelInstance") \
            == "http://127.0.0.1:9/v1/models.ModelApiService/GetModelInstance"
    assert kaggle_env.get_endpoint(kaggle_env.KaggleEnv.PROD) == "https://api.kaggle.com"
    assert kaggle_env.get_env() is kaggle_env.KaggleEnv.PROD


def test_kagglehub_progress_hooks_still_exist() -> None:
    """quiet=True replaces these by disabled versions; a rename would bring bars back."""
    from kagglehub import clients, http_resolver

    assert callable(clients.tqdm) and callable(http_resolver.thread_map)
    assert hasattr(clients, "already_printed_version_warning")


def test_missing_private_attribute_is_a_clear_error(api: KaggleStub,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from kagglesdk import kaggle_env

    monkeypatch.delattr(kaggle_env, "_env_to_endpoint")
    with pytest.raises(SourceError, match="_env_to_endpoint") as err:
        kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api))
    assert "kagglesdk" in str(err.value)
    assert api.requests == []  # never falls back to the real api.kaggle.com


# --- limits ckptkit puts on kagglehub's own downloading ---------------------------------------

def hostile_tar_gz(good: dict[str, bytes], member: tarfile.TarInfo) -> bytes:
    """A version archive: the good files, then ``member`` (a header only when it claims more
    than the default extraction cap: the bytes of a real bomb never need to exist)."""
    if member.size > archives.BOMB_FLOOR:
        return gzip.compress(member.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in good.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(member, io.BytesIO(b"x" * member.size))
    return buf.getvalue()


@pytest.mark.parametrize("name, kind, link, size", [
    pytest.param("variables/huge.data", tarfile.REGTYPE, "", archives.BOMB_FLOOR + 1, id="bomb"),
    pytest.param("../../escape.txt", tarfile.REGTYPE, "", 6, id="traversal"),
    pytest.param("variables/escape", tarfile.SYMTYPE, "../../../../../../outside", 0,
                 id="symlink-out"),
    pytest.param("dev/sda", tarfile.BLKTYPE, "", 0, id="device"),
])
def test_kaggle_archives_pass_the_tf_hub_extraction_caps(
        name: str, kind: bytes, link: str, size: int, saved_model: Path,
        kaggle_env: Path, tmp_path: Path) -> None:
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.size = kind, link, size
    stub = KaggleStub()
    stub.add_model(KAGGLE_HANDLE, tree_files(saved_model),
                   archive=hostile_tar_gz(tree_files(saved_model), member))
    stub.next_page_token = "more"  # the whole version as one archive
    with stub, pytest.raises(IntegrityError) as refused:
        kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(stub))
    assert f"unsafe member {name!r}" in str(refused.value)
    assert refused.value.reason.startswith(f"unsafe member {name!r}")
    # Nothing ckpt caused to be written stays in kagglehub's cache: no tree, no archive, no
    # completion marker, no empty folders.
    assert not kaggle_env.exists() or list(kaggle_env.rglob("*")) == []
    assert [p for p in tmp_path.rglob("*") if p.name in ("escape.txt", "outside")] == []


def test_a_failed_call_keeps_what_was_in_kagglehubs_cache(saved_model: Path,
                                                          kaggle_env: Path) -> None:
    other = kaggle_env / "models" / "google" / "musiq" / "tensorFlow2" / "ava" / "1"
    other.mkdir(parents=True)
    (other / "saved_model.pb").write_bytes(b"another model")
    member = tarfile.TarInfo("variables/huge.data")
    member.size = archives.BOMB_FLOOR + 1
    stub = KaggleStub()
    stub.add_model(KAGGLE_HANDLE, {}, archive=hostile_tar_gz({}, member))
    stub.next_page_token = "more"
    with stub, pytest.raises(IntegrityError):
        kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(stub))
    assert sorted(p.relative_to(kaggle_env).as_posix() for p in kaggle_env.rglob("*")) == [
        "models", "models/google", "models/google/musiq", "models/google/musiq/tensorFlow2",
        "models/google/musiq/tensorFlow2/ava", "models/google/musiq/tensorFlow2/ava/1",
        "models/google/musiq/tensorFlow2/ava/1/saved_model.pb"]


def test_a_kaggle_file_over_the_ceiling_is_refused_and_removed(saved_model: Path,
                                                               kaggle_env: Path) -> None:
    files = tree_files(saved_model)
    stub = KaggleStub()
    stub.add_model(KAGGLE_HANDLE, files)
    biggest = max(len(data) for data in files.values())
    limits = TransferLimits(max_bytes=biggest - 1)
    with stub:
        with pytest.raises(SourceError) as refused:
            kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(stub), limits=limits)
        assert refused.value.reason == f"too large (over {biggest - 1:,} bytes)"
        assert not kaggle_env.exists() or list(kaggle_env.rglob("*")) == []
        # the same files within the ceiling
        assert kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(stub),
                            limits=TransferLimits(max_bytes=biggest)).announced


def test_kagglehub_internals_the_limits_replace_still_exist() -> None:
    """The limits replace these kagglehub functions (kagglehub 1.0); a rename is refused."""
    import inspect

    from kagglehub import clients, http_resolver
    from kagglesdk.kaggle_http_client import KaggleHttpClient

    assert list(inspect.signature(http_resolver._extract_archive).parameters) == [
        "archive_path", "out_path"]
    assert list(inspect.signature(clients._download_file).parameters) == [
        "response", "out_file", "size_read", "total_size", "hash_object"]
    assert callable(KaggleHttpClient._init_session)


def test_kagglehub_without_the_replaced_function_is_refused(
        api: KaggleStub, monkeypatch: pytest.MonkeyPatch) -> None:
    from kagglehub import http_resolver

    monkeypatch.delattr(http_resolver, "_extract_archive")
    with pytest.raises(SourceError, match="_extract_archive") as err:
        kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api))
    assert err.value.reason == "unsupported kagglehub version" and api.requests == []


class _TricklingApi(StubHandler):
    """A Kaggle API that answers every RPC one header byte every 20 ms (80 s in all)."""

    def do_POST(self) -> None:
        self._record()
        head = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * 4000 + b"\r\n\r\n"
        for byte in head:
            if self.stub.done.wait(0.02):
                return
            try:
                self.wfile.write(bytes([byte]))
            except OSError:
                return


class TricklingApi(StubServer):
    handler_class = _TricklingApi

    def __init__(self) -> None:
        self.done = threading.Event()
        super().__init__()

    def stop(self) -> None:
        self.done.set()
        super().stop()


def test_kaggle_api_headers_are_held_to_the_deadline(kaggle_env: Path) -> None:
    """kagglesdk sends its requests without a timeout; the header deadline still ends them."""
    with TricklingApi() as api:
        with pytest.raises(SourceError) as err:
            kaggle.fetch(KAGGLE_HANDLE, mirrors=mirror(api),
                         limits=TransferLimits(header_timeout=0.5))
        assert err.value.reason == "no complete headers within 0.5 s"
        assert len(api.requests) == 1 and api.requests[0].method == "POST"
    assert not kaggle_env.exists() or list(kaggle_env.rglob("*")) == []
