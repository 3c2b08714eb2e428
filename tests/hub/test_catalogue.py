"""The contract test guarding the built-in catalogue, and user catalogue merging."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptkit.hub import catalogue
from ckptkit.errors import ExitCode, FormatError, NotFoundError
from tests.conftest import run_main

MUSIQ = {"musiq-spaq": "spaq", "musiq-ava": "ava", "musiq-koniq": "koniq-10k",
         "musiq-paq2piq": "paq2piq"}
JUKEBOX_SHARED = ["jukebox/5b/vqvae.pth.tar", "jukebox/5b/prior_level_0.pth.tar",
                  "jukebox/5b/prior_level_1.pth.tar"]


@pytest.fixture(scope="module")
def cat() -> catalogue.Catalogue:
    return catalogue.load()


@pytest.mark.parametrize("name, slug", sorted(MUSIQ.items()))
def test_musiq_models_have_hub_handles_and_the_original_npz(cat, name: str, slug: str) -> None:
    saved, npz = cat.files_of(name)
    assert saved.kind == "savedmodel"
    assert [str(s) for s in saved.sources] == [
        f"tfhub:https://tfhub.dev/google/musiq/{slug}/1",
        f"kaggle:google/musiq/tensorFlow2/{slug}/1"]
    stem = name.removeprefix("musiq-")
    assert npz.sources[0].ref == f"https://storage.googleapis.com/gresearch/musiq/{stem}_ckpt.npz"


def test_vila_and_imagenet_pretrain(cat) -> None:
    (vila,) = cat.files_of("vila-image")
    assert [s.ref for s in vila.sources] == ["https://tfhub.dev/google/vila/image/1",
                                             "google/vila/tensorFlow2/image/1"]
    (npz,) = cat.files_of("musiq-imagenet-pretrain")
    assert npz.sources[0].ref.endswith("/gresearch/musiq/imagenet_pretrain.npz")


@pytest.mark.parametrize("name, top", [("jukebox-5b", "5b"), ("jukebox-5b_lyrics", "5b_lyrics"),
                                       ("jukebox-1b_lyrics", "1b_lyrics")])
def test_jukebox_bundles_share_the_5b_files(cat, name: str, top: str) -> None:
    model = cat.model(name)
    assert list(model.files) == JUKEBOX_SHARED + [f"jukebox/{top}/prior_level_2.pth.tar"]
    for spec in cat.files_of(name):
        assert spec.sources[0].ref == ("https://openaipublic.azureedge.net/jukebox/models/"
                                       + spec.dest)
        assert any(s.type == "local" and s.ref == f"~/.cache/jukebox/models/{spec.dest}"
                   for s in spec.sources)
    assert set(cat.users_of("jukebox/5b/vqvae.pth.tar")) == {
        "jukebox-5b", "jukebox-5b_lyrics", "jukebox-1b_lyrics"}


def test_jukebox_never_asks_for_a_1b_lyrics_upsampler(cat) -> None:
    assert not [f for f in cat.files if f.startswith("jukebox/1b_lyrics/prior_level_0")]
    assert not any("1b_lyrics/prior_level_0" in s.ref for f in cat.files.values()
                   for s in f.sources)


def test_loftr_is_an_alias_of_the_outdoor_weights_with_the_recipe(cat) -> None:
    model = cat.model("loftr")
    assert model.name == "loftr-outdoor" and model.recipe == "loftr"
    assert cat.model("loftr-indoor").recipe == "loftr"


def test_every_entry_is_well_formed(cat) -> None:
    assert len(cat.models) == 11
    ids_by_dest: dict[str, str] = {}
    for spec in cat.files.values():
        assert spec.sources and (spec.sha256 is None or len(spec.sha256) == 64)
        # dest paths may repeat a file name only under different folders (no collisions)
        assert ids_by_dest.setdefault(spec.dest, spec.id) == spec.id
    assert {f for m in cat.models.values() for f in m.files} == set(cat.files)


def test_unknown_model_suggests_close_names(cat) -> None:
    with pytest.raises(NotFoundError, match="musiq-spaq"):
        cat.model("musiq-spa")


def test_user_catalogue_adds_and_overrides(tmp_path: Path) -> None:
    user = tmp_path / "mine.toml"
    user.write_text('''
[files."mine/w.pt"]
size = 12
sha256 = "%s"
sources = [{ type = "url", url = "http://127.0.0.1:9/w.pt" }]

[models.mine]
files = ["mine/w.pt"]

[models.loftr-outdoor]
description = "pinned to my mirror"
files = ["mine/w.pt"]
''' % ("a" * 64))
    cat = catalogue.load([user])
    assert cat.model("mine").origin == str(user)
    assert cat.files["mine/w.pt"].size == 12
    assert cat.model("loftr-outdoor").files == ("mine/w.pt",)


@pytest.mark.parametrize("body, fragment", [
    ('[models.x]\nfiles = ["nope"]', "no catalogue defines"),
    ('[files."a"]\nsources = []', "at least one source"),
    ('[files."a"]\nsources = [{ type = "kaggle", handle = "google/musiq/tf2/spaq" }]',
     "versions are pinned"),
    ('[files."a"]\nsha256 = "xyz"\nsources = [{ type = "url", url = "http://h/a" }]', "sha256"),
    ('[files."a"]\ndest = "../x"\nsources = [{ type = "url", url = "http://h/a" }]', "dest"),
    ("not toml [", "not valid TOML"),
])
def test_bad_user_catalogues_name_the_file_and_entry(tmp_path: Path, body: str,
                                                     fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(FormatError, match=fragment) as info:
        catalogue.load([path])
    assert str(path) in str(info.value)


@pytest.mark.parametrize("file_id", ["/tmp/abs", "../../escape", "a/../../b", "~/x", "a//b",
                                     "C:/w", "a\\b"])
def test_file_ids_cannot_leave_the_cache(tmp_path: Path, file_id: str) -> None:
    path = tmp_path / "evil.toml"
    path.write_text(f'[files."{file_id}"]\nsources = [{{ type = "url", url = "http://h/a" }}]\n'
                    .replace("\\", "\\\\"))
    with pytest.raises(FormatError, match="cache path"):
        catalogue.load([path])


LONG_ID = "x" * 300
GOOD_FILE = '[files."a"]\nsources = [{ type = "url", url = "http://h/a" }]\n'
MALFORMED = [
    pytest.param("files = [1, 2]", "files", "must be a table of entries", id="files-list"),
    pytest.param('[files."a"]\nsources = 5', "files.'a': sources", "needs at least one source",
                 id="sources-5"),
    pytest.param('[files."a"]\nsources = [5]', "files.'a': sources[0]", "5 needs type = one of",
                 id="source-5"),
    pytest.param(GOOD_FILE + '[models.m]\nfiles = ["a"]\naliases = 7', "models.'m': aliases",
                 "must be a list of strings, not 7", id="aliases-7"),
    pytest.param('[files."a\\u0000b"]\nsources = [{ type = "url", url = "http://h/a" }]',
                 "files.'a\\x00b'", "contains control characters", id="nul-in-id"),
    pytest.param('[files."a"]\nsources = [{ type = "url", url = "http://[::1/x" }]',
                 "files.'a': sources[0]: url", "is not a valid URL (Invalid IPv6 URL)",
                 id="bad-ipv6-url"),
    pytest.param('[files."a"]\nsources = [{ type = "url", url = "http://h:99999/x" }]',
                 "files.'a': sources[0]: url", "is not a valid URL", id="port-out-of-range"),
    pytest.param(f'[files."{LONG_ID}"]\nsources = [{{ type = "url", url = "http://h/a" }}]',
                 "files.'xxxxxxxx", "is 300 characters long (at most 200)", id="300-char-id"),
    pytest.param('[files."a"]\nsize = true\nsources = [{ type = "url", url = "http://h/a" }]',
                 "files.'a': size", "True is not a byte count", id="size-true"),
    pytest.param('[files."a"]\ndest = 5\nsources = [{ type = "url", url = "http://h/a" }]',
                 "files.'a': dest", "must be a non-empty string", id="dest-5"),
    pytest.param('[files."a"]\naliases = ["../../etc"]\nsources = [{ type = "url", '
                 'url = "http://h/a" }]', "files.'a': aliases", "must be a relative path",
                 id="alias-traversal"),
    pytest.param('[files."a"]\nsources = [{ type = "kaggle", handle = "o/m/f/v/\\u0661" }]',
                 "files.'a': sources[0]: handle", "versions are pinned", id="unicode-version"),
    pytest.param(GOOD_FILE + '[files."a/b"]\nsources = [{ type = "url", url = "http://h/b" }]',
                 "files.'a/b'", "inside the id 'a', which is a file", id="id-inside-an-id"),
    pytest.param("models = 5", "models", "must be a table of entries", id="models-5"),
    pytest.param(GOOD_FILE + '[models.m]\nfiles = "a"', "models.'m': files",
                 "must be a list of strings", id="files-a-string"),
    pytest.param(GOOD_FILE + '[models.m]\nfiles = ["a"]\nrecipe = 5', "models.'m': recipe",
                 "must be a recipe name", id="recipe-5"),
    pytest.param(GOOD_FILE + '[models.m]\nfiles = ["a"]\ndescription = {x = 1}',
                 "models.'m': description", "must be a string", id="description-table"),
    pytest.param(GOOD_FILE + '[models."\\u001b[2J"]\nfiles = ["a"]', "models.'\\x1b[2J'",
                 "contains control characters", id="escape-in-name"),
    pytest.param('schema = true', "schema", "True is not supported", id="schema-true"),
    pytest.param("x = " + "[" * 5000 + "]" * 5000, "not valid TOML",
                 "nested too deeply", id="deep-nesting"),
]


@pytest.mark.parametrize("body, where, problem", MALFORMED)
def test_a_malformed_catalogue_is_one_line_naming_file_entry_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, where: str,
        problem: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(body)
    code, out, err = run_main(capsys, "fetch", "m", "--catalog", str(path), "--dry-run")
    assert code == ExitCode.USAGE and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"ckpt: error: {path}: {where}") and problem in err, err
    assert len(err) < 400 and "internal error" not in err
