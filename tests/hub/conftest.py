"""Fixtures the hub wing's tests share (tests/hub and tests/hub/sources).

Global ones (a clean environment, ``tf``) stay in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hub.sources.hubs import saved_model  # noqa: F401 (fixture: one SavedModel per session)
from tests.servers.http import http_server  # noqa: F401 (fixture)


@pytest.fixture
def kaggle_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """kagglehub's cache in tmp and no real credentials, as kagglehub's own tests do."""
    pytest.importorskip("kagglehub")
    cache = tmp_path / "kagglehub"
    token = tmp_path / "empty-token"
    token.write_text("")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "missing-kaggle-config"))
    monkeypatch.setenv("KAGGLE_API_TOKEN", str(token))
    # kagglesdk reads ~/.kaggle/kaggle.json itself, whatever KAGGLE_CONFIG_DIR says.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_ENVIRONMENT",
                 "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_DATA_PROXY_URL", "TBE_RUNTIME_ADDR",
                 "COLAB_RELEASE_TAG", "KAGGLEHUB_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    return cache
