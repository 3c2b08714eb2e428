"""DeepSpeed ZeRO stage 1-3 checkpoints (real 2-rank CPU/gloo jobs, made once by
scripts/make_deepspeed_samples.py) read as one model, against DeepSpeed's own zero_to_fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError
from ckptkit.formats import deepspeed
from ckptkit.formats.tensor_io import read_tensor
from tests.conftest import FRAMEWORKS, run_ckpt_without

SAMPLES = Path(__file__).with_name("deepspeed_samples")
STAGES = (1, 2, 3)


def _expected(stage: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(SAMPLES / f"zero{stage}" / "expected_fp32.safetensors")


@pytest.mark.parametrize("stage", STAGES)
def test_consolidates_as_zero_to_fp32_does(stage: int) -> None:
    ours = ckptkit.load(SAMPLES / f"zero{stage}", framework="numpy")
    expected = _expected(stage)
    assert set(ours) == set(expected) and len(expected) == 7
    for name, want in expected.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


@pytest.mark.parametrize("stage", STAGES)
def test_structure_without_torch(stage: int) -> None:
    result = run_ckpt_without(FRAMEWORKS, "inspect", "--json", str(SAMPLES / f"zero{stage}"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    expected = _expected(stage)
    assert data["format"] == "deepspeed"
    assert {t["name"]: t["shape"] for t in data["tensors"]} == {
        k: list(v.shape) for k, v in expected.items()}
    assert data["details"]["zero_stage"] == stage and data["details"]["world_size"] == 2
    assert data["metadata"]["global_steps"] == 2 and data["metadata"]["epoch"] == 1
    spread = data["details"]["placement"]["0.weight"]
    assert "rank 0" in spread and ("rank 1" in spread) == (stage == 3)


def test_step_directory_and_run_directory_read_the_same() -> None:
    run = ckptkit.inspect(SAMPLES / "zero2")
    step = ckptkit.inspect(SAMPLES / "zero2" / "global_step2")
    assert run.tensors == step.tensors


def test_parameters_inside_one_partition_are_plain_byte_spans() -> None:
    raw = deepspeed.read_info(SAMPLES / "zero1")
    refs = dict((name[0], ref) for name, ref in raw.tensors)
    expected = _expected(1)
    spanned = [n for n, r in refs.items() if r.span is not None]
    assert spanned and len(spanned) < len(refs)  # 1.weight straddles the two ranks
    for name in spanned:
        assert read_tensor(refs[name]).tobytes() == expected[name].tobytes()


def test_load_as_torch() -> None:
    torch = pytest.importorskip("torch")
    state = ckptkit.load(SAMPLES / "zero3", framework="torch")
    for name, want in _expected(3).items():
        assert torch.equal(state[name], torch.from_numpy(want))


@pytest.mark.parametrize("stage", STAGES)
def test_complete_samples_verify_clean(stage: int) -> None:
    assert deepspeed.verify(SAMPLES / f"zero{stage}") == []


def test_missing_rank_is_named(tmp_path: Path) -> None:
    copy = tmp_path / "zero2"
    shutil.copytree(SAMPLES / "zero2", copy)
    (copy / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    problems = deepspeed.verify(copy)
    assert [p.kind for p in problems] == ["incomplete"]
    assert "saved by 2 ranks" in problems[0].message
    result = run_ckpt_without((), "inspect", str(copy))
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1


def test_truncated_rank_file_fails_in_one_line(tmp_path: Path) -> None:
    copy = tmp_path / "zero3"
    shutil.copytree(SAMPLES / "zero3", copy)
    victim = copy / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:-900])
    problems = deepspeed.verify(copy)
    assert problems and problems[0].file == str(victim)
    with pytest.raises(IntegrityError):
        ckptkit.inspect(copy)
    result = run_ckpt_without((), "inspect", str(copy))
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert victim.name in result.stderr
