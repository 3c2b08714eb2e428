"""pytest side of the hub stand-ins: a tiny real SavedModel to serve, and the constants the
tests share.

The servers themselves (:class:`TFHubStub`, :class:`KaggleStub`, the archive helpers) live in
:mod:`ckptkit.testing.hubs`, dependency-free so demos can use them too; they are re-exported
here so test modules keep one import line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ckptkit.testing.hubs import (KaggleModel, KaggleStub, Logged, StubServer, TFHubStub,
                                  archive_of, tfhub_archive, tree_files)

__all__ = ["HANDLE", "KAGGLE_HANDLE", "SAMPLE_INPUT", "SAMPLE_SCORE", "KaggleModel", "KaggleStub",
           "Logged", "StubServer", "TFHubStub", "archive_of", "build_saved_model", "saved_model",
           "tfhub_archive", "tree_files"]

HANDLE = "https://tfhub.dev/google/musiq/spaq/1"
KAGGLE_HANDLE = "google/musiq/tensorFlow2/spaq/1"
#: The stand-in SavedModel's serving signature: score = x · [1, 2, 3] + 0.5.
SAMPLE_INPUT = [[1.0, 1.0, 1.0]]
SAMPLE_SCORE = 6.5

_SAVED_MODEL: dict[str, Path] = {}


def build_saved_model(root: Path) -> Path:
    """Write the stand-in SavedModel (a tf.Module with two variables and a serving
    signature ``score = x · w + b``) under ``root/saved_model`` and return that directory."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")

    class Scorer(tf.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable([[1.0], [2.0], [3.0]], name="w")
            self.b = tf.Variable([0.5], name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"score": tf.matmul(x, self.w) + self.b}

    scorer = Scorer()
    out = root / "saved_model"
    tf.saved_model.save(scorer, str(out), signatures={"serving_default": scorer.serve})
    return out


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in SavedModel directory, built once per test session (one TF import)."""
    # Modules import this fixture separately; the cache keeps it to one build per session.
    if "dir" not in _SAVED_MODEL:
        _SAVED_MODEL["dir"] = build_saved_model(tmp_path_factory.mktemp("hub_model"))
    return _SAVED_MODEL["dir"]

