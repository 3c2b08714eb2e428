"""Hugging Face sharded checkpoints written by huggingface_hub: one tree across shards,
bit-for-bit loads, and every way the index and the shards can disagree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ckptkit
from ckptkit.errors import IntegrityError
from ckptkit.formats import hf_sharded

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _index(folder: Path) -> dict:
    name = next(n for n in hf_sharded.INDEXES if (folder / n).is_file())
    return json.loads((folder / name).read_text())


def _engine(folder: Path) -> dict:
    """What loading every shard with its own library gives."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    for shard in sorted(folder.glob("*.bin")):
        state.update(torch.load(shard, weights_only=True))
    return state


def _same(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("kind", ["hf_safetensors_dir", "hf_bin_dir"])
def test_one_tree_across_shards_each_tensor_knowing_its_shard(kind: str, request) -> None:
    folder = request.getfixturevalue(kind)
    index = _index(folder)
    assert len(set(index["weight_map"].values())) >= 3
    for target in (folder, folder / next(n for n in hf_sharded.INDEXES
                                         if (folder / n).is_file())):
        info = ckptkit.inspect(target)
        assert info.format == "hf-sharded" and info.kind == "state-dict"
        assert {t.name: t.file for t in info.tensors} == index["weight_map"]
        assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float16"} <= set(
            info.dtype_breakdown())
        assert info.tensor_bytes == index["metadata"]["total_size"]
        shards = info.details["shards"]
        assert [s["file"] for s in shards] == sorted(set(index["weight_map"].values()))
        assert sum(s["tensors"] for s in shards) == len(index["weight_map"])
        assert all(s["size"] == (folder / s["file"]).stat().st_size for s in shards)
        assert info.to_dict()["tensors"][0]["file"] == info.tensors[0].file


@pytest.mark.parametrize("kind", ["hf_safetensors_dir", "hf_bin_dir"])
def test_loads_bit_for_bit_like_every_shard(kind: str, request) -> None:
    from ckptkit.formats.torch_common import to_torch

    folder = request.getfixturevalue(kind)
    expected = _engine(folder)
    as_torch = ckptkit.load(folder, framework="torch")
    as_numpy = ckptkit.load(folder, framework="numpy")
    assert set(as_torch) == set(as_numpy) == set(expected)
    for name, tensor in expected.items():
        assert _same(as_torch[name], tensor), name
        dtype = str(tensor.dtype).removeprefix("torch.")
        assert _same(to_torch(as_numpy[name], dtype), tensor), name


def test_verify_passes_a_complete_checkpoint(hf_safetensors_dir: Path, hf_bin_dir: Path) -> None:
    assert hf_sharded.verify(hf_safetensors_dir) == []
    assert ckptkit.verify(hf_bin_dir).ok


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_missing_shard(hf_safetensors_dir: Path, tmp_path: Path) -> None:
    folder = _copy(hf_safetensors_dir, tmp_path)
    gone = sorted(folder.glob("model-*.safetensors"))[1]
    gone.unlink()
    [problem] = ckptkit.verify(folder).problems
    assert (problem.kind, problem.file) == ("missing-shard", str(gone))
    with pytest.raises(IntegrityError, match="shard missing"):
        ckptkit.inspect(folder)


def test_truncated_shard(hf_safetensors_dir: Path, tmp_path: Path) -> None:
    folder = _copy(hf_safetensors_dir, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    [problem] = ckptkit.verify(folder).problems
    assert (problem.kind, problem.file) == ("truncated", str(shard))
    with pytest.raises(IntegrityError, match="bytes"):
        ckptkit.inspect(folder)


def test_index_naming_a_tensor_no_shard_holds(hf_bin_dir: Path, tmp_path: Path) -> None:
    folder = _copy(hf_bin_dir, tmp_path)
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["lm_head.weight"] = shard
    index_path.write_text(json.dumps(index))
    [problem] = ckptkit.verify(folder).problems
    assert problem.kind == "missing-tensor" and problem.file == str(folder / shard)
    assert "'lm_head.weight'" in problem.message and "no shard holds it" in problem.message
    with pytest.raises(IntegrityError, match="lm_head.weight"):
        ckptkit.inspect(index_path)


def test_stray_shard_duplicate_and_unindexed_tensors(hf_safetensors_dir: Path,
                                                     tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    folder = _copy(hf_safetensors_dir, tmp_path)
    shards = sorted(folder.glob("model-*.safetensors"))
    # Left over from an earlier save with more shards.
    shutil.copy(shards[0], folder / "model-00004-of-00004.safetensors")
    # The last shard also holds the first shard's tensor, and one the index never names.
    last = load_file(shards[-1])
    first_name, first = next(iter(load_file(shards[0]).items()))
    save_file({**last, first_name: first, "extra.bias": torch.zeros(3)}, shards[-1],
              metadata={"format": "pt"})
    problems = {(p.kind, Path(p.file).name) for p in ckptkit.verify(folder).problems}
    assert ("stray-shard", "model-00004-of-00004.safetensors") in problems
    assert ("duplicate", shards[-1].name) in problems
    assert ("stray-tensor", shards[-1].name) in problems
    info = ckptkit.inspect(folder)  # readable: the first copy counts, the extra one is listed
    assert info.details["unindexed_tensors"] == ["extra.bias"]


def test_index_pointing_outside_the_folder_is_refused(hf_safetensors_dir: Path,
                                                      tmp_path: Path) -> None:
    folder = _copy(hf_safetensors_dir, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["embed.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match="outside the checkpoint"):
        ckptkit.inspect(folder)
    assert ckptkit.verify(folder).problems[0].kind == "unreadable"


def test_sniff_wants_a_weight_map(tmp_path: Path) -> None:
    other = tmp_path / "config.json"
    other.write_text('{"hidden_size": 8}')
    assert not hf_sharded.sniff(other) and not hf_sharded.sniff(tmp_path)


def test_bundled_sample_reads_without_torch() -> None:
    from tests.conftest import run_python

    sample = Path(ckptkit.__file__).parent / "samples" / "hf_sharded"
    code = ("import sys, ckptkit; info = ckptkit.inspect(sys.argv[1]); "
            "assert ckptkit.verify(sys.argv[1]).ok; ckptkit.load(sys.argv[1]); "
            "print(info.details['num_shards'], 'torch' in sys.modules)")
    result = run_python(code, str(sample))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "False"]


class _Shell:
    """Pickles as a call to os.system (written here, never loaded)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_unsafe_bin_shard_is_reported_with_its_shard(hf_bin_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    folder = _copy(hf_bin_dir, tmp_path)
    shard = sorted(folder.glob("pytorch_model-*.bin"))[0]
    torch.save({**torch.load(shard, weights_only=True), "hook": _Shell()}, shard)
    info = ckptkit.inspect(folder)
    [name] = info.unsafe
    assert name.endswith(".system")
    assert info.details["unsafe_where"][name].startswith(shard.name)
    with pytest.raises(ckptkit.UnsafeContentError):
        ckptkit.load(folder, framework="torch")
