"""`ckpt fetch` end to end: built-in catalogue names, served by local mirrors through the chain."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckptkit import config
from ckptkit.hub.cache import Cache
from ckptkit.errors import ExitCode
from ckptkit.hub.fetch import FetchError, plan_fetch
from ckptkit.hub.pins import Pins
from tests import figures
from tests.conftest import SRC, run_ckpt, run_main
from tests.servers.http import Fault, HTTPTestServer

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
    from ckptkit.hub.download import download

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
    figures.count("network-faults")


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
    nothing_under_final_names("jukebox/5b/vqvae.pth.tar")
    figures.count("network-faults")


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
    figures.count("network-faults")


def test_html_error_page_is_a_failed_source(http_server, jukebox_files) -> None:
    for rel, data in jukebox_files.items():
        http_server.add(f"/blob/jukebox/models/{rel}", data)
        http_server.add(f"/cdn/jukebox/models/{rel}", b"<!DOCTYPE html><html>Sign in</html>",
                        content_type="text/html")
    mirror = f"{AZURE}={http_server.url('/cdn')},{BLOB}={http_server.url('/blob')}"
    fetched = plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).execute()
    assert all(Path(f.path).read_bytes() == jukebox_files[r]
               for f, r in zip(fetched, JUKEBOX[:4], strict=True))
    figures.count("network-faults")


def test_every_source_failing_lists_each_attempt(http_server) -> None:
    mirror = f"{AZURE}={http_server.url('/none')},{BLOB}={http_server.url('/none')}"
    logged: list[str] = []
    with pytest.raises(FetchError) as failed:
        plan_fetch(["jukebox-1b_lyrics"], settings(mirror)).execute(log=logged.append)
    assert failed.value.exit_code == 4
    lines = failed.value.attempt_lines()
    assert sorted(lines) == sorted(logged)  # each attempt was logged as it happened
    assert sum(": url:" in line for line in lines) == 8
    assert sum(line.endswith("failed: not on disk") for line in lines) == 4  # ~/.cache/jukebox
    assert all(line.endswith(("failed: HTTP 404 (not found)", "failed: not on disk"))
               for line in lines), lines
    message = str(failed.value)
    assert message.startswith("could not fetch jukebox/5b/vqvae.pth.tar and 3 more files: "
                              "every source failed (12 attempts)") and "\n" not in message
    for rel in JUKEBOX[:4]:
        nothing_under_final_names(f"jukebox/{rel}")
    figures.count("network-faults")


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
    """Four `ckpt fetch` processes, one bundle, started together: every file crosses the wire
    once (one CDN miss, one probe, one body), all four processes succeed with the same files."""
    bundle = JUKEBOX[:4]
    # The VQ-VAE's body holds after 1000 bytes until the three other processes wait for it:
    # they surely overlap, however the machine schedules them.
    http_server.routes["/blob/jukebox/models/5b/vqvae.pth.tar"].faults.append(
        Fault("stall", after=1000, seconds=None, only="data"))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [subprocess.Popen([sys.executable, "-m", "ckptkit", "fetch", "jukebox-1b_lyrics",
                               "--mirror", mirror, "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors: list[list[str]] = [[] for _ in procs]
    readers = [threading.Thread(target=lambda proc=proc, lines=lines: lines.extend(proc.stderr),
                                daemon=True) for proc, lines in zip(procs, errors, strict=True)]
    for reader in readers:
        reader.start()
    while sum(any("waiting for pid" in line and "vqvae" in line for line in lines)
              for lines in errors) < 3:
        assert all(proc.poll() is None for proc in procs), errors
        time.sleep(0.01)
    http_server.release.set()
    outputs = []
    for proc, reader, lines in zip(procs, readers, errors, strict=True):
        out = proc.stdout.read()
        proc.wait(timeout=120)
        reader.join()
        outputs.append((out, "".join(lines)))
    assert [proc.returncode for proc in procs] == [0] * 4, [err for _out, err in outputs]
    reports = [json.loads(out) for out, _err in outputs]
    files = {tuple((f["name"], f["path"], f["bytes"], f["sha256"]) for f in r) for r in reports}
    assert len(files) == 1  # the same paths, sizes and hashes for all four
    for index, rel in enumerate(bundle):
        assert Path(reports[0][index]["path"]).read_bytes() == jukebox_files[rel]
        # one process downloaded it, the three others found it in the cache
        assert sorted(r[index]["source"] for r in reports) == ["cache"] * 3 + ["url"]
    stderr = "".join(err for _out, err in outputs)
    for rel in bundle:
        blob_hits = http_server.hits(f"/blob/jukebox/models/{rel}")
        assert [h.range for h in blob_hits].count("bytes=0-0") == 1  # one probe
        assert len(blob_hits) == 2 and blob_hits[1].status == 206  # and one body
        assert http_server.bytes_sent(f"/blob/jukebox/models/{rel}") \
            == len(jukebox_files[rel]) + 1
        assert len(http_server.hits(f"/cdn/jukebox/models/{rel}")) == 1  # one chain walked
        assert stderr.count(f"jukebox/{rel}: verified from url:") == 1
    assert "waiting for pid" in stderr  # they did run at the same time
    assert not list(Path(os.environ["CKPTKIT_CACHE"]).rglob("*.part"))
    figures.count("concurrent-fetches", 4)


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


# --- one file, several sources, one network fault each ------------------------------------------

FAULTY = "faults/model.bin"
SIZE = 96 << 10


def blob(seed: int = 0, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def flipped(data: bytes, offset: int) -> bytes:
    bad = bytearray(data)
    bad[offset] ^= 0xFF
    return bytes(bad)


def fault_catalogue(path: Path, urls: list[str], sha256: str | None) -> Path:
    """A catalogue whose model ``faulty`` is one file with ``urls`` as its sources, in order."""
    sources = ", ".join(f'{{ type = "url", url = "{url}" }}' for url in urls)
    pin = f'sha256 = "{sha256}"\n' if sha256 else ""
    path.write_text(f'schema = 1\n\n[files."{FAULTY}"]\n{pin}sources = [{sources}]\n\n'
                    f'[models.faulty]\nfiles = ["{FAULTY}"]\n')
    return path


def dead_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/model.bin"


@dataclass(frozen=True)
class Bad:
    """How a source misbehaves every time, and what its failed attempt must say."""

    says: str
    exit_code: ExitCode
    faults: tuple[Fault, ...] = ()
    route: tuple[tuple[str, object], ...] = ()
    seed: int = 0          # which bytes it serves: 0 is the right file
    size: int = SIZE       # how many of them
    loop: bool = False     # it redirects in a loop
    dead: bool = False     # nothing listens

    def serve(self, server: HTTPTestServer) -> str:
        """Set the fault up on ``server``; the URL of the faulty source."""
        if self.dead:
            return dead_url()
        if self.loop:
            server.redirect("/a/loop1", "/a/loop2")
            server.redirect("/a/loop2", "/a/loop1")
            return server.url("/a/loop1")
        server.add("/a/model.bin", blob(self.seed, self.size), **dict(self.route),
                   faults=copy.deepcopy(list(self.faults)))
        return server.url("/a/model.bin")


PERSISTENT = [
    pytest.param(Bad("connection broke mid-body (after 5 attempts)", ExitCode.INTEGRITY,
                     (Fault("drop", after=0, times=None, only="data"),)), id="reset-mid-body"),
    pytest.param(Bad("timed out after 0.25 s (after 5 attempts)", ExitCode.NOT_FOUND,
                     (Fault("stall", after=0, seconds=3, times=None, only="data"),)),
                 id="stall-past-timeout"),
    pytest.param(Bad("HTTP 404 (not found)", ExitCode.NOT_FOUND,
                     (Fault("status", status=404, times=None),)), id="404"),
    pytest.param(Bad("HTTP 403 (access refused)", ExitCode.NOT_FOUND,
                     (Fault("status", status=403, times=None),)), id="403"),
    pytest.param(Bad("HTTP 500 (after 5 attempts)", ExitCode.NOT_FOUND,
                     (Fault("status", status=500, times=None),)), id="500"),
    pytest.param(Bad("HTTP 503 (after 5 attempts)", ExitCode.NOT_FOUND,
                     (Fault("status", status=503, retry_after="1", times=None),)),
                 id="503-retry-after"),
    pytest.param(Bad(f"wrong Content-Length ({SIZE + 100:,} for {SIZE:,} bytes) "
                     "(after 5 attempts)", ExitCode.INTEGRITY,
                     (Fault("length", delta=100, times=None, only="data"),)),
                 id="content-length-too-long"),
    pytest.param(Bad(f"wrong Content-Length ({SIZE - 100:,} for {SIZE:,} bytes) "
                     "(after 5 attempts)", ExitCode.INTEGRITY,
                     (Fault("length", delta=-100, times=None, only="data"),)),
                 id="content-length-too-short"),
    pytest.param(Bad(f"sha256 {hashlib.sha256(flipped(blob(), 4321)).hexdigest()[:12]}… "
                     f"differs from {hashlib.sha256(blob()).hexdigest()[:12]}…",
                     ExitCode.INTEGRITY, (Fault("flip", offset=4321, times=None),)),
                 id="byte-changed-in-transit"),
    pytest.param(Bad("an HTML page instead of the file", ExitCode.NOT_FOUND,
                     (Fault("html", times=None),)), id="html-page-with-200"),
    pytest.param(Bad("redirect loop (over 10 redirects)", ExitCode.NOT_FOUND, loop=True),
                 id="redirect-loop"),
    pytest.param(Bad(f"sha256 {hashlib.sha256(blob(9)).hexdigest()[:12]}… differs from "
                     f"{hashlib.sha256(blob()).hexdigest()[:12]}…", ExitCode.INTEGRITY,
                     seed=9), id="other-file-same-size"),
    pytest.param(Bad("connection refused (after 5 attempts)", ExitCode.NOT_FOUND, dead=True),
                 id="nothing-listening"),
]


@pytest.fixture
def quick_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeout (CKPTKIT_TIMEOUT) and near-zero backoff, so a faulty source fails fast."""
    from ckptkit.hub.download import download

    monkeypatch.setenv("CKPTKIT_TIMEOUT", "0.25")
    for name, value in {"BACKOFF_BASE": 0.001, "BACKOFF_CAP": 0.01,
                        "RETRY_AFTER_CAP": 0.05}.items():
        monkeypatch.setattr(download, name, value)


