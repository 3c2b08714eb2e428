"""Hugging Face sharded output: ``model-0000N-of-0000M.safetensors`` plus its index.

The layout is the one ``huggingface_hub.save_torch_state_dict`` writes and ``transformers`` /
``huggingface_hub.load_torch_model`` read:

- tensors are split in the order given: a shard is closed when the next tensor would take it
  over the limit, and a tensor larger than the limit gets a shard of its own (so one shard can
  exceed the limit, as in Hugging Face's own splitter);
- shards are ``model-00001-of-00003.safetensors`` (``pytorch_model-...bin`` for torch files),
  each with ``{"format": "pt"}`` as its metadata;
- ``model.safetensors.index.json`` (``pytorch_model.bin.index.json``) holds
  ``{"metadata": {"total_size": <tensor bytes>, ...}, "weight_map": {name: shard}}``;
- everything in one shard: a single ``model.safetensors`` with the metadata in it, no index.

:func:`plan_shards` decides the split from names, dtypes and shapes alone; :func:`write_shards`
writes each shard atomically (``storage/atomic.py``), one tensor alive at a time, and the index
last, so a directory with an index has every shard it names complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from ckptkit.errors import NotFoundError, UsageError
from ckptkit.formats.writers import Fmt, LayoutEntry, WriteResult, write
from ckptkit.model import itemsize
from ckptkit.storage.atomic import write_text

#: Output format -> (file stem, suffix) of its shards, as Hugging Face names them.
SHARD_NAMES: dict[str, tuple[str, str]] = {"safetensors": ("model", ".safetensors"),
                                           "torch": ("pytorch_model", ".bin")}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)(B?)", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``500MB`` (10**6, as Hugging Face counts), ``2GiB`` / ``2G`` (2**30), ``123`` bytes.

    Raises:
        UsageError: not a size of at least one byte.
    """
    found = _SIZE.fullmatch(str(text).strip())
    value = 0
    if found:
        number, unit, binary, byte = found.groups()
        power = "_KMGT".index(unit.upper() or "_")
        if binary or (unit and not byte):
            value = int(float(number) * (1 << (10 * power)))
        else:
            value = int(float(number) * 1000 ** power)
    if value < 1:
        raise UsageError(f"--max-shard-size {text!r} is not a size",
                         hint="Examples: 500MB, 5GB (powers of 1000, as Hugging Face counts), "
                              "2GiB, 512M (powers of 1024)")
    return value


@dataclass(frozen=True)
class ShardPlan:
    """Which tensors go to which file; nothing written yet."""

    fmt: Fmt
    max_size: int
    files: tuple[tuple[str, tuple[LayoutEntry, ...]], ...]
    total_size: int

    @property
    def index_name(self) -> str | None:
        """The index file, or None when everything fits one file."""
        if len(self.files) < 2:
            return None
        stem, suffix = SHARD_NAMES[self.fmt]
        return f"{stem}{suffix}.index.json"

    @property
    def names(self) -> tuple[str, ...]:
        """Every file the plan writes, the index last."""
        return tuple(name for name, _ in self.files) + (
            (self.index_name,) if self.index_name else ())

    def weight_map(self) -> dict[str, str]:
        return {entry[0]: name for name, entries in self.files for entry in entries}


def plan_shards(layout: Sequence[LayoutEntry], fmt: Fmt, max_size: int) -> ShardPlan:
    """Split ``layout`` into Hugging Face shards of at most ``max_size`` bytes each.

    Raises:
        UsageError: ``fmt`` has no Hugging Face sharded layout (only safetensors and torch do).
    """
    if fmt not in SHARD_NAMES:
        raise UsageError(f"--max-shard-size writes Hugging Face shards, which exist for "
                         f"safetensors and torch files, not {fmt}",
                         hint="Use --to safetensors (or torch) with --max-shard-size")
    groups: list[list[LayoutEntry]] = []
    current: list[LayoutEntry] = []
    used = total = 0
    for entry in layout:
        size = int(math.prod(entry[2]) * itemsize(entry[1]))
        total += size
        if size > max_size:
            groups.append([entry])  # too big for any shard: alone, as Hugging Face does
            continue
        if current and used + size > max_size:
            groups.append(current)
            current, used = [], 0
        current.append(entry)
        used += size
    if current:
        groups.append(current)
    stem, suffix = SHARD_NAMES[fmt]
    if len(groups) <= 1:
        files = ((f"{stem}{suffix}", tuple(groups[0] if groups else ())),)
    else:
        count = len(groups)
        files = tuple((f"{stem}-{i + 1:05d}-of-{count:05d}{suffix}", tuple(group))
                      for i, group in enumerate(groups))
    return ShardPlan(fmt, max_size, files, total)


