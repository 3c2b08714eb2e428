"""`latest` and `cleanup` on step directories of sharded saves: a DCP, Orbax or Hugging Face
step directory is one checkpoint, proven complete before anything older goes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import ckptkit
from ckptkit.runs import integrity
from ckptkit.runs.retention import plan_cleanup
from ckptkit.runs.saving import find_latest
from tests.conftest import run_main

torch = pytest.importorskip("torch")


def dcp_save(path: Path, step: int) -> None:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(step)
    state = {"model": torch.nn.Linear(16, 16).state_dict(), "step": step}
    dcp.save(state, checkpoint_id=path, no_dist=True)


@pytest.fixture
def dcp_run(tmp_path: Path) -> Path:
    """torchtitan's layout: step-N/ directories written by torch.distributed.checkpoint."""
    run = tmp_path / "run"
    for step in (100, 200, 300, 400):
        dcp_save(run / f"step-{step}", step)
    # step-400 crashed before torch renamed .metadata into place.
    (run / "step-400" / ".metadata").unlink()
    (run / "step-7").mkdir()
    (run / "step-7" / "notes.txt").write_text("not a checkpoint")  # a folder, not a save
    return run


def test_latest_skips_a_dcp_step_without_metadata(dcp_run: Path) -> None:
    result = find_latest(dcp_run)
    assert result.checkpoint is not None and result.checkpoint.path.name == "step-300"
    # The DCP reader's verify verb says it, or (without one) the layout check does.
    assert [c.path.name for c, _why in result.skipped] == ["step-400"]
    assert "without .metadata" in result.skipped[0][1]
    assert ckptkit.latest(dcp_run).step == 300


def test_cleanup_deletes_older_dcp_steps_only_behind_a_complete_one(dcp_run: Path,
                                                                     capsys) -> None:
    plan = plan_cleanup(dcp_run, keep_last=1)
    actions = {i.path.name: (i.action, i.reason) for i in plan.items}
    assert actions["step-100"][0] == actions["step-200"][0] == "delete"
    assert actions["step-300"] == ("keep", "newest complete checkpoint (step-400 is "
                                           "incomplete)")
    assert actions["step-400"][0] == "keep"
    assert actions["step-7"] == ("keep", "not a periodic checkpoint (directory)")
    assert [g.path.name for g in plan.guards] == ["step-300"]
    code, out, err = run_main(capsys, "cleanup", str(dcp_run), "--keep-last", "1", "--yes")
    assert code == 0, err
    assert "deleted 2 checkpoint(s)" in out
    assert sorted(p.name for p in dcp_run.iterdir()) == ["step-300", "step-400", "step-7"]
    assert (dcp_run / "step-7" / "notes.txt").read_text() == "not a checkpoint"


def test_nothing_is_deleted_when_the_guard_lost_its_metadata(dcp_run: Path) -> None:
    from ckptkit.errors import DeletionStoppedError

    plan = plan_cleanup(dcp_run, keep_last=1)
    (dcp_run / "step-300" / ".metadata").unlink()  # after the plan, before execute
    with pytest.raises(DeletionStoppedError, match="step-300.*no longer complete"):
        plan.execute()
    assert (dcp_run / "step-100").is_dir() and (dcp_run / "step-200").is_dir()


def test_hugging_face_sharded_epoch_dirs(tmp_path: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    run = tmp_path / "tune"
    for epoch in range(3):
        torch.manual_seed(epoch)
        state = {f"layers.{i}.weight": torch.randn(64, 64) for i in range(4)}
        (run / f"epoch_{epoch}").mkdir(parents=True)
        save_torch_state_dict(state, run / f"epoch_{epoch}", max_shard_size="40KB")
    shards = sorted((run / "epoch_2").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()  # a shard the index names is missing
    assert integrity.check_complete(run / "epoch_1")
    verdict = integrity.check_complete(run / "epoch_2")
    assert not verdict and shards[-1].name in verdict.reason
    assert find_latest(run).checkpoint.path.name == "epoch_1"
    plan = plan_cleanup(run, keep_last=1)
    assert {i.path.name: i.action for i in plan.items} == {
        "epoch_0": "delete", "epoch_1": "keep", "epoch_2": "keep"}


def test_global_step_dirs_and_layouts(tmp_path: Path) -> None:
    run = tmp_path / "ds"
    dcp_save(run / "global_step10", 10)
    dcp_save(run / "global_step20", 20)
    shutil.copytree(run / "global_step20", run / "global_step30")
    for data in (run / "global_step30").glob("*.distcp"):
        data.unlink()
    assert integrity.directory_layout(run / "global_step10") == "dcp"
    assert integrity.directory_layout(tmp_path) is None
    assert not integrity.check_complete(run / "global_step30")
    assert find_latest(run, prefix="global_step").checkpoint.step == 20


def test_deepspeed_global_step_dirs(tmp_path: Path) -> None:
    samples = Path(__file__).resolve().parents[1] / "formats" / "deepspeed_samples"
    run = tmp_path / "ds_run"
    run.mkdir()
    for stage in (1, 2, 3):  # real ZeRO saves of 2-rank jobs, one per stage
        shutil.copytree(samples / f"zero{stage}" / "global_step2",
                        run / f"global_step{stage}")
    rank1 = next((run / "global_step3").glob("*rank_1_*optim_states.pt"))
    rank1.unlink()  # one rank's optimizer states never arrived
    assert integrity.directory_layout(run / "global_step1") == "deepspeed"
    verdict = integrity.check_complete(run / "global_step3")
    assert not verdict and "rank" in verdict.reason
    assert find_latest(run).checkpoint.path.name == "global_step2"
    plan = plan_cleanup(run, keep_last=1)
    assert {i.path.name: i.action for i in plan.items} == {
        "global_step1": "delete", "global_step2": "keep", "global_step3": "keep"}
