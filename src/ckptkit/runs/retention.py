"""Which periodic checkpoints of a run directory may go: decide, then delete exactly that.

:func:`ckptkit.runs.checkpoint_names.scan` recognises periodic checkpoints by name and groups them
by run; :func:`plan_cleanup` decides (pure, apart from cheap reads) and returns a frozen
:class:`CleanupPlan` naming every path it would delete; only :meth:`CleanupPlan.execute`
deletes, through :mod:`ckptkit.storage.deletion`.  Anything not recognised is kept: "no marker" or
"unknown name" never means garbage (orbax#394).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ckptkit.storage import deletion
from ckptkit.runs import integrity
from ckptkit.runs.checkpoint_names import (PINNED, SAVE_TEMP_NAME, Checkpoint, Listed, listing,
                                      parse_name, run_root, scan)
from ckptkit.errors import DeletionStoppedError, UsageError
from ckptkit.runs.metrics import MetricSpec, metric_values, parse_metric

Action = Literal["keep", "delete"]


@dataclass(frozen=True)
class PlanItem:
    """One entry of a plan: what happens to ``path`` and why.

    ``members`` are the paths that make up a checkpoint (a TF index and its data shards; the
    path alone otherwise) and ``snapshots`` record each as planned: a ``delete`` item deletes
    exactly these, and only if they are unchanged.
    """

    path: Path
    action: Action
    reason: str
    step: int | None = None
    group: str | None = None
    size: int = 0
    members: tuple[Path, ...] = ()
    snapshots: tuple[deletion.Snapshot, ...] = ()


@dataclass(frozen=True)
class Guard:
    """The kept checkpoint of ``group`` proven complete when the plan was made; it is proven
    again right before the group's first deletion."""

    group: str
    path: Path


@dataclass(frozen=True)
class CleanupResult:
    """What :meth:`CleanupPlan.execute` deleted."""

    deleted: tuple[PlanItem, ...]
    freed_bytes: int


@dataclass(frozen=True)
class CleanupPlan:
    """A decided cleanup: every scanned entry with keep/delete and its reason, plus notes."""

    root: Any  # a Path, or a remote location (a URL's prefix)
    items: tuple[PlanItem, ...]
    notes: tuple[str, ...] = ()
    guards: tuple[Guard, ...] = ()

    @property
    def kept(self) -> tuple[PlanItem, ...]:
        return tuple(i for i in self.items if i.action == "keep")

    @property
    def deleted(self) -> tuple[PlanItem, ...]:
        return tuple(i for i in self.items if i.action == "delete")

    @property
    def freed_bytes(self) -> int:
        return sum(i.size for i in self.deleted)

    def execute(self) -> CleanupResult:
        """Delete every ``delete`` item's members, exactly those paths, or nothing.

        First, before anything is deleted, the newest kept checkpoint of every group that
        loses one is proven complete again, and every path to delete is compared with its
        snapshot (type, size, mtime, inode; every entry of a directory).  If anything changed
        nothing is deleted.  Then each path is checked once more right before it is removed
        (TF checkpoints lose their ``.index`` first, so a half-deleted one reads as absent).

        Raises:
            DeletionStoppedError: what changed or could not be deleted; ``.deleted`` lists the
                paths already gone (none when the checks before the first deletion failed).
        """
        doomed = self.deleted
        losing = {i.group for i in doomed}
        problems = []
        for guard in self.guards:
            if guard.group in losing:
                verdict = integrity.check_complete(guard.path)
                if not verdict:
                    problems.append(f"{guard.path}, the newest kept checkpoint of "
                                    f"{guard.group}, is no longer complete ({verdict.reason})")
        problems += [why for i in doomed for snap in i.snapshots
                     if (why := deletion.change(snap, self.root))]
        if problems:
            more = f" (and {len(problems) - 1} more change(s))" if len(problems) > 1 else ""
            raise DeletionStoppedError(f"nothing deleted: {problems[0]}{more}",
                                       hint=_AGAIN, path=str(self.root))
        done: list[PlanItem] = []
        gone: list[str] = []
        for item in doomed:
            for snap in item.snapshots:
                try:
                    deletion.remove(snap, self.root)
                except DeletionStoppedError as exc:
                    raise DeletionStoppedError(
                        f"deleted {len(done)} of {len(doomed)} checkpoint(s), then stopped: "
                        f"{exc.message}", deleted=tuple(gone), hint=_AGAIN,
                        path=exc.path) from exc
                gone.append(str(snap.path))
            done.append(item)
        return CleanupResult(tuple(done), sum(i.size for i in done))


