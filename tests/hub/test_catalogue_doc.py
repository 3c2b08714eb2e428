"""docs/catalogue.md lists every built-in model and file exactly as the catalogue data says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ckptkit.hub import catalogue

ROOT = Path(__file__).resolve().parents[2]


def _table_module():
    spec = importlib.util.spec_from_file_location(
        "catalogue_table", ROOT / "scripts" / "lib" / "catalogue_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_tables_match_the_catalogue() -> None:
    table = _table_module()
    text = (ROOT / "docs" / "catalogue.md").read_text()
    assert table.rewrite(text, table.render(catalogue.load())) == text, (
        "docs/catalogue.md is stale: run python scripts/lib/catalogue_table.py")


def test_every_model_and_source_is_in_the_doc() -> None:
    text = (ROOT / "docs" / "catalogue.md").read_text()
    cat = catalogue.load()
    for name in cat.models:
        assert f"`{name}`" in text
    for spec in cat.files.values():
        for source in spec.sources:
            assert source.ref in text, source
