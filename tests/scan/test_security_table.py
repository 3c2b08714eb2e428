"""scripts/lib/security_table.py: the figures table of docs/security.md, prose left alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.figures import LABELS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lib" / "security_table.py"


@pytest.fixture(scope="module")
def table() -> ModuleType:
    spec = importlib.util.spec_from_file_location("security_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAGE = """# Security

Prose before the table, with `code` and a list:

- one
- two

<!-- figures:start -->
| stale | table |
<!-- figures:end -->

Prose after the table.
"""


def test_rows_follow_the_labels_with_counts(table: ModuleType) -> None:
    text = table.render({"fuzz-inputs": 12345, "kills": 7}, LABELS, date="2025-01-02",
                        where="Linux x86_64, 8 cores", command="scripts/fuzz 5000")
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0][2:] for row in rows] == list(LABELS.values())
    assert f"| {LABELS['fuzz-inputs']} | 12,345 |" in rows
    assert f"| {LABELS['kills']} | 7 |" in rows
    assert f"| {LABELS['disk-full']} | — |" in rows
    assert text.endswith("Measured 2025-01-02 on Linux x86_64, 8 cores by `scripts/fuzz 5000`.")


def test_a_figure_without_a_label_keeps_its_name(table: ModuleType) -> None:
    text = table.render({"new-figure": 3}, LABELS, date="d", where="w", command="c")
    assert "| `new-figure` | 3 |" in text


def test_only_the_part_between_the_markers_changes(table: ModuleType, tmp_path: Path) -> None:
    doc = tmp_path / "security.md"
    doc.write_text(PAGE)
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps({"fuzz-inputs": 5000, "hostile-files": 412}))
    assert table.main([str(figures), "--doc", str(doc), "--command", "scripts/fuzz 5000"]) == 0
    text = doc.read_text()
    before, rest = text.split("<!-- figures:start -->\n")
    inside, after = rest.split("<!-- figures:end -->")
    assert before == PAGE.split("<!-- figures:start -->\n")[0]
    assert after == PAGE.split("<!-- figures:end -->")[1]
    assert "stale" not in inside
    assert f"| {LABELS['fuzz-inputs']} | 5,000 |" in inside
    assert f"| {LABELS['hostile-files']} | 412 |" in inside
    # A second run replaces its own table instead of adding another.
    table.main([str(figures), "--doc", str(doc), "--command", "scripts/fuzz 5000"])
    assert doc.read_text() == text


def test_a_page_without_markers_gets_them_appended(table: ModuleType) -> None:
    text = table.rewrite("# Security\n\nOnly prose.\n", "| t |")
    assert text == ("# Security\n\nOnly prose.\n\n<!-- figures:start -->\n| t |\n"
                    "<!-- figures:end -->\n")


def test_a_missing_page_is_created_with_a_title(table: ModuleType, tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps({"fuzz-inputs": 1}))
    doc = tmp_path / "docs" / "security.md"
    doc.parent.mkdir()
    table.main([str(figures), "--doc", str(doc), "--command", "scripts/fuzz 1"])
    text = doc.read_text()
    assert text.startswith("# Security\n\n<!-- figures:start -->\n| figure | count |")
    assert text.endswith("by `scripts/fuzz 1`.\n<!-- figures:end -->\n")


def test_unreadable_figures_exit_with_one_line(table: ModuleType, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        table.main([str(tmp_path / "absent.json"), "--doc", str(tmp_path / "s.md"),
                    "--command", "c"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "absent.json" in err and "scripts/fuzz" in err
    assert not (tmp_path / "s.md").exists()
