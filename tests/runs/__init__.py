"""Real training-run directories for the retention, integrity and save tests.

A tiny torch model is trained for a few steps and saved the way μOmni does
(``thinker_step_{N}.pt`` with model, optimizer, scheduler, GradScaler, step, best_val_loss;
``thinker_best.pt``; the final ``thinker.pt``), plus HF ``checkpoint-N/`` directories,
Lightning names and Orbax-like step directories.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def train_states(steps: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """Train a tiny LM and snapshot μOmni-style checkpoints at ``steps`` (val loss falls,
    then rises after the middle step, so the best is not the newest)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.Linear(8, 32, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    scaler = torch.amp.GradScaler("cpu")
    states = []
    best = float("inf")
    for i, step in enumerate(steps):
        ids = torch.randint(0, 32, (2, 5))
        loss = nn.functional.cross_entropy(model(ids).reshape(-1, 32), ids.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        val_loss = 3.0 - i * 0.5 if i <= len(steps) // 2 else 3.0 - len(steps) // 2 * 0.5 + i
        best = min(best, val_loss)
        states.append({"model": model.state_dict(), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                       "step": step, "best_val_loss": best, "val_loss": val_loss,
                       "val_acc": 1.0 / val_loss})
    return states


def muomni_run(directory: Path, name: str = "thinker", steps: tuple[int, ...] = (100, 200, 300,
                                                                                     400),
               seed: int = 0) -> dict[int, Path]:
    """``{name}_step_{N}.pt`` for each step, ``{name}_best.pt``, ``{name}.pt`` and a tokenizer."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    states = train_states(list(steps), seed)
    paths = {}
    for state in states:
        paths[state["step"]] = directory / f"{name}_step_{state['step']}.pt"
        torch.save(state, paths[state["step"]])
    torch.save(min(states, key=lambda s: s["val_loss"]), directory / f"{name}_best.pt")
    torch.save({"model": states[-1]["model"]}, directory / f"{name}.pt")
    (directory / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    (directory / "notes.txt").write_text("lr sweep 3\n")
    return paths


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def hf_run(directory: Path, steps: tuple[int, ...] = (10, 20, 30),
           eval_losses: tuple[float, ...] = (2.0, 1.0, 1.5)) -> dict[int, Path]:
    """HF Trainer layout: checkpoint-N/ with model.safetensors and trainer_state.json whose
    log_history holds eval_loss per step (the way the Trainer writes it)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    paths = {}
    for step, loss in zip(steps, eval_losses):
        ckpt = directory / f"checkpoint-{step}"
        ckpt.mkdir()
        save_file({"w": torch.full((4, 4), float(step))}, str(ckpt / "model.safetensors"))
        torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
        history += [{"step": step, "loss": loss + 0.1, "epoch": step / 10},
                    {"step": step, "eval_loss": loss, "epoch": step / 10}]
        best = min(history[1::2], key=lambda e: e["eval_loss"])
        (ckpt / "trainer_state.json").write_text(json.dumps({
            "global_step": step, "best_metric": best["eval_loss"],
            "best_model_checkpoint": str(directory / f"checkpoint-{best['step']}"),
            "log_history": history}))
        paths[step] = ckpt
    (directory / "config.json").write_text("{}")
    return paths


def orbax_run(directory: Path, steps: tuple[int, ...] = (1000, 2000, 3000),
              committed: tuple[bool, ...] = (True, True, True)) -> dict[int, Path]:
    """Orbax-like step directories; a committed one carries the marker files."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for step, ok in zip(steps, committed):
        ckpt = directory / str(step)
        (ckpt / "default").mkdir(parents=True)
        (ckpt / "default" / "data").write_bytes(os.urandom(256))
        if ok:
            (ckpt / "_CHECKPOINT_METADATA").write_text('{"commit_timestamp_nsecs": 1}')
            (ckpt / "commit_success.txt").write_text("ok")
        paths[step] = ckpt
    return paths
