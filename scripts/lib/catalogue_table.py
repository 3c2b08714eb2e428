"""Render the built-in catalogue as the Markdown tables of docs/catalogue.md.

    python scripts/lib/catalogue_table.py          # rewrite the tables in docs/catalogue.md

The tables sit between ``<!-- catalogue:start -->`` and ``<!-- catalogue:end -->``;
tests/hub/test_catalogue_doc.py fails when they no longer match the catalogue data.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from ckptkit.hub import catalogue  # noqa: E402

DOC = ROOT / "docs" / "catalogue.md"
START, END = "<!-- catalogue:start -->", "<!-- catalogue:end -->"


def render(cat: catalogue.Catalogue) -> str:
    lines = ["### Models", "", "| model | aliases | files | convert recipe | description |",
             "|---|---|---|---|---|"]
    for name in sorted(cat.models):
        model = cat.models[name]
        lines.append(f"| `{name}` | {', '.join(f'`{a}`' for a in model.aliases) or '—'} | "
                     f"{'<br>'.join(f'`{f}`' for f in model.files)} | "
                     f"{f'`{model.recipe}`' if model.recipe else '—'} | {model.description} |")
    lines += ["", "### Files", "",
              "| file id | kind | size | sha256 | sources, in order | used by |",
              "|---|---|---|---|---|---|"]
    for file_id in sorted(cat.files):
        spec = cat.files[file_id]
        size = f"{spec.size:,} B" if spec.size else "pinned on first fetch"
        digest = f"`{spec.sha256[:16]}…`" if spec.sha256 else "pinned on first fetch"
        sources = "<br>".join(f"{i}. {s.type}: `{s.ref}`" for i, s in enumerate(spec.sources, 1))
        users = ", ".join(f"`{m}`" for m in cat.users_of(file_id))
        lines.append(f"| `{file_id}` | {spec.kind} | {size} | {digest} | {sources} | {users} |")
    return "\n".join(lines)


def rewrite(text: str, table: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: markers {START} … {END} are missing")
    return pattern.sub(lambda _m: f"{START}\n{table}\n{END}", text)


if __name__ == "__main__":
    DOC.write_text(rewrite(DOC.read_text(), render(catalogue.load())))
    print(f"rewrote the catalogue tables in {DOC}")
