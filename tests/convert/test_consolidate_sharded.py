"""Consolidating sharded and distributed sources: DCP against `dcp_to_torch_save`, Hugging Face
shards against loading every shard, bit for bit; broken sources exit 3 in one line."""

from __future__ import annotations

import shutil
import tracemalloc
import warnings
from pathlib import Path

import pytest

from ckptkit.convert.consolidate import open_source, plan_consolidation
from tests.conftest import run_main
from tests.convert import torch_bits

torch = pytest.importorskip("torch")
SAMPLES = Path(__file__).resolve().parents[2] / "src" / "ckptkit" / "samples"


def flattened(tree: object, prefix: str = "") -> dict[str, object]:
    """A nested state dict as DCP names its entries: keys joined with dots."""
    out: dict[str, object] = {}
    items = (tree.items() if isinstance(tree, dict) else
             enumerate(tree) if isinstance(tree, (list, tuple)) else None)
    if items is None:
        return {prefix[:-1]: tree}
    for key, value in items:
        out.update(flattened(value, f"{prefix}{key}."))
    return out


def reference(dcp_dir: Path, tmp_path: Path) -> dict[str, tuple]:
    """What torch's own consolidation gives: every tensor, as (dtype, shape, bytes)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(dcp_dir, tmp_path / "reference.pt")
    state = torch.load(tmp_path / "reference.pt", weights_only=False)
    return {k: torch_bits(v) for k, v in flattened(state).items() if isinstance(v, torch.Tensor)}


def mixed() -> dict[str, "torch.Tensor"]:
    g = torch.Generator().manual_seed(3)
    return {"embed.weight": torch.randn(96, 16, generator=g).bfloat16(),
            "layers.0.w": torch.randn(16, 16, generator=g),
            "layers.0.scale": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
            "layers.0.ids": torch.arange(9, dtype=torch.int64)}


def test_fsdp2_dcp_step_consolidates_as_dcp_to_torch_save_does(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    sample = SAMPLES / "fsdp_step_200"  # 2 ranks, FSDP2, model and AdamW state
    expected = reference(sample, tmp_path)
    source = open_source(sample)
    assert max(len(t.chunks) for t in source.tensors) == 2  # real per-rank chunks
    assert all(p.span is not None for t in source.tensors for p in t.chunks)  # read in place
    code, _out, err = run_main(capsys, "convert", str(sample), "--to", "safetensors", "-o",
                               str(tmp_path / "c.safetensors"))
    assert code == 0, err
    got = load_file(tmp_path / "c.safetensors")
    assert {k: torch_bits(v) for k, v in got.items()} == expected
    from safetensors import safe_open

    with safe_open(tmp_path / "c.safetensors", "pt") as handle:
        assert handle.metadata()["step"] == "200"


def test_dcp_to_torch_and_back_to_dcp(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    src = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": mixed(), "step": 5}, checkpoint_id=src)
    expected = reference(src, tmp_path)
    assert expected == {f"model.{k}": torch_bits(v) for k, v in mixed().items()}
    plan_consolidation(src, "torch", tmp_path / "c.pt").execute()
    got = torch.load(tmp_path / "c.pt", weights_only=True)
    assert {k: torch_bits(v) for k, v in got.items()} == expected
    plan_consolidation(src, "dcp", tmp_path / "again").execute()
    into = {"model": {k: torch.zeros_like(v) for k, v in mixed().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(into, checkpoint_id=tmp_path / "again")
    assert {f"model.{k}": torch_bits(v) for k, v in into["model"].items()} == expected


def test_hugging_face_shards_consolidate_and_round_trip(tmp_path: Path) -> None:
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    src = tmp_path / "hf"
    src.mkdir()
    save_torch_state_dict(mixed(), src, max_shard_size="2KB")
    assert len(list(src.glob("model-*.safetensors"))) > 1
    expected: dict[str, tuple] = {}
    for shard in src.glob("model-*.safetensors"):
        expected.update({k: torch_bits(v) for k, v in load_file(shard).items()})
    for given in (src, src / "model.safetensors.index.json"):
        out = tmp_path / f"one-{given.name}.safetensors"
        plan_consolidation(given, "safetensors", out).execute()
        assert {k: torch_bits(v) for k, v in load_file(out).items()} == expected
    # single file -> shards -> single file, bit for bit
    plan_consolidation(out, "safetensors", tmp_path / "re", max_shard_size=1500).execute()
    plan_consolidation(tmp_path / "re", "safetensors", tmp_path / "back.safetensors").execute()
    assert (load_file(tmp_path / "back.safetensors").keys() == load_file(out).keys())
    assert {k: torch_bits(v) for k, v in load_file(tmp_path / "back.safetensors").items()} \
        == expected
    bins = tmp_path / "bins"
    bins.mkdir()
    save_torch_state_dict(mixed(), bins, max_shard_size="2KB", safe_serialization=False)
    plan_consolidation(bins, "safetensors", tmp_path / "from-bin.safetensors").execute()
    assert {k: torch_bits(v) for k, v in load_file(tmp_path / "from-bin.safetensors").items()} \
        == expected


def test_one_global_tensor_in_memory_at_a_time(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    big = 1 << 20
    state = {f"w{i}": torch.full((big // 4,), float(i)) for i in range(10)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=tmp_path / "src")
    plan = plan_consolidation(tmp_path / "src", "safetensors", tmp_path / "out.safetensors")
    tracemalloc.start()
    try:
        plan.execute()
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * big, peak  # 10 MiB of tensors: one 1 MiB tensor plus working memory


def test_broken_sources_exit_3_in_one_line(tmp_path: Path, capsys) -> None:
    dcp_copy = tmp_path / "step-200"
    shutil.copytree(SAMPLES / "fsdp_step_200", dcp_copy)
    data = dcp_copy / "__1_0.distcp"
    data.write_bytes(data.read_bytes()[:-2000])
    hf_copy = tmp_path / "hf"
    shutil.copytree(SAMPLES / "hf_sharded", hf_copy)
    (hf_copy / "model-00002-of-00003.safetensors").unlink()
    for src, named in ((dcp_copy, "__1_0.distcp"), (hf_copy, "model-00002-of-00003")):
        for args in (("--to", "safetensors"), ("--to", "dcp"),
                     ("--to", "safetensors", "--max-shard-size", "1KB")):
            out = tmp_path / f"out-{src.name}-{len(args)}-{args[1]}"
            code, _out, err = run_main(capsys, "convert", str(src), *args, "-o", str(out))
            assert code == 3, err
            assert named in err and len(err.strip().splitlines()) <= 2
            assert not out.exists() or not any(out.iterdir())


def test_consolidating_to_safetensors_needs_no_torch(tmp_path: Path) -> None:
    from tests.conftest import run_ckpt_without

    for src in (SAMPLES / "fsdp_step_200", SAMPLES / "hf_sharded"):
        out = tmp_path / f"{src.name}.safetensors"
        result = run_ckpt_without(("torch",), "convert", str(src), "--to", "safetensors",
                                  "--max-shard-size", "20KB", "-o", str(out))
        assert result.returncode == 0, result.stderr
        assert (out / "model.safetensors.index.json").is_file() or (
            out / "model.safetensors").is_file()
