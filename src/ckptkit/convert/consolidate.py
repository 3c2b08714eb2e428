"""Consolidate and reshard: any checkpoint to one file, to Hugging Face shards, or to DCP.

The source is read as global tensors made of chunks (:mod:`ckptkit.formats.chunked`): a DCP
tensor has one chunk per rank that saved a piece of it, a tensor of a single file or of a
Hugging Face shard is one chunk, read from the file's structure
(:func:`ckptkit.convert.passthrough.chunked_source`).  :func:`plan_consolidation` decides everything from
structure alone (names, dtypes, shapes, which file each tensor goes to) and returns a frozen
:class:`Consolidation`; :meth:`Consolidation.execute` gathers one global tensor at a time and
hands it to the writer, so peak memory is about the largest tensor plus a small constant,
whatever the model's size.  The output is then re-read (structure only) and compared with the
plan.

Names are kept as the source gives them: DCP keys as flattened state-dict names
(``model.layers.0.weight``), Orbax tree paths joined by ``/``, files' own keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ckptkit import formats
from ckptkit.convert.passthrough import refuse_overwrite
from ckptkit.errors import IntegrityError, UsageError, naming
from ckptkit.formats.chunked import ChunkedCheckpoint, ChunkedTensor, assemble
from ckptkit.formats.shard_writer import ShardPlan, conflicts, plan_shards, write_shards
from ckptkit.formats.writers import FORMATS, LayoutEntry, WriteResult, check_dtype, write
from ckptkit.storage import budget

Target = Literal["npz", "safetensors", "torch", "flax", "dcp"]
TARGETS: tuple[Target, ...] = (*FORMATS, "dcp")
#: Formats whose checkpoint is several files (their readers' FORMAT names).
MULTI_FILE = ("hf-sharded", "torch-dcp", "orbax", "deepspeed")


@dataclass(frozen=True)
class Consolidation:
    """A decided consolidation: the source's tensors, the output and, for Hugging Face
    shards, which file each tensor goes to.  Nothing is read or written until
    :meth:`execute`."""

    source: ChunkedCheckpoint
    target: Target
    out: Path
    shards: ShardPlan | None = None

    @property
    def layout(self) -> tuple[LayoutEntry, ...]:
        return tuple((t.name, t.dtype, t.shape) for t in self.source.tensors)

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.source.tensors)

    @property
    def largest(self) -> int:
        """Bytes of the largest tensor: about the peak memory of :meth:`execute`."""
        return max((t.nbytes for t in self.source.tensors), default=0)

    def execute(self) -> WriteResult:
        """Gather each tensor and write it; then re-read the output and check it.

        Raises:
            IntegrityError: a chunk is missing, short or does not tile its tensor, or the
                output does not read back as planned (a single-file output is removed then).
        """
        tensors = self.source.tensors
        by_name = {t.name: t for t in tensors}
        # Generators hold no reference to the array they last yielded: each is freed by the
        # writer before the next tensor is gathered.
        order = ([by_name[e[0]] for _f, entries in self.shards.files for e in entries]
                 if self.shards is not None else tensors)  # a big tensor's shard comes early
        stream = ((t.name, assemble(t)) for t in order)
        meta = self.source.metadata or None
        with budget.reading(self.source.path):
            if self.target == "dcp":
                from ckptkit.formats.dcp_writer import write_dcp

                result = write_dcp(self.out, self.layout, lambda name: assemble(by_name[name]))
            elif self.shards is not None:
                result = write_shards(self.out, self.shards, stream, meta)
            else:
                result = write(self.out, self.target, stream, metadata=meta,
                               separator=self.source.separator, layout=self.layout)
        check_output(self, result)
        return result


def open_source(src: str | os.PathLike[str]) -> ChunkedCheckpoint:
    """``src`` as global tensors, each with the chunks it is stored in (structure only)."""
    from ckptkit.convert.passthrough import chunked_source

    path = Path(src)
    with naming(path):
        return chunked_source(path)


def is_chunked(src: str | os.PathLike[str]) -> bool:
    """Whether ``src`` is a checkpoint of several files (DCP, Orbax, Hugging Face shards),
    which converting always consolidates."""
    path = Path(src)
    with naming(path):
        return formats.detect(path).FORMAT in MULTI_FILE


def plan_consolidation(src: str | os.PathLike[str], to: Target, out: str | os.PathLike[str], *,
                       max_shard_size: int | None = None) -> Consolidation:
    """Decide how ``src`` becomes ``to`` at ``out``, reading structure only.

    Args:
        src: any checkpoint ckptkit reads: a file, or a sharded / distributed directory.
        to: ``safetensors``, ``torch``, ``npz``, ``flax`` (msgpack) or ``dcp``.
        out: the file to write, or the directory for Hugging Face shards and DCP.
        max_shard_size: bytes per shard; writes Hugging Face shards plus their index
            (safetensors and torch only).

    Raises:
        UsageError: a target or a combination that cannot hold the source (a dtype, shards of
            npz, a sharded DCP), an output over an input, stale shards in ``out``.
        NotFoundError, FormatError, IntegrityError: from reading ``src``.
    """
    if to not in TARGETS:
        raise UsageError(f"--to {to!r} is not one of {', '.join(TARGETS)}",
                         hint=f"Pass one of: {', '.join(TARGETS)}")
    if to == "dcp" and max_shard_size is not None:
        raise UsageError("--max-shard-size writes Hugging Face shards; a DCP checkpoint is "
                         "sharded by the ranks that load it", hint="Drop --max-shard-size, "
                         "or write --to safetensors")
    source = open_source(src)
    target = Path(out)
    if to == "dcp" and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{target} already exists and is not an empty directory",
                         hint="A DCP checkpoint is a directory of its own: choose a new path "
                              "with -o", path=str(target))
    if not source.tensors:
        raise UsageError(f"{source.path}: holds no tensors to convert; converting to 0 tensors "
                         "is always an error", hint="Run `ckpt inspect` on it to see what it holds")
    _check_names(source.tensors)
    for tensor in source.tensors:
        if to == "dcp":
            from ckptkit.formats.dcp_writer import holds

            if not holds(tensor.dtype):
                raise UsageError(f"tensor {tensor.name!r} has dtype {tensor.dtype}, which DCP "
                                 "cannot store", hint="Convert to npz instead")
        else:
            check_dtype(to, tensor.name, tensor.dtype)
    shards = None
    if max_shard_size is not None:
        if target.exists() and not target.is_dir():
            raise UsageError(f"{target} is a file; --max-shard-size writes a directory of shards",
                             hint="Pass -o with a new or empty directory", path=str(target))
        shards = plan_shards([(t.name, t.dtype, t.shape) for t in source.tensors], to,  # type: ignore[arg-type]
                             max_shard_size)
        stale = conflicts(target, shards)
        if stale:
            raise UsageError(f"{target} holds {', '.join(stale[:3])} from an earlier sharded "
                             "save, which this one would not replace",
                             hint="Write to an empty or new directory (-o), or remove those "
                                  "files", path=str(target))
    _refuse_overwrite(source, [target / name for name in shards.names] if shards else [target])
    return Consolidation(source, to, target, shards)


def _check_names(tensors: tuple[ChunkedTensor, ...]) -> None:
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise UsageError(f"two tensors are named {tensor.name!r}",
                             hint="Every tensor of the output needs its own name")
        seen.add(tensor.name)


def _refuse_overwrite(source: ChunkedCheckpoint, written: list[Path]) -> None:
    """No file written may be the source or any file of it (hard links included)."""
    for out in written:
        refuse_overwrite(source.path, out, {source.path, *source.inputs})


def check_output(plan: Consolidation, result: WriteResult) -> None:
    """Re-read what was written (structure only) and compare names, dtypes and shapes.

    Raises:
        IntegrityError: a difference; a single-file output is removed first.
    """
    expected = {name: (dtype, tuple(shape)) for name, dtype, shape in plan.layout}
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    if plan.target == "dcp":
        found = _dcp_layout(plan.out)
    else:
        paths = ([plan.out / name for name, _ in plan.shards.files] if plan.shards is not None
                 else [plan.out])
        for path in paths:
            raw = formats.detect(path).read_info(path)
            for where, ref in raw.tensors:
                name = where if isinstance(where, str) else raw.separator.join(map(str, where))
                found[name] = (ref.dtype, tuple(ref.shape))
    problems = [f"{n}: missing" for n in expected if n not in found]
    problems += [f"{n}: {found[n][0]}{list(found[n][1])}, planned {d}{list(s)}"
                 for n, (d, s) in expected.items() if n in found and found[n] != (d, s)]
    problems += [f"{n}: not planned" for n in found if n not in expected]
    if problems:
        if plan.shards is None and plan.target != "dcp":
            plan.out.unlink(missing_ok=True)
        raise IntegrityError(f"{plan.out} does not read back as written ({len(problems)} "
                             f"problem(s): {'; '.join(problems[:3])})",
                             hint="Please report this with CKPTKIT_DEBUG=1 output",
                             path=str(plan.out))


def _dcp_layout(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    # torch wrote it and is imported already: its own reader checks its own metadata.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(directory).read_metadata()
    return {name: (str(meta.properties.dtype).removeprefix("torch."), tuple(meta.size))
            for name, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)}


__all__ = ["Consolidation", "TARGETS", "Target", "is_chunked", "open_source",
           "plan_consolidation"]
