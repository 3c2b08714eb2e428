"""PyTorch DCP checkpoints written by torch.distributed.checkpoint (one process, and a real
2-rank FSDP2 job on gloo): inspected without torch, consolidated bit for bit like
dcp_to_torch_save, and verified chunk by chunk."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

import ckptkit
from ckptkit.errors import IntegrityError
from ckptkit.formats import torch_dcp
from tests.conftest import run_ckpt_without

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SAMPLE = Path(ckptkit.__file__).parent / "samples" / "fsdp_step_200"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def _engine(folder: Path, tmp_path: Path) -> dict[str, Any]:
    """What torch itself consolidates: dcp_to_torch_save, then torch.load."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / "consolidated.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, out)
    return _flat(torch.load(out, weights_only=False))


def _same(a: Any, b: Any) -> bool:
    import torch

    if not isinstance(b, torch.Tensor):
        return a == b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("kind", ["dcp_dir", "fsdp_dir"])
def test_consolidated_loads_are_bit_for_bit_dcp_to_torch_save(kind: str, request,
                                                              tmp_path: Path) -> None:
    from ckptkit.formats.torch_common import to_torch

    folder = request.getfixturevalue(kind)
    expected = _engine(folder, tmp_path)
    as_torch = _flat(ckptkit.load(folder, framework="torch"))
    as_numpy = _flat(ckptkit.load(folder, framework="numpy"))
    assert set(as_torch) == set(as_numpy) == set(expected)
    for name, value in expected.items():
        assert _same(as_torch[name], value), name
        if hasattr(value, "dtype"):
            value_np = to_torch(as_numpy[name], str(value.dtype).removeprefix("torch."))
            assert _same(value_np, value), name


def test_single_process_save_global_shapes_dtypes_and_bytes_items(dcp_dir: Path) -> None:
    info = ckptkit.inspect(dcp_dir)
    assert info.format == "torch-dcp"
    assert info.metadata == {"step": 210}
    tensors = {t.name: t for t in info.tensors}
    assert tensors["model.layers.0.mlp.weight"].dtype == "bfloat16"
    assert tensors["model.layers.1.attn.weight"].dtype == "float8_e4m3fn"
    assert tensors["model.view"].shape == (3, 4)
    assert all(len(t.chunks) == 1 and t.file == "__0_0.distcp" for t in tensors.values())
    assert info.tree["extra"] == {"name": "run-a", "lr": 3e-4}  # bytes items, read safely
    assert info.details["world_size"] == 1 and info.details["bytes_items"] == 3
    assert not info.unsafe and not info.objects


def test_fsdp_job_chunks_per_rank(fsdp_dir: Path) -> None:
    info = ckptkit.inspect(fsdp_dir)
    assert info.details["world_size"] == 2 and info.details["num_shards"] == 2
    assert [s["file"] for s in info.details["shards"]] == ["__0_0.distcp", "__1_0.distcp"]
    assert info.optimizer is not None and info.optimizer.kind == "AdamW"
    assert info.optimizer.learning_rates == (1e-3,)
    weight = next(t for t in info.tensors if t.name == "model.0.weight")
    assert weight.shape == (50, 16)
    assert [(c["file"], c["offsets"], c["sizes"]) for c in weight.chunks] == [
        ("__0_0.distcp", [0, 0], [25, 16]), ("__1_0.distcp", [25, 0], [25, 16])]
    data = info.to_dict()
    assert next(t for t in data["tensors"] if t["name"] == "model.0.weight")["chunks"][1][
        "length"] == weight.chunks[1]["length"]


