"""ckptkit: fetch, inspect, convert and manage model checkpoints.

The public API is re-exported here.  Heavy modules are imported on first use so that
``import ckptkit`` (and the ``ckpt`` command) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptkit.errors import (CkptkitError, DiskFullError, ExitCode, FormatError, IntegrityError,
                            MissingDependencyError, NotFoundError, UnsafeContentError,
                            UsageError)

__all__ = [
    "CheckpointInfo", "CkptkitError", "DiskFullError", "ExitCode", "FormatError",
    "IntegrityError", "MissingDependencyError", "NotFoundError", "UnsafeContentError",
    "UsageError",
    "__version__", "inspect", "latest", "load", "resume", "save", "verify",
]

if TYPE_CHECKING:
    __version__: str
    from ckptkit.inspection import inspect
    from ckptkit.loading import load
    from ckptkit.runs.resuming import resume
    from ckptkit.runs.saving import latest, save
    from ckptkit.summary import CheckpointInfo
    from ckptkit.verification import verify

_LAZY = {"inspect": "ckptkit.inspection", "load": "ckptkit.loading",
         "CheckpointInfo": "ckptkit.summary", "resume": "ckptkit.runs.resuming",
         "save": "ckptkit.runs.saving", "latest": "ckptkit.runs.saving",
         "verify": "ckptkit.verification"}


def _package_version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckptkit")
    except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = globals()["__version__"] = _package_version()
        return value
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptkit' has no attribute {name!r}")
