"""Tests of ckptkit.convert; helpers shared by its test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def torch_bits(tensor: Any) -> tuple[str, tuple[int, ...], bytes]:
    """dtype name, shape and C-order bytes of a torch tensor, bfloat16/float8 included."""
    import torch

    t = tensor.detach().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.element_size() in (1, 2, 4, 8) and not t.dtype.is_complex and t.dtype != torch.bool:
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        raw = t.view(width).numpy().tobytes()
    else:
        raw = t.numpy().tobytes()
    return dtype, tuple(t.shape), raw


def numpy_bits(array: Any) -> tuple[str, tuple[int, ...], bytes]:
    """The same triple for a numpy array (or numpy scalar)."""
    array = np.asarray(array)
    return array.dtype.name, tuple(array.shape), np.ascontiguousarray(array).tobytes()


def listing(directory: Path) -> set[str]:
    """Every name in ``directory``, hidden temp files included."""
    return {p.name for p in directory.iterdir()}
