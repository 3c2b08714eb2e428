"""`ckptkit.runs.retention`: recognising, grouping and planning over real run directories."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ckptkit.errors import DeletionStoppedError, UsageError
from ckptkit.runs.retention import parse_name, plan_cleanup, scan
from tests.conftest import SRC
from tests.runs import hf_run, muomni_run, orbax_run, truncate

SAMPLES = SRC / "ckptkit" / "samples"

pytest.importorskip("torch")


def actions(plan) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {str(i.path.relative_to(plan.root)): i.action for i in plan.items}


def deleted(plan) -> set[str]:  # type: ignore[no-untyped-def]
    return {str(i.path.relative_to(plan.root)) for i in plan.deleted}


@pytest.mark.parametrize("name,expected", [
    ("thinker_step_200.pt", ("thinker", 200)), ("thinker_step200.pt", ("thinker", 200)),
    ("audio_enc_step_5.pt", ("audio_enc", 5)), ("checkpoint_step_7.pth.tar", ("checkpoint", 7)),
    ("epoch_3.pt", ("", 3)), ("epoch12.pt", ("", 12)), ("model_epoch_4.pth", ("model_", 4)),
    ("epoch=3-step=400.ckpt", ("", 400)), ("epoch=3-step=400-val_loss=0.25.ckpt", ("", 400)),
    ("ckpt-12.index", ("ckpt", 12)),
    ("thinker_best.pt", None), ("thinker.pt", None), ("last.ckpt", None),
    ("latest_step_3.pt", None), ("best_epoch_2.pt", None), ("tokenizer.model", None),
    ("resnet50.pt", None), ("ckpt-12.data-00000-of-00001", None), ("checkpoint", None),
    # The common names (issue 13): a word or an underscore before the number.
    ("step_1000.pt", ("", 1000)), ("step1000.pt", ("", 1000)),
    ("checkpoint_5.pt", ("checkpoint", 5)), ("ckpt_7.pth", ("ckpt", 7)),
    ("model_100.pt", ("model", 100)), ("iter_3000.pt", ("iter", 3000)),
    ("model_100.safetensors", ("model", 100)), ("run_2024_05.bin", ("run_2024", 5)),
    # No separator: only as a run (see test_names_without_a_separator_count_only_as_a_run).
    ("100.pt", None), ("model100.pt", None), ("model-100.pt", None),
    ("model-00001-of-00002.safetensors", None), ("best_model_100.pt", None),
])
def test_parse_name(name: str, expected: tuple[str, int] | None) -> None:
    parsed = parse_name(name)
    assert (parsed[1], parsed[2]) == expected if parsed else expected is None


@pytest.mark.parametrize("name,expected", [
    ("100.pt", ("{N}.pt", "", 100)), ("model100.pt", ("model{N}.pt", "model", 100)),
    ("model-100.pt", ("model-{N}.pt", "model-", 100)),
    ("resnet50.pt", ("resnet{N}.pt", "resnet", 50)),
    ("model-00001-of-00002.safetensors", None), ("last100.pt", None),
])
def test_parse_name_in_a_run(name: str, expected: tuple[str, str, int] | None) -> None:
    parsed = parse_name(name, in_run=True)
    assert (parsed[0], parsed[1], parsed[2]) == expected if parsed else expected is None


COMMON = ("step_{}.pt", "checkpoint_{}.pt", "ckpt_{}.pt", "model_{}.pt", "iter_{}.pt", "{}.pt")


@pytest.mark.parametrize("pattern", COMMON)
def test_common_names_are_runs_for_cleanup_and_latest(tmp_path: Path, pattern: str) -> None:
    sample = SAMPLES / "thinker_step_200.pt"
    for step in (1000, 2000, 3000):
        shutil.copy(sample, tmp_path / pattern.format(step))
    shutil.copy(sample, tmp_path / "resnet50.pt")  # a lone number without a separator
    found = scan(tmp_path)
    assert [(c.path.name, c.step) for c in found] == [
        (pattern.format(s), s) for s in (1000, 2000, 3000)]
    assert {c.group for c in found} == {pattern.format("{N}")}
    assert deleted(plan_cleanup(tmp_path, keep_last=1)) == {pattern.format(1000),
                                                            pattern.format(2000)}
    assert actions(plan_cleanup(tmp_path, keep_last=1))["resnet50.pt"] == "keep"
    from ckptkit.runs.saving import latest

    newest = latest(tmp_path)
    assert newest is not None and newest.path.name == pattern.format(3000)


def test_names_without_a_separator_count_only_as_a_run(tmp_path: Path) -> None:
    sample = SAMPLES / "thinker_step_200.pt"
    for name in ("resnet50.pt", "model_100.pt", "model100.pt", "7.pt"):
        shutil.copy(sample, tmp_path / name)
    # Alone, only the name with an underscore before its number is a periodic checkpoint.
    assert [c.path.name for c in scan(tmp_path)] == ["model_100.pt"]
    for name in ("model200.pt", "8.pt"):
        shutil.copy(sample, tmp_path / name)
    # Two files sharing a pattern make a run; resnet50.pt still has no partner.
    assert {(c.group, c.path.name) for c in scan(tmp_path)} == {
        ("model_{N}.pt", "model_100.pt"), ("model{N}.pt", "model100.pt"),
        ("model{N}.pt", "model200.pt"), ("{N}.pt", "7.pt"), ("{N}.pt", "8.pt")}
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert deleted(plan) == {"model100.pt", "7.pt"}
    assert actions(plan)["resnet50.pt"] == "keep"


def test_keep_last_per_group_never_touches_pinned_files(tmp_path: Path) -> None:
    muomni_run(tmp_path, "thinker")
    muomni_run(tmp_path, "vision", steps=(50, 60, 70), seed=1)
    (tmp_path / "last.pt").symlink_to("thinker_step_100.pt")
    plan = plan_cleanup(tmp_path, keep_last=2)
    assert deleted(plan) == {"thinker_step_200.pt", "vision_step_50.pt"}
    acts = actions(plan)
    for name in ("thinker_best.pt", "thinker.pt", "vision.pt", "tokenizer.model", "notes.txt",
                 "last.pt", "thinker_step_100.pt", "thinker_step_300.pt", "thinker_step_400.pt"):
        assert acts[name] == "keep", name
    reasons = {i.path.name: i.reason for i in plan.items}
    assert "symlink" in reasons["thinker_step_100.pt"]
    assert "final checkpoint" in reasons["thinker.pt"]
    assert plan.freed_bytes == sum((tmp_path / n).stat().st_size for n in deleted(plan))


def test_a_run_shorter_than_keep_last_keeps_everything(tmp_path: Path) -> None:
    muomni_run(tmp_path, steps=(1, 2))
    assert not plan_cleanup(tmp_path, keep_last=3).deleted


def test_step_order_not_mtime(tmp_path: Path) -> None:
    muomni_run(tmp_path)
    os.utime(tmp_path / "thinker_step_100.pt", (2e9, 2e9))  # newest by mtime
    assert "thinker_step_100.pt" in deleted(plan_cleanup(tmp_path, keep_last=1))


def test_truncated_newest_keeps_newest_good_and_says_so(tmp_path: Path) -> None:
    muomni_run(tmp_path)
    truncate(tmp_path / "thinker_step_400.pt")
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert deleted(plan) == {"thinker_step_100.pt", "thinker_step_200.pt"}
    assert actions(plan)["thinker_step_300.pt"] == "keep"
    assert any("incomplete" in n and "thinker_step_300.pt" in n for n in plan.notes)


def test_all_incomplete_deletes_nothing_in_that_group(tmp_path: Path) -> None:
    muomni_run(tmp_path, steps=(1, 2, 3))
    for step in (1, 2, 3):
        truncate(tmp_path / f"thinker_step_{step}.pt", 0.3)
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert not plan.deleted
    assert any("nothing in this group is deleted" in n for n in plan.notes)


def test_keep_every(tmp_path: Path) -> None:
    muomni_run(tmp_path, steps=(100, 200, 300, 400, 500))
    plan = plan_cleanup(tmp_path, keep_last=1, keep_every=200)
    assert deleted(plan) == {"thinker_step_100.pt", "thinker_step_300.pt"}


def test_keep_best_min_and_max_from_inside_the_checkpoint(tmp_path: Path) -> None:
    muomni_run(tmp_path)  # val_loss 3.0, 2.5, 2.0, 5.0 -> best at step 300; newest is 400
    assert deleted(plan_cleanup(tmp_path, keep_last=1, keep_best="val_loss")) == {
        "thinker_step_100.pt", "thinker_step_200.pt"}
    # val_acc = 1/val_loss: max by default (name contains "acc"), same winner
    assert "thinker_step_300.pt" not in deleted(
        plan_cleanup(tmp_path, keep_last=1, keep_best="val_acc"))
    # forced max on a loss keeps the worst (step 400 is newest anyway): 100..300 minus none
    assert deleted(plan_cleanup(tmp_path, keep_last=0, keep_best="val_loss:max")) == {
        "thinker_step_100.pt", "thinker_step_200.pt", "thinker_step_300.pt"}


def test_checkpoints_without_the_metric_are_kept_and_noted(tmp_path: Path) -> None:
    import torch

    muomni_run(tmp_path)
    state = torch.load(tmp_path / "thinker_step_200.pt", weights_only=True)
    del state["val_loss"]
    torch.save(state, tmp_path / "thinker_step_200.pt")
    plan = plan_cleanup(tmp_path, keep_last=1, keep_best="val_loss")
    assert deleted(plan) == {"thinker_step_100.pt"}
    assert any("lack 'val_loss'" in n for n in plan.notes)
    plan = plan_cleanup(tmp_path, keep_last=1, keep_best="no_such_metric")
    assert not plan.deleted
    assert any("no checkpoint records" in n for n in plan.notes)


def test_keep_last_zero_needs_keep_best(tmp_path: Path) -> None:
    muomni_run(tmp_path)
    with pytest.raises(UsageError, match="keep-last 0"):
        plan_cleanup(tmp_path, keep_last=0)
    with pytest.raises(UsageError):
        plan_cleanup(tmp_path, keep_last=1, keep_best="val_loss:sideways")


def test_hf_dirs_keep_best_from_trainer_state(tmp_path: Path) -> None:
    hf_run(tmp_path, steps=(10, 20, 30, 40), eval_losses=(2.0, 1.0, 1.5, 1.7))
    (tmp_path / "trainer_state.json").write_text("{}")
    plan = plan_cleanup(tmp_path, keep_last=1, keep_best="eval_loss")
    assert deleted(plan) == {"checkpoint-10", "checkpoint-30"}
    assert actions(plan)["trainer_state.json"] == "keep"
    assert actions(plan)["config.json"] == "keep"
    # "loss" alone is looked up as eval_loss too, the way HF names it
    assert deleted(plan_cleanup(tmp_path, keep_last=1, keep_best="loss")) == deleted(plan)


def test_hf_half_written_newest_dir(tmp_path: Path) -> None:
    dirs = hf_run(tmp_path, steps=(10, 20, 30), eval_losses=(1.0, 1.0, 1.0))
    (dirs[30] / "trainer_state.json").unlink()
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert deleted(plan) == {"checkpoint-10"}


def test_orbax_dirs_and_lightning_names(tmp_path: Path) -> None:
    orbax_run(tmp_path / "orbax", committed=(True, True, False))
    (tmp_path / "orbax" / "4000.orbax-checkpoint-tmp-1").mkdir()
    plan = plan_cleanup(tmp_path / "orbax", keep_last=1)
    assert deleted(plan) == {"1000"}  # 3000 uncommitted -> 2000 kept too; tmp dir untouched
    light = tmp_path / "light"
    light.mkdir()
    for name in ("epoch=0-step=100.ckpt", "epoch=1-step=200.ckpt", "epoch=2-step=300.ckpt",
                 "last.ckpt"):
        import torch
        torch.save({"step": 1}, light / name)
    assert deleted(plan_cleanup(light, keep_last=1)) == {"epoch=0-step=100.ckpt",
                                                         "epoch=1-step=200.ckpt"}


def test_plain_numeric_dirs_are_not_orbax(tmp_path: Path) -> None:
    for name in ("2023", "2024"):
        (tmp_path / name).mkdir()
    assert scan(tmp_path) == []


def test_recursive_walks_run_subdirectories(tmp_path: Path) -> None:
    muomni_run(tmp_path / "thinker_tiny", steps=(1, 2, 3))
    muomni_run(tmp_path / "vision_tiny", "vision", steps=(5, 6))
    assert not plan_cleanup(tmp_path, keep_last=1).deleted
    plan = plan_cleanup(tmp_path, keep_last=1, recursive=True)
    assert deleted(plan) == {"thinker_tiny/thinker_step_1.pt", "thinker_tiny/thinker_step_2.pt",
                             "vision_tiny/vision_step_5.pt"}


def test_tf_checkpoints_go_with_their_shards(tmp_path: Path, tf) -> None:  # type: ignore[no-untyped-def]
    v = tf.Variable(tf.zeros((16, 16)))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), str(tmp_path),
                                         max_to_keep=None)
    for _ in range(3):
        v.assign_add(tf.ones((16, 16)))
        manager.save()
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert deleted(plan) == {"ckpt-1.index", "ckpt-2.index"}
    assert actions(plan)["checkpoint"] == "keep"
    result = plan.execute()
    assert len(result.deleted) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint", "ckpt-3.data-00000-of-00001", "ckpt-3.index"]
    restored = tf.Variable(tf.zeros((16, 16)))
    tf.train.Checkpoint(v=restored).restore(tf.train.latest_checkpoint(str(tmp_path)))
    assert float(restored[0, 0]) == 3.0


def test_execute_deletes_nothing_when_a_planned_file_changed(tmp_path: Path) -> None:
    muomni_run(tmp_path)
    plan = plan_cleanup(tmp_path, keep_last=2)
    with open(tmp_path / "thinker_step_100.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(DeletionStoppedError, match=r"nothing deleted: .*thinker_step_100\.pt "
                       r"changed since the plan was made: size") as exc:
        plan.execute()
    assert exc.value.deleted == () and exc.value.exit_code == 1
    assert {"thinker_step_100.pt", "thinker_step_200.pt"} <= {p.name for p in tmp_path.iterdir()}


def replace_keeping_size_and_mtime(path: Path) -> None:
    """Swap ``path`` for a copy with the same bytes, size and mtime: only the inode differs."""
    st = path.stat()
    copy = path.with_name(path.name + ".copy")
    shutil.copy(path, copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, path)


def test_execute_notices_a_replaced_file_and_a_touched_one(tmp_path: Path) -> None:
    muomni_run(tmp_path)
    plan = plan_cleanup(tmp_path, keep_last=2)
    replace_keeping_size_and_mtime(tmp_path / "thinker_step_200.pt")
    with pytest.raises(DeletionStoppedError, match=r"thinker_step_200\.pt changed .*inode"):
        plan.execute()
    plan = plan_cleanup(tmp_path, keep_last=2)
    os.utime(tmp_path / "thinker_step_100.pt", (1e9, 1e9))
    with pytest.raises(DeletionStoppedError, match=r"thinker_step_100\.pt changed .*mtime"):
        plan.execute()
    assert {"thinker_step_100.pt", "thinker_step_200.pt"} <= {p.name for p in tmp_path.iterdir()}
    plan_cleanup(tmp_path, keep_last=2).execute()  # planned afresh, it goes through
    assert not (tmp_path / "thinker_step_100.pt").exists()


def test_execute_reproves_the_newest_kept_checkpoint(tmp_path: Path) -> None:
    muomni_run(tmp_path)
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert [g.path.name for g in plan.guards] == ["thinker_step_400.pt"]
    truncate(tmp_path / "thinker_step_400.pt")
    with pytest.raises(DeletionStoppedError, match=r"nothing deleted: .*thinker_step_400\.pt, "
                       r"the newest kept checkpoint of thinker_step_\{N\}\.pt, is no longer "
                       r"complete"):
        plan.execute()
    assert all((tmp_path / f"thinker_step_{n}.pt").exists() for n in (100, 200, 300))


def test_a_directory_checkpoint_goes_only_as_planned(tmp_path: Path) -> None:
    dirs = hf_run(tmp_path, steps=(10, 20, 30), eval_losses=(1.0, 1.0, 1.0))
    plan = plan_cleanup(tmp_path, keep_last=1)
    (dirs[10] / "notes_added_later.txt").write_text("mine")
    with pytest.raises(DeletionStoppedError, match=r"checkpoint-10/notes_added_later\.txt "
                       r"appeared since the plan was made"):
        plan.execute()
    assert dirs[10].is_dir() and dirs[20].is_dir()
    (dirs[10] / "notes_added_later.txt").unlink()
    plan = plan_cleanup(tmp_path, keep_last=1)
    assert len(plan.execute().deleted) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-30", "config.json"]


def test_symlinked_run_dirs_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    muomni_run(outside, steps=(1, 2))
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)
    plan = plan_cleanup(root, keep_last=1, recursive=True)
    assert not plan.deleted
    json.dumps([str(i.path) for i in plan.items])


def tf_sample_run(directory: Path, steps: tuple[int, ...]) -> None:
    """TF checkpoints ``ckpt-{N}`` copied from the sample TensorFlow wrote (index + 1 shard)."""
    sample = SAMPLES / "tf_ckpt"
    directory.mkdir(parents=True, exist_ok=True)
    for step in steps:
        shutil.copy(sample / "ckpt-1.index", directory / f"ckpt-{step}.index")
        shutil.copy(sample / "ckpt-1.data-00000-of-00001",
                    directory / f"ckpt-{step}.data-00000-of-00001")


def test_a_tf_checkpoint_owns_exactly_its_index_and_shards(tmp_path: Path) -> None:
    tf_sample_run(tmp_path, (1, 2, 3))
    analysis = tmp_path / "ckpt-1.data-analysis"
    analysis.mkdir()
    (analysis / "plots.txt").write_text("loss curve\n")
    (tmp_path / "ckpt-1.data-00000-of-00001.sha256").write_text("abc\n")
    plan = plan_cleanup(tmp_path, keep_last=1)
    acts = actions(plan)
    assert acts["ckpt-1.data-analysis"] == "keep"
    assert acts["ckpt-1.data-00000-of-00001.sha256"] == "keep"
    shown = {str(m.relative_to(tmp_path)) for i in plan.deleted for m in i.members}
    assert shown == {"ckpt-1.index", "ckpt-1.data-00000-of-00001", "ckpt-2.index",
                     "ckpt-2.data-00000-of-00001"}
    # A path is either deleted or kept, never both.
    assert not shown & {p for p, a in acts.items() if a == "keep"}
    plan.execute()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-1.data-00000-of-00001.sha256", "ckpt-1.data-analysis",
        "ckpt-3.data-00000-of-00001", "ckpt-3.index"]
    assert (analysis / "plots.txt").read_text() == "loss curve\n"
