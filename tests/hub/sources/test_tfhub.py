"""TF Hub source: the compressed protocol against a local tfhub.dev stand-in, the
tensorflow_hub cache layout, and ``hub.load`` working offline on what was fetched."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import ckptkit
from ckptkit.errors import IntegrityError, NotFoundError, SourceError, UsageError
from ckptkit.formats import savedmodel
from ckptkit.storage.mirrors import Mirrors
from ckptkit.hub.sources import tfhub
from tests.conftest import SRC
from tests.hub.sources import hubs
from tests.hub.sources.hubs import HANDLE, SAMPLE_INPUT, SAMPLE_SCORE, TFHubStub, tree_files

SPAQ_PATH = "/google/musiq/spaq/1"


@pytest.fixture
def hub(saved_model: Path) -> Iterator[TFHubStub]:
    stub = TFHubStub()
    stub.add(SPAQ_PATH, hubs.tfhub_archive(saved_model))
    with stub:
        yield stub


def mirror(stub: TFHubStub) -> Mirrors:
    return Mirrors.parse(f"https://tfhub.dev={stub.base}")


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep) if folder.exists() else []


def test_fetch_through_mirror_into_dest_and_tfhub_cache(hub: TFHubStub, tmp_path: Path,
                                                        saved_model: Path) -> None:
    cache, dest = tmp_path / "tfhub_modules", tmp_path / "models" / "spaq"
    archive = hub.archives["google_musiq_spaq_1.tar.gz"]

    result = tfhub.fetch(HANDLE, dest, mirrors=mirror(hub), tfhub_cache_dir=cache)

    assert result.path == dest
    assert result.url == f"{hub.base}{SPAQ_PATH}?tf-hub-format=compressed"
    assert result.final_url == f"{hub.base}/archives/google_musiq_spaq_1.tar.gz"
    assert result.archive_size == len(archive)
    assert result.archive_sha256 == hashlib.sha256(archive).hexdigest()
    assert result.transferred == len(archive)
    assert hub.paths("GET")[0] == f"{SPAQ_PATH}?tf-hub-format=compressed"
    assert tree_files(dest) == tree_files(saved_model)
    info = ckptkit.inspect(dest)
    assert info.format == "savedmodel"
    assert "serving_default" in {s.key for s in info.signatures}
    assert leftovers(dest.parent, {"spaq"}) == []  # no archive, .part or staging dir left

    key = hashlib.sha1(HANDLE.encode("utf8")).hexdigest()
    assert result.tfhub_module_dir == cache / key
    assert tree_files(cache / key) == tree_files(dest)
    # Hardlinks: the TF Hub copy costs no space.
    assert (cache / key / "saved_model.pb").stat().st_ino == (dest / "saved_model.pb").stat().st_ino
    descriptor = (cache / f"{key}.descriptor.txt").read_text()
    assert re.fullmatch(r"Module: https://tfhub\.dev/google/musiq/spaq/1\n"
                        r"Download Time: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?\n"
                        r"Downloader Hostname: .+ \(PID:\d+\)", descriptor)
    assert leftovers(cache, {key, f"{key}.descriptor.txt"}) == []


def test_hub_load_works_offline_after_fetch(hub: TFHubStub, tmp_path: Path) -> None:
    pytest.importorskip("tensorflow_hub")
    cache = tmp_path / "tfhub_modules"
    tfhub.fetch(HANDLE, tmp_path / "spaq", mirrors=mirror(hub), tfhub_cache_dir=cache)
    hub.stop()  # the network is gone: hub.load must use the cache

    script = textwrap.dedent(f"""
        import tensorflow as tf, tensorflow_hub as hub
        model = hub.load({HANDLE!r})
        out = model.signatures["serving_default"](x=tf.constant({SAMPLE_INPUT!r}))
        print("SCORE", float(out["score"].numpy()[0][0]))
        print("PATH", hub.resolve({HANDLE!r}))
    """)
    env = {**os.environ, "TFHUB_CACHE_DIR": str(cache), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": str(SRC), "NO_PROXY": "", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}  # any attempt to download fails loudly
    env.pop("TFHUB_MODEL_LOAD_FORMAT", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SCORE {SAMPLE_SCORE}" in proc.stdout
    key = hashlib.sha1(HANDLE.encode("utf8")).hexdigest()
    assert f"PATH {cache / key}" in proc.stdout


def test_existing_identical_cache_entry_is_kept_and_a_broken_one_replaced(
        hub: TFHubStub, tmp_path: Path) -> None:
    cache = tmp_path / "tfhub_modules"
    key = tfhub.module_key(HANDLE)
    broken = cache / key
    (broken / "variables").mkdir(parents=True)  # what an OS temp cleaner leaves behind
    (broken / "variables" / "variables.index").write_bytes(b"")

    tfhub.fetch(HANDLE, tmp_path / "a", mirrors=mirror(hub), tfhub_cache_dir=cache)
    assert savedmodel.sniff(cache / key)
    inode = (cache / key / "saved_model.pb").stat().st_ino

    tfhub.fetch(HANDLE, tmp_path / "b", mirrors=mirror(hub), tfhub_cache_dir=cache)
    assert (cache / key / "saved_model.pb").stat().st_ino == inode
    assert leftovers(cache, {key, f"{key}.descriptor.txt"}) == []


def test_refetch_replaces_dest_and_other_query_params_are_kept(hub: TFHubStub,
                                                               tmp_path: Path) -> None:
    dest = tmp_path / "spaq"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    result = tfhub.fetch(HANDLE + "?lang=en", dest, mirrors=mirror(hub), tfhub_cache_dir=None)
    assert result.url == f"{hub.base}{SPAQ_PATH}?lang=en&tf-hub-format=compressed"
    assert result.tfhub_module_dir is None
    assert not (dest / "stale.txt").exists() and savedmodel.sniff(dest)


def test_unknown_handle_is_not_found(hub: TFHubStub, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        tfhub.fetch("https://tfhub.dev/google/musiq/nope/1", tmp_path / "x",
                    mirrors=mirror(hub), tfhub_cache_dir=tmp_path / "c")
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()


def test_html_page_instead_of_archive_is_a_source_error(hub: TFHubStub, tmp_path: Path) -> None:
    hub.html_instead.add(SPAQ_PATH)
    with pytest.raises(SourceError) as err:
        tfhub.fetch(HANDLE, tmp_path / "x", mirrors=mirror(hub), tfhub_cache_dir=tmp_path / "c")
    assert not isinstance(err.value, NotFoundError)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_archive_is_an_integrity_error_and_leaves_nothing(
        hub: TFHubStub, tmp_path: Path, damage: str) -> None:
    name = "google_musiq_spaq_1.tar.gz"
    good = hub.archives[name]
    if damage == "truncated":
        hub.archives[name] = good[: len(good) // 2]
    else:
        middle = len(good) // 2
        hub.archives[name] = good[:middle] + bytes(b ^ 0x5A for b in good[middle:middle + 64]) \
            + good[middle + 64:]
    dest = tmp_path / "models" / "spaq"
    with pytest.raises(IntegrityError):
        tfhub.fetch(HANDLE, dest, mirrors=mirror(hub), tfhub_cache_dir=tmp_path / "c")
    assert not dest.exists()
    assert leftovers(dest.parent, set()) == []  # archive deleted: the next try starts afresh
    assert not (tmp_path / "c").exists()


def test_archive_without_saved_model_is_an_integrity_error(hub: TFHubStub, tmp_path: Path) -> None:
    hub.add(SPAQ_PATH, hubs.archive_of({"./README.md": b"# not a model\n"}))
    dest = tmp_path / "spaq"
    with pytest.raises(IntegrityError, match="not a SavedModel"):
        tfhub.fetch(HANDLE, dest, mirrors=mirror(hub), tfhub_cache_dir=tmp_path / "c")
    assert not dest.exists() and leftovers(tmp_path, set()) == []


def test_handle_must_be_a_url(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        tfhub.fetch("google/musiq/spaq/1", tmp_path / "x", mirrors=Mirrors(),
                    tfhub_cache_dir=None)


def test_helpers_match_tensorflow_hub() -> None:
    import tempfile

    assert tfhub.default_tfhub_cache_dir() == Path(tempfile.gettempdir()) / "tfhub_modules"
    assert tfhub.module_key(HANDLE) == hashlib.sha1(HANDLE.encode()).hexdigest()
    assert tfhub.compressed_url("http://h/m/1?a=1") == "http://h/m/1?a=1&tf-hub-format=compressed"


def test_module_does_not_import_tensorflow() -> None:
    code = ("import sys\n"
            "import ckptkit.hub.sources.tfhub\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_hub')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
