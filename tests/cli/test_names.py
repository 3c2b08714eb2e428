"""Catalogue names wherever a checkpoint path is accepted: resolved from the cache, offline,
by one resolver (ckptkit.hub.resolver) for inspect, scan, diff, compare, strip and convert."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ckptkit.hub import catalogue
from ckptkit import config
from ckptkit.hub.fetch import plan_fetch
from ckptkit.hub.resolver import choices, lookup
from tests.conftest import SRC, run_main
from tests.servers.http import HTTPTestServer, http_server  # noqa: F401 (fixture)

SAMPLES = SRC / "ckptkit" / "samples"
BUNDLE = "jukebox-1b_lyrics"  # four files, three shared with the other Jukebox models
SINGLE = "musiq-imagenet-pretrain"  # one .npz


@pytest.fixture
def cached(http_server: HTTPTestServer, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bundle and the single-file model fetched (from a local mirror) into the cache, then
    the network cut: every later request would go to a dead proxy.  Runs in an empty cwd."""
    for name in ("vqvae", "prior_level_0", "prior_level_1"):
        http_server.add(f"/jukebox/models/5b/{name}.pth.tar",
                        (SAMPLES / "jukebox" / f"{name}.pth.tar").read_bytes())
    http_server.add("/jukebox/models/1b_lyrics/prior_level_2.pth.tar",
                    (SAMPLES / "prior_level_2.pth.tar").read_bytes())
    http_server.add("/gresearch/musiq/imagenet_pretrain.npz",
                    (SAMPLES / "spaq_ckpt.npz").read_bytes())
    mirror = (f"https://openaipublic.azureedge.net={http_server.url('')},"
              f"https://storage.googleapis.com={http_server.url('')}")
    plan_fetch([BUNDLE, SINGLE], config.settings(mirror=mirror)).execute()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return Path(os.environ["CKPTKIT_CACHE"]) / "files"


def ckpt_json(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    code, out, err = run_main(capsys, *args, "--json")
    assert code in (0, 5), err
    return json.loads(out)


def test_lookup_rules_on_the_builtin_catalogue() -> None:
    cat = catalogue.load()
    ids = {ref: [f.id for f in named.files] for ref in (
        "loftr", "loftr-outdoor", BUNDLE, f"{BUNDLE}/vqvae.pth.tar",
        f"{BUNDLE}/prior_level_2.pth.tar", "jukebox/5b/vqvae.pth.tar", "musiq-spaq/saved_model",
        "musiq-spaq/spaq", "musiq-spaq/spaq_ckpt.npz") if (named := lookup(ref, cat))}
    assert ids["loftr"] == ids["loftr-outdoor"] == ["loftr/outdoor_ds.ckpt"]  # alias
    assert len(ids[BUNDLE]) == 4
    assert ids[f"{BUNDLE}/vqvae.pth.tar"] == ["jukebox/5b/vqvae.pth.tar"]
    assert ids[f"{BUNDLE}/prior_level_2.pth.tar"] == ["jukebox/1b_lyrics/prior_level_2.pth.tar"]
    assert ids["jukebox/5b/vqvae.pth.tar"] == ["jukebox/5b/vqvae.pth.tar"]  # a file id
    # A file by the last part of its id, or by its --dest name.
    assert ids["musiq-spaq/saved_model"] == ids["musiq-spaq/spaq"] == ["musiq/spaq/saved_model"]
    assert ids["musiq-spaq/spaq_ckpt.npz"] == ["musiq/spaq_ckpt.npz"]
    assert lookup("thinker_best.pt", cat) is None and lookup(f"{BUNDLE}/nope.pt", cat) is None
    assert choices(lookup("musiq-spaq", cat)) == ["musiq-spaq/saved_model",  # type: ignore[arg-type]
                                                 "musiq-spaq/spaq_ckpt.npz"]


def test_inspect_by_model_name_file_name_and_file_id(
        cached: Path, capsys: pytest.CaptureFixture[str]) -> None:
    single = ckpt_json(capsys, "inspect", SINGLE)
    assert single["format"] == "npz"
    assert single["path"] == str(cached / "musiq" / "imagenet_pretrain.npz")
    one = ckpt_json(capsys, "inspect", f"{BUNDLE}/prior_level_2.pth.tar")
    assert one["path"] == str(cached / "jukebox" / "1b_lyrics" / "prior_level_2.pth.tar")
    by_id = ckpt_json(capsys, "inspect", "jukebox/5b/vqvae.pth.tar")
    assert by_id["path"] == str(cached / "jukebox" / "5b" / "vqvae.pth.tar")


def test_a_bundle_is_all_its_files_where_several_are_taken_else_a_choice(
        cached: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scanned = ckpt_json(capsys, "scan", BUNDLE)
    assert len(scanned["files"]) == 4  # type: ignore[index]
    compared = ckpt_json(capsys, "compare", BUNDLE, SINGLE)
    assert len(compared["rows"]) == 5  # type: ignore[index]
    code, out, err = run_main(capsys, "inspect", BUNDLE)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{BUNDLE}/vqvae.pth.tar" in err and f"{BUNDLE}/prior_level_2.pth.tar" in err


def test_diff_and_convert_by_name(cached: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = ckpt_json(capsys, "diff", SINGLE, str(SAMPLES / "spaq_ckpt.npz"))
    assert report["summary"]["changed"] == 0 and report["summary"]["unchanged"] > 0  # type: ignore[index]
    code, out, err = run_main(capsys, "convert", SINGLE, "--to", "npz", "-o", "copy.npz",
                              "--quiet")
    assert code == 0, err
    assert out.strip() == "copy.npz" and Path("copy.npz").is_file()


def test_strip_by_name_writes_here_and_never_into_the_cache(
        cached: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prior = cached / "jukebox" / "1b_lyrics" / "prior_level_2.pth.tar"
    before = prior.read_bytes()
    code, _out, err = run_main(capsys, "strip", f"{BUNDLE}/prior_level_2.pth.tar", "--in-place",
                               "--yes")
    assert code == 2 and "download cache" in err and "-o FILE" in err
    code, out, err = run_main(capsys, "strip", f"{BUNDLE}/prior_level_2.pth.tar", "--quiet")
    assert code == 0, err
    assert out.strip() == "prior_level_2.pth.stripped.pt" and Path(out.strip()).is_file()
    assert prior.read_bytes() == before
    assert sorted(p.name for p in prior.parent.iterdir()) == [prior.name]


@pytest.mark.parametrize("command", [("inspect",), ("scan",), ("diff", "x.pt"), ("compare",),
                                     ("strip",), ("convert", "--to", "npz", "--dry-run")],
                         ids=lambda c: c[0])
def test_a_name_not_cached_says_to_fetch_it(cached: Path, capsys: pytest.CaptureFixture[str],
                                            command: tuple[str, ...]) -> None:
    name, *rest = command
    args = [name, "jukebox-5b/prior_level_2.pth.tar", *rest]
    if name == "diff":
        args = [name, rest[0], "jukebox-5b/prior_level_2.pth.tar"]
    code, out, err = run_main(capsys, *args)
    assert code == 4 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("Fetch it first: ckpt fetch jukebox-5b"), err
    assert "jukebox/5b/prior_level_2.pth.tar" in lines[0]


def test_a_real_path_wins_over_a_name(cached: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(SAMPLES / "thinker_step_200.pt", SINGLE)
    info = ckpt_json(capsys, "inspect", SINGLE)
    assert info["format"] == "torch-zip" and info["path"] == SINGLE
