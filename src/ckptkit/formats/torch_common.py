"""Loading PyTorch files for real use: through torch (weights only by default) or as numpy."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

from ckptkit.errors import FormatError, MissingDependencyError, UnsafeContentError, UsageError
from ckptkit.model import RawCheckpoint
from ckptkit.storage.location import LocalLocation, locate
from ckptkit.formats.tensor_io import materialise, read_tensor
from ckptkit.tree import join


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "torch", "Loading with framework='torch'") from None
    return torch


def to_torch(array: Any, dtype: str) -> Any:
    """A numpy array as a torch tensor of ckptkit dtype ``dtype`` (bfloat16 and float8 go
    through an integer view: numpy's ml_dtypes and torch share the bit layout)."""
    torch = import_torch()
    if dtype == "bfloat16" or dtype.startswith("float8"):
        width = {1: "uint8", 2: "int16"}[array.dtype.itemsize]
        return torch.from_numpy(array.view(width)).view(getattr(torch, dtype))
    return torch.from_numpy(array)


def refuse_unsafe(path: Path, raw: RawCheckpoint) -> None:
    if raw.safety.unsafe:
        raise UnsafeContentError(
            f"{path}: refusing to load, the file calls {', '.join(raw.safety.unsafe)}",
            unsafe=list(raw.safety.unsafe),
            hint="Run `ckpt inspect` to see it; pass unsafe=True only for files you trust",
            path=str(path))


def load(path: Path, framework: str, *, unsafe: bool,
         reader: Callable[[Path], RawCheckpoint]) -> Any:
    """Load a torch-format file: ``numpy`` and ``torch`` never run code (torch tensors are
    built from the restricted reader's tree, see :mod:`torch_build`); ``unsafe=True`` hands
    the file to ``torch.load`` itself."""
    raw = reader(path)
    if framework == "numpy":
        big = raw.details.get("byteorder") == "big"
        if raw.format == "torchscript":  # a flat state dict, like ScriptModule.state_dict()
            return {join(p): read_tensor(ref, big_endian=big) for p, ref in raw.tensors}
        return materialise(raw.tree, big_endian=big)
    if framework != "torch":
        raise UsageError(f"{path}: cannot load a {raw.format} file as {framework!r}",
                         hint="Use framework='torch' or framework='numpy'")
    if not unsafe:
        refuse_unsafe(path, raw)
    torch = import_torch()
    if raw.format == "torchscript":
        if not unsafe:
            raise UnsafeContentError(
                f"{path}: a TorchScript archive runs its own code when loaded",
                unsafe=["torch.jit.load"], path=str(path),
                hint="Pass unsafe=True to torch.jit.load it, or framework='numpy' for its weights")
        with locate(path).open() as fh:
            return torch.jit.load(fh, map_location="cpu")
    loc = locate(path)
    if not unsafe:
        # Built from what the restricted reader parsed: torch allocates, never unpickles.
        from ckptkit.formats.torch_build import TorchBuilder

        builder = TorchBuilder(torch, path, big_endian=raw.details.get("byteorder") == "big",
                               mmap=raw.format == "torch-zip" and isinstance(loc, LocalLocation))
        return builder.build(raw.tree)
    try:
        if isinstance(loc, LocalLocation):  # mmap needs a file name, not a file object
            return torch.load(loc.path, map_location="cpu", weights_only=False,
                              mmap=raw.format == "torch-zip")
        with loc.open() as fh:
            return torch.load(fh, map_location="cpu", weights_only=False)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"{path}: torch.load could not read it: {first}",
            hint="Use framework='numpy' to read its tensors with ckptkit's own reader",
            path=str(path)) from exc
