"""`ckpt mirror export|serve`: a populated cache exported into a static tree, served (or read
through file:// URLs), and fetched from with `--mirror` into an empty cache by the real fetch
code: URL sources, TF Hub's compressed protocol and Kaggle versions (as archives, without
kagglehub)."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkit import config
from ckptkit.hub.download import file_urls
from ckptkit.hub.cache import Cache
from ckptkit.errors import IntegrityError, NotFoundError
from ckptkit.hub.fetch import plan_fetch
from ckptkit.hub.mirror_tree import MANIFEST, pack
from tests.conftest import SRC, run_ckpt, run_ckpt_without

SAMPLES = SRC / "ckptkit" / "samples"
MODELS = ("musiq-spaq", "jukebox-1b_lyrics")  # a SavedModel (TF Hub, Kaggle), npz and legacy
FILES = {"musiq/spaq/saved_model", "musiq/spaq_ckpt.npz", "jukebox/5b/vqvae.pth.tar",
         "jukebox/5b/prior_level_0.pth.tar", "jukebox/5b/prior_level_1.pth.tar",
         "jukebox/1b_lyrics/prior_level_2.pth.tar"}
HUBS = ("kagglehub", "kagglesdk")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The cache of a machine with internet, filled by `ckpt fetch` (the bundled samples in a
    --local-dir stand in for the hubs); returns the cache directory."""
    origin = tmp_path / "origin"
    shutil.copytree(SAMPLES / "musiq_saved_model", origin / "musiq" / "spaq" / "saved_model")
    shutil.copy(SAMPLES / "spaq_ckpt.npz", origin / "musiq" / "spaq_ckpt.npz")
    shutil.copytree(SAMPLES / "jukebox", origin / "jukebox" / "5b")
    (origin / "jukebox" / "1b_lyrics").mkdir()
    shutil.copy(SAMPLES / "prior_level_2.pth.tar", origin / "jukebox" / "1b_lyrics")
    cache = tmp_path / "site-cache"
    conf = config.settings(cache_dir=cache, offline=True, local_dirs=(origin,))
    plan_fetch(list(MODELS), conf).execute()
    return cache


