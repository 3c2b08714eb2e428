"""Builders for real checkpoints written by the real libraries (used by several test files)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def tiny_training_state(seed: int = 0) -> dict[str, Any]:
    """A μOmni-style training checkpoint: model, optimizer, scheduler, scaler, step, best."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.Linear(8, 32, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(2):
        ids = torch.randint(0, 32, (2, 5))
        loss = model(ids).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "step": 210, "best_val_loss": 1.75}


def mixed_dtype_state_dict() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, generator=g)
    return {
        "w32": base, "w16": base.half(), "wbf16": base.bfloat16(), "w64": base.double(),
        "ids": torch.arange(5, dtype=torch.int64), "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.arange(4, dtype=torch.uint8), "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
        "view_row": base[2], "transposed": base.t(), "sliced": base[1:4, 1:3],
        "f8": torch.ones(4).to(torch.float8_e4m3fn), "c64": torch.randn(2, dtype=torch.complex64),
    }


def save_torch(obj: Any, path: Path, legacy: bool = False) -> Path:
    import torch

    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def namespace_checkpoint() -> dict[str, Any]:
    import torch

    return {"epoch": 4, "val_loss": 0.25, "args": argparse.Namespace(lr=0.1, dims=[64, 128]),
            "model_state_dict": {"head.weight": torch.ones(2, 3)}}


def torch_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor of a loaded torch object, named the way ckptkit names them."""
    import torch

    out: dict[str, Any] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(torch_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(torch_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def torch_dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def assert_matches_torch(info: Any, loaded: Any) -> None:
    """Names, dtypes, shapes and counts reported by ckptkit equal what torch loads."""
    expected = torch_tensors(loaded)
    got = {t.name: t for t in info.tensors}
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch_dtype_name(tensor), name
        assert got[name].shape == tuple(tensor.shape), name
    assert info.tensor_count == len(expected)
    assert info.param_count == sum(t.numel() for t in expected.values())
