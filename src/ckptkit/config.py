"""Environment variables, read in one place.

Precedence for every setting: 1. the command-line flag, 2. the ``CKPTKIT_*`` variable,
3. the built-in default.
"""

from __future__ import annotations

import os

TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


def env_flag(name: str, default: bool = False) -> bool:
    """True when the environment variable ``name`` is set to 1/true/yes/on."""
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in TRUE_VALUES


def debug() -> bool:
    """``CKPTKIT_DEBUG=1``: show tracebacks instead of one-line errors."""
    return env_flag("CKPTKIT_DEBUG")


def no_color() -> bool:
    """``NO_COLOR`` (any value) turns colour off, as https://no-color.org asks."""
    return "NO_COLOR" in os.environ
