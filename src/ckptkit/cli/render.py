"""Small text helpers shared by commands: sizes, counts, safe names, aligned rows."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

import click

# C0, DEL and C1 (U+0080-U+009F: some terminals take U+009B as CSI, an escape sequence start)
_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}


def safe(text: Any) -> str:
    """Escape control characters so names from a file cannot drive the terminal."""
    return str(text).translate(_CONTROL)


def size(n: float) -> str:
    """Human byte size: ``46.3 MB`` (decimal units, like file managers)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def count(n: int) -> str:
    return f"{n:,}"


def table(rows: Iterable[Iterable[Any]], indent: int = 2, right: tuple[int, ...] = ()) -> str:
    """Align rows into columns; columns listed in ``right`` are right-aligned."""
    cells = [[safe(c) for c in row] for row in rows]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    lines = []
    for row in cells:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                 for i, c in enumerate(row)]
        lines.append(" " * indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """Strict JSON has no NaN or Infinity (a diverged loss is common): spell them as strings."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def emit_json(data: Any) -> None:
    click.echo(json.dumps(_finite(data), indent=2, default=str, allow_nan=False))


def label(name: str, text: str) -> str:
    return f"{name:<10}{text}"
