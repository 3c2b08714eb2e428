"""Readers the pickle layer calls but cannot import: they live in a layer above it.

A torch file embedded in a pickle (``torch.storage._load_from_bytes``) is read by the torch
readers of :mod:`ckptkit.formats`, which set :data:`embedded_reader` when that package is
imported.  This module imports nothing, so setting the hook costs no start-up time.
"""

from __future__ import annotations

from typing import Any, Callable

#: (bytes of the embedded file, the findings to add to, where it sits) -> a problem or None.
#: None until ``ckptkit.formats`` is imported; an embedded file then counts as unreadable.
embedded_reader: Callable[[bytes, Any, str], str | None] | None = None
