"""Small text helpers shared by commands: sizes, counts, safe names, aligned rows."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

import click


def _escapes() -> dict[int, str]:
    """Every character that can drive or fool a terminal, mapped to a readable escape."""
    table = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}  # C0, DEL, C1
    # Bytes of a name that is not UTF-8 arrive as U+DC80-U+DCFF (surrogateescape); written
    # back raw they would be C1 controls (0x9B is CSI), so show the byte they stand for.
    table.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})
    table.update({c: f"\\u{c:04x}" for c in range(0xD800, 0xE000) if c not in table})
    # Bidirectional overrides reorder what is shown (a name can display as another); line and
    # paragraph separators start new lines in some terminals.
    for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
              *range(0x2066, 0x206A)):
        table[c] = f"\\u{c:04x}"
    return table


_ESCAPES = _escapes()


def safe(text: Any) -> str:
    """``text`` with every control character escaped, so a name cannot drive the terminal.

    The one helper every command uses for names (and messages quoting them) in human output:
    C0 controls (newline and ESC included, so OSC/CSI sequences fall apart), DEL, C1
    controls, bytes that were not UTF-8, bidirectional overrides and line separators become
    ``\\x1b``-style escapes; every other character is kept.  ``--json`` output is not
    escaped: it carries the real name.
    """
    return str(text).translate(_ESCAPES)


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
    return f"{name:<10}{safe(text)}"
