"""`ckpt fetch` of hub-hosted models (TF Hub → Kaggle fallback), interop, and resume after kill."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import ckptkit
from ckptkit.storage import archives
from ckptkit import config
from ckptkit.hub.fetch import FetchPlan, plan_fetch
from ckptkit.hub.sources.tfhub import module_key
from tests import figures
from tests.conftest import SRC, run_ckpt
from tests.servers.http import Fault, HTTPTestServer
from tests.hub.sources.hubs import (HANDLE, KAGGLE_HANDLE, SAMPLE_INPUT, SAMPLE_SCORE, KaggleStub,
                                TFHubStub, tfhub_archive, tree_files)

SAMPLES = SRC / "ckptkit" / "samples"
GCS = "https://storage.googleapis.com"


@pytest.fixture
def hubs(saved_model: Path, http_server: HTTPTestServer):
    """TF Hub and Kaggle stand-ins holding the same SavedModel; GCS serving the MUSIQ npz."""
    tfhub, kaggle = TFHubStub(), KaggleStub()
    tfhub.add("/google/musiq/spaq/1", tfhub_archive(saved_model))
    kaggle.add_model(KAGGLE_HANDLE, tree_files(saved_model))
    http_server.add("/gresearch/musiq/spaq_ckpt.npz", (SAMPLES / "spaq_ckpt.npz").read_bytes())
    with tfhub, kaggle:
        yield tfhub, kaggle, http_server


def env_for(**rules: str) -> dict[str, str]:
    return {"CKPTKIT_CACHE": os.environ["CKPTKIT_CACHE"],
            "CKPTKIT_CONFIG": os.environ["CKPTKIT_CONFIG"],
            "TFHUB_CACHE_DIR": os.environ["TFHUB_CACHE_DIR"],
            "KAGGLEHUB_CACHE": os.environ["KAGGLEHUB_CACHE"],
            "CKPTKIT_MIRROR": ",".join(f"{k}={v}" for k, v in rules.items())}


def test_musiq_spaq_from_tf_hub_then_hub_load_works_offline(hubs, tmp_path: Path) -> None:
    tfhub, _kaggle, gcs = hubs
    env = env_for(**{"https://tfhub.dev": tfhub.base, GCS: gcs.url("")})
    result = run_ckpt("fetch", "musiq-spaq", "--json", env=env)
    assert result.returncode == 0, result.stderr
    saved, npz = json.loads(result.stdout)
    assert saved["source"] == "tfhub" and npz["source"] == "url"
    assert ckptkit.inspect(saved["path"]).format == "savedmodel"
    assert ckptkit.inspect(npz["path"]).format == "npz"
    tfhub.stop()
    gcs.stop()
    code = ("import sys, tensorflow as tf, tensorflow_hub as hub\n"
            f"model = hub.load({HANDLE!r})\n"
            f"out = model.signatures['serving_default'](x=tf.constant({SAMPLE_INPUT!r}))\n"
            "print(float(list(out.values())[0].numpy().ravel()[0]))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "TFHUB_CACHE_DIR": env["TFHUB_CACHE_DIR"],
                                 "HTTPS_PROXY": "http://127.0.0.1:9",
                                 "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert float(loaded.stdout.strip().splitlines()[-1]) == pytest.approx(SAMPLE_SCORE)


def test_tf_hub_down_falls_back_to_kaggle(hubs, kaggle_env: Path) -> None:
    tfhub, kaggle, gcs = hubs
    tfhub.stop()  # refused connections: TF Hub is down
    settings = config.settings(mirror=f"https://tfhub.dev={tfhub.base},"
                                      f"https://api.kaggle.com={kaggle.base},{GCS}={gcs.url('')}")
    logged: list[str] = []
    saved, npz = plan_fetch(["musiq-spaq"], settings).execute(log=logged.append)
    assert saved.source == "kaggle" and npz.source == "url"
    assert any("tfhub:https://tfhub.dev/google/musiq/spaq/1 failed" in m for m in logged)
    assert ckptkit.inspect(saved.path).signatures[0].key == "serving_default"
    figures.count("network-faults")


def hostile_archive(model_dir: Path, member: tarfile.TarInfo) -> bytes:
    """The real SavedModel as TF Hub serves it, plus ``member``: a tar.gz."""
    if member.size > archives.BOMB_FLOOR:  # a header past the default cap; the bytes never come
        return gzip.compress(member.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096)
    payload = b"pwned\n" * (member.size // 6)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(model_dir, arcname=".")
        tar.addfile(member, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("name, kind, link, size", [
    pytest.param("../../escape.txt", tarfile.REGTYPE, "", 6, id="traversal"),
    pytest.param("{outside}/abs.txt", tarfile.REGTYPE, "", 6, id="absolute-path"),
    pytest.param("variables/escape", tarfile.SYMTYPE, "../../../../../outside", 0,
                 id="symlink-out"),
    pytest.param("variables/leak", tarfile.LNKTYPE, "/etc/passwd", 0, id="hardlink-out"),
    pytest.param("dev/sda", tarfile.BLKTYPE, "", 0, id="device"),
    pytest.param("variables/pipe", tarfile.FIFOTYPE, "", 0, id="fifo"),
    pytest.param("variables/huge.data", tarfile.REGTYPE, "", archives.BOMB_FLOOR + 1, id="bomb"),
])
def test_hostile_tf_hub_archive_is_refused_and_kaggle_used(
        name: str, kind: bytes, link: str, size: int, hubs, saved_model: Path, kaggle_env: Path,
        tmp_path: Path) -> None:
    tfhub, kaggle, gcs = hubs
    outside = tmp_path / "outside"
    member = tarfile.TarInfo(name.format(outside=outside))
    member.type, member.linkname, member.size = kind, link, size
    tfhub.add("/google/musiq/spaq/1", hostile_archive(saved_model, member))
    settings = config.settings(mirror=f"https://tfhub.dev={tfhub.base},"
                                      f"https://api.kaggle.com={kaggle.base},{GCS}={gcs.url('')}")
    logged: list[str] = []
    saved, _npz = plan_fetch(["musiq-spaq"], settings).execute(log=logged.append)
    assert saved.source == "kaggle" and ckptkit.inspect(saved.path).format == "savedmodel"
    refusal = [m for m in logged if m.startswith(
        "musiq/spaq/saved_model: tfhub:https://tfhub.dev/google/musiq/spaq/1 failed: ")]
    assert len(refusal) == 1 and f"unsafe member {member.name!r}" in refusal[0], logged
    assert not outside.exists()
    assert [p for p in tmp_path.rglob("*") if p.name in ("escape.txt", "abs.txt")] == []
    cache = Path(os.environ["CKPTKIT_CACHE"])
    assert [p.name for p in cache.rglob("*") if p.name.endswith((".extract", ".tmp", ".partial",
                                                                 ".tar.gz"))
            or not (p.is_file() or p.is_dir())] == []  # no temp tree, archive, link or fifo left
    assert not (Path(os.environ["TFHUB_CACHE_DIR"]) / module_key(HANDLE)).exists()
    figures.count("archive-attacks")


def test_tf_hub_and_kaggle_deliver_the_same_tree(hubs, kaggle_env: Path) -> None:
    tfhub, kaggle, gcs = hubs
    base = {"mirror": f"https://tfhub.dev={tfhub.base},https://api.kaggle.com={kaggle.base},"
                      f"{GCS}={gcs.url('')}"}
    via_tfhub, _npz = plan_fetch(["musiq-spaq"], config.settings(**base)).execute()
    assert via_tfhub.source == "tfhub"
    run = run_ckpt("cache", "rm", "musiq/spaq/saved_model", "--yes",
                   env=env_for())
    assert run.returncode == 0, run.stderr
    via_kaggle, npz = plan_fetch(["musiq-spaq"], config.settings(**base),
                                 source="kaggle").execute()  # the npz is cached already
    assert via_kaggle.source == "kaggle" and npz.source == "cache"
    assert via_kaggle.sha256 == via_tfhub.sha256  # the pin from TF Hub accepts Kaggle's copy


def test_killed_fetch_resumes_and_moves_only_the_missing_bytes(http_server: HTTPTestServer,
                                                               tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    big = tmp_path / "big.pth.tar"
    torch.save({"model": {"w": torch.zeros(12 << 20)}, "step": 1}, big,
               _use_new_zipfile_serialization=False)  # 48 MiB
    size = big.stat().st_size
    path = "/blob/jukebox/models/5b/vqvae.pth.tar"
    route = http_server.add(path, big, rate=8 << 20)  # per connection
    env = env_for(**{"https://openaipublic.azureedge.net": http_server.url("/blob"),
                     "https://openaipublic.blob.core.windows.net": http_server.url("/blob")})
    child = subprocess.Popen(
        [sys.executable, "-m", "ckptkit", "fetch", "jukebox-5b", "--source", "url",
         "--connections", "2"],  # 16 MiB pieces, two at a time
        env={**os.environ, "PYTHONPATH": str(SRC), **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while http_server.bytes_sent(path) < size * 3 // 4:  # two of three pieces are done
        assert time.monotonic() < deadline and child.poll() is None, child.stderr.read()
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    http_server.wait_idle()
    staged = Path(os.environ["CKPTKIT_CACHE"]) / "staging" / "jukebox" / "5b" / "vqvae.pth.tar"
    assert not staged.exists() and staged.with_name(staged.name + ".part").exists()
    assert not (Path(os.environ["CKPTKIT_CACHE"]) / "files" / "jukebox" / "5b").exists()
    before = http_server.bytes_sent(path)
    route.rate = None
    settings = config.settings(mirror=env["CKPTKIT_MIRROR"])
    planned = plan_fetch(["jukebox-5b"], settings, source="url")
    vqvae = next(f for f in planned.files if f.spec.id == "jukebox/5b/vqvae.pth.tar")
    fetched = FetchPlan(planned.models, (vqvae,), settings).execute()[0]
    moved = http_server.bytes_sent(path) - before
    assert fetched.bytes == size and Path(fetched.path).read_bytes() == big.read_bytes()
    assert moved <= size // 2  # only the missing pieces moved again


def test_ctrl_c_stops_a_fetch_at_once_and_the_rerun_resumes(http_server: HTTPTestServer,
                                                            tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    big = tmp_path / "big.pth.tar"
    torch.save({"w": torch.zeros(4 << 20)}, big, _use_new_zipfile_serialization=False)
    path = "/blob/jukebox/models/5b/vqvae.pth.tar"
    # The first piece sends 1 MiB, then nothing until the test releases it: the transfer has
    # surely started when the signal is sent, and cannot finish before it.
    http_server.add(path, big, faults=[Fault("stall", after=1 << 20, seconds=None,
                                             only="data")])
    env = env_for(**{"https://openaipublic.azureedge.net": http_server.url("/blob"),
                     "https://openaipublic.blob.core.windows.net": http_server.url("/blob")})
    child = subprocess.Popen(
        [sys.executable, "-m", "ckptkit", "fetch", "jukebox-5b", "--source", "url"],
        env={**os.environ, "PYTHONPATH": str(SRC), **env,
             "CKPTKIT_TIMEOUT": "600"},  # waiting for the stalled socket would take 10 min
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not http_server.stalled.wait(0.05):
        assert child.poll() is None, child.communicate()[1]
    child.send_signal(signal.SIGINT)
    _out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    stalled, = [hit for hit in http_server.hits(path) if "stall" in hit.faults]
    assert stalled.stalling  # it left while the transfer was held: it did not wait for it
    http_server.release.set()
    settings = config.settings(mirror=env["CKPTKIT_MIRROR"])
    planned = plan_fetch(["jukebox-5b"], settings, source="url")
    vqvae = next(f for f in planned.files if f.spec.id == "jukebox/5b/vqvae.pth.tar")
    fetched = FetchPlan(planned.models, (vqvae,), settings).execute()[0]
    assert Path(fetched.path).read_bytes() == big.read_bytes()
