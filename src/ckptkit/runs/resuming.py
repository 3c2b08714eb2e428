"""``ckptkit.resume``: restore a training run's model, optimizer, scheduler and scaler.

Training scripts name the pieces of their checkpoints differently (μOmni alone uses ``model``,
``thinker``, ``vit``, ``enc``, ``talker`` and ``generator`` for the weights, and ``opt_g``/
``opt_d`` for a GAN's optimizers), and older runs saved only a bare state dict.  ``resume``
accepts all of these, restores every piece that is present, and reports the ones that are
not, so that a run never continues silently from random weights (μOmni's fine-tuning script
loaded its checkpoint only when the file existed, and started from scratch without a word
when it did not).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkit.errors import (FormatError, MissingDependencyError, NotFoundError,
                            UnsafeContentError, UsageError)

#: Entries that ``model=`` restores from, first present wins.  Generic names come first so that
#: a file holding both ``model`` and a stage name uses the generic one.
MODEL_KEYS: tuple[str, ...] = ("model", "model_state_dict", "state_dict", "net", "thinker", "vit",
                               "enc", "talker", "generator")
#: Entries that ``optimizer=`` restores from (``optimizer_states`` is Lightning's one-item list).
OPTIMIZER_KEYS: tuple[str, ...] = ("optimizer", "optimizer_state_dict", "opt", "optim",
                                   "optimizer_states")
#: Entries that ``scheduler=`` restores from (``lr_schedulers`` is Lightning's one-item list).
SCHEDULER_KEYS: tuple[str, ...] = ("scheduler", "lr_scheduler", "scheduler_state_dict",
                                   "lr_schedulers")
#: Entries that ``scaler=`` restores from.
SCALER_KEYS: tuple[str, ...] = ("scaler", "grad_scaler", "scaler_state_dict")
#: Training-progress metadata, first present wins.
STEP_KEYS: tuple[str, ...] = ("step", "global_step", "iteration")
EPOCH_KEYS: tuple[str, ...] = ("epoch",)
METRIC_KEYS: tuple[str, ...] = ("best_val_loss", "best_metric", "val_loss")

#: Wrappers that add a prefix to every key: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
_SHOWN_KEYS = 5


class StateMismatchError(FormatError):
    """A checkpoint entry does not fit the object it is restored into.

    Carries the entry name and the first differing keys so that the caller can see whether the
    model was built with a different config or the wrong entry was chosen.
    """

    def __init__(self, message: str, *, entry: str, missing_keys: list[str],
                 unexpected_keys: list[str], mismatched_shapes: list[str],
                 hint: str | None = None, path: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.entry = entry
        self.missing_keys = missing_keys
        self.unexpected_keys = unexpected_keys
        self.mismatched_shapes = mismatched_shapes


@dataclass(frozen=True)
class ResumeResult:
    """What :func:`resume` restored and the training progress stored in the checkpoint.

    ``restored``, ``missing`` and ``unused`` name arguments (``"model"``, ``"img_proj"``) for the
    first two and top-level file entries for the last.
    """

    path: Path
    step: int | None
    epoch: int | None
    best_metric: float | None
    best_metric_name: str | None
    restored: tuple[str, ...]
    missing: tuple[str, ...]
    unused: tuple[str, ...]


def resume(dir_or_file: str | os.PathLike[str], *, model: Any = None, optimizer: Any = None,
           scheduler: Any = None, scaler: Any = None, strict: bool = True,
           map_location: Any = "cpu", unsafe: bool = False, **modules: Any) -> ResumeResult:
    """Restore every requested training object that the checkpoint holds.

    ``dir_or_file`` is a checkpoint file, or a directory, in which case the newest complete
    periodic checkpoint by step number is used (``*_step_N.pt``, ``epoch_N.pt``,
    ``checkpoint-N.pt``; ``*_best.pt`` and finals are not periodic).  The file is loaded with
    ``torch.load(weights_only=True)`` after :func:`ckptkit.inspect` has checked it runs no code.

    ``model=`` takes the first present entry of :data:`MODEL_KEYS`; ``optimizer=``,
    ``scheduler=`` and ``scaler=`` likewise from :data:`OPTIMIZER_KEYS`, :data:`SCHEDULER_KEYS`
    and :data:`SCALER_KEYS`; every other keyword restores the entry of the same name
    (``img_proj=``, ``opt_g=``, ``mpd=``).  A file that is a bare state dict of tensors (legacy
    weights-only) restores into ``model`` only.  ``module.`` and ``_orig_mod.`` prefixes are
    removed (or added, for a compiled target) when the target's keys differ that way.

    Side effects: the targets' ``load_state_dict`` is called.  Every module entry is checked
    against its target before anything is loaded, so a model mismatch leaves all targets
    untouched; an optimizer or scheduler that does not fit is reported after the modules
    were restored.

    Args:
        dir_or_file: a checkpoint file or a directory of periodic checkpoints.
        model: the ``torch.nn.Module`` to restore; if given, the file must hold weights.
        optimizer: a ``torch.optim.Optimizer``.
        scheduler: an LR scheduler.
        scaler: a ``torch.amp.GradScaler``.
        strict: passed to ``Module.load_state_dict``; with False, missing and unexpected keys
            are allowed (a warning names them), but an entry sharing no key is still an error.
        map_location: passed to ``torch.load``.
        unsafe: load files that name custom classes or callables.  Runs code from the file;
            only for files you trust.
        **modules: further objects with ``load_state_dict``, restored from the entry of the
            same name.

    Returns:
        A :class:`ResumeResult`: the file used, step, epoch, best metric, and the names of
        the pieces restored, asked for but missing, and present but not asked for.

    Raises:
        NotFoundError: no such path, no periodic checkpoint in the directory, or the file has
            no model entry although ``model`` was given (resuming without weights is never
            what a training script wants).
        UnsafeContentError: the file would run code and ``unsafe`` is False.
        StateMismatchError: an entry does not fit its target (keys or shapes listed).
        FormatError: not a dict checkpoint or state dict, or refused by weights_only loading.
        MissingDependencyError: torch is not installed.

    Example:
        >>> result = ckptkit.resume("checkpoints/thinker_tiny", model=model,   # doctest: +SKIP
        ...                         optimizer=opt, scheduler=sched, scaler=scaler)
        >>> start_step = (result.step or 0) + 1                                 # doctest: +SKIP
    """
    torch = _import_torch()
    path = _resolve(Path(dir_or_file))
    checkpoint = _load(torch, path, map_location=map_location, unsafe=unsafe)

    if _is_bare_state_dict(torch, checkpoint):
        return _resume_bare(path, checkpoint, model=model, optimizer=optimizer,
                            scheduler=scheduler, scaler=scaler, strict=strict, modules=modules)
    if not isinstance(checkpoint, Mapping):
        raise FormatError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict",
                          hint="resume() reads dicts of state dicts or a bare state dict",
                          path=str(path))

    # Decide which entry feeds which target before touching anything.
    explicit = set(modules)
    plan: list[tuple[str, str | None, Any]] = []
    if model is not None:
        plan.append(("model", _first(checkpoint, MODEL_KEYS, explicit), model))
    plan += [(name, name if name in checkpoint else None, target)
             for name, target in modules.items() if target is not None]
    for name, keys, target in (("optimizer", OPTIMIZER_KEYS, optimizer),
                               ("scheduler", SCHEDULER_KEYS, scheduler),
                               ("scaler", SCALER_KEYS, scaler)):
        if target is not None:
            plan.append((name, _first(checkpoint, keys, explicit), target))

    if model is not None and plan[0][1] is None:
        raise NotFoundError(
            f"{path}: no model weights: none of {', '.join(MODEL_KEYS)} is present "
            f"(entries: {_preview(list(checkpoint))})",
            hint="Pass the weights' entry by name, e.g. resume(path, thinker=model)",
            path=str(path))

    # Every module is checked before any target is touched: modules are the likeliest not to
    # fit, and a mismatch must leave the caller's objects as they were.
    present = [(name, entry, target) for name, entry, target in plan if entry is not None]
    modules_ready = [(target, _fit_module(target, checkpoint[entry], entry=entry, path=path,
                                          strict=strict))
                     for _, entry, target in present if isinstance(target, torch.nn.Module)]
    for target, state in modules_ready:
        target.load_state_dict(state, strict=strict)
    for _, entry, target in present:
        if not isinstance(target, torch.nn.Module):
            _load_other(target, _unwrap(checkpoint[entry]), entry=entry, path=path)
    restored = [name for name, _, _ in present]

    used = {entry for _, entry, _ in plan if entry is not None}
    step_key = _first(checkpoint, STEP_KEYS, set())
    epoch_key = _first(checkpoint, EPOCH_KEYS, set())
    metric_key = _first(checkpoint, METRIC_KEYS, set())
    used |= {k for k in (step_key, epoch_key, metric_key) if k is not None}
    restored_set = set(restored)
    return ResumeResult(
        path=path,
        step=_as_int(checkpoint.get(step_key)) if step_key else _step_from_name(path, "step"),
        epoch=_as_int(checkpoint.get(epoch_key)) if epoch_key else _step_from_name(path, "epoch"),
        best_metric=_as_float(checkpoint.get(metric_key)) if metric_key else None,
        best_metric_name=metric_key,
        restored=tuple(n for n, _, _ in plan if n in restored_set),
        missing=tuple(n for n, entry, _ in plan if entry is None),
        unused=tuple(str(k) for k in checkpoint if k not in used),
    )


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "torch", "ckptkit.resume") from None
    return torch


def _resolve(target: Path) -> Path:
    """The checkpoint file to read: ``target`` itself, or the newest complete one inside it."""
    if target.is_file():
        return target
    if not target.is_dir():
        raise NotFoundError(f"{target}: no such file or directory",
                            hint="Pass a checkpoint file or the run's checkpoint directory",
                            path=str(target))
    # The same rules as `ckpt latest`: step number, not mtime (copies reset mtimes), and a
    # save killed halfway is skipped so the run resumes from the last good one.
    from ckptkit.runs.saving import find_latest

    found = find_latest(target)
    skipped = [f"{c.path.name} ({reason})" for c, reason in found.skipped]
    if found.checkpoint is None:
        note = f"; incomplete: {', '.join(skipped)}" if skipped else ""
        raise NotFoundError(
            f"{target}: no complete periodic checkpoint (*_step_N.pt, epoch_N.pt, ...){note}",
            hint="Pass the checkpoint file explicitly, e.g. resume(DIR / 'thinker_best.pt', ...)",
            path=str(target))
    if skipped:
        warnings.warn(f"skipped incomplete checkpoint(s) {', '.join(skipped)}; resuming from "
                      f"{found.checkpoint.path.name}", stacklevel=3)
    if not found.checkpoint.path.is_file():
        raise UsageError(f"{found.checkpoint.path}: the newest checkpoint is a "
                         f"{found.checkpoint.kind}, resume() reads single PyTorch files",
                         hint="Pass the weights file inside it explicitly", path=str(target))
    return found.checkpoint.path


def _load(torch: Any, path: Path, *, map_location: Any, unsafe: bool) -> Any:
    """Load ``path`` after the restricted reader has confirmed it runs no code."""
    import pickle

    from ckptkit.inspection import inspect

    info = inspect(path)
    if info.unsafe and not unsafe:
        raise UnsafeContentError(
            f"{path}: refusing to load, the file calls {', '.join(info.unsafe)}",
            unsafe=list(info.unsafe), path=str(path),
            hint="Run `ckpt inspect` to see it; pass unsafe=True only for files you trust")
    if info.format == "safetensors":
        from ckptkit.loading import load

        return load(path, "torch")
    if info.format not in ("torch-zip", "torch-legacy"):
        raise UsageError(f"{path}: resume() reads PyTorch checkpoints, this is {info.format}",
                         hint="Convert it first (`ckpt convert`) or load it yourself",
                         path=str(path))
    try:
        return torch.load(str(path), map_location=map_location, weights_only=not unsafe)
    except pickle.UnpicklingError as exc:
        # torch's own message is a paragraph of advice; the classes are what the user needs.
        what = (f"it holds custom classes ({_preview(list(info.objects))})" if info.objects
                else str(exc).strip().splitlines()[0][:200])
        raise FormatError(
            f"{path}: torch.load(weights_only=True) refused it: {what}",
            hint="Pass unsafe=True only if you trust the file (it runs code from it)",
            path=str(path)) from exc


def _is_bare_state_dict(torch: Any, checkpoint: Any) -> bool:
    return (isinstance(checkpoint, Mapping) and len(checkpoint) > 0
            and all(isinstance(v, torch.Tensor) for v in checkpoint.values()))


def _resume_bare(path: Path, state: Mapping[str, Any], *, model: Any,
                 optimizer: Any, scheduler: Any, scaler: Any, strict: bool,
                 modules: dict[str, Any]) -> ResumeResult:
    """A legacy weights-only file: the whole file is the model; everything else is missing."""
    if model is None:
        raise UsageError(f"{path}: is a bare state dict (weights only); pass model=",
                         path=str(path))
    model.load_state_dict(_fit_module(model, state, entry="<file>", path=path, strict=strict),
                          strict=strict)
    others = [*modules.items(), ("optimizer", optimizer), ("scheduler", scheduler),
              ("scaler", scaler)]
    return ResumeResult(path=path, step=_step_from_name(path, "step"),
                        epoch=_step_from_name(path, "epoch"), best_metric=None,
                        best_metric_name=None, restored=("model",),
                        missing=tuple(n for n, t in others if t is not None), unused=())


def _first(checkpoint: Mapping[str, Any], keys: tuple[str, ...],
           claimed: set[str]) -> str | None:
    # Entries named by an explicit keyword belong to that keyword, not to model=/optimizer=.
    for key in keys:
        if key in checkpoint and key not in claimed and checkpoint[key] is not None:
            return key
    return None


def _unwrap(value: Any) -> Any:
    # Lightning stores optimizers and schedulers as lists; one item is unambiguous.
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def _fit_module(module: Any, state: Any, *, entry: str, path: Path,
                strict: bool) -> dict[str, Any]:
    """``state`` with wrapper prefixes reconciled to ``module``'s keys, or a clear error.

    Raises StateMismatchError for shape mismatches, for missing or unexpected keys when
    ``strict``, and for an entry sharing no key at all (which would mean random weights).
    """
    if not isinstance(state, Mapping):
        raise FormatError(f"{path}: entry {entry!r} is a {type(state).__name__}, "
                          "not a state dict", path=str(path))
    own = module.state_dict()
    state = _match_prefixes(dict(state), set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)) or len(missing) == len(own) > 0:
        raise _mismatch(path, entry, missing, unexpected, shapes, strict=strict)
    if missing or unexpected:
        warnings.warn(f"{path}: entry {entry!r} loaded non-strictly: "
                      f"{_count(missing, 'missing')}, {_count(unexpected, 'unexpected')}",
                      stacklevel=3)
    return state


def _match_prefixes(state: dict[str, Any], own: set[str]) -> dict[str, Any]:
    """Remove (or add) ``module.``/``_orig_mod.`` so the keys line up with the target's."""
    if not state or set(state) <= own and own <= set(state):
        return state

    def fix(key: str) -> str:
        if key in own:
            return key
        bare = key
        changed = True
        while changed:  # DDP around torch.compile gives "module._orig_mod."
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if bare.startswith(prefix):
                    bare, changed = bare[len(prefix):], True
        # torch.compile'd submodules put "_orig_mod." in the middle of the key.
        bare = bare.replace("._orig_mod.", ".")
        for candidate in (bare, "_orig_mod." + bare, "module." + bare):
            if candidate in own:
                return candidate
        return key

    fixed = {fix(k): v for k, v in state.items()}
    # Two keys collapsing onto one would drop a tensor silently; keep the original then.
    return fixed if len(fixed) == len(state) else state