@pytest.mark.parametrize("value, seconds", [(None, 30.0), ("0.25", 0.25), ("90", 90.0),
                                            ("0", None), ("-1", None), ("soon", None),
                                            ("inf", None), ("nan", None)])
def test_ckptkit_timeout_is_read_once_and_checked(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str],
                                                  value: str | None,
                                                  seconds: float | None) -> None:
    if value is not None:
        monkeypatch.setenv("CKPTKIT_TIMEOUT", value)
    if seconds is not None:
        assert config.settings().timeout == seconds
        return
    code, _out, err = run_main(capsys, "fetch", "jukebox-5b", "--dry-run")
    assert code == ExitCode.USAGE and err.count("\n") == 1
    assert f"CKPTKIT_TIMEOUT={value!r} is not a number of seconds above 0" in err


def nothing_under_final_names(file_id: str, dest: Path | None = None) -> None:
    """No cache entry, no file at the cache's or the staging's final name, none in --dest."""
    cache = Cache(Path(os.environ["CKPTKIT_CACHE"]))
    assert cache.entry(file_id) is None
    assert not cache.path(file_id).exists()
    assert not (cache.root / "staging" / file_id).exists()
    if dest is not None:
        assert not dest.exists() or list(dest.iterdir()) == []


@pytest.mark.parametrize("bad", PERSISTENT)
def test_a_faulty_first_source_is_left_for_the_next(bad: Bad, http_server: HTTPTestServer,
                                                    quick_network: None, tmp_path: Path) -> None:
    good = blob()
    http_server.add("/b/model.bin", good)
    first = bad.serve(http_server)
    catalogue = fault_catalogue(tmp_path / "faults.toml", [first, http_server.url("/b/model.bin")],
                                hashlib.sha256(good).hexdigest())
    logged: list[str] = []
    [fetched] = plan_fetch(["faulty"], config.settings(catalogs=(catalogue,))).execute(
        log=logged.append)
    assert fetched.source == "url" and fetched.sha256 == hashlib.sha256(good).hexdigest()
    assert Path(fetched.path).read_bytes() == good and fetched.bytes == len(good)
    failed = [m for m in logged if m.startswith(f"{FAULTY}: url:{first} failed: ")]
    assert failed == [f"{FAULTY}: url:{first} failed: {bad.says}"], logged
    assert logged[-1] == f"{FAULTY}: verified from url:{http_server.url('/b/model.bin')}"
    assert bad.dead or http_server.hits("/a/loop1" if bad.loop else "/a/model.bin")
    figures.count("network-faults")


