"""DeepSpeed ZeRO checkpoints (stages 1-3): a ``global_stepN/`` directory read as one model.

``engine.save_checkpoint(dir, tag)`` writes ``dir/tag/`` (and ``dir/latest`` naming the tag):

- ``mp_rank_00_model_states.pt`` (stages 1-2) or one ``zero_pp_rank_<r>_mp_rank_00_model_states.pt``
  per rank (stage 3): the module state dict (empty placeholders in stage 3), ``param_shapes``
  (one ordered ``{name: shape}`` per optimizer parameter group), step counters, ``ds_config``;
- ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per data-parallel rank: that rank's slice
  of the fp32 master weights (``single_partition_of_fp32_groups`` in stages 1-2,
  ``fp32_flat_groups`` in stage 3) and of the optimizer moments.

Every file is read by the restricted torch-zip reader (never ``torch.load``).  The master
weights are put together as DeepSpeed's ``zero_to_fp32`` does: stages 1-2 concatenate the
ranks' partitions of each group and cut consecutive parameters from it; stage 3 gives each
parameter ``ceil(numel / world)`` elements on every rank.  A parameter that lies inside one
rank's partition keeps a plain byte span; one spread over ranks is assembled when loaded,
one parameter at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkit.errors import CkptkitError, FormatError, IntegrityError, UsageError
from ckptkit.formats import torch_zip
from ckptkit.model import ByteSpan, Opaque, Problem, RawCheckpoint, TensorRef, itemsize
from ckptkit.storage.budget import metered
from ckptkit.storage.location import Location, locate

FORMAT = "deepspeed"
_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
_MODEL = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_00_model_states\.pt")


@dataclass(frozen=True)
class Piece:
    """``length`` elements of a parameter, at element ``start`` of rank ``rank``'s flat
    partition (whose bytes are ``span``)."""

    rank: int
    start: int
    length: int
    span: ByteSpan


def _files(path: Location) -> tuple[dict[int, Location], dict[int | None, Location]]:
    optim: dict[int, Location] = {}
    model: dict[int | None, Location] = {}
    for entry in path.list() if path.is_dir() else []:
        if (m := _OPTIM.fullmatch(entry.name)):
            optim[int(m.group(1))] = path.child(entry.name)
        elif (m := _MODEL.fullmatch(entry.name)):
            model[int(m.group(1)) if m.group(1) else None] = path.child(entry.name)
    return optim, model


#: Bytes of ``latest`` read: it holds one tag name.
_LATEST_MAX = 4096


def _step_dir(path: Path | Location) -> Location:
    """``path`` itself, or the tag that ``path/latest`` names."""
    path = locate(path)
    latest = path.child("latest")
    if latest.is_file() and not _files(path)[0]:
        tag = latest.read(0, _LATEST_MAX).decode("utf-8", "replace").strip()
        if not tag or "/" in tag or tag.startswith("."):
            raise IntegrityError(f"{latest}: names no tag ({tag!r})", path=str(latest))
        return path.child(tag)
    return path


def sniff(path: Path) -> bool:
    try:
        optim, model = _files(_step_dir(path))
    except (OSError, CkptkitError):
        return False
    return bool(optim) and bool(model)


def _stage(optim_state: dict[str, Any], where: Location) -> int:
    stage = optim_state.get("zero_stage")
    if isinstance(stage, Opaque) and stage.args and isinstance(stage.args[0], int):
        stage = stage.args[0]
    if stage not in (1, 2, 3):
        raise IntegrityError(f"{where}: ZeRO stage {stage!r} is not 1, 2 or 3",
                             hint="Not a ZeRO checkpoint ckptkit can read", path=str(where))
    return int(stage)


def _partitions(optim_state: dict[str, Any], stage: int, where: Location
                ) -> list[TensorRef]:
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = optim_state.get(key)
    if not isinstance(groups, list) or not all(isinstance(g, TensorRef) for g in groups):
        raise IntegrityError(f"{where}: no {key} (the fp32 master weights)", path=str(where),
                             hint="The file is not a ZeRO optimizer state or is corrupt")
    for ref in groups:
        if ref.dtype != "float32" or len(ref.shape) != 1 or ref.span is None:
            raise IntegrityError(f"{where}: {key} holds a {ref.dtype}{list(ref.shape)} tensor, "
                                 "not a flat float32 partition", path=str(where))
    return groups


def _layout(path: Path) -> tuple[dict[str, Any], dict[str, list[Piece]], dict[str, tuple],
                                 int, int, dict[int, Location]]:
    """(model states tree, pieces per parameter, shapes, stage, world size, optim files)."""
    step = _step_dir(path)
    optim, model = _files(step)
    if not optim or not model:
        raise FormatError(f"{step}: not a DeepSpeed ZeRO checkpoint directory",
                          hint="Pass the global_stepN directory", path=str(step))
    world = len(optim)
    if sorted(optim) != list(range(world)):
        missing = sorted(set(range(max(optim) + 1)) - set(optim))
        raise IntegrityError(f"{step}: optimizer states of rank(s) {missing} are missing",
                             hint="The checkpoint is incomplete", path=str(step))
    states = torch_zip.read_info(model[min(model, key=lambda k: -1 if k is None else k)]).tree
    if not isinstance(states, dict) or not isinstance(states.get("param_shapes"), list):
        raise IntegrityError(f"{step}: model states without param_shapes", path=str(step),
                             hint="Not a ZeRO checkpoint, or a corrupt one")
    declared = states.get("dp_world_size")
    if isinstance(declared, int) and declared != world:
        raise IntegrityError(f"{step}: saved by {declared} ranks but {world} optimizer state "
                             "file(s) are here", hint="The checkpoint is incomplete",
                             path=str(step))
    optim_states = []
    for rank in range(world):
        tree = torch_zip.read_info(optim[rank]).tree
        state = tree.get("optimizer_state_dict") if isinstance(tree, dict) else None
        if not isinstance(state, dict):
            raise IntegrityError(f"{optim[rank]}: no optimizer_state_dict", path=str(optim[rank]))
        optim_states.append(state)
    stage = _stage(optim_states[0], optim[0])
    partitions = [_partitions(s, stage, optim[r]) for r, s in enumerate(optim_states)]
    pieces: dict[str, list[Piece]] = {}
    shapes: dict[str, tuple] = {}
    for group, names in enumerate(states["param_shapes"]):
        if not isinstance(names, dict) or any(len(p) <= group for p in partitions):
            raise IntegrityError(f"{step}: parameter group {group} has no partition on "
                                 "every rank", path=str(step))
        parts = [p[group] for p in partitions]
        cursor = 0
        for name, shape in names.items():
            numel = math.prod(shape)
            shapes[str(name)] = tuple(shape)
            if stage == 3:
                share = math.ceil(numel / world)
                taken = [Piece(r, cursor, min(share, numel - r * share), parts[r].span)
                         for r in range(world) if numel - r * share > 0]
                cursor += share
            else:
                taken = _cut(parts, cursor, numel)
                cursor += numel
            pieces[str(name)] = taken
        available = max(p.shape[0] for p in parts) if stage == 3 else sum(p.shape[0]
                                                                          for p in parts)
        if cursor > available:
            raise IntegrityError(f"{step}: group {group} needs {cursor:,} elements but its "
                                 f"partitions hold {available:,}", path=str(step),
                                 hint="The checkpoint is incomplete or corrupt")
    return states, pieces, shapes, stage, world, optim


def _cut(parts: list[TensorRef], start: int, numel: int) -> list[Piece]:
    """Elements ``start..start+numel`` of the concatenated partitions, per rank."""
    out = []
    base = 0
    for rank, part in enumerate(parts):
        size = part.shape[0]
        lo, hi = max(start, base), min(start + numel, base + size)
        if lo < hi:
            assert part.span is not None
            out.append(Piece(rank, lo - base, hi - lo, part.span))
        base += size
    return out


def _ref(pieces: list[Piece], shape: tuple) -> TensorRef:
    if len(pieces) == 1:
        piece = pieces[0]
        width = int(itemsize("float32"))
        return TensorRef("float32", shape, ByteSpan(piece.span.path, piece.span.offset
                                                    + piece.start * width,
                                                    piece.length * width, piece.span.member))
    return TensorRef("float32", shape)


@metered
def read_info(path: Path) -> RawCheckpoint:
    states, pieces, shapes, stage, world, optim = _layout(path)
    params = _buffers(states)
    params.update((name, _ref(pieces[name], shapes[name])) for name in pieces)
    tensors = tuple(((name,), ref) for name, ref in params.items())
    placement = {name: " + ".join(f"rank {p.rank} [{p.start}:{p.start + p.length}]"
                                  for p in parts) for name, parts in pieces.items()}
    metadata = {k: v for k, v in states.items() if isinstance(v, (int, float, str))
                and not isinstance(v, bool)}
    details = {"zero_stage": stage, "world_size": world, "metadata": metadata,
               "placement": placement, "files": len(optim) + 1,
               "optim_files": [p.name for p in optim.values()]}
    return RawCheckpoint(FORMAT, {**metadata, **params}, tensors, details=details)


def _buffers(states: dict[str, Any]) -> dict[str, Any]:
    """The module's buffers (BatchNorm statistics...), which ZeRO does not partition: they
    stay in the model states file, and ``zero_to_fp32`` puts them first."""
    module = states.get("module") if isinstance(states.get("module"), dict) else {}
    names = states.get("buffer_names") or []
    return {str(n): module[n] for n in names if isinstance(module.get(n), TensorRef)}


def _assemble(pieces: list[Piece], shape: tuple) -> Any:
    import numpy as np

    from ckptkit.formats.tensor_io import read_bytes

    width = int(itemsize("float32"))
    parts = [np.frombuffer(read_bytes(TensorRef("float32", (p.length,), ByteSpan(
        p.span.path, p.span.offset + p.start * width, p.length * width, p.span.member)
    )), dtype=np.float32) for p in pieces]
    return np.concatenate(parts).reshape(shape) if parts else np.zeros(shape, np.float32)


def tensor_reader(path: Path) -> Any:
    """A function reading one consolidated fp32 parameter (or buffer) by name, as
    :func:`load` gives it: what ``ckpt convert`` asks for, one tensor at a time."""
    from ckptkit.formats.tensor_io import read_tensor

    _states, pieces, shapes, *_ = _layout(path)

    def read(name: str, ref: TensorRef) -> Any:
        return _assemble(pieces[name], shapes[name]) if name in pieces else read_tensor(ref)

    return read


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: the consolidated fp32 state dict (``{name: array}``, names as DeepSpeed's
    ``zero_to_fp32`` gives them); ``torch``: the same as torch tensors."""
    if framework not in ("numpy", "torch"):
        raise UsageError(f"{path}: cannot load a DeepSpeed checkpoint as {framework!r}",
                         hint="Use framework='numpy' or framework='torch'")
    states, pieces, shapes, *_ = _layout(path)
    from ckptkit.formats.tensor_io import read_tensor

    state = {name: read_tensor(ref) for name, ref in _buffers(states).items()}
    state.update((name, _assemble(parts, shapes[name])) for name, parts in pieces.items())
    if framework == "torch":
        from ckptkit.formats.torch_common import import_torch

        torch = import_torch()
        return {name: torch.from_numpy(array) for name, array in state.items()}
    return state


def verify(path: Path, *, hashes: bool = False) -> list[Problem]:
    """Problems of a ZeRO checkpoint: missing rank files, partitions too short for the
    parameters, byte ranges outside their files (each named by file)."""

    try:
        _states, pieces, *_ = _layout(path)
    except CkptkitError as exc:
        return [Problem(exc.path or str(path), "incomplete" if "missing" in exc.message
                        else "corrupt", exc.message)]
    found = []
    for parts in pieces.values():
        for piece in parts:
            size = locate(piece.span.path).size()
            if piece.span.offset + piece.span.length > size:
                found.append(Problem(piece.span.path, "truncated",
                                     f"{piece.span.path}: partition reaches byte "
                                     f"{piece.span.offset + piece.span.length:,} of {size:,}"))
    return sorted(set(found), key=lambda p: p.file)