def _load_other(target: Any, state: Any, *, entry: str, path: Path) -> None:
    """Optimizer, scheduler, scaler or any other ``load_state_dict`` object."""
    if not hasattr(target, "load_state_dict"):
        raise UsageError(f"cannot restore entry {entry!r} into a {type(target).__name__}: "
                         "it has no load_state_dict()", path=str(path))
    if not isinstance(state, Mapping):
        raise FormatError(f"{path}: entry {entry!r} is a {type(state).__name__}, "
                          "not a state dict", path=str(path))
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise StateMismatchError(
            f"{path}: entry {entry!r} does not fit the {type(target).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}",
            entry=entry, missing_keys=[], unexpected_keys=[], mismatched_shapes=[],
            hint="Build it over the same parameters (and param groups) as the saving run",
            path=str(path)) from exc


def _mismatch(path: Path, entry: str, missing: list[str], unexpected: list[str],
              shapes: list[str], *, strict: bool) -> StateMismatchError:
    parts = []
    if missing:
        parts.append(f"{_count(missing, 'missing')} ({_preview(missing)})")
    if unexpected:
        parts.append(f"{_count(unexpected, 'unexpected')} ({_preview(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ({_preview(shapes)})")
    if not strict and not shapes:
        parts.insert(0, "no key in common")
    return StateMismatchError(
        f"{path}: entry {entry!r} does not fit the model: {'; '.join(parts)}",
        entry=entry, missing_keys=missing, unexpected_keys=unexpected, mismatched_shapes=shapes,
        hint="Build the model with the config it was trained with, or pick the right entry "
             "by name (resume(path, thinker=model)); strict=False loads matching keys only",
        path=str(path))


def _count(keys: list[str], what: str) -> str:
    return f"{len(keys)} {what} key{'' if len(keys) == 1 else 's'}"


def _preview(items: list[str]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN_KEYS])
    return shown + (f", … {len(items) - _SHOWN_KEYS} more" if len(items) > _SHOWN_KEYS else "")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if hasattr(value, "numel") and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1:
        return float(value.item())
    return None


def _step_from_name(path: Path, kind: str) -> int | None:
    """The step (or epoch) in a periodic file name, for files that do not store it."""
    from ckptkit.runs.retention import parse_name

    parsed = parse_name(path.name)
    if parsed is None:
        return None
    pattern, _, step, epoch = parsed
    # epoch_N.pt counts epochs, which the name pattern reports in its step slot.
    per_epoch = pattern.startswith("epoch_{N}")
    if kind == "epoch":
        return step if per_epoch else epoch
    return None if per_epoch else step


__all__ = ["MODEL_KEYS", "OPTIMIZER_KEYS", "SCALER_KEYS", "SCHEDULER_KEYS", "ResumeResult",
           "StateMismatchError", "resume"]
