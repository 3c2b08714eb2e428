"""What the core install (no torch, TensorFlow, JAX or safetensors) does, and what a missing
package does: exit 1 with one line saying what to install, never exit 2 (bad flags)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import FRAMEWORKS, SRC, run_ckpt_without

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = SRC.parent
#: Holds a bfloat16 and a float16 tensor beside a float32 one.
BF16_SAMPLE = SRC / "ckptkit" / "samples" / "model.safetensors"


def test_ml_dtypes_is_a_core_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(dep.startswith("ml_dtypes") for dep in project["dependencies"])


def test_bfloat16_converts_and_diffs_in_the_core_install(tmp_path: Path) -> None:
    converted = run_ckpt_without(FRAMEWORKS, "convert", str(BF16_SAMPLE), "--to", "torch",
                                 "-o", "model.pt", cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert "bfloat16" not in converted.stderr and (tmp_path / "model.pt").is_file()
    diffed = run_ckpt_without(FRAMEWORKS, "diff", str(BF16_SAMPLE), "model.pt", "--json",
                              cwd=tmp_path)
    assert diffed.returncode == 0, diffed.stderr
    assert '"changed": 0' in diffed.stdout and '"unchanged": 3' in diffed.stdout


@pytest.mark.parametrize("args", [
    ("convert", str(BF16_SAMPLE), "--to", "torch", "-o", "model.pt"),
    ("convert", str(BF16_SAMPLE), "--to", "npz", "-o", "model.npz"),
    ("diff", str(BF16_SAMPLE), str(BF16_SAMPLE)),
], ids=["convert-torch", "convert-npz", "diff"])
def test_a_missing_package_exits_1_saying_what_to_install(tmp_path: Path,
                                                          args: tuple[str, ...]) -> None:
    result = run_ckpt_without((*FRAMEWORKS, "ml_dtypes"), *args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs ml_dtypes, which is not installed" in lines[0]
    assert "pip install ml_dtypes" in lines[0] and "ckptkit[jax]" not in lines[0]
    assert not list(tmp_path.iterdir())  # nothing half-written
