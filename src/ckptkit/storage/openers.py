"""Which backend reads a URL scheme: ``http(s)`` goes to
:mod:`ckptkit.storage.http_location`, everything else to fsspec
(:mod:`ckptkit.storage.fsspec_location`).  :func:`ckptkit.storage.location.locate` imports
this module only for a URL, so a local path never imports requests or fsspec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def opener_for(scheme: str) -> Callable[[str], Any] | None:
    """The location maker for ``scheme``, or None when no backend reads it."""
    if scheme in ("http", "https"):
        from ckptkit.storage.http_location import HttpLocation

        return HttpLocation
    from ckptkit.storage.fsspec_location import fsspec_opener

    return fsspec_opener(scheme)


__all__ = ["opener_for"]
