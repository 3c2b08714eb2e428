"""``ckptkit.load``: load a checkpoint for real use, safe by default."""

from __future__ import annotations

import os
from typing import Any, Literal

from ckptkit import formats
from ckptkit.storage.location import locate

Framework = Literal["torch", "numpy", "flax", "jax", "tf"]


def load(path: str | os.PathLike[str], framework: Framework = "numpy", *,
         unsafe: bool = False) -> Any:
    """Load the checkpoint at ``path`` into ``framework``'s objects.

    ``torch`` gives what ``torch.load(weights_only=True)`` gives (memory-mapped for zip files),
    built from ckptkit's restricted reading of the file: torch's unpickler never runs, torch
    only allocates storages and tensor views (docs/formats.md); ``numpy`` gives the same tree
    with numpy arrays, read without torch and without running pickle code (also for plain
    pickles, joblib files and ``.npy`` arrays); ``flax`` gives a nested param tree (for
    MUSIQ-style ``.npz`` the tree under ``opt/target``); ``tf`` gives ``tf.saved_model.load`` /
    ``tf.train.load_checkpoint``.

    A sharded Hugging Face checkpoint (its directory or ``*.index.json``) loads as one state
    dict; a PyTorch DCP directory as its nested state dict with every tensor consolidated from
    its chunks, one tensor at a time (what ``dcp_to_torch_save`` then ``torch.load`` give).

    Args:
        path: the checkpoint.
        framework: which library's objects to return.
        unsafe: allow loading files that name dangerous callables, custom classes or code
            (TorchScript); with ``torch`` it hands the file to ``torch.load(weights_only=False)``.
            This runs code from the file; use it only for files you trust.

    Raises:
        UnsafeContentError: the file would run code and ``unsafe`` is False.
        MissingDependencyError: the framework is not installed.
        UsageError: the format cannot be loaded into that framework.
    """
    target = locate(path)
    return formats.detect(target).load(target, framework, unsafe=unsafe)
