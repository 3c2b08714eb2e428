"""`diff`, `compare` and `strip` on a DCP step: the sample a real 2-rank FSDP2 job wrote."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tests.conftest import run_main

torch = pytest.importorskip("torch")
STEP = Path(__file__).resolve().parents[2] / "src" / "ckptkit" / "samples" / "fsdp_step_200"


@pytest.fixture
def consolidated(tmp_path: Path, capsys) -> Path:
    out = tmp_path / "step-200.safetensors"
    code, _out, err = run_main(capsys, "convert", str(STEP), "--to", "safetensors", "-o",
                               str(out))
    assert code == 0, err
    return out


def test_diff_of_a_dcp_step_against_its_consolidated_file(consolidated: Path, capsys) -> None:
    code, out, err = run_main(capsys, "diff", str(STEP), str(consolidated), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["summary"]["changed"] == 0 and report["summary"]["unchanged"] == 24
    code, out, _err = run_main(capsys, "compare", str(STEP), str(consolidated), "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [(r["format"], r["step"], r["tensor_count"]) for r in rows] == [
        ("torch-dcp", 200, 24), ("safetensors", 200, 24)]


def test_strip_a_dcp_step_into_an_inference_file(tmp_path: Path, capsys) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    code, out, err = run_main(capsys, "strip", str(STEP), "-o", str(tmp_path / "model.pt"))
    assert code == 0, err
    assert "optim  (optimizer state)" in out
    stripped = torch.load(tmp_path / "model.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(STEP, tmp_path / "reference.pt")
    reference = torch.load(tmp_path / "reference.pt", weights_only=False)
    assert set(stripped) == {"model", "step"} and stripped["step"] == 200
    assert stripped["model"].keys() == reference["model"].keys()
    assert all(torch.equal(stripped["model"][k], reference["model"][k])
               for k in reference["model"])
