"""PyTorch Distributed Checkpoint (DCP) output, written by torch's own engine.

``torch.distributed.checkpoint.save`` runs in this one process, without a process group, with
``FileSystemWriter``: the result is what a one-rank training job would have saved
(``.metadata`` plus ``__0_N.distcp``, one data file per tensor), and ``torch.distributed.checkpoint.load`` restores it
exactly, into any sharding.  Names are the flattened state-dict keys given
(``model.layers.0.weight``).

Tensors stream: torch plans the save from meta tensors (dtype and shape only), then asks for
each tensor's data as it writes it, in plan order; the planner below reads that one tensor
then.  torch holds every tensor of a data file until the file is complete, so each tensor gets
a file of its own (``single_file_per_rank=False``, a layout DCP loads like any other): one
tensor is alive at a time.  The checkpoint is built in a temporary directory
beside the target and renamed into place once torch has written ``.metadata``, so the target
never holds a partial checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ckptkit.errors import MissingDependencyError, NotFoundError, UsageError, disk_full
from ckptkit.formats.writers import LayoutEntry, WriteResult
from ckptkit.storage.atomic import fsync_dir, temp_path

#: ckptkit dtype names torch has a dtype for (the same spelling in ``torch``).
DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
          "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
          "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
_WIDTH = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def holds(dtype: str) -> bool:
    """Whether a DCP checkpoint written here can hold tensors of ``dtype``."""
    return dtype in DTYPES


def to_torch(array: np.ndarray, dtype: str) -> Any:
    """``array`` as a CPU torch tensor sharing its memory; ``ml_dtypes`` types (bfloat16,
    float8) are reinterpreted bit for bit, since numpy cannot hand them to torch."""
    import torch

    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # np.ascontiguousarray would make a 0-d array 1-d
    if array.dtype.kind == "V":  # ml_dtypes types report themselves as void
        raw = array.view(_WIDTH[array.dtype.itemsize])
        return torch.from_numpy(raw).view(getattr(torch, dtype))
    if not array.flags.writeable:
        array = array.copy()  # torch.from_numpy warns on read-only memory
    return torch.from_numpy(array)


def write_dcp(directory: str | os.PathLike[str], layout: Sequence[LayoutEntry],
              read: Callable[[str], np.ndarray]) -> WriteResult:
    """Write the tensors of ``layout`` as a DCP checkpoint in the new directory ``directory``.

    Args:
        directory: must not exist, or be an empty directory; its parent must exist.
        layout: ``(name, dtype, shape)`` of every tensor, in the order to write them.
        read: called once per name, when torch writes that tensor; returns its array.

    Raises:
        UsageError: ``directory`` is a file or not empty, a dtype torch has no type for, two
            tensors with one name.
        NotFoundError: the parent directory is missing.
        MissingDependencyError: torch is not installed.
        IntegrityError (or anything ``read`` raises): nothing is left behind.
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{target} already exists and is not an empty directory",
                         hint="A DCP checkpoint is a directory of its own: choose a new path "
                              "with -o", path=str(target))
    if not target.parent.is_dir():
        raise NotFoundError(f"{target.parent}: no such directory for the output {target.name}",
                            hint="Create it first, or choose another output path",
                            path=str(target.parent))
    names = [entry[0] for entry in layout]
    if len(set(names)) != len(names):
        raise UsageError("the layout names a tensor twice",
                         hint="Every tensor of a checkpoint needs its own name")
    for name, dtype, _shape in layout:
        if not holds(dtype):
            raise UsageError(f"tensor {name!r} has dtype {dtype}, which torch (and so DCP) "
                             "cannot store", hint="Convert to npz instead")
    try:
        import torch
        import torch.distributed.checkpoint as dcp
    except ImportError:
        raise MissingDependencyError("torch", "torch", "writing DCP checkpoints") from None
    state = {name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
             for name, dtype, shape in layout}
    dtypes = {name: dtype for name, dtype, _shape in layout}
    tmp = temp_path(target)
    tmp.mkdir()
    try:
        with warnings.catch_warnings():
            # "assuming the intent is to save in a single process": it is.
            warnings.filterwarnings("ignore", message=".*single process.*")
            try:
                # One file per tensor: torch keeps every tensor of a file alive until the file
                # is done, so one tensor per file is what keeps one tensor in memory.
                writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False)
                dcp.save(state, storage_writer=writer,
                         planner=_planner(read, dtypes), no_dist=True)
            except dcp.api.CheckpointException as exc:
                raise _original(exc) from None
        if target.exists():
            target.rmdir()  # empty (checked above); os.replace cannot replace a directory
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary directory, never the target
        full = disk_full(exc, target, "writing the DCP checkpoint")
        if full is not None:
            raise full from exc
        raise
    fsync_dir(target.parent)
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    params = sum(math.prod(shape) for _n, _d, shape in layout)
    return WriteResult(target, "dcp", len(layout), params, size)


def _original(exc: Any) -> BaseException:
    """The exception a rank raised, which torch wraps (with its traceback) in a
    ``CheckpointException``: a truncated source or Ctrl-C is reported as itself."""
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return exc


def _planner(read: Callable[[str], np.ndarray], dtypes: dict[str, str]) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class StreamingPlanner(DefaultSavePlanner):
        """Plans from meta tensors; reads each tensor only when torch writes it."""

        def resolve_data(self, write_item: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            name = write_item.index.fqn
            meta = self.lookup_object(write_item.index)
            tensor = to_torch(read(name), dtypes[name])
            if tuple(tensor.shape) != tuple(meta.shape):
                raise UsageError(f"tensor {name!r} arrived with shape {list(tensor.shape)}, "
                                 f"planned {list(meta.shape)}")
            return tensor

    return StreamingPlanner()


__all__ = ["DTYPES", "holds", "to_torch", "write_dcp"]