def test_inspect_needs_no_torch() -> None:
    import json

    result = run_ckpt_without(("torch",), "inspect", str(SAMPLE), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "torch-dcp" and data["details"]["world_size"] == 2
    assert run_ckpt_without(("torch",), "verify", str(SAMPLE)).returncode == 0


def test_metadata_classes_are_known_records() -> None:
    from ckptkit.pickles.unpickler import Findings, read_pickle

    findings = Findings()
    top = read_pickle((SAMPLE / ".metadata").read_bytes(), findings)
    assert top.qualname == "torch.distributed.checkpoint.metadata.Metadata"
    assert not findings.unsafe and not findings.objects


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_verify_complete(fsdp_dir: Path, dcp_dir: Path) -> None:
    assert torch_dcp.verify(fsdp_dir) == [] and ckptkit.verify(dcp_dir).ok


def test_truncated_distcp(fsdp_dir: Path, tmp_path: Path) -> None:
    folder = _copy(fsdp_dir, tmp_path)
    data = folder / "__1_0.distcp"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    problems = ckptkit.verify(folder).problems
    assert problems and {(p.kind, p.file) for p in problems} == {("truncated", str(data))}
    with pytest.raises(IntegrityError, match="truncated"):
        ckptkit.inspect(folder)


def test_missing_data_file_and_missing_metadata(fsdp_dir: Path, tmp_path: Path) -> None:
    folder = _copy(fsdp_dir, tmp_path)
    (folder / "__0_0.distcp").unlink()
    [problem] = ckptkit.verify(folder).problems
    assert (problem.kind, problem.file) == ("missing-shard", str(folder / "__0_0.distcp"))
    with pytest.raises(IntegrityError, match="missing"):
        ckptkit.inspect(folder)
    (folder / ".metadata").unlink()
    [problem] = ckptkit.verify(folder).problems
    assert problem.kind == "missing-metadata"
    with pytest.raises(IntegrityError, match="did not finish"):
        ckptkit.inspect(folder)


def test_stray_data_file(dcp_dir: Path, tmp_path: Path) -> None:
    folder = _copy(dcp_dir, tmp_path)
    shutil.copy(folder / "__0_0.distcp", folder / "__1_0.distcp")
    [problem] = ckptkit.verify(folder).problems
    assert (problem.kind, problem.file) == ("stray-shard", str(folder / "__1_0.distcp"))


def test_chunks_that_do_not_tile_the_tensor(fsdp_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    folder = _copy(fsdp_dir, tmp_path)
    meta_path = folder / ".metadata"
    with open(meta_path, "rb") as fh:
        meta = pickle.load(fh)  # the test's own file, written by torch above
    record = meta.state_dict_metadata["model.1.weight"]
    record.chunks.pop()  # rank 1's half is gone: rows 12..23 are covered by nothing
    with open(meta_path, "wb") as fh:
        pickle.dump(meta, fh)
    problems = [p for p in ckptkit.verify(folder).problems if p.kind == "not-tiled"]
    assert len(problems) == 1 and "'model.1.weight'" in problems[0].message
    assert "192 of 384" in problems[0].message
    with pytest.raises(IntegrityError, match="192 of 384"):  # never uninitialised memory
        ckptkit.load(folder)


def test_safetensors_serialization(tmp_path: Path) -> None:
    """FileSystemWriter(serialization_format=SAFETENSORS): the chunks of each file are one
    safetensors blob after its bytes items."""
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    from tests.distributed_checkpoints import mixed_state_dict

    state = {"model": mixed_state_dict(), "step": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(
            tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS))
    loaded = ckptkit.load(tmp_path / "st", framework="torch")
    assert loaded["step"] == 7
    for name, tensor in state["model"].items():
        assert _same(loaded["model"][name], tensor), name
    assert ckptkit.verify(tmp_path / "st").ok
    assert isinstance(loaded["model"]["embed.weight"], torch.Tensor)


def test_diff_against_its_consolidated_file(fsdp_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Each DCP tensor is gathered from its chunks, then compared element by element."""
    import json

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from tests.conftest import run_main

    whole = tmp_path / "whole.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(fsdp_dir, whole)
    code, out, _err = run_main(capsys, "diff", str(fsdp_dir), str(whole), "--json")
    assert code == 0 and json.loads(out)["summary"]["changed"] == 0
    assert json.loads(out)["summary"]["unchanged"] == 24
    state = torch.load(whole, weights_only=False)
    state["model"]["0.weight"][40, 3] += 1  # a row rank 1 holds
    torch.save(state, whole)
    code, out, _err = run_main(capsys, "diff", str(fsdp_dir), str(whole), "--json")
    changed = [t["name"] for t in json.loads(out)["tensors"] if t["status"] == "changed"]
    assert changed == ["model.0.weight"]