_AGAIN = "Look at the directory, then plan again (ckpt cleanup --dry-run shows the new plan)"


def pinned_targets(directory: Any) -> dict[Any, str]:
    """Checkpoints something points at: symlink targets and the TF state file's latest."""
    from ckptkit.formats import tf_checkpoint

    if not isinstance(directory, Path):  # an object store: no links; the TF state file
        state = directory.child(tf_checkpoint.STATE_FILE)
        if not state.is_file():
            return {}
        latest = _state_latest(state.read(0, state.size()).decode("utf-8", "replace"))
        return {directory.child(latest + ".index"): "latest in the TF 'checkpoint' file"
                } if latest else {}
    pins: dict[Any, str] = {}
    root = directory.resolve()
    for e in listing(directory):
        if e.is_link:
            target = Path(e.path).resolve()
            if target.parent == root or root in target.parents:
                pins[target] = f"target of symlink {e.name}"
    latest, _all = tf_checkpoint.read_state(directory / tf_checkpoint.STATE_FILE)
    if latest:
        index = Path(latest if os.path.isabs(latest) else directory / latest)
        pins[Path(str(index) + ".index").resolve()] = "latest in the TF 'checkpoint' file"
    return pins


def _state_latest(text: str) -> str | None:
    """``model_checkpoint_path`` of a TF ``checkpoint`` state file (text protobuf)."""
    import re

    found = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    return found.group(1).rpartition("/")[2] if found else None


def _parent(path: Any) -> Any:
    return path.parent if isinstance(path, Path) else path.parent()


def _resolved(path: Any) -> Any:
    return path.resolve() if isinstance(path, Path) else path


def _suffix(path: Any) -> str:
    return path.suffix if isinstance(path, Path) else Path(path.name).suffix


# --------------------------------------------------------------------------- deciding


