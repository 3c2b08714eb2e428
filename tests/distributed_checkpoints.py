"""Builders for real sharded and distributed checkpoints, written by the libraries themselves:
huggingface_hub's sharded saves, DCP in one process, and a 2-process FSDP2 job (gloo on
127.0.0.1) whose ranks each save their own chunks of model and optimizer state.

Run as a script it builds one of them (the 2-process job runs this file under torchrun-style
environment variables itself)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def mixed_state_dict(seed: int = 0) -> dict[str, Any]:
    """Tensors of several dtypes (bfloat16 and float8 included) and sizes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 32, generator=g)
    return {
        "embed.weight": torch.randn(128, 32, generator=g),
        "layers.0.attn.weight": base.clone(),
        "layers.0.attn.bias": torch.randn(64, generator=g).half(),
        "layers.0.mlp.weight": torch.randn(96, 32, generator=g).bfloat16(),
        "layers.1.attn.weight": base.to(torch.float8_e4m3fn),
        "layers.1.mlp.weight": torch.randn(32, 96, generator=g).to(torch.float8_e5m2),
        "layers.1.ids": torch.arange(40, dtype=torch.int64),
        "norm.weight": torch.ones(32, dtype=torch.float64),
    }


def hf_sharded(out: Path, *, safe: bool = True, max_shard_size: int = 12_000) -> Path:
    """``huggingface_hub.save_torch_state_dict`` into ``out`` (several shards plus index)."""
    from huggingface_hub import save_torch_state_dict

    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(mixed_state_dict(), out, safe_serialization=safe,
                          max_shard_size=max_shard_size)
    return out


def dcp_single(out: Path) -> Path:
    """``torch.distributed.checkpoint.save`` in one process: a training state with a step."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    state = {"model": mixed_state_dict(), "step": 210, "extra": {"name": "run-a", "lr": 3e-4}}
    state["model"]["view"] = torch.arange(30, dtype=torch.float32)[5:17].view(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(out))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcp_fsdp(out: Path, world: int = 2) -> Path:
    """A ``world``-rank FSDP2 job on CPU (gloo, 127.0.0.1) saving model and optimizer state
    with DCP: each rank writes its own ``__R_0.distcp`` chunks."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        procs.append(subprocess.Popen([sys.executable, __file__, "fsdp-rank", str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    errors = []
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        if proc.returncode:
            errors.append(err.decode(errors="replace")[-3000:])
    if errors:
        raise RuntimeError("FSDP job failed:\n" + "\n".join(errors))
    return out


def _fsdp_rank(out: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 24), nn.LayerNorm(24),
                          nn.Linear(24, 7, bias=False))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(torch.randint(0, 50, (4, 5))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "step": 2}, checkpoint_id=str(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    kind, target = sys.argv[1], Path(sys.argv[2])
    if kind == "fsdp-rank":
        _fsdp_rank(target)
    else:
        {"hf-safetensors": hf_sharded, "hf-bin": lambda p: hf_sharded(p, safe=False),
         "dcp": dcp_single, "fsdp": dcp_fsdp}[kind](target)
