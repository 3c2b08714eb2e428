"""The docs cannot drift from the code: every option of every command is on its page as
``--help`` spells it, every exit code and every ``CKPTKIT_*`` variable is documented."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ckptkit.errors import ExitCode
from tests.cli.commands import all_commands, help_column, options

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

#: command -> its page; a command not listed here is documented in docs/<command>.md.
PAGES = {
    "list": "cache.md",
    "compare": "compare-diff-strip.md",
    "diff": "compare-diff-strip.md",
    "strip": "compare-diff-strip.md",
    "completion": "cli.md",
}


def page_of(path: str) -> Path:
    top = path.split()[0]
    return DOCS / PAGES.get(top, f"{top}.md")


def page_text(page: Path) -> str:
    # Markdown tables escape "|" inside code spans; --help does not.
    return page.read_text(encoding="utf-8").replace("\\|", "|")


COMMANDS = [(path, command) for path, command in all_commands()
            if not isinstance(command, click.Group)]


@pytest.mark.parametrize("path, command", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_option_is_on_the_commands_page(path: str, command: click.Command) -> None:
    page = page_of(path)
    assert page.is_file(), f"`ckpt {path}` has no page: write {page.relative_to(ROOT)} or map "\
                           "it in PAGES (tests/cli/test_docs.py)"
    text = page_text(page)
    missing = [column for column in (help_column(command, o) for o in options(command).values())
               if f"`{column}`" not in text]
    assert not missing, f"{page.name} does not list {missing} as `--help` shows them"
    assert f"ckpt {path}" in text
    for section in ("Exit codes", "Examples"):
        assert section in text, f"{page.name} has no {section} section"
    if "--json" in options(command):
        assert re.search(r"JSON|`--json`", text)


def test_exit_codes_table_matches_the_enum() -> None:
    text = page_text(DOCS / "cli.md")
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \| `{code.name}` \|", text, re.M), code


def test_every_ckptkit_variable_is_in_configuration_md() -> None:
    used: set[str] = set()
    for folder in ("src", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix not in (".pyc", ".npz", ".pt", ".tar", ".msgpack"):
                try:
                    used |= set(re.findall(r"\bCKPTKIT_[A-Z_]+[A-Z]", path.read_text("utf-8")))
                except (UnicodeDecodeError, OSError):
                    continue
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert used and not sorted(v for v in used if f"`{v}`" not in text)
    assert re.search(r"1\. the command-line flag,\s+2\. the environment variable,\s+3\. the "
                     r"built-in default", text)


def test_docs_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert not sorted(p for p in pages if f"({p})" not in index)


def test_readme_shows_every_command_and_the_two_quick_start_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in {path.split()[0] for path, _ in all_commands()}:
        assert f"ckpt {name}" in readme, f"README.md has no example of `ckpt {name}`"
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [line.split()[0] for line in quick.split("```bash", 1)[1].split("```", 1)[0]
                .strip().splitlines()]
    assert commands == ["scripts/demo", "scripts/test"]


def test_files_the_docs_cite_are_in_the_repository() -> None:
    """Backticked repository paths (``src/ckptkit/x.py``) and relative links exist."""
    missing = []
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = page.read_text(encoding="utf-8")
        cited = re.findall(r"`([\w.-]+(?:/[\w.-]+)+\.(?:md|py|toml|sh|txt|json))`", text)
        linked = re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", text)
        for rel in cited:
            if not any((base / rel).exists() for base in (ROOT, ROOT / "src", page.parent)):
                missing.append(f"{page.name}: `{rel}`")
        missing += [f"{page.name}: ({rel})" for rel in linked if not (page.parent / rel).exists()]
    assert not missing, f"cited but not in the repository: {missing}"
