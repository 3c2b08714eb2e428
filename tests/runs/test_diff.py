"""``ckpt diff``: frozen backbone vs trained head, cross-format pairing, memory bound."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ckptkit.runs.diff import diff
from tests.conftest import SRC, run_main
from tests.mrl_runs import mrl_run

torch = pytest.importorskip("torch")


run = run_main


def groups(report) -> dict[str, tuple[int, int]]:
    return {g.name: (g.counts["changed"], g.total) for g in report.groups}


def test_frozen_backbone_unchanged_head_changed(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    paths = mrl_run(tmp_path)
    report = diff(paths["epoch_0"], paths["latest"])
    assert groups(report)["backbone"] == (0, 11)
    assert groups(report)["head"] == (2, 2)
    assert groups(report)["optimizer"] == (0, 6)  # Adam state exists only in latest.pt
    head = next(t for t in report.tensors if t.name == "model.head.weight")
    assert head.status == "changed" and head.max_abs > 0 and 0 < head.relative < 10
    assert head.relative == pytest.approx(
        head.max_abs / torch.load(paths["epoch_0"])["model"]["head.weight"].abs().max().item())
    code, out, _ = run(capsys, "diff", str(paths["epoch_0"]), str(paths["latest"]))
    assert code == 0
    assert "backbone  0/11 changed" in out and "head       2/2 changed" in out
    assert "Training state" in out
    code, out, _ = run(capsys, "diff", str(paths["epoch_0"]), str(paths["best"]),
                       "--weights-only", "--json")
    data = json.loads(out)
    assert code == 0 and data["summary"] == {"changed": 2, "unchanged": 11,
                                             "shape_changed": 0, "only_a": 0, "only_b": 0}


def test_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = mrl_run(tmp_path)
    code, out, _ = run(capsys, "diff", str(paths["best"]), str(paths["latest"]), "--json")
    data = json.loads(out)
    assert code == 0
    assert set(data) == {"a", "b", "format_a", "format_b", "atol", "depth", "summary",
                         "matched", "groups", "tensors"}
    assert data["matched"] == {"exact": 13, "renamed": 0, "flax": 0}
    assert set(data["groups"][0]) == {"name", "section", "total", "changed", "unchanged",
                                      "shape_changed", "only_a", "only_b", "max_abs", "relative"}
    tensor = data["tensors"][0]
    assert set(tensor) == {"name", "name_b", "section", "group", "status", "shape_a",
                           "shape_b", "dtype_a", "dtype_b", "max_abs", "relative", "match"}
    only_b = [t for t in data["tensors"] if t["status"] == "only_b"]
    assert len(only_b) == 6 and all(t["section"] == "training" for t in only_b)


def test_across_formats_flax_npz_and_safetensors(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    paths = mrl_run(tmp_path)
    sd = tmp_path / "sd.pt"
    torch.save(torch.load(paths["latest"])["model"], sd)
    flax = tmp_path / "sd.flax.npz"
    st = tmp_path / "sd.safetensors"
    assert run(capsys, "convert", str(sd), "--to", "flax", "-o", str(flax), "-q")[0] == 0
    assert run(capsys, "convert", str(sd), "--to", "safetensors", "-o", str(st), "-q")[0] == 0
    report = diff(sd, flax)
    counts = report.counts()
    # Flax BatchNorm keeps no step counter: the converter drops num_batches_tracked.
    assert counts == {"changed": 0, "unchanged": 12, "shape_changed": 0, "only_a": 1,
                      "only_b": 0}
    assert [t.name for t in report.tensors if t.status == "only_a"] == [
        "backbone.1.num_batches_tracked"]
    assert report.matched["flax"] == 12
    kernel = next(t for t in report.tensors if t.name == "head.weight")
    assert kernel.name_b == "params/head/kernel" and kernel.shape_b == (8, 4)
    exact = diff(sd, st)
    assert exact.matched == {"exact": 13, "renamed": 0, "flax": 0}
    assert exact.counts()["unchanged"] == 13
    nested = diff(paths["latest"], st, weights_only=True)
    assert nested.matched["renamed"] == 13 and nested.counts()["unchanged"] == 13
    # The other way round (Flax as A) pairs too, and finds the trained head.
    back = diff(flax, paths["epoch_0"])
    assert back.counts()["changed"] == 2 and back.counts()["only_b"] == 1


def test_shape_changed_only_in_a_and_b(tmp_path: Path) -> None:
    a = {"enc.w": torch.ones(3, 4), "enc.b": torch.zeros(4), "head.w": torch.ones(2, 4),
         "old.w": torch.ones(1)}
    b = {"enc.w": torch.ones(3, 4), "enc.b": torch.zeros(4), "head.w": torch.ones(5, 4),
         "new.w": torch.ones(1)}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    report = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    status = {t.name: t.status for t in report.tensors}
    assert status == {"enc.w": "unchanged", "enc.b": "unchanged", "head.w": "shape_changed",
                      "old.w": "only_a", "new.w": "only_b"}
    head = next(t for t in report.tensors if t.name == "head.w")
    assert head.shape_a == (2, 4) and head.shape_b == (5, 4) and head.max_abs is None


def test_atol_and_special_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = torch.randn(64, 32)
    nan = torch.tensor([1.0, math.nan, math.inf, -0.0])
    torch.save({"w": base, "n": nan, "m": torch.tensor([1.0, 2.0])}, tmp_path / "a.pt")
    torch.save({"w": base + 1e-5, "n": torch.tensor([1.0, math.nan, math.inf, 0.0]),
                "m": torch.tensor([1.0, math.nan])}, tmp_path / "b.pt")
    exact = {t.name: t for t in diff(tmp_path / "a.pt", tmp_path / "b.pt").tensors}
    assert exact["w"].status == "changed" and exact["w"].max_abs == pytest.approx(1e-5, rel=0.1)
    assert exact["n"].status == "unchanged"  # NaN = NaN, inf = inf, -0.0 = 0.0
    assert exact["m"].status == "changed" and math.isnan(exact["m"].max_abs)
    loose = {t.name: t for t in diff(tmp_path / "a.pt", tmp_path / "b.pt", atol=1e-4).tensors}
    assert loose["w"].status == "unchanged" and loose["m"].status == "changed"
    code, out, _ = run(capsys, "diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"),
                       "--atol", "1e-4", "--json")
    data = json.loads(out)  # strict JSON: NaN is spelled "nan"
    assert code == 0 and data["summary"]["changed"] == 1 and data["atol"] == 1e-4


def test_missing_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "a.pt")
    code, _out, err = run(capsys, "diff", str(tmp_path / "a.pt"), str(tmp_path / "nope.pt"))
    assert code == 4 and "nope.pt" in err


#: Runs one command and prints its own peak RSS (KiB).  A fresh interpreter, so the
#: measured process does not inherit pytest's high-water mark through fork.
_MEASURE = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n")


def test_diff_memory_is_bounded(tmp_path: Path) -> None:
    tensor_mib = 100
    rows = tensor_mib * 2**20 // 4 // 1024
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.weight": torch.empty(rows, 1024).normal_(generator=g)
             for i in range(3)}
    torch.save(state, tmp_path / "a.pt")
    state["layers.1.weight"][0, 0] += 1.0
    torch.save(state, tmp_path / "b.pt")
    del state
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, sys.executable, "-m", "ckptkit", "diff",
         str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--json"],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(SRC)})
    code, peak_kib = map(int, proc.stdout.split())
    assert code == 0, proc.stderr
    limit_mib = 2 * tensor_mib + 100
    assert peak_kib / 1024 <= limit_mib, f"peak RSS {peak_kib / 1024:.0f} MiB > {limit_mib}"


def test_orbax_step_against_itself_and_its_consolidated_copy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Orbax arrays have no plain bytes in the files: diff reads them through the format's
    own reader (TensorStore), and a consolidated copy compares equal."""
    pytest.importorskip("tensorstore")
    step = SRC / "ckptkit" / "samples" / "orbax_step_3"
    same = diff(step, step)
    assert same.tensors and all(t.status == "unchanged" for t in same.tensors)
    out = tmp_path / "step3.safetensors"
    code, _out, err = run_main(capsys, "convert", str(step), "--to", "safetensors", "-o", str(out))
    assert code == 0, err
    report = diff(step, out)
    assert {t.status for t in report.tensors} == {"unchanged"}
    assert len(report.tensors) == len(same.tensors)
