"""`ckptkit.hub.environment`: facts gathered without importing a framework or showing a secret."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ckptkit import config
from ckptkit.hub.environment import HIDDEN, describe_environment, find_extras, measure_cache, variables
from tests.conftest import SRC

FRAMEWORKS = ("torch", "tensorflow", "tensorflow_hub", "jax", "flax", "kagglehub",
              "safetensors")


def test_extras_are_found_without_being_imported() -> None:
    code = ("import sys, json\nfrom ckptkit.hub.environment import find_extras\n"
            "found = {e.module: e.installed for e in find_extras()}\n"
            f"print(json.dumps([found, sorted(m for m in sys.modules "
            f"if m.split('.')[0] in {FRAMEWORKS!r})]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC)}, timeout=60)
    assert result.returncode == 0, result.stderr
    found, imported = json.loads(result.stdout)
    assert imported == [] and set(found) >= set(FRAMEWORKS)


def test_installed_extras_carry_their_version() -> None:
    import importlib.metadata

    extra = next(e for e in find_extras() if e.module == "safetensors")
    assert extra.installed  # a test dependency
    assert extra.version == importlib.metadata.version("safetensors")


def test_cache_size_and_free_space(tmp_path: Path) -> None:
    (tmp_path / "c" / "files").mkdir(parents=True)
    (tmp_path / "c" / "files" / "a").write_bytes(b"x" * 100)
    (tmp_path / "c" / "b").write_bytes(b"y" * 20)
    facts = measure_cache(tmp_path / "c")
    assert (facts.exists, facts.files, facts.bytes) == (True, 2, 120)
    assert facts.free_bytes is not None and facts.free_bytes > 0
    missing = measure_cache(tmp_path / "not" / "yet")
    assert not missing.exists and missing.files == 0 and missing.free_bytes is not None


def test_variables_mask_secrets() -> None:
    shown = dict(variables({"CKPTKIT_CACHE": "/c", "HTTPS_PROXY": "http://me:pw@proxy:3128",
                            "KAGGLE_KEY": "k", "HOME": "/home/me", "no_proxy": "localhost"}))
    assert shown == {"CKPTKIT_CACHE": "/c", "HTTPS_PROXY": "http://me:***@proxy:3128",
                     "no_proxy": "localhost", "KAGGLE_KEY": HIDDEN}


def test_describe_reads_pins_and_reports_a_broken_lock_file(tmp_path: Path) -> None:
    conf = config.settings()
    conf.config_dir.mkdir(parents=True, exist_ok=True)
    conf.pins_path.write_text(json.dumps({"schema": 1, "files": {
        "a": {"sha256": "0" * 64, "size": 1}, "b": {"sha256": "1" * 64, "size": 2}}}))
    env = describe_environment(conf)
    assert env.pins == 2 and env.pins_problem is None
    assert env.cache.path == conf.cache_dir and env.kagglehub_cache_dir == conf.kagglehub_cache_dir
    conf.pins_path.write_text("{broken")
    broken = describe_environment(conf)
    assert broken.pins is None and "not valid JSON" in (broken.pins_problem or "")
    assert json.loads(json.dumps(broken.to_dict()))["pins"]["count"] is None


def test_kaggle_credentials_are_named_by_origin_only(tmp_path: Path) -> None:
    env = describe_environment(config.settings(), {"KAGGLE_API_TOKEN": "tok"})
    assert env.kaggle_credentials == "KAGGLE_API_TOKEN"
    assert env.to_dict()["variables"]["KAGGLE_API_TOKEN"] == HIDDEN


def test_facts_the_caller_read_are_not_read_again() -> None:
    from ckptkit.hub.credentials import KaggleCredentials, KaggleLookup
    from ckptkit.hub.pins import Pin, PinsSnapshot

    conf = config.settings()
    conf.config_dir.mkdir(parents=True, exist_ok=True)
    conf.pins_path.write_text("{broken")  # would be a problem if it were read here
    env = describe_environment(conf, {"KAGGLE_API_TOKEN": "tok"},
                               pins=PinsSnapshot({"a": Pin("0" * 64, 1, "url", 0.0)}),
                               kaggle=KaggleLookup(KaggleCredentials("kaggle.json", "t")))
    assert (env.pins, env.pins_problem) == (1, None)
    assert env.kaggle_credentials == "kaggle.json"
    broken = describe_environment(conf, {}, kaggle=KaggleLookup(None, "kaggle.json is bad"))
    assert broken.pins is None and "not valid JSON" in (broken.pins_problem or "")
    assert (broken.kaggle_credentials, broken.kaggle_credentials_problem) == (
        None, "kaggle.json is bad")


def test_the_keras_extra_is_reported_by_h5py() -> None:
    import importlib.metadata

    extra = next(e for e in find_extras() if e.module == "h5py")
    assert extra.extra == "keras" and extra.distribution == "h5py"
    if extra.installed:
        assert extra.version == importlib.metadata.version("h5py")
