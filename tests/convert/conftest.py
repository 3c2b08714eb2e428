"""Fixtures the convert wing's tests share."""

from __future__ import annotations

from tests.convert.reference_models import loftr_ckpt  # noqa: F401 (fixture: one per session)
