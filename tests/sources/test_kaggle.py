"""Kaggle source: real kagglehub/kagglesdk talking to a local Kaggle Models API stand-in
through a mirror rule; kagglehub's cache layout, offline reuse, error mapping, quiet output,
and a guard on the private kagglesdk attribute the mirror support relies on."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("kagglehub")

from ckptkit.errors import (AuthError, MissingDependencyError, NotFoundError,  # noqa: E402
                            SourceError, UsageError)
from ckptkit.formats import savedmodel  # noqa: E402
from ckptkit.mirrors import Mirrors  # noqa: E402
from ckptkit.sources import kaggle  # noqa: E402
from tests.sources.hubs import KAGGLE_HANDLE, KaggleStub, saved_model, tree_files  # noqa: E402

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


def mirror(stub: KaggleStub) -> Mirrors:
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