@pytest.fixture
def tree(site: Path, tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    result = run_ckpt("mirror", "export", str(root), *MODELS, "--cache-dir", str(site), "--json")
    assert result.returncode == 0, result.stderr
    return root


def served_value(proc: subprocess.Popen[str]) -> str:
    """The --mirror line `ckpt mirror serve` prints first."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=60), "ckpt mirror serve printed nothing"
    return proc.stdout.readline().strip()


@pytest.fixture
def serving(tree: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen([sys.executable, "-m", "ckptkit", "mirror", "serve", str(tree),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        yield proc, served_value(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def fetch_into_empty_cache(tmp_path: Path, mirror: str, *models: str,
                           blocked: tuple[str, ...] = HUBS) -> subprocess.CompletedProcess[str]:
    """`ckpt fetch` with a fresh cache, config and TF Hub cache, kagglehub unimportable."""
    fresh = tmp_path / "air-gapped"
    return run_ckpt_without(blocked, "fetch", *(models or MODELS), "--mirror", mirror,
                            "--cache-dir", str(fresh / "cache"), cwd=tmp_path)


def assert_same_files(site: Path, cache: Path) -> None:
    want = {e.id: e.sha256 for e in Cache(site).entries()}
    got = {e.id: e.sha256 for e in Cache(cache).entries()}
    assert got == want and set(got) == FILES


def test_export_lays_each_source_out_at_its_url(site: Path, tree: Path) -> None:
    manifest = json.loads((tree / MANIFEST).read_text())
    assert set(manifest["files"]) == FILES
    assert manifest["rules"] == {
        "https://openaipublic.azureedge.net": "openaipublic.azureedge.net",
        "https://openaipublic.blob.core.windows.net": "openaipublic.blob.core.windows.net",
        "https://storage.googleapis.com": "storage.googleapis.com",
        "https://tfhub.dev": "tfhub.dev", "https://www.kaggle.com": "www.kaggle.com"}
    npz = tree / "storage.googleapis.com" / "gresearch" / "musiq" / "spaq_ckpt.npz"
    assert npz.read_bytes() == (SAMPLES / "spaq_ckpt.npz").read_bytes()
    hub = tree / "tfhub.dev" / "google" / "musiq" / "spaq" / "1"
    kaggle = (tree / "www.kaggle.com" / "api" / "v1" / "models" / "google" / "musiq"
              / "tensorFlow2" / "spaq" / "1" / "download")
    assert hub.read_bytes()[:2] == b"\x1f\x8b" and os.path.samefile(hub, kaggle)
    assert not [p for p in tree.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def test_export_again_keeps_what_is_there(site: Path, tree: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*") if p.is_file()}
    again = run_ckpt("mirror", "export", str(tree), *MODELS, "--cache-dir", str(site), "--json")
    report = json.loads(again.stdout)
    assert (report["written"], report["already_there"]) == (0, 6)
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*") if p.is_file()
            and p.name != MANIFEST} == {p: t for p, t in before.items() if p.name != MANIFEST}
    npz = tree / "storage.googleapis.com" / "gresearch" / "musiq" / "spaq_ckpt.npz"
    npz.unlink()
    npz.write_bytes(b"cut short")  # a damaged copy is written again, the rest left alone
    repaired = json.loads(run_ckpt("mirror", "export", str(tree), *MODELS, "--cache-dir",
                                   str(site), "--json").stdout)
    assert (repaired["written"], repaired["already_there"]) == (1, 5)
    assert npz.read_bytes() == (SAMPLES / "spaq_ckpt.npz").read_bytes()


def test_served_tree_fills_an_empty_cache(site: Path, serving: tuple[subprocess.Popen[str], str],
                                          tmp_path: Path) -> None:
    proc, mirror = serving
    assert "https://tfhub.dev=http://127.0.0.1:" in mirror  # --port 0: a free port, named
    fetched = fetch_into_empty_cache(tmp_path, mirror)
    assert fetched.returncode == 0, fetched.stderr
    assert "verified from tfhub:https://tfhub.dev/google/musiq/spaq/1" in fetched.stderr
    assert_same_files(site, tmp_path / "air-gapped" / "cache")
    proc.send_signal(signal.SIGINT)  # Ctrl-C stops it, and that is success
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err.strip().endswith("ckpt: stopped")


def test_kaggle_versions_come_as_archives_without_kagglehub(
        site: Path, tree: Path, serving: tuple[subprocess.Popen[str], str],
        tmp_path: Path) -> None:
    shutil.rmtree(tree / "tfhub.dev")  # TF Hub gone: the SavedModel's next source is Kaggle
    _proc, mirror = serving
    fetched = fetch_into_empty_cache(tmp_path, mirror, "musiq-spaq")
    assert fetched.returncode == 0, fetched.stderr
    assert "tfhub:https://tfhub.dev/google/musiq/spaq/1 failed" in fetched.stderr
    assert "verified from kaggle:google/musiq/tensorFlow2/spaq/1" in fetched.stderr
    fresh = Cache(tmp_path / "air-gapped" / "cache").entry("musiq/spaq/saved_model")
    assert fresh is not None and fresh.sha256 == Cache(site).entry(
        "musiq/spaq/saved_model").sha256  # type: ignore[union-attr]


def test_file_urls_need_no_server(site: Path, tree: Path, tmp_path: Path) -> None:
    value = run_ckpt("mirror", "export", str(tree), "--cache-dir", str(site), "--quiet")
    assert value.returncode == 0 and value.stdout.count("\n") == 1
    assert f"https://tfhub.dev={tree.resolve().as_uri()}/tfhub.dev" in value.stdout
    fetched = fetch_into_empty_cache(tmp_path, value.stdout.strip())
    assert fetched.returncode == 0, fetched.stderr
    assert_same_files(site, tmp_path / "air-gapped" / "cache")
    shutil.rmtree(tree / "tfhub.dev")
    (tmp_path / "again").mkdir()
    again = fetch_into_empty_cache(tmp_path / "again", value.stdout.strip(), "musiq-spaq")
    assert again.returncode == 0, again.stderr
    assert "verified from kaggle:" in again.stderr


def test_export_refuses_what_it_cannot_do(site: Path, tmp_path: Path) -> None:
    missing = run_ckpt("mirror", "export", str(tmp_path / "m"), "loftr", "--cache-dir",
                       str(site))
    assert missing.returncode == 4 and "ckpt fetch loftr-outdoor" in missing.stderr
    assert not (tmp_path / "m").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    busy = run_ckpt("mirror", "export", str(tmp_path / "busy"), "--cache-dir", str(site))
    assert busy.returncode == 2 and "not a mirror tree" in busy.stderr
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    nothing = run_ckpt("mirror", "serve", str(tmp_path / "busy"))
    assert nothing.returncode == 4 and "ckpt mirror export" in nothing.stderr


def test_pack_is_reproducible(tmp_path: Path) -> None:
    pack(SAMPLES / "musiq_saved_model", tmp_path / "a.tar.gz")
    pack(SAMPLES / "musiq_saved_model", tmp_path / "b.tar.gz")
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()


def test_file_url_copies_are_verified_and_atomic(tmp_path: Path) -> None:
    source = tmp_path / "dir with space" / "w.bin"
    source.parent.mkdir()
    source.write_bytes(b"weights" * 100)
    dest = tmp_path / "out" / "w.bin"
    dest.parent.mkdir()
    url = source.as_uri() + "?tf-hub-format=compressed"
    with pytest.raises(IntegrityError):
        file_urls.copy(url, dest, expected_size=None, expected_sha256="0" * 64)
    assert list(dest.parent.iterdir()) == []
    got = file_urls.copy(url, dest, expected_size=700, expected_sha256=None)
    assert dest.read_bytes() == source.read_bytes() and got.size == 700
    with pytest.raises(NotFoundError):
        file_urls.copy(source.with_name("gone.bin").as_uri(), dest, expected_size=None,
                       expected_sha256=None)
