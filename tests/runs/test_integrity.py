"""`ckptkit.runs.integrity.check_complete` on real files, truncated at the places saves die."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptkit.runs.integrity import check_complete
from tests.checkpoints import save_torch, tiny_training_state
from tests.runs import hf_run, orbax_run, truncate

pytest.importorskip("torch")


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_files_complete_and_truncated(tmp_path: Path, legacy: bool) -> None:
    path = save_torch(tiny_training_state(), tmp_path / "thinker_step_1.pt", legacy=legacy)
    assert check_complete(path).ok
    for keep in (0.99, 0.5, 0.01):
        cut = tmp_path / f"cut_{keep}.pt"
        cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
        verdict = check_complete(cut)
        assert not verdict.ok and verdict.reason, keep


def test_legacy_stream_with_trailing_bytes_is_not_complete(tmp_path: Path) -> None:
    path = save_torch(tiny_training_state(), tmp_path / "a.pth.tar", legacy=True)
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    assert not check_complete(path).ok


def test_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    assert check_complete(tmp_path / "empty.pt").reason == "file is empty"
    assert not check_complete(tmp_path / "nope.pt").ok


def test_safetensors_and_npz(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    st = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(st))
    assert check_complete(st).ok
    truncate(st, 0.9)
    assert "truncated" in check_complete(st).reason
    npz = tmp_path / "m.npz"
    np.savez(npz, a=np.ones((32, 32)), b=np.zeros(3))
    assert check_complete(npz).ok
    truncate(npz, 0.7)
    assert not check_complete(npz).ok


def test_hf_checkpoint_dirs(tmp_path: Path) -> None:
    dirs = hf_run(tmp_path / "run")
    assert check_complete(dirs[10]).ok
    (dirs[20] / "trainer_state.json").unlink()
    assert "trainer_state.json" in check_complete(dirs[20]).reason
    truncate(dirs[30] / "model.safetensors", 0.5)
    assert "model.safetensors" in check_complete(dirs[30]).reason


def test_hf_sharded_index_needs_every_shard(tmp_path: Path) -> None:
    import json

    ckpt = hf_run(tmp_path / "run", steps=(10,), eval_losses=(1.0,))[10]
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}))
    assert "model-00002-of-00002" in check_complete(ckpt).reason


def test_orbax_dirs(tmp_path: Path) -> None:
    dirs = orbax_run(tmp_path / "run", committed=(True, False, True))
    assert check_complete(dirs[1000]).ok
    assert "not committed" in check_complete(dirs[2000]).reason
    tmp = tmp_path / "run" / "4000.orbax-checkpoint-tmp-123"
    tmp.mkdir()
    assert not check_complete(tmp).ok


def test_tf_checkpoint_index_and_shards(tmp_path: Path, tf) -> None:  # type: ignore[no-untyped-def]
    ckpt = tf.train.Checkpoint(v=tf.Variable(tf.ones((256, 64))))
    prefix = Path(ckpt.save(str(tmp_path / "ckpt")))
    assert check_complete(prefix).ok
    assert check_complete(Path(f"{prefix}.index")).ok
    shard = next(tmp_path.glob("ckpt-1.data-*"))
    truncate(shard, 0.5)
    assert "data shard is" in check_complete(prefix).reason
    shard.unlink()
    assert "missing" in check_complete(prefix).reason