def conflicts(directory: Path, plan: ShardPlan) -> list[str]:
    """Files in ``directory`` of an earlier sharded save that this plan would not replace:
    left there, they would be stray shards, or a stale index naming them."""
    if not directory.is_dir():
        return []
    stem, suffix = SHARD_NAMES[plan.fmt]
    ours = re.compile(re.escape(stem) + r"(?:-\d{5,}-of-\d{5,})?" + re.escape(suffix)
                      + r"(?:\.index\.json)?")
    planned = set(plan.names)
    return sorted(p.name for p in directory.iterdir()
                  if ours.fullmatch(p.name) and p.name not in planned)


def write_shards(directory: str | Path, plan: ShardPlan,
                 tensors: Iterable[tuple[str, np.ndarray]],
                 metadata: dict[str, str] | None = None) -> WriteResult:
    """Write ``tensors`` (in the plan's order) as the plan's shards, then the index.

    ``directory`` is created if missing (its parent must exist).  ``metadata`` goes where
    Hugging Face puts it: into the index (sharded) or the one file's header.

    Returns:
        A :class:`WriteResult` whose ``path`` is the directory and ``bytes`` the files' total.

    Raises:
        UsageError: files of an earlier sharded save that the plan would not replace are in
            ``directory`` (see :func:`conflicts`), or a tensor arrives out of the plan's order.
        NotFoundError: the parent of ``directory`` does not exist.
        Anything ``tensors`` raises; the shards this call created are removed then, and no
        index is written.
    """
    target = Path(directory)
    stale = conflicts(target, plan)
    if stale:
        raise UsageError(f"{target} holds {', '.join(stale[:3])}"
                         f"{f' and {len(stale) - 3} more' if len(stale) > 3 else ''} from an "
                         "earlier sharded save, which this one would not replace",
                         hint="Write to an empty or new directory (-o), or remove those files",
                         path=str(target))
    if not target.parent.is_dir():
        raise NotFoundError(f"{target.parent}: no such directory for the output {target.name}",
                            hint="Create it first, or choose another output path",
                            path=str(target.parent))
    target.mkdir(exist_ok=True)
    meta = dict(metadata or {})
    sharded = plan.index_name is not None
    per_file = {"format": "pt"} if sharded else {"format": "pt", **meta}
    stream = _in_order(tensors, [e[0] for _, entries in plan.files for e in entries])
    created: list[Path] = []
    count = params = size = 0
    try:
        for name, entries in plan.files:
            path = target / name
            fresh = not path.exists()
            result = write(path, plan.fmt, islice(stream, len(entries)), metadata=per_file,
                           layout=entries)
            if fresh:
                created.append(path)
            if result.tensor_count != len(entries):
                raise UsageError(f"{path}: {result.tensor_count} of {len(entries)} planned "
                                 "tensors arrived", hint="The tensor stream ended early")
            count += result.tensor_count
            params += result.param_count
            size += result.bytes
        if sharded:
            index = {"metadata": {"total_size": plan.total_size, **meta},
                     "weight_map": plan.weight_map()}
            text = json.dumps(index, indent=2, ensure_ascii=False) + "\n"
            write_text(target / plan.index_name, text)  # type: ignore[operator]
            size += len(text.encode("utf-8"))
    except BaseException:
        for path in created:  # ours, complete but useless without the index
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return WriteResult(target, plan.fmt, count, params, size)


def _in_order(tensors: Iterable[tuple[str, np.ndarray]],
              names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    for expected, (name, array) in zip(names, tensors):
        if name != expected:
            raise UsageError(f"tensor {name!r} arrived where the shard plan expects "
                             f"{expected!r}", hint="Pass the tensors in the planned order")
        yield name, array
        del array


__all__ = ["SHARD_NAMES", "ShardPlan", "conflicts", "parse_size", "plan_shards", "write_shards"]
