"""Fuzzing the catalogue loader: any user catalogue loads, or fails with one line and exit 2.

Two kinds of input, as the readers are fuzzed (``tests/formats/test_fuzz.py``):

* **structured**: catalogues whose every field may hold the right kind of value or any other
  (numbers where strings go, tables where lists go, control characters, 300-character ids,
  broken URLs), written as TOML;
* **damaged**: a valid catalogue truncated, bit-flipped and spliced (:mod:`tests.mutations`).

The only outcomes allowed: a :class:`~ckptkit.errors.CatalogueError` (exit 2) of one line that
names the file, or a catalogue every consumer can use (``ckpt list``, planning a fetch of each
model).  Profiles: CI runs a fixed, derandomized number of examples;
``CKPTKIT_FUZZ_EXAMPLES=N`` (``scripts/fuzz``) gives each test a share of N.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkit.hub import catalogue
from ckptkit import config
from ckptkit.errors import CatalogueError, CkptkitError, ExitCode
from ckptkit.hub.fetch import plan_fetch
from tests import figures
from tests.conftest import run_main
from tests.mutations import Mutation, mutations

CI_EXAMPLES = 60
LONG_TOTAL = int(os.environ.get("CKPTKIT_FUZZ_EXAMPLES", "0") or 0)
LONG_SHARE = 0.05  # of CKPTKIT_FUZZ_EXAMPLES, per test


def fuzz_settings() -> settings:
    return settings(max_examples=max(CI_EXAMPLES, round(LONG_TOTAL * LONG_SHARE)),
                    derandomize=not LONG_TOTAL, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


# --- TOML out of Python values --------------------------------------------------------------

def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) \
        + " }"


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in data.items())


# --- catalogues where every field may be wrong ------------------------------------------------

def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` seven times in eight: a catalogue with one wrong field, not wrong everywhere."""
    return st.integers(0, 7).flatmap(lambda n: bad if n == 0 else good)


