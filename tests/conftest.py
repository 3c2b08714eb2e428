"""Shared fixtures: a clean ckptkit environment for every test, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


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


def run_ckpt(*args: str, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `ckpt` entry point in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ckptkit", *args], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=120)
