"""Render the figures a security test run counted as the table of docs/security.md.

    python scripts/lib/security_table.py build/security-figures.json --command "scripts/fuzz"

The table sits between ``<!-- figures:start -->`` and ``<!-- figures:end -->``; only that part
of the page is rewritten, the prose around it is left as it is.  Rows follow the order and
wording of ``tests/figures.py`` LABELS, so a figure is named in exactly one place.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
NEW_PAGE = f"# Security\n\n{START}\n{END}\n"


def machine() -> str:
    """Where the figures were measured: OS, architecture, cores, Python."""
    return (f"{platform.system()} {platform.release()} {platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}")


def render(counts: dict[str, int], labels: dict[str, str], *, date: str, where: str,
           command: str) -> str:
    """The Markdown table: one row per label (``—`` where this run did not count it), then
    figures the labels do not know under their raw names, then when, where and how."""
    lines = ["| figure | count |", "|---|---:|"]
    for name, label in labels.items():
        value = f"{counts[name]:,}" if name in counts else "—"
        lines.append(f"| {label} | {value} |")
    for name in sorted(set(counts) - set(labels)):
        lines.append(f"| `{name}` | {counts[name]:,} |")
    lines += ["", f"Measured {date} on {where} by `{command}`."]
    return "\n".join(lines)


def rewrite(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``; markers missing from
    a page that exists are appended to it, so no prose is ever replaced."""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    return pattern.sub(lambda _m: f"{START}\n{table}\n{END}", text, count=1)


def labels() -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from tests.figures import LABELS

    return LABELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", type=Path, help="JSON written by a CKPTKIT_FIGURES test run")
    parser.add_argument("--doc", type=Path, default=DOC, help="page to rewrite [%(default)s]")
    parser.add_argument("--command", required=True, help="the command that produced the figures")
    args = parser.parse_args(argv)
    try:
        counts = json.loads(args.figures.read_text())
    except (OSError, ValueError) as exc:
        parser.exit(1, f"security_table: cannot read {args.figures}: {exc}. Run scripts/fuzz "
                       "to produce it\n")
    table = render(counts, labels(), date=dt.date.today().isoformat(), where=machine(),
                   command=args.command)
    text = args.doc.read_text() if args.doc.exists() else NEW_PAGE
    args.doc.write_text(rewrite(text, table))
    print(f"rewrote the figures table in {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