ANY = st.recursive(
    st.one_of(st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1), st.floats(),
              st.text(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
NAMES = mostly(st.sampled_from(["a", "a/b", "team/model.pt", "m", "x/y/z.bin"]),
               st.one_of(st.sampled_from(["../up", "a\x00b", "esc\x1b[2J", "C:/w", "~/x",
                                          "a//b", ""]),
                         st.text(max_size=24), st.text(min_size=250, max_size=320)))
URLS = mostly(st.sampled_from(["https://example.org/w.pt", "http://[::1]:8/x",
                               "http://127.0.0.1:9/a/b.bin"]),
              st.one_of(st.sampled_from(["http://[::1/x", "http://h:99999/x", "http://h:port/x",
                                         "ftp://h/x", "https://", "http://h/ x", "http://\x00/x",
                                         "http:///x"]),
                        st.text(max_size=60).map(lambda t: "https://" + t)))
HANDLES = mostly(st.just("google/musiq/tensorFlow2/spaq/1"),
                 st.one_of(st.sampled_from(["google/musiq/tensorFlow2/spaq/0",
                                            "google/musiq/tensorFlow2/spaq/\u0661",
                                            "a/b/c/d/1\x00"]),
                           st.text(max_size=50)))
SOURCE = mostly(
    st.one_of(st.fixed_dictionaries({"type": st.just("url"), "url": mostly(URLS, ANY)}),
              st.fixed_dictionaries({"type": st.just("tfhub"), "handle": mostly(URLS, ANY)}),
              st.fixed_dictionaries({"type": st.just("kaggle"), "handle": mostly(HANDLES, URLS)}),
              st.fixed_dictionaries({"type": mostly(st.just("local"), st.just("s3")),
                                     "path": mostly(st.text(max_size=30), ANY)})),
    ANY)
FILE = mostly(
    st.fixed_dictionaries({"sources": mostly(st.lists(SOURCE, min_size=1, max_size=2), ANY)},
                          optional={
        "kind": mostly(st.sampled_from(["file", "savedmodel"]), ANY),
        "size": mostly(st.integers(-5, 1 << 40), ANY),
        "sha256": mostly(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), ANY),
        "dest": mostly(NAMES, ANY),
        "aliases": mostly(st.lists(NAMES, max_size=3), ANY)}),
    ANY)


def models(file_ids: list[str]) -> st.SearchStrategy[Any]:
    """Model entries, whose files are mostly ids the catalogue defines."""
    known = mostly(st.sampled_from(file_ids), NAMES) if file_ids else NAMES
    entry = st.fixed_dictionaries(
        {"files": mostly(st.lists(known, min_size=1, max_size=3), ANY)}, optional={
            "aliases": mostly(st.lists(NAMES, max_size=3), ANY),
            "recipe": mostly(st.sampled_from(["loftr", "default"]), ANY),
            "description": mostly(st.text(max_size=20), ANY),
            "license": ANY})
    return mostly(st.dictionaries(NAMES, mostly(entry, ANY), max_size=3), ANY)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if draw(st.booleans()):
        document["schema"] = draw(mostly(st.just(1), ANY))
    files = draw(mostly(st.dictionaries(NAMES, FILE, max_size=2), ANY))
    if draw(mostly(st.just(True), st.just(False))):
        document["files"] = files
    ids = sorted(files) if isinstance(files, dict) else []
    if draw(mostly(st.just(True), st.just(False))):
        document["models"] = draw(models(ids))
    return document


#: A valid user catalogue in the layout docs/catalogue.md shows: what the damage starts from.
VALID = f'''schema = 1

[files."myteam/encoder-v3.safetensors"]
size = 431075648
sha256 = "{"5f2c" * 16}"
aliases = ["encoder.safetensors"]
sources = [
  {{ type = "url", url = "https://models.example.com/encoder-v3.safetensors" }},
  {{ type = "local", path = "/mnt/shared/models/encoder-v3.safetensors" }},
]

[files."myteam/scorer/saved_model"]
kind = "savedmodel"
sources = [{{ type = "tfhub", handle = "https://tfhub.dev/google/musiq/spaq/1" }},
           {{ type = "kaggle", handle = "google/musiq/tensorFlow2/spaq/1" }}]

[models.encoder-v3]
files = ["myteam/encoder-v3.safetensors", "myteam/scorer/saved_model"]
aliases = ["encoder"]
description = "our encoder"
recipe = "loftr"
'''.encode()


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Load ``path`` as a user catalogue: a one-line error naming it with exit 2, or a
    catalogue that ``ckpt list`` shows and every model of which can be planned."""
    try:
        cat = catalogue.load([path])
    except CatalogueError as exc:
        message = str(exc)
        assert exc.exit_code == ExitCode.USAGE and "\n" not in message, message
        assert message.startswith(f"{path}: "), message
        code, out, err = run_main(capsys, "list", "--catalog", str(path))
        assert code == ExitCode.USAGE and out == "" and err.count("\n") == 1, err
        assert err.startswith("ckpt: error: ") and "internal error" not in err, err
        return
    offline = config.settings(offline=True, catalogs=(path,))
    for name in cat.models:
        try:
            json.dumps(plan_fetch([name], offline, catalogue=cat).to_dict())
        except CkptkitError as exc:  # nothing cached, nothing local: not found, never a crash
            assert exc.exit_code in (ExitCode.USAGE, ExitCode.NOT_FOUND), exc
    code, out, err = run_main(capsys, "list", "--catalog", str(path), "--json")
    assert code == ExitCode.OK, err
    assert {entry["name"] for entry in json.loads(out)} >= set(cat.models)


def test_catalogues_with_any_value_in_any_field(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    @fuzz_settings()
    @given(document=documents())
    def run(document: dict[str, Any]) -> None:
        path = tmp_path / "catalogue.toml"
        path.write_text(toml_document(document), encoding="utf-8")
        check(path, capsys)
        figures.count("catalogue-inputs")

    run()


def test_damaged_catalogues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    @fuzz_settings()
    @given(mutation=mutations(VALID))
    def run(mutation: Mutation) -> None:
        path = tmp_path / "catalogue.toml"
        path.write_bytes(mutation.data)
        check(path, capsys)
        figures.count("catalogue-inputs")

    run()


def test_the_valid_catalogue_loads(tmp_path: Path) -> None:
    """The damage starts from a catalogue that is accepted whole."""
    path = tmp_path / "catalogue.toml"
    path.write_bytes(VALID)
    cat = catalogue.load([path])
    assert cat.model("encoder").files == ("myteam/encoder-v3.safetensors",
                                          "myteam/scorer/saved_model")
