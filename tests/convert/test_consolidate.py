"""Consolidating and resharding (`ckpt convert --max-shard-size`, `--to dcp`): outputs read by
huggingface_hub, safetensors and torch.distributed.checkpoint themselves, bit for bit."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ckptkit.convert.consolidate import plan_consolidation
from ckptkit.formats.shard_writer import parse_size, plan_shards
from tests.conftest import run_main
from tests.convert import listing, torch_bits

torch = pytest.importorskip("torch")


def model() -> "torch.nn.Module":
    """A small model of several dtypes: float32 layers, a bfloat16 head, a float8 buffer."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6)),
                              torch.nn.Linear(64, 8).to(torch.bfloat16))
    net.register_buffer("scale", torch.linspace(-1, 1, 16).to(torch.float8_e4m3fn))
    net.register_buffer("steps", torch.tensor(12345, dtype=torch.int64))
    return net


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, tuple]]:
    from safetensors.torch import save_file

    state = model().state_dict()
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"step": "700"})
    return path, {k: torch_bits(v) for k, v in state.items()}


def test_shards_follow_hugging_face_and_load_with_huggingface_hub(source, tmp_path: Path,
                                                                   capsys) -> None:
    from huggingface_hub import load_torch_model
    from safetensors import safe_open
    from safetensors.torch import load_file

    path, expected = source
    code, out, err = run_main(capsys, "convert", str(path), "--to", "safetensors",
                              "--max-shard-size", "40KB", "-o", str(tmp_path / "sharded"))
    assert code == 0, err
    assert "shards + index" in out
    folder = tmp_path / "sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    count = len(shards)
    assert count > 2 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors"
                                    for i in range(1, count + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(len(bits[2]) for bits in expected.values())
    assert index["metadata"]["step"] == "700"  # the source's metadata goes to the index
    seen: dict[str, tuple] = {}
    for shard in shards:
        with safe_open(folder / shard, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        for name, tensor in load_file(folder / shard).items():
            assert index["weight_map"][name] == shard
            seen[name] = torch_bits(tensor)
        assert (folder / shard).stat().st_size <= 40_000 + 1024 or len(
            load_file(folder / shard)) == 1  # a tensor over the limit gets a shard alone
    assert seen == expected
    into = model()
    for parameter in into.parameters():
        parameter.data.zero_()
    load_torch_model(into, folder, strict=True)
    assert {k: torch_bits(v) for k, v in into.state_dict().items()} == expected


def test_torch_shards_and_a_single_shard(source, tmp_path: Path) -> None:
    path, expected = source
    torch_plan = plan_consolidation(path, "torch", tmp_path / "bin", max_shard_size=30_000)
    torch_plan.execute()
    index = json.loads((tmp_path / "bin" / "pytorch_model.bin.index.json").read_text())
    loaded = {}
    for shard in set(index["weight_map"].values()):
        assert shard.startswith("pytorch_model-") and shard.endswith(".bin")
        loaded.update(torch.load(tmp_path / "bin" / shard, weights_only=True))
    assert {k: torch_bits(v) for k, v in loaded.items()} == expected
    one = plan_consolidation(path, "safetensors", tmp_path / "one", max_shard_size=10 << 20)
    one.execute()
    assert listing(tmp_path / "one") == {"model.safetensors"}  # no index for one shard
    from safetensors import safe_open

    with safe_open(tmp_path / "one" / "model.safetensors", "pt") as handle:
        assert handle.metadata()["format"] == "pt" and handle.metadata()["step"] == "700"


def test_split_is_hugging_face_s_greedy_one() -> None:
    mb = 1_000_000
    layout = [(f"t{i}", "uint8", (size * mb,)) for i, size in enumerate([6, 6, 2, 6, 2, 2, 11])]
    plan = plan_shards(layout, "safetensors", 10 * mb)
    assert [[e[0] for e in entries] for _name, entries in plan.files] == [
        ["t0"], ["t1", "t2"], ["t6"], ["t3", "t4", "t5"]]  # as huggingface_hub splits
    assert plan.names[-1] == "model.safetensors.index.json"
    assert parse_size("500MB") == 500 * mb and parse_size("2GiB") == 2 << 30
    assert parse_size("512M") == 512 << 20 and parse_size("1234") == 1234


def test_dcp_output_restores_exactly_with_torch_distributed_checkpoint(source,
                                                                       tmp_path: Path,
                                                                       capsys) -> None:
    import torch.distributed.checkpoint as dcp

    path, expected = source
    code, _out, err = run_main(capsys, "convert", str(path), "--to", "dcp", "-o",
                               str(tmp_path / "step-700"))
    assert code == 0, err
    files = listing(tmp_path / "step-700")
    assert ".metadata" in files and "__0_0.distcp" in files
    into = model()
    state = {k: torch.zeros_like(v) for k, v in into.state_dict().items()}
    dcp.load(state, checkpoint_id=tmp_path / "step-700", no_dist=True)
    assert {k: torch_bits(v) for k, v in state.items()} == expected
    nested = {"model": {k: torch.zeros_like(v) for k, v in into.state_dict().items()}}
    prefixed = tmp_path / "prefixed.safetensors"
    from safetensors.torch import save_file

    save_file({f"model.{k}": v.contiguous() for k, v in model().state_dict().items()}, prefixed)
    plan_consolidation(prefixed, "dcp", tmp_path / "nested").execute()
    dcp.load(nested, checkpoint_id=tmp_path / "nested", no_dist=True)  # flattened names
    assert {k: torch_bits(v) for k, v in nested["model"].items()} == expected


def test_one_tensor_alive_at_a_time(tmp_path: Path) -> None:
    import torch.distributed.checkpoint  # noqa: F401 (imports are not what is measured)
    import torch.distributed.checkpoint.default_planner  # noqa: F401
    from safetensors.numpy import save_file

    big = 1 << 20
    save_file({f"w{i}": np.full(big // 4, i, np.float32) for i in range(12)},
              tmp_path / "m.safetensors")
    for target, extra in (("safetensors", {"max_shard_size": 3 * big}), ("dcp", {})):
        plan = plan_consolidation(tmp_path / "m.safetensors", target, tmp_path / f"o-{target}",
                                  **extra)
        tracemalloc.start()
        try:
            plan.execute()
            _now, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # 12 MiB of tensors; one (1 MiB) plus the writers' working memory at a time.
        assert peak < 4 * big, (target, peak)


def test_refusals_are_usage_errors(source, tmp_path: Path, capsys) -> None:
    path, _expected = source

    def convert(*args: str) -> tuple[int, str]:
        code, _out, err = run_main(capsys, "convert", str(path), *args)
        return code, err

    code, err = convert("--to", "dcp", "--max-shard-size", "1MB", "-o", str(tmp_path / "x"))
    assert code == 2 and "DCP checkpoint is sharded by the ranks" in err
    code, err = convert("--to", "npz", "--max-shard-size", "1MB", "-o", str(tmp_path / "x"))
    assert code == 2 and "not npz" in err
    code, err = convert("--to", "safetensors", "--max-shard-size", "12XB")
    assert code == 2 and "'12XB' is not a size" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    code, err = convert("--to", "dcp", "-o", str(full))
    assert code == 2 and "not an empty directory" in err
    assert listing(full) == {"notes.txt"}
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"old")
    code, err = convert("--to", "safetensors", "--max-shard-size", "40KB", "-o", str(stale))
    assert code == 2 and "model-00001-of-00009.safetensors from an earlier sharded save" in err
    code, err = convert("--to", "safetensors", "--max-shard-size", "10MB", "-o",
                        str(path.parent))  # one shard: model.safetensors... is not the input
    assert code == 0, err
    code, err = convert("--to", "safetensors", "--max-shard-size", "1MB", "-o", str(path))
    assert code == 2 and "is a file; --max-shard-size writes a directory" in err
    code, err = convert("--to", "dcp", "--recipe", "loftr", "-o", str(tmp_path / "y"))
    assert code == 2 and "--recipe renames tensors of one file" in err


def test_output_over_the_input_is_refused(tmp_path: Path, capsys) -> None:
    from safetensors.numpy import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": np.ones(4, np.float32)}, folder / "model.safetensors")
    before = (folder / "model.safetensors").read_bytes()
    code, _out, err = run_main(capsys, "convert", str(folder / "model.safetensors"), "--to",
                               "safetensors", "--max-shard-size", "1MB", "-o", str(folder))
    assert code == 2 and "over the input" in err
    assert (folder / "model.safetensors").read_bytes() == before


def test_a_truncated_source_leaves_no_output(tmp_path: Path, capsys) -> None:
    from safetensors.numpy import save_file

    save_file({f"w{i}": np.full(4096, i, np.float32).astype(ml_dtypes.bfloat16)
               for i in range(8)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-5000])
    for args in (("--to", "safetensors", "--max-shard-size", "20KB", "-o", "shards"),
                 ("--to", "dcp", "-o", "dcp")):
        code, _out, err = run_main(capsys, "convert", str(tmp_path / "m.safetensors"),
                                   *args[:-1], str(tmp_path / args[-1]))
        assert code == 3, err
        assert "m.safetensors" in err and "Traceback" not in err
        assert not (tmp_path / args[-1]).exists() or listing(tmp_path / args[-1]) == set()
    assert listing(tmp_path) <= {"m.safetensors", "shards"}


def test_default_outputs(source, tmp_path: Path, capsys, monkeypatch) -> None:
    path, _expected = source
    monkeypatch.chdir(tmp_path)
    code, _out, err = run_main(capsys, "convert", str(path), "--to", "dcp", "--quiet")
    assert code == 0, err and (tmp_path / "net.dcp" / ".metadata").is_file()
    code, out, err = run_main(capsys, "convert", str(path), "--to", "safetensors",
                              "--max-shard-size", "40KB", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["output"].endswith("net.shards") and report["shards"] > 2
    assert (tmp_path / "net.shards" / "model.safetensors.index.json").is_file()
    code, _out, err = run_main(capsys, "convert", str(path), "--to", "dcp")
    assert code == 2 and "net.dcp already exists" in err