@pytest.mark.parametrize("bad", PERSISTENT)
def test_the_only_source_failing_is_one_line_and_leaves_nothing(
        bad: Bad, http_server: HTTPTestServer, quick_network: None, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = bad.serve(http_server)
    catalogue = fault_catalogue(tmp_path / "faults.toml", [url],
                                hashlib.sha256(blob()).hexdigest())
    dest = tmp_path / "dest"
    code, out, err = run_main(capsys, "fetch", "faulty", "--catalog", str(catalogue),
                              "--dest", str(dest), "--quiet")
    assert code == bad.exit_code and out == ""
    attempt, final = err.splitlines()  # --quiet: the attempt is printed with the error
    assert attempt == f"ckpt: {FAULTY}: url:{url} failed: {bad.says}"
    assert final.startswith(f"ckpt: error: could not fetch {FAULTY}: every source failed "
                            "(1 attempt). ") and "--mirror" in final  # the next step
    assert "Traceback" not in err
    nothing_under_final_names(FAULTY, dest)
    figures.count("network-faults")


@pytest.mark.parametrize("faults, route", [
    pytest.param((Fault("drop", after=10_000, only="data"),), (), id="reset-mid-body-once"),
    pytest.param((Fault("stall", after=10_000, seconds=3, only="data"),), (),
                 id="stall-past-timeout-once"),
    pytest.param((Fault("status", status=503, retry_after="1"),), (), id="503-retry-after-once"),
    pytest.param((Fault("status", status=500), Fault("status", status=502, only="data")), (),
                 id="500-then-502"),
    pytest.param((Fault("length", delta=100, only="data"),), (),
                 id="content-length-wrong-once"),
    pytest.param((), (("ranges", False),), id="range-ignored"),
    pytest.param((Fault("drop", after=10_000),), (("ranges", False),),
                 id="range-ignored-and-reset"),
])
def test_a_fault_the_engine_survives_does_not_move_on(
        faults: tuple[Fault, ...], route: tuple[tuple[str, object], ...],
        http_server: HTTPTestServer, quick_network: None, tmp_path: Path) -> None:
    good = blob()
    http_server.add("/a/model.bin", good, **dict(route), faults=copy.deepcopy(list(faults)))
    http_server.add("/b/model.bin", good)
    catalogue = fault_catalogue(tmp_path / "faults.toml",
                                [http_server.url("/a/model.bin"), http_server.url("/b/model.bin")],
                                hashlib.sha256(good).hexdigest())
    logged: list[str] = []
    [fetched] = plan_fetch(["faulty"], config.settings(catalogs=(catalogue,))).execute(
        log=logged.append)
    assert Path(fetched.path).read_bytes() == good
    assert fetched.sha256 == hashlib.sha256(good).hexdigest()
    assert logged == [f"{FAULTY}: verified from url:{http_server.url('/a/model.bin')}"]
    assert http_server.hits("/b/model.bin") == []
    served = http_server.hits("/a/model.bin")
    assert any(hit.faults for hit in served) or not faults  # the fault did happen
    assert {hit.status for hit in served} <= ({200} if route else {206, 500, 502, 503})
    figures.count("network-faults")


def test_a_source_serving_another_file_of_the_pinned_size_is_refused(
        http_server: HTTPTestServer, quick_network: None, tmp_path: Path) -> None:
    """No sha256 in the catalogue: the pin of the first download is what refuses it."""
    good, other = blob(), blob(9)
    http_server.add("/a/model.bin", other)
    http_server.add("/b/model.bin", good)
    catalogue = fault_catalogue(tmp_path / "faults.toml", [http_server.url("/a/model.bin"),
                                                           http_server.url("/b/model.bin")], None)
    settings = config.settings(catalogs=(catalogue,))
    Pins(settings.pins_path).record(FAULTY, hashlib.sha256(good).hexdigest(), len(good),
                                    "url:first download")
    logged: list[str] = []
    [fetched] = plan_fetch(["faulty"], settings).execute(log=logged.append)
    assert Path(fetched.path).read_bytes() == good
    first = http_server.url("/a/model.bin")
    assert len(logged) == 2 and logged[0] == (
        f"{FAULTY}: url:{first} failed: sha256 {hashlib.sha256(other).hexdigest()[:12]}… "
        f"differs from {hashlib.sha256(good).hexdigest()[:12]}…"), logged
    staged = Cache(settings.cache_dir).root / "staging" / FAULTY
    assert not staged.exists() and not Path(f"{staged}.part").exists()  # refused bytes are gone
    figures.count("network-faults")


# --- limits: a source that would hang, fill the disk or pin garbage is left for the next -------

@pytest.fixture
def tight_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB ceiling, 1000 B/s over 0.3 s, headers within 0.5 s (CKPTKIT_* settings)."""
    for name, value in {"CKPTKIT_MAX_DOWNLOAD": "1M", "CKPTKIT_LOW_SPEED_LIMIT": "1000",
                        "CKPTKIT_LOW_SPEED_TIME": "0.3", "CKPTKIT_HEADER_TIMEOUT": "0.5"}.items():
        monkeypatch.setenv(name, value)


LIMITED = [
    pytest.param(Bad("too large (over 1,048,576 bytes)", ExitCode.NOT_FOUND,
                     (Fault("chunked", after=0, times=None),), (("ranges", False),)),
                 id="endless-chunked-body"),
    pytest.param(Bad("too large (over 1,048,576 bytes)", ExitCode.NOT_FOUND, size=2 << 20),
                 id="announced-over-the-ceiling"),
    pytest.param(Bad("stalled (below 1,000 B/s for 0.3 s)", ExitCode.NOT_FOUND,
                     (Fault("drip", after=1000, seconds=0.02, times=None, only="data"),)),
                 id="body-a-byte-every-20-ms"),
    pytest.param(Bad("no complete headers within 0.5 s", ExitCode.NOT_FOUND,
                     (Fault("drip-headers", after=4000, seconds=0.02, times=None),)),
                 id="headers-a-byte-every-20-ms"),
]


@pytest.mark.parametrize("bad", LIMITED)
def test_a_source_past_a_limit_is_left_for_the_next_and_leaves_nothing(
        bad: Bad, http_server: HTTPTestServer, tight_limits: None, tmp_path: Path) -> None:
    good = blob()
    http_server.add("/b/model.bin", good)
    first = bad.serve(http_server)
    catalogue = fault_catalogue(tmp_path / "faults.toml", [first, http_server.url("/b/model.bin")],
                                hashlib.sha256(good).hexdigest())
    settings = config.settings(catalogs=(catalogue,))
    staged = Cache(settings.cache_dir).root / "staging" / FAULTY
    seen: list[str] = []

    def log(message: str) -> None:
        seen.append(message)
        if "failed" in message:  # right after the first source
            left = sorted(p.name for p in staged.parent.glob("model.bin*"))
            # Bytes past the ceiling are deleted; a stalled download may be resumed.
            assert left == (["model.bin.part", "model.bin.part.json"] if "stalled" in message
                            else []), left

    [fetched] = plan_fetch(["faulty"], settings).execute(log=log)
    assert Path(fetched.path).read_bytes() == good
    assert seen == [f"{FAULTY}: url:{first} failed: {bad.says}",
                    f"{FAULTY}: verified from url:{http_server.url('/b/model.bin')}"]
    assert len(http_server.hits("/a/model.bin")) <= 2  # given up at once: no retries
    figures.count("network-faults")


def unsized_catalogue(tmp_path: Path, url: str) -> Path:
    """A catalogue giving neither size nor hash for FAULTY: the first download is a pin."""
    return fault_catalogue(tmp_path / "unsized.toml", [url], None)


def test_a_first_download_without_a_stated_size_is_not_pinned(
        http_server: HTTPTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = blob()
    http_server.add("/a/model.bin", good, ranges=False, faults=[Fault("chunked", after=1)])
    catalogue = unsized_catalogue(tmp_path, http_server.url("/a/model.bin"))
    code, out, err = run_main(capsys, "fetch", "faulty", "--catalog", str(catalogue))
    assert code == 0 and Path(out.strip()).read_bytes() == good  # fetched and cached
    assert f"ckpt: {FAULTY}: not pinned: " in err and "--pin-unsized" in err
    pins = Pins(config.settings().pins_path)
    assert pins.get(FAULTY) is None  # a later fetch is not held to these bytes

    assert run_ckpt("cache", "rm", FAULTY, "--yes", "--catalog", str(catalogue)).returncode == 0
    http_server.add("/a/model.bin", good, ranges=False, faults=[Fault("chunked", after=1)])
    code, _out, err = run_main(capsys, "fetch", "faulty", "--catalog", str(catalogue),
                               "--pin-unsized")
    pin = pins.get(FAULTY)
    assert code == 0 and "not pinned" not in err
    assert pin is not None and pin.sha256 == hashlib.sha256(good).hexdigest()


def test_a_first_download_with_a_content_length_is_pinned(http_server: HTTPTestServer,
                                                          tmp_path: Path) -> None:
    good = blob()
    http_server.add("/a/model.bin", good, ranges=False)
    settings = config.settings(catalogs=(unsized_catalogue(tmp_path,
                                                           http_server.url("/a/model.bin")),))
    logged: list[str] = []
    plan_fetch(["faulty"], settings).execute(log=logged.append)
    assert not any("not pinned" in m for m in logged)
    assert Pins(settings.pins_path).get(FAULTY).size == len(good)


@pytest.mark.parametrize("env, flag, pinned", [({}, (), False),
                                               ({"CKPTKIT_PIN_UNSIZED": "1"}, (), True),
                                               ({}, ("--pin-unsized",), True)])
def test_pin_unsized_comes_from_the_flag_or_the_environment(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], flag: tuple[str, ...],
        pinned: bool) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert config.settings(pin_unsized=True if flag else None).pin_unsized is pinned


# --- what a failed source says ------------------------------------------------------------------

WORDS = [
    pytest.param("refused", "connection refused (after 5 attempts)", id="closed-port"),
    pytest.param("unresolvable", "host not found (after 5 attempts)", id="unresolvable-host"),
    pytest.param("silent", "timed out after 0.25 s (after 5 attempts)", id="no-answer"),
    pytest.param("404", "HTTP 404 (not found)", id="404"),
    pytest.param("drip", "stalled (below 1,000 B/s for 0.3 s)", id="stalled"),
    pytest.param("huge", "too large (over 1,048,576 bytes)", id="too-large"),
]


@pytest.mark.parametrize("case, words", WORDS)
def test_each_failure_reads_as_words_on_its_own_line(
        case: str, words: str, http_server: HTTPTestServer, quick_network: None,
        tight_limits: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.servers.http import UNRESOLVABLE

    for name in ("NO_PROXY", "no_proxy"):  # reach UNRESOLVABLE's resolver, not the dead proxy
        monkeypatch.setenv(name, "*")
    urls = {"refused": dead_url(), "unresolvable": f"http://{UNRESOLVABLE}/model.bin"}
    faults = {"silent": [Fault("delay", seconds=None, times=None)],
              "404": [Fault("status", status=404, times=None)],
              "drip": [Fault("drip", after=100, seconds=0.02, times=None, only="data")],
              "huge": [Fault("chunked", after=0, times=None)]}
    http_server.add("/w/model.bin", blob(), ranges=case != "huge",
                    faults=faults.get(case, []))
    url = urls.get(case, http_server.url("/w/model.bin"))
    catalogue = fault_catalogue(tmp_path / "one.toml", [url], None)
    result = run_ckpt("fetch", "faulty", "--catalog", str(catalogue),
                      env={"CKPTKIT_TIMEOUT": "0.25"})
    attempt, final = result.stderr.splitlines()
    assert attempt == f"ckpt: {FAULTY}: url:{url} failed: {words}"
    assert final == (f"ckpt: error: could not fetch {FAULTY}: every source failed (1 attempt). "
                     "Check the network or --mirror, or pass --local-dir "
                     "(`ckpt fetch --dry-run` lists the sources)")
    assert result.returncode == ExitCode.NOT_FOUND


def test_the_final_line_of_a_failed_bundle_is_short(http_server: HTTPTestServer) -> None:
    """Five files, three sources each, all failing: one line per attempt, then one short line."""
    from tests.servers.http import UNRESOLVABLE

    mirror = f"{AZURE}=http://{UNRESOLVABLE},{BLOB}={http_server.url('/none')}"
    result = run_ckpt("fetch", "jukebox-1b_lyrics", "jukebox-5b", "--mirror", mirror,
                      env={"NO_PROXY": "*", "no_proxy": "*", "HOME": os.environ["CKPTKIT_CACHE"]})
    *attempts, final = result.stderr.splitlines()
    assert result.returncode == ExitCode.NOT_FOUND and len(attempts) == 15
    assert sum(a.endswith("failed: host not found (after 5 attempts)") for a in attempts) == 5
    assert sum(a.endswith("failed: HTTP 404 (not found)") for a in attempts) == 5
    assert sum(a.endswith("failed: not on disk") for a in attempts) == 5
    assert all(len(a) < 300 and "Error(" not in a for a in attempts)  # no raw reprs
    assert final.startswith("ckpt: error: could not fetch jukebox/") and len(final) <= 200
    assert "and 4 more files: every source failed (15 attempts)" in final
