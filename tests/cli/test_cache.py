"""`ckpt list` and `ckpt cache ls|verify|rm|prune` on a real cache filled by `ckpt fetch`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckptkit import config
from ckptkit.hub.fetch import plan_fetch
from tests.conftest import SRC, run_ckpt
from tests.servers.http import HTTPTestServer, http_server  # noqa: F401 (fixture)

SAMPLES = SRC / "ckptkit" / "samples"
BLOB = "https://openaipublic.blob.core.windows.net"
AZURE = "https://openaipublic.azureedge.net"


@pytest.fixture
def filled(http_server: HTTPTestServer) -> dict[str, str]:
    """jukebox-1b_lyrics fetched from a local mirror; returns the env for CLI runs."""
    for name in ("vqvae", "prior_level_0", "prior_level_1"):
        http_server.add(f"/jukebox/models/5b/{name}.pth.tar",
                        (SAMPLES / "jukebox" / f"{name}.pth.tar").read_bytes())
    http_server.add("/jukebox/models/1b_lyrics/prior_level_2.pth.tar",
                    (SAMPLES / "prior_level_2.pth.tar").read_bytes())
    mirror = f"{AZURE}={http_server.url('')},{BLOB}={http_server.url('')}"
    plan_fetch(["jukebox-1b_lyrics"], config.settings(mirror=mirror)).execute()
    return {"CKPTKIT_CACHE": os.environ["CKPTKIT_CACHE"],
            "CKPTKIT_CONFIG": os.environ["CKPTKIT_CONFIG"], "CKPTKIT_MIRROR": mirror}


def cache_root() -> Path:
    return Path(os.environ["CKPTKIT_CACHE"])


def test_list_shows_cached_state(filled: dict[str, str]) -> None:
    rows = {r["name"]: r for r in json.loads(run_ckpt("list", "--json", env=filled).stdout)}
    assert rows["jukebox-1b_lyrics"]["cached_files"] == 4
    assert rows["jukebox-5b"]["cached_files"] == 3  # the shared files count for both
    assert rows["jukebox-1b_lyrics"]["size"] == sum(
        p.stat().st_size for p in (cache_root() / "files" / "jukebox").rglob("*.pth.tar"))
    text = run_ckpt("list", env=filled).stdout
    assert "loftr-outdoor (loftr)" in text and "3/4" in text


def test_ls_lists_every_file_with_the_models_using_it(filled: dict[str, str]) -> None:
    entries = json.loads(run_ckpt("cache", "ls", "--json", env=filled).stdout)
    assert len(entries) == 4
    shared = next(e for e in entries if e["name"] == "jukebox/5b/vqvae.pth.tar")
    assert set(shared["models"]) == {"jukebox-5b", "jukebox-5b_lyrics", "jukebox-1b_lyrics"}
    assert "4 file(s)" in run_ckpt("cache", "ls", env=filled).stdout


def test_verify_catches_a_file_changed_on_disk(filled: dict[str, str]) -> None:
    assert run_ckpt("cache", "verify", env=filled).returncode == 0
    victim = cache_root() / "files" / "jukebox" / "5b" / "prior_level_0.pth.tar"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = run_ckpt("cache", "verify", "--json", env=filled)
    assert result.returncode == 3
    status = {r["name"]: r["status"] for r in json.loads(result.stdout)}
    assert status["jukebox/5b/prior_level_0.pth.tar"] == "CHANGED"
    assert list(status.values()).count("ok") == 3


def test_rm_keeps_files_another_cached_bundle_needs(filled: dict[str, str],
                                                    http_server: HTTPTestServer) -> None:
    http_server.add("/jukebox/models/5b/prior_level_2.pth.tar",
                    (SAMPLES / "thinker_step_200.pt").read_bytes())
    plan_fetch(["jukebox-5b"], config.settings(mirror=filled["CKPTKIT_MIRROR"])).execute()
    dry = run_ckpt("cache", "rm", "jukebox-1b_lyrics", "--dry-run", env=filled)
    assert dry.returncode == 0 and "still used by jukebox-5b" in dry.stdout
    assert (cache_root() / "files" / "jukebox" / "1b_lyrics").exists()  # dry run kept it
    refused = run_ckpt("cache", "rm", "jukebox-1b_lyrics", env=filled)  # no TTY, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = run_ckpt("cache", "rm", "jukebox-1b_lyrics", "--yes", env=filled)
    assert done.returncode == 0, done.stderr
    left = {e["name"] for e in json.loads(run_ckpt("cache", "ls", "--json", env=filled).stdout)}
    assert left == {"jukebox/5b/vqvae.pth.tar", "jukebox/5b/prior_level_0.pth.tar",
                    "jukebox/5b/prior_level_1.pth.tar", "jukebox/5b/prior_level_2.pth.tar"}


def test_prune_removes_leftovers_and_unknown_files(filled: dict[str, str]) -> None:
    partial = cache_root() / "staging" / "jukebox" / "5b" / "prior_level_2.pth.tar.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"x" * 1000)
    orphan = cache_root() / "files" / "old" / "weights.bin"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"y" * 10)
    plan = run_ckpt("cache", "prune", "--unreferenced", "--dry-run", env=filled)
    assert str(partial) in plan.stdout and str(orphan) in plan.stdout and partial.exists()
    done = run_ckpt("cache", "prune", "--unreferenced", "--yes", env=filled)
    assert done.returncode == 0 and not partial.exists() and not orphan.exists()
    assert len(json.loads(run_ckpt("cache", "ls", "--json", env=filled).stdout)) == 4
    assert "nothing to delete" in run_ckpt("cache", "prune", "--yes", env=filled).stdout


def test_prune_leaves_a_download_in_progress_alone(filled: dict[str, str]) -> None:
    from ckptkit.storage.locks import FileLock

    partial = cache_root() / "staging" / "jukebox" / "5b" / "prior_level_2.pth.tar.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"x" * 1000)
    with FileLock(partial.with_name("prior_level_2.pth.tar.lock"), purpose="downloading"):
        result = run_ckpt("cache", "prune", "--yes", env=filled)
        assert result.returncode == 0 and partial.exists()
    run_ckpt("cache", "prune", "--yes", env=filled)
    assert not partial.exists()


def test_prune_keeps_files_of_other_catalogues_unless_asked(filled: dict[str, str],
                                                           tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('[files."mine/w.pt"]\nsources = [{ type = "local", path = "%s" }]\n'
                    '[models.mine]\nfiles = ["mine/w.pt"]\n'
                    % (SAMPLES / "thinker_step_200.pt"))
    assert run_ckpt("fetch", "mine", "--catalog", str(mine), env=filled).returncode == 0
    assert "nothing to delete" in run_ckpt("cache", "prune", "--yes", env=filled).stdout
    assert "mine/w.pt" in run_ckpt("cache", "prune", "--unreferenced", "--dry-run",
                                   env=filled).stdout


def test_a_changed_or_missing_cached_file_is_never_handed_out(filled: dict[str, str]) -> None:
    victim = cache_root() / "files" / "jukebox" / "5b" / "prior_level_0.pth.tar"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    (cache_root() / "files" / "jukebox" / "5b" / "vqvae.pth.tar").unlink()
    result = run_ckpt("cache", "verify", env=filled)
    assert result.returncode == 3
    assert "MISSING    jukebox/5b/vqvae.pth.tar" in result.stdout
    assert "CHANGED    jukebox/5b/prior_level_0.pth.tar" in result.stdout
    plan = json.loads(run_ckpt("fetch", "jukebox-1b_lyrics", "--dry-run", "--json",
                               env=filled).stdout)
    assert [f["cached"] for f in plan["files"]] == [False, False, True, True]
    fetched = run_ckpt("fetch", "jukebox-1b_lyrics", env=filled)
    assert fetched.returncode == 0, fetched.stderr
    assert run_ckpt("cache", "verify", env=filled).returncode == 0


def test_prune_keeps_committed_files_whatever_their_ids_look_like(tmp_path: Path) -> None:
    """Partial, staging and lock files are told by where they lie, never by how an id ends."""
    ids = ["odd/weights.part", "odd/state.part.json", "odd/run.lock", "tmp/w.pt"]
    catalogue = tmp_path / "odd.toml"
    catalogue.write_text("".join(f'[files."{i}"]\nsources = [{{ type = "local", path = '
                                 f'"{SAMPLES / "thinker_step_200.pt"}" }}]\n' for i in ids)
                         + f"[models.odd]\nfiles = {json.dumps(ids)}\n")
    args = ("--catalog", str(catalogue))
    assert run_ckpt("fetch", "odd", *args).returncode == 0
    leftover = cache_root() / "staging" / "odd" / "weights.part.part"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"x" * 10)
    pruned = run_ckpt("cache", "prune", "--yes", "--json", *args)
    assert pruned.returncode == 0, pruned.stderr
    assert [d["path"] for d in json.loads(pruned.stdout)["deleted"]] == [str(leftover)]
    listed = json.loads(run_ckpt("cache", "ls", "--json", *args).stdout)
    assert sorted(e["name"] for e in listed) == sorted(ids)
    assert run_ckpt("cache", "verify", *args).returncode == 0


def test_prune_deletes_nothing_when_a_leftover_changed_after_the_plan(tmp_path: Path) -> None:
    from ckptkit.hub.cache import Cache, plan_prune
    from ckptkit.errors import DeletionStoppedError

    cache = Cache(cache_root())
    old = cache_root() / "staging" / "a.bin.part"
    other = cache_root() / "tmp" / "extract-1"
    for path in (old, other / "x"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
    plan = plan_prune(cache, None)
    assert sorted(r.path for r in plan.remove) == sorted([str(old), str(other)])
    with open(old, "ab") as fh:  # a download resumed into it meanwhile
        fh.write(b"more")
    with pytest.raises(DeletionStoppedError, match=r"nothing deleted: .*a\.bin\.part changed "
                                                   r"since the plan was made: size 10 -> 14"):
        plan.execute(cache)
    assert old.exists() and (other / "x").exists()
