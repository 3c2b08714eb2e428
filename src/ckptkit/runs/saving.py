"""For training scripts: an atomic ``torch.save`` with optional retention, and ``latest``.

``save`` writes into a unique temp file beside the target, fsyncs it, renames it over the
target and fsyncs the directory, so a crash (even ``kill -9``) leaves either the previous
complete file or the new complete file at ``path``, never a torn one.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkit.runs import checkpoint_names, integrity, retention
from ckptkit.runs.checkpoint_names import Checkpoint
from ckptkit.errors import DeletionStoppedError, MissingDependencyError, UsageError
from ckptkit.runs.metrics import parse_metric
from ckptkit.storage.atomic import atomic_file

def save(obj: Any, path: str | os.PathLike[str], *, keep_last: int | None = None,
         keep_best: str | None = None) -> Path:
    """``torch.save(obj, path)``, atomically, then optionally prune older checkpoints.

    The object is written to a temporary file (:mod:`ckptkit.storage.atomic`) in the same directory (created if
    needed), flushed and fsynced, renamed over ``path`` with :func:`os.replace`, and the
    directory is fsynced.  On any exception the temp file is removed and whatever was at
    ``path`` before is untouched.  Temp files of earlier killed saves to the same name that
    have not changed for 15 minutes are removed after a successful save.

    With ``keep_last`` and/or ``keep_best``, :func:`ckptkit.runs.retention.plan_cleanup` then runs
    on the directory and only deletions of ``path``'s own run group are executed (never the
    file just saved, never best/final/unrecognised files, never before the newest kept
    checkpoint is verified complete, and nothing at all if a file to delete changed since the
    plan was made).  Flags are validated before writing; an I/O error or a stopped deletion
    while pruning becomes a ``RuntimeWarning``, not a failed save.

    Args:
        obj: anything ``torch.save`` accepts.
        path: the target, e.g. ``checkpoints/thinker_step_300.pt``.
        keep_last: keep this many newest checkpoints of the run (``keep_best`` alone means 1).
        keep_best: ``METRIC[:min|max]``: also keep the best checkpoint by this metric.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        MissingDependencyError: torch is not installed.
        UsageError: retention asked for, but ``path`` is not a periodic checkpoint name.
        DiskFullError: no space left (or a quota or file size limit); also an ``OSError``.

    Example:
        >>> ckptkit.save({"model": model.state_dict(), "step": step},         # doctest: +SKIP
        ...              f"checkpoints/thinker_step_{step}.pt", keep_last=2)
    """
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "torch", "ckptkit.save") from None
    target = Path(path)
    # in_run: a name such as 1000.pt is a step once a second file of its pattern exists.
    parsed = checkpoint_names.parse_name(target.name, in_run=True)
    retain = keep_last is not None or keep_best is not None
    if retain and parsed is None:
        # Checked before writing: a run without retention would fill the disk silently.
        raise UsageError(f"{target.name}: not a periodic checkpoint name, so keep_last/keep_best "
                         "cannot tell which files belong to its run",
                         hint="Name it like step_300.pt, thinker_step_300.pt, model_300.pt, "
                              "epoch_3.pt or 300.pt (docs/cleanup.md lists the names)")
    if retain:
        # Validate the retention flags now, so a bad value fails before anything is written.
        if keep_last is not None and keep_last < (0 if keep_best else 1):
            raise UsageError(f"keep_last={keep_last} would delete the checkpoints to resume "
                             "from", hint="Use keep_last >= 1, or 0 together with keep_best")
        if keep_best:
            parse_metric(keep_best)
    kept = " (the previous file there is untouched)" if target.exists() else ""
    # torch.save reports a full disk as a RuntimeError: atomic_file says what it is.
    with atomic_file(target, make_parents=True, doing=f"saving it{kept}",
                     hint=f"Free some space in {target.parent} or save to another directory"
                     ) as fh:
        torch.save(obj, fh)
    if retain and parsed is not None:
        try:
            _retain(target, keep_last if keep_last is not None else 1, keep_best)
        except (OSError, DeletionStoppedError) as exc:
            # The new checkpoint is safely on disk; a failed prune must not crash training.
            warnings.warn(f"ckptkit.save: retention after saving {target} failed: {exc}",
                          RuntimeWarning, stacklevel=2)
    return target


def _retain(target: Path, keep_last: int, keep_best: str | None) -> None:
    plan = retention.plan_cleanup(target.parent, keep_last=keep_last, keep_best=keep_best)
    mine = next((i.group for i in plan.items if i.path == target), None)
    items = tuple(i for i in plan.items if not (i.action == "delete" and (
        i.group != mine or i.path == target)))
    dataclasses.replace(plan, items=items).execute()


@dataclass(frozen=True)
class LatestResult:
    """The newest complete checkpoint (or None) and the newer ones skipped as incomplete."""

    checkpoint: Checkpoint | None
    skipped: tuple[tuple[Checkpoint, str], ...]


def find_latest(directory: str | os.PathLike[str], prefix: str | None = None) -> LatestResult:
    """Like :func:`latest`, also reporting the newer checkpoints skipped and why.

    Raises:
        UsageError: several runs in ``directory`` and no ``prefix`` to choose one.
        NotFoundError: ``directory`` does not exist.
    """
    found = checkpoint_names.scan(directory)
    if prefix is not None:
        # A run is named by its prefix, or by its pattern when two runs share a prefix
        # (thinker_step_{N}.pt beside thinker_step_{N}.safetensors).
        found = [c for c in found if prefix in (c.prefix, c.group)]
    groups = sorted({c.group for c in found})
    if len(groups) > 1:
        prefixes = sorted({c.prefix or '""' for c in found})
        choices = prefixes if len(prefixes) == len(groups) else [f"'{g}'" for g in groups]
        raise UsageError(f"{directory}: holds checkpoints of {len(groups)} runs "
                         f"({', '.join(groups)})",
                         hint=f"Pick one with --prefix (one of: {', '.join(choices)})")
    skipped: list[tuple[Checkpoint, str]] = []
    for ckpt in sorted(found, key=lambda c: c.step, reverse=True):
        verdict = integrity.check_complete(ckpt.path)
        if verdict:
            return LatestResult(ckpt, tuple(skipped))
        skipped.append((ckpt, verdict.reason))
    return LatestResult(None, tuple(skipped))


def latest(directory: str | os.PathLike[str], prefix: str | None = None) -> Checkpoint | None:
    """The newest complete periodic checkpoint in ``directory``, by step number (not mtime).

    Incomplete checkpoints (truncated files, uncommitted directories) are skipped.

    Args:
        directory: the run directory (not searched recursively).
        prefix: the run prefix (``thinker`` for ``thinker_step_N.pt``, ``checkpoint`` for HF,
            ``ckpt`` for TF); needed when the directory holds several runs.

    Returns:
        The :class:`~ckptkit.runs.retention.Checkpoint` (``.path``, ``.step``), or None.

    Raises:
        UsageError: several runs and no ``prefix``.

    Example:
        >>> ckptkit.latest("checkpoints/thinker_tiny").path            # doctest: +SKIP
        PosixPath('checkpoints/thinker_tiny/thinker_step_300.pt')
    """
    return find_latest(directory, prefix).checkpoint
