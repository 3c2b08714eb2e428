"""Fixtures the tests of ckptkit.testing (the hub and Hugging Face stand-ins) share."""

from __future__ import annotations

from tests.hf_content import hub  # noqa: F401 (fixture: a Hugging Face Hub stand-in)
from tests.hub.conftest import kaggle_env  # noqa: F401 (fixture: shared with the hub wing)
