"""Real MRL-style training runs for compare/diff tests: a frozen backbone, a trained head."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_model() -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8),
                                          nn.Conv1d(8, 8, 3), nn.LayerNorm(12))
            self.head = nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            return self.head(self.backbone(x).mean(-1))

    torch.manual_seed(0)
    return Net()


def mrl_run(directory: Path) -> dict[str, Path]:
    """Train the head of a frozen-backbone model for a few steps and save MRL-style epochs.

    ``best.pt`` (epoch 1) and ``latest.pt`` (epoch 5) share the best val loss; only
    ``latest.pt`` carries optimizer state, so it is the larger file.
    """
    import torch

    model = build_model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()  # frozen: BatchNorm statistics must not move either
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    paths = {name: directory / f"{name}.pt" for name in ("epoch_0", "best", "latest")}
    torch.save({"model": model.state_dict(), "epoch": 0, "val_loss": 18.0195},
               paths["epoch_0"])
    for _ in range(3):
        loss = model(torch.randn(2, 4, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": model.state_dict(), "epoch": 1, "val_loss": 18.0021}, paths["best"])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 5,
                "val_loss": 18.0021}, paths["latest"])
    return paths
