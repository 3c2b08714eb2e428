"""Shared fixtures: a clean ckptkit environment for every test, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests import figures

    figures.write()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CKPTKIT_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("CKPTKIT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CKPTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CKPTKIT_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("NO_COLOR", "1")
    # A safety net: a request a test forgot to point at a local server goes to a dead proxy
    # on loopback and fails fast, instead of leaving the machine.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def tf() -> object:
    """TensorFlow, imported once, quietly (skips where it is not installed)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def run_ckpt(*args: str, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `ckpt` entry point in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ckptkit", *args], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=120)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    from ckptkit.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code), out, err


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports ckptkit from this checkout."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(SRC)})


#: The frameworks a core install lacks (``pip install ckptkit`` without extras).
FRAMEWORKS = ("torch", "tensorflow", "tensorflow_hub", "jax", "flax", "keras", "safetensors")

_BLOCKED_CKPT = """
import sys, importlib.abc
blocked = set(sys.argv[1].split(','))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in blocked:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
from ckptkit.cli.main import main
main(sys.argv[2:])
"""


def run_ckpt_without(blocked: tuple[str, ...], *args: str,
                     cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `ckpt` in a fresh interpreter where importing any of ``blocked`` fails, as on a
    machine where they are not installed."""
    return subprocess.run([sys.executable, "-c", _BLOCKED_CKPT, ",".join(blocked), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})


# Sharded and distributed checkpoints written by the real libraries, once per session (the
# 2-process FSDP job takes seconds); tests copy one before breaking it.

@pytest.fixture(scope="session")
def hf_safetensors_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("huggingface_hub")
    from tests.distributed_checkpoints import hf_sharded

    return hf_sharded(tmp_path_factory.mktemp("hf") / "safetensors")


@pytest.fixture(scope="session")
def hf_bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("huggingface_hub")
    from tests.distributed_checkpoints import hf_sharded

    return hf_sharded(tmp_path_factory.mktemp("hf") / "bin", safe=False)


@pytest.fixture(scope="session")
def dcp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from tests.distributed_checkpoints import dcp_single

    return dcp_single(tmp_path_factory.mktemp("dcp") / "step-210")


@pytest.fixture(scope="session")
def fsdp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from tests.distributed_checkpoints import dcp_fsdp

    return dcp_fsdp(tmp_path_factory.mktemp("fsdp") / "step-2")
