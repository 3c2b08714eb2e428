"""``ckpt scan`` reads a sharded checkpoint as one unit: the index and every shard it names,
each shard with its own format's full scan; DCP directories as the DCP reader sees them."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

import ckptkit
from ckptkit.scan.scanning import scan

SAMPLES = Path(ckptkit.__file__).parent / "samples"


class _Shell:
    """Pickles as a call to os.system (written here, never loaded)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_index_is_the_unit_and_shards_are_not_listed_again(hf_bin_dir: Path) -> None:
    report = scan([hf_bin_dir])
    assert [Path(r.path).name for r in report.results] == ["pytorch_model.bin.index.json"]
    [result] = report.results
    assert (result.verdict, result.format) == ("safe", "hf-sharded")
    assert "3 shard(s) scanned" in result.note


def test_unsafe_shard_is_found_through_its_index(hf_bin_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    folder = Path(shutil.copytree(hf_bin_dir, tmp_path / "model"))
    shard = sorted(folder.glob("pytorch_model-*.bin"))[1]
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "hook": _Shell()}, shard)
    [result] = scan([folder]).results
    assert result.verdict == "unsafe" and result.format == "hf-sharded"
    [danger] = result.unsafe
    assert danger.name.endswith(".system") and shard.name in danger.where
    # Named on its own, the shard still gets its own verdict.
    [alone] = scan([shard]).results
    assert alone.verdict == "unsafe"


def test_other_files_beside_the_shards_are_still_scanned(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(SAMPLES / "hf_sharded", tmp_path / "checkpoint-100"))
    shutil.copy(SAMPLES / "thinker_step_200.pt", folder / "optimizer.pt")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 16}))
    names = sorted(Path(r.path).name for r in scan([folder]).results)
    assert names == ["model.safetensors.index.json", "optimizer.pt"]


def test_missing_shard_makes_the_unit_unreadable(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(SAMPLES / "hf_sharded", tmp_path / "hf"))
    (folder / "model-00003-of-00003.safetensors").unlink()
    [result] = scan([folder]).results
    assert result.verdict == "unreadable" and "model-00003-of-00003" in result.note


def test_dcp_sample_is_safe_and_its_metadata_a_known_record() -> None:
    [result] = scan([SAMPLES / "fsdp_step_200"]).results
    assert (result.verdict, result.format) == ("safe", "torch-dcp")
    assert not result.objects and not result.unsafe


def test_dcp_without_metadata_is_one_unfinished_checkpoint(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(SAMPLES / "fsdp_step_200", tmp_path / "step-200"))
    (folder / ".metadata").unlink()
    [result] = scan([tmp_path]).results
    assert (result.verdict, result.format) == ("unreadable", "torch-dcp")
    assert "did not finish" in result.note


def test_dcp_safetensors_serialization_holds_no_pickles(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    from tests.distributed_checkpoints import mixed_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": mixed_state_dict(), "step": 3}, storage_writer=FileSystemWriter(
            tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS))
    [result] = scan([tmp_path / "st"]).results
    assert (result.verdict, result.objects) == ("safe", ())
