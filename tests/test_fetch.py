"""`ckpt fetch` end to end: built-in catalogue names, served by local mirrors through the chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptkit import config
from ckptkit.fetch import FetchError, plan_fetch
from tests.conftest import SRC, run_ckpt
from tests.servers.http import Fault, HTTPTestServer, http_server  # noqa: F401 (fixture)

torch = pytest.importorskip("torch")

AZURE = "https://openaipublic.azureedge.net"
BLOB = "https://openaipublic.blob.core.windows.net"
JUKEBOX = ["5b/vqvae.pth.tar", "5b/prior_level_0.pth.tar", "5b/prior_level_1.pth.tar",
           "1b_lyrics/prior_level_2.pth.tar", "5b/prior_level_2.pth.tar"]


def legacy_checkpoint(path: Path, seed: int) -> bytes:
    """A Jukebox-shaped legacy torch file (hps, model, opt=None, step)."""
    g = torch.Generator().manual_seed(seed)
    torch.save({"hps": {"name": path.name, "level": seed}, "opt": None, "step": seed,
                "model": {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(64)}},
               path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


@pytest.fixture
def jukebox_files(tmp_path: Path) -> dict[str, bytes]:
    return {rel: legacy_checkpoint(tmp_path / rel.replace("/", "_"), seed)
            for seed, rel in enumerate(JUKEBOX)}


@pytest.fixture
def mirror(http_server: HTTPTestServer, jukebox_files: dict[str, bytes]) -> str:
    """The retired Azure CDN answers 404; the storage account is served by the local server."""
    for rel, data in jukebox_files.items():
        http_server.add(f"/blob/jukebox/models/{rel}", data)
    return f"{AZURE}={http_server.url('/cdn')},{BLOB}={http_server.url('/blob')}"


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptkit import download

    monkeypatch.setattr(download, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(download, "BACKOFF_CAP", 0.05)


def settings(mirror: str = "", **kw) -> config.Settings:
    return config.settings(mirror=mirror, **kw)


def test_bundle_falls_back_to_the_second_source_and_verifies(mirror: str,
                                                             jukebox_files, http_server) -> None:
    result = run_ckpt("fetch", "jukebox-1b_lyrics", "--mirror", mirror, "--json",
                      env={"CKPTKIT_CACHE": os.environ["CKPTKIT_CACHE"],
                           "CKPTKIT_CONFIG": os.environ["CKPTKIT_CONFIG"]})
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)
    assert [f["name"] for f in files] == [f"jukebox/{r}" for r in JUKEBOX[:4]]
    for item, rel in zip(files, JUKEBOX[:4], strict=True):
        assert Path(item["path"]).read_bytes() == jukebox_files[rel]
        assert item["source"] == "url" and item["bytes"] == len(jukebox_files[rel])
    assert "azureedge" in result.stderr and "failed" in result.stderr  # the fallback is visible
    assert not list(Path(os.environ["CKPTKIT_CACHE"]).rglob("*.part"))


def test_shared_bundle_files_are_fetched_once(mirror: str, http_server) -> None:
    plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).execute()
    sent = http_server.bytes_sent()
    second = plan_fetch(["jukebox-5b"], settings(mirror))
    assert [f.cached is not None for f in second.files] == [True, True, True, False]
    fetched = second.execute()
    assert [f.source for f in fetched] == ["cache", "cache", "cache", "url"]
    new_bytes = http_server.bytes_sent() - sent
    assert new_bytes < 2 * fetched[3].bytes  # only the 5b top prior moved (plus probes/errors)
    # the three shared files are one cache entry each, whatever the model
    paths = {f.path for f in plan_fetch(["jukebox-5b_lyrics"], settings(mirror)).files
             if f.cached for f in [f.cached]}
    assert len(paths) == 3


def test_first_download_is_pinned_and_drift_is_refused(mirror: str, http_server,
                                                       tmp_path: Path) -> None:
    plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).execute()
    pins = json.loads((Path(os.environ["CKPTKIT_CONFIG"]) / "lock.json").read_text())["files"]
    assert set(pins) == {f"jukebox/{r}" for r in JUKEBOX[:4]}
    other = legacy_checkpoint(tmp_path / "other.pth.tar", 99)
    http_server.add("/blob/jukebox/models/5b/vqvae.pth.tar", other)  # same name, other bytes
    run = run_ckpt("cache", "rm", "jukebox/5b/vqvae.pth.tar", "--yes",
                   env={"CKPTKIT_CACHE": os.environ["CKPTKIT_CACHE"],
                        "CKPTKIT_CONFIG": os.environ["CKPTKIT_CONFIG"]})
    assert run.returncode == 0, run.stderr
    with pytest.raises(FetchError) as failed:
        plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).execute()
    assert failed.value.exit_code == 3
    assert "jukebox/5b/vqvae.pth.tar" in str(failed.value)


def test_a_cdn_answering_503_is_retried_then_abandoned(http_server, jukebox_files,
                                                       fast_retries) -> None:
    for rel, data in jukebox_files.items():
        http_server.add(f"/blob/jukebox/models/{rel}", data)
        http_server.add(f"/cdn/jukebox/models/{rel}", data,
                        faults=[Fault("status", status=503, times=None)])
    mirror = f"{AZURE}={http_server.url('/cdn')},{BLOB}={http_server.url('/blob')}"
    fetched = plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).execute()
    assert {f.source for f in fetched} == {"url"}
    assert len(http_server.hits("/cdn/jukebox/models/5b/vqvae.pth.tar")) > 1  # retried


def test_html_error_page_is_a_failed_source(http_server, jukebox_files) -> None:
    for rel, data in jukebox_files.items():
        http_server.add(f"/blob/jukebox/models/{rel}", data)
        http_server.add(f"/cdn/jukebox/models/{rel}", b"<!DOCTYPE html><html>Sign in</html>",
                        content_type="text/html")
    mirror = f"{AZURE}={http_server.url('/cdn')},{BLOB}={http_server.url('/blob')}"
    fetched = plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).execute()
    assert all(Path(f.path).read_bytes() == jukebox_files[r]
               for f, r in zip(fetched, JUKEBOX[:4], strict=True))


def test_every_source_failing_lists_each_attempt(http_server) -> None:
    mirror = f"{AZURE}={http_server.url('/none')},{BLOB}={http_server.url('/none')}"
    with pytest.raises(FetchError) as failed:
        plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).execute()
    message = str(failed.value)
    assert failed.value.exit_code == 4
    assert message.count("url:") >= 8 and "local:" in message


def test_offline_uses_local_dirs_and_never_the_network(mirror: str, jukebox_files, http_server,
                                                       tmp_path: Path) -> None:
    local = tmp_path / "usb"
    for rel, data in jukebox_files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    fetched = plan_fetch(["jukebox-1b_lyrics"],
                         settings(mirror, offline=True, local_dirs=(local,))).execute()
    assert [f.source for f in fetched] == ["local"] * 4
    assert http_server.hits() == []


def test_offline_with_nothing_exits_4(mirror: str) -> None:
    result = run_ckpt("fetch", "musiq-spaq", "--offline",
                      env={"CKPTKIT_CACHE": os.environ["CKPTKIT_CACHE"]})
    assert result.returncode == 4 and "offline" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dest_places_the_origin_layout(mirror: str, tmp_path: Path) -> None:
    dest = tmp_path / "jukebox-cache"
    fetched = plan_fetch(["jukebox-1b_lyrics"], settings(mirror), dest=dest).execute()
    assert sorted(str(Path(f.path).relative_to(dest)) for f in fetched) == sorted(JUKEBOX[:4])
    cached = Path(os.environ["CKPTKIT_CACHE"]) / "files" / "jukebox" / "5b" / "vqvae.pth.tar"
    assert os.path.samefile(dest / "5b" / "vqvae.pth.tar", cached)  # a hardlink, not a copy


def test_dry_run_json_plans_without_transferring(mirror: str, http_server) -> None:
    env = {"CKPTKIT_CACHE": os.environ["CKPTKIT_CACHE"],
           "CKPTKIT_CONFIG": os.environ["CKPTKIT_CONFIG"]}
    plan = json.loads(run_ckpt("fetch", "jukebox-5b", "--dry-run", "--json", "--mirror", mirror,
                               env=env).stdout)
    assert set(plan) >= {"files", "total_bytes"} and len(plan["files"]) == 4
    assert {h.range for h in http_server.hits()} == {"bytes=0-0"}  # sizes asked, nothing moved
    assert run_ckpt("fetch", "jukebox-1b_lyrics", "--mirror", mirror, env=env).returncode == 0
    plan = json.loads(run_ckpt("fetch", "jukebox-5b", "--dry-run", "--json", "--mirror", mirror,
                               env=env).stdout)
    assert [f["cached"] for f in plan["files"]] == [True, True, True, False]
    assert plan["unknown_sizes"] == 0 and plan["total_bytes"] == plan["files"][3]["size"]


def test_concurrent_fetches_download_each_file_once(mirror: str, jukebox_files, http_server,
                                                    tmp_path: Path) -> None:
    code = ("import sys; from ckptkit import config; from ckptkit.fetch import plan_fetch; "
            "plan_fetch(['jukebox-1b_lyrics'], config.settings(mirror=sys.argv[1])).execute()")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [subprocess.Popen([sys.executable, "-c", code, mirror], env=env,
                              stderr=subprocess.PIPE) for _ in range(4)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    total = sum(len(jukebox_files[r]) for r in JUKEBOX[:4])
    served = sum(h.sent for h in http_server.hits() if "/blob/" in h.path)
    assert served < total * 1.2  # each file crossed the wire once


def test_unknown_model_and_bad_source_are_usage_errors() -> None:
    result = run_ckpt("fetch", "musiq-spa")
    assert result.returncode == 4 and "musiq-spaq" in result.stderr
    result = run_ckpt("fetch", "jukebox-5b", "--source", "tfhub")
    assert result.returncode == 2 and "no tfhub source" in result.stderr


def test_dry_run_asks_servers_for_sizes(mirror: str, jukebox_files, http_server) -> None:
    plan = plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).with_probed_sizes()
    assert plan.unknown_sizes == 0
    assert plan.total_bytes == sum(len(jukebox_files[r]) for r in JUKEBOX[:4])
    assert all(h.range == "bytes=0-0" for h in http_server.hits())  # one byte each, no download
    assert {f.to_dict(plan.settings)["size_from"] for f in plan.files} == {"server"}
