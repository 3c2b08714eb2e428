"""Fuzzing the reading budget: adversarial shapes (:func:`tests.mutations.shapes`: deep
nesting, huge repetition counts, keys hashed again and again, pickles hidden in records,
broadcast views, archives in archives, giant headers) go to every reader and command, under a
reduced budget (:data:`SHAPE_LIMITS`) so that they go past it while their files stay small.
Each must end cleanly, within every limit of its budget (:mod:`ckptkit.storage.budget`), and within
the memory bound of ``tests/formats/test_fuzz.py`` (``64 MiB + 4 x the input``): with a reader that
ignored the budget, the larger shapes would not.

Profiles as in ``tests/formats/test_fuzz.py``: CI runs one large shape of each kind and a few drawn
ones; ``CKPTKIT_FUZZ_EXAMPLES=N`` (``scripts/fuzz``) draws 2 % of N.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given

import ckptkit
from ckptkit.storage import budget
from ckptkit import formats
from ckptkit.convert.passthrough import convert_format
from ckptkit.runs.diff import diff
from ckptkit.errors import ExitCode
from ckptkit.scan.scanning import scan
from tests import figures
from tests.mutations import Shape, shapes
from tests.formats.test_fuzz import CLEAN, bounded, fuzz_settings, survive

#: A reduced budget: shapes go past it while their files stay small and quick to read.
SHAPE_LIMITS = {"CKPTKIT_MAX_OPCODES": "300_000", "CKPTKIT_MAX_NODES": "100_000",
                "CKPTKIT_MAX_STACK": "300_000", "CKPTKIT_MAX_TREE": "300_000",
                "CKPTKIT_MAX_BYTES": str(8 << 20)}
#: Kinds of work that add up over a read (the others are per-item caps).
COUNTED = ("opcodes", "nodes", "stack", "tree", "decompressed", "expanded")


def check_budgets(path: Path, out: Path) -> None:
    """Every reader and command on ``path``, each within its own budget: a clean outcome, and
    no kind of work past its limit."""
    readers = [(fmt, importlib.import_module(module)) for fmt, module in formats.FORMAT_MODULES]
    operations: list[tuple[str, Callable[[], Any]]] = [
        *((f"{fmt}.read_info", lambda r=reader: r.read_info(path)) for fmt, reader in readers),
        ("inspect", lambda: json.dumps(ckptkit.inspect(path).to_dict(), default=str)),
        ("load", lambda: ckptkit.load(path, framework="numpy")),
        ("scan", lambda: scan([path]).to_dict()),
        ("diff", lambda: diff(path, path).to_dict()),
        ("convert", lambda: convert_format(path, "safetensors", out / "converted.safetensors")),
    ]
    for name, operation in operations:
        with budget.reading(path) as account:
            # Usage errors: a reader asked for a file of another format, nothing to convert.
            survive(operation, CLEAN | {ExitCode.NOT_FOUND, ExitCode.USAGE})
        for kind in COUNTED:
            assert account.used[kind] <= account.limit(kind), (name, kind, account.used)
        (out / "converted.safetensors").unlink(missing_ok=True)


#: One shape of each kind past SHAPE_LIMITS, always tried (drawn examples start small).
SHAPE_EXAMPLES = (
    Shape("repeated", (("unit", b"\x8f"), ("count", 400_000))),
    Shape("nested", (("kind", "dict"), ("depth", 600), ("items", 50_000), ("tensors", True))),
    Shape("rechecked_key", (("width", 900), ("setitems", 5_000))),
    Shape("pickle_records", (("records", 2), ("record_mib", 1))),
    Shape("broadcast_view", (("shape", (50_000, 50_000)), ("stride", (0, 0)), ("numel", 1))),
    Shape("nested_zips", (("levels", 3), ("fanout", 2), ("member_mib", 6))),
    Shape("header_flood", (("count", 2_000_000),)),
    Shape("msgpack_flood", (("count", 1_200_000), ("depth", 1))),
)


def _every_kind_of_shape(test: Callable[[Shape], None]) -> Callable[[Shape], None]:
    for shape in reversed(SHAPE_EXAMPLES):
        test = example(shape=shape)(test)
    return test


def test_adversarial_shapes_stay_within_budget(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in SHAPE_LIMITS.items():
        monkeypatch.setenv(variable, value)

    @fuzz_settings(4, 0.02, per_seed=False)
    @given(shape=shapes())
    @_every_kind_of_shape
    def run(shape: Shape) -> None:
        with tempfile.TemporaryDirectory(dir=tmp_path) as where:
            path = shape.write(Path(where))
            out = Path(where) / "out"
            out.mkdir()
            with bounded(path.stat().st_size):
                check_budgets(path, out)
        figures.count("budget-inputs")

    run()