def plan_cleanup(directory: str | os.PathLike[str], keep_last: int, keep_every: int | None = None,
                 keep_best: str | None = None, recursive: bool = False) -> CleanupPlan:
    """Decide which periodic checkpoints of ``directory`` to delete, and say why for each.

    Per run group (same directory and name pattern), ordered by step number (never mtime):
    the newest ``keep_last`` are kept, so are steps divisible by ``keep_every`` and the best
    one by ``keep_best`` (``METRIC[:min|max]``, read from inside the checkpoint or from HF's
    ``trainer_state.json``/Orbax ``metrics``; checkpoints without it are kept and noted).
    Then the newest kept checkpoint is verified with :func:`ckptkit.runs.integrity.check_complete`;
    if it is incomplete the newest complete one is kept too, and if no checkpoint of the group
    is complete nothing in it is deleted.  Unrecognised entries are always kept.

    Args:
        directory: the run directory.
        keep_last: newest checkpoints to keep per group; 0 only together with ``keep_best``.
        keep_every: also keep steps divisible by this.
        keep_best: ``"val_loss"``, ``"best_val_loss:min"``, ``"eval_accuracy:max"``…
        recursive: also plan for run subdirectories (not inside checkpoint directories).

    Returns:
        A frozen :class:`CleanupPlan`; nothing is deleted until ``.execute()``.

    Raises:
        UsageError: a negative or unsafe ``keep_last``, a bad ``keep_every`` or metric spec.
        NotFoundError: ``directory`` does not exist.

    Example:
        >>> plan = plan_cleanup("checkpoints/thinker_tiny", keep_last=2)   # doctest: +SKIP
        >>> [i.path.name for i in plan.deleted], plan.freed_bytes          # doctest: +SKIP
    """
    if keep_last < 0:
        raise UsageError(f"--keep-last must be 0 or more, got {keep_last}",
                         hint="Pass --keep-last N with N >= 1 (0 only with --keep-best)")
    if keep_last == 0 and not keep_best:
        raise UsageError("--keep-last 0 would delete every periodic checkpoint, including the "
                         "one to resume from", hint="Keep at least one (--keep-last 1), or "
                         "pass --keep-best METRIC to keep the best one instead")
    if keep_every is not None and keep_every < 1:
        raise UsageError(f"--keep-every must be 1 or more, got {keep_every}",
                         hint="Pass --keep-every K with K >= 1, or leave it out")
    spec = parse_metric(keep_best) if keep_best else None
    root = run_root(directory)
    if spec is not None and not isinstance(root, Path):
        raise UsageError(f"{root}: --keep-best is not supported for remote runs yet",
                         hint="Use --keep-last/--keep-every, or run it on a local copy")
    checkpoints = scan(root, recursive=recursive)
    notes: list[str] = []
    items: list[PlanItem] = []
    groups: dict[str, list[Checkpoint]] = {}
    for ckpt in checkpoints:
        groups.setdefault(ckpt.group, []).append(ckpt)
    pins: dict[Path, str] = {}
    for folder in {root, *(_parent(c.path) for c in checkpoints)}:
        pins.update(pinned_targets(folder))
    guards: list[Guard] = []
    for group, members in groups.items():
        planned, guard = _plan_group(group, members, keep_last, keep_every, spec, pins, notes)
        items.extend(planned)
        guards.extend([guard] if guard else [])
    # A TF checkpoint's shards are part of it: listed with it, never again as "keep".
    recognised = {m for c in checkpoints for m in c.members}
    finals = {_parent(c.path) / f"{c.prefix}{_suffix(c.path)}": c.group for c in checkpoints
              if c.kind == "file" and c.prefix}
    folders = [root] + (sorted({_parent(c.path) for c in checkpoints} - {root}, key=str)
                        if recursive else [])
    for folder in folders:
        for e in listing(folder):
            path = e.path
            if path not in recognised:
                reason = (f"final checkpoint of {finals[path]}" if path in finals
                          else _unrecognised_reason(e, pins))
                items.append(PlanItem(path, "keep", reason))
    items.sort(key=lambda i: (str(_parent(i.path)), i.group or "~", i.step or 0, i.path.name))
    return CleanupPlan(root, tuple(items), tuple(notes), tuple(guards))


def _unrecognised_reason(e: Listed, pins: dict[Any, str]) -> str:
    if e.is_link:
        return "symlink (never touched, nor is its target)"
    if PINNED.search(e.name):
        return "best/last/latest checkpoint (always kept)"
    if SAVE_TEMP_NAME.fullmatch(e.name):
        return "temporary file of an interrupted ckptkit.save (remove it by hand when no " \
               "save is running)"
    if pins and _resolved(e.path) in pins:
        return pins[_resolved(e.path)]
    if e.is_dir:
        return "not a periodic checkpoint (directory)"
    return "not a periodic checkpoint"


def _plan_group(group: str, members: list[Checkpoint], keep_last: int, keep_every: int | None,
                spec: MetricSpec | None, pins: dict[Path, str],
                notes: list[str]) -> tuple[list[PlanItem], Guard | None]:
    ordered = sorted(members, key=lambda c: c.step)
    reasons: dict[Path, str] = {}
    for ckpt in ordered[max(0, len(ordered) - keep_last):] if keep_last else []:
        reasons[ckpt.path] = f"newest {keep_last} of {group}"
    if keep_every:
        for ckpt in ordered:
            if ckpt.step % keep_every == 0:
                reasons.setdefault(ckpt.path, f"step {ckpt.step} is a multiple of {keep_every}")
    for ckpt in ordered if pins else ():  # resolving 10,000 paths costs; skip when no pins
        pin = pins.get(_resolved(ckpt.path))
        if pin:
            reasons.setdefault(ckpt.path, pin)
    if spec is not None:
        values = metric_values(ordered, spec)
        ranked = [c for c in ordered if c.path in values]
        missing = [c for c in ordered if c.path not in values]
        if ranked:
            pick = min if spec.mode == "min" else max
            best = pick(ranked, key=lambda c: (values[c.path], -c.step if spec.mode == "min"
                                               else c.step))
            reasons.setdefault(best.path, f"best {spec.name} ({spec.mode}) = "
                                          f"{values[best.path]:g}")
        else:
            notes.append(f"{group}: no checkpoint records {spec.name!r}; none is kept as best")
        for ckpt in missing:
            reasons.setdefault(ckpt.path, f"no {spec.name} to rank it by (kept)")
        if missing and ranked:
            notes.append(f"{group}: {len(missing)} checkpoint(s) lack {spec.name!r} and are "
                         f"kept: {', '.join(c.name for c in missing[:5])}")
    # Verify before deleting: the newest kept checkpoint must be complete, else fall back.
    # The one proven complete guards the group: execute() proves it again before deleting.
    guard: Checkpoint | None = None
    kept = [c for c in ordered if c.path in reasons]
    if kept:
        newest = kept[-1]
        verdict = integrity.check_complete(newest.path)
        guard = newest if verdict else next(
            (c for c in reversed(ordered)
             if c.step < newest.step and integrity.check_complete(c.path)), None)
        if guard is None:
            notes.append(f"{group}: no complete checkpoint (newest {newest.name}: "
                         f"{verdict.reason}); nothing in this group is deleted")
        elif guard is not newest:
            reasons.setdefault(guard.path, f"newest complete checkpoint ({newest.name} "
                                           f"is incomplete)")
            notes.append(f"{group}: newest kept {newest.name} is incomplete "
                         f"({verdict.reason}); also keeping {guard.name}, the newest "
                         f"complete one")
    items = []
    for ckpt in ordered:
        try:
            snaps = tuple(deletion.snapshot(m) for m in ckpt.members)
        except OSError as exc:  # gone or unreadable since the scan: not ours to judge now
            items.append(PlanItem(ckpt.path, "keep", f"unreadable while planning "
                                  f"({exc.strerror or exc})", ckpt.step, group))
            continue
        size = sum(s.size for s in snaps)
        if ckpt.path in reasons:
            items.append(PlanItem(ckpt.path, "keep", reasons[ckpt.path], ckpt.step, group, size,
                                  ckpt.members, snaps))
        elif guard is None:
            items.append(PlanItem(ckpt.path, "keep", "group has no complete checkpoint",
                                  ckpt.step, group, size, ckpt.members, snaps))
        else:
            items.append(PlanItem(ckpt.path, "delete", _delete_reason(keep_last, keep_every,
                                                                     spec),
                                  ckpt.step, group, size, ckpt.members, snaps))
    return items, (Guard(group, guard.path) if guard is not None else None)


def _delete_reason(keep_last: int, keep_every: int | None, spec: MetricSpec | None) -> str:
    parts = [f"older than the newest {keep_last}" if keep_last else "not among the kept"]
    if keep_every:
        parts.append(f"step not a multiple of {keep_every}")
    if spec is not None:
        parts.append(f"not the best {spec.name}")
    return "; ".join(parts)


#: Checkpoint, parse_name and scan live in ckptkit.runs.checkpoint_names; re-exported here because
#: retention.scan / retention.parse_name are documented (docs/cleanup.md).
__all__ = ["Checkpoint", "CleanupPlan", "CleanupResult", "Guard", "PlanItem", "parse_name",
           "plan_cleanup", "scan"]
