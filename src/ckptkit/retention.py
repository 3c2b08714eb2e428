"""Which periodic checkpoints of a run directory may go: recognise, group, decide, then delete.

:func:`scan` recognises periodic checkpoints by name and groups them by run;
:func:`plan_cleanup` decides (pure, apart from cheap reads) and returns a frozen
:class:`CleanupPlan`; only :meth:`CleanupPlan.execute` deletes.  Anything not recognised is
kept: "no marker" or "unknown name" never means garbage (orbax#394).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ckptkit import integrity
from ckptkit.errors import NotFoundError, UsageError
from ckptkit.metrics import MetricSpec, metric_values, parse_metric

Kind = Literal["file", "dir", "tf"]
Action = Literal["keep", "delete"]

_EXT = r"(?P<ext>\.pt|\.pth|\.pth\.tar|\.ckpt|\.bin|\.safetensors)"
#: (pattern label, regex, kind).  Order matters: the first match wins.
_FILE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Lightning: epoch=E-step=S[-anything].ckpt; the step orders, the epoch is informative.
    ("{prefix}epoch={E}-step={N}.ckpt",
     re.compile(r"(?P<prefix>.*?)epoch=(?P<epoch>\d+)-step=(?P<step>\d+)(?:[-_].*)?\.ckpt")),
    # μOmni thinker_step_200.pt, thinker_step200.pt, Jukebox checkpoint_step_N.pth.tar.
    ("{prefix}_step_{N}", re.compile(r"(?P<prefix>.+?)_step_?(?P<step>\d+)" + _EXT)),
    # epoch_3.pt, epoch3.pt, model_epoch_3.pt (the epoch is the step).
    ("{prefix}epoch_{N}", re.compile(r"(?P<prefix>.*?)epoch_?(?P<step>\d+)" + _EXT)),
)
_HF_DIR = re.compile(r"checkpoint-(?P<step>\d+)")
_ORBAX_DIR = re.compile(r"(?:(?P<prefix>[A-Za-z][\w]*?)_)?(?P<step>0|[1-9]\d*)")
_TF_INDEX = re.compile(r"(?P<prefix>.+)-(?P<step>\d+)\.index")
#: best/last/latest anywhere as a word: such files are pinned, whatever else the name says.
_PINNED = re.compile(r"(?:^|[^a-z])(best|last|latest)(?:$|[^a-z])", re.IGNORECASE)
SAVE_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


@dataclass(frozen=True)
class Checkpoint:
    """One periodic checkpoint: a file, a directory, or a TF index with its data shards."""

    path: Path
    group: str
    prefix: str
    step: int
    kind: Kind
    members: tuple[Path, ...]
    epoch: int | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class PlanItem:
    """One entry of a plan: what happens to ``path`` and why."""

    path: Path
    action: Action
    reason: str
    step: int | None = None
    group: str | None = None
    size: int = 0
    members: tuple[Path, ...] = ()
    #: (path, size, mtime_ns) of every member when planned; execute refuses if they changed.
    fingerprint: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class CleanupResult:
    """What :meth:`CleanupPlan.execute` did."""

    deleted: tuple[PlanItem, ...]
    skipped: tuple[tuple[PlanItem, str], ...]
    freed_bytes: int


@dataclass(frozen=True)
class CleanupPlan:
    """A decided cleanup: every scanned entry with keep/delete and its reason, plus notes."""

    root: Path
    items: tuple[PlanItem, ...]
    notes: tuple[str, ...] = ()

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
        """Delete every ``delete`` item, re-checking each is still what was planned.

        An item whose files changed size or mtime, vanished, became a symlink, or lie outside
        the plan's root is skipped (reported, not raised); so is one whose deletion fails.
        TF checkpoints lose their ``.index`` first, so a half-deleted one reads as incomplete.
        """
        root = self.root.resolve()
        done: list[PlanItem] = []
        skipped: list[tuple[PlanItem, str]] = []
        for item in self.deleted:
            problem = _changed(item, root)
            if problem:
                skipped.append((item, problem))
                continue
            try:
                for member in item.members:
                    if member.is_dir() and not member.is_symlink():
                        shutil.rmtree(member)
                    else:
                        member.unlink(missing_ok=True)
            except OSError as exc:
                skipped.append((item, f"delete failed: {exc}"))
                continue
            done.append(item)
        return CleanupResult(tuple(done), tuple(skipped), sum(i.size for i in done))


def _fingerprint(paths: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in paths:
        st = p.lstat()
        out.append((str(p), _tree_size(p), st.st_mtime_ns))
    return tuple(out)


def _tree_size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for base, _dirs, files in os.walk(path):  # os.walk does not follow symlinked dirs
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def _changed(item: PlanItem, root: Path) -> str | None:
    for member in item.members:
        if member.is_symlink():
            return f"{member.name} became a symlink"
        try:
            member.resolve().relative_to(root)
        except ValueError:
            return f"{member} is outside {root}"
    try:
        now = _fingerprint(item.members)
    except OSError:
        return "gone since the plan was made"
    if now != item.fingerprint:
        return "changed since the plan was made (size or mtime)"
    return None


# --------------------------------------------------------------------------- recognising


def parse_name(name: str, is_dir: bool = False) -> tuple[str, str, int, int | None] | None:
    """``(pattern, prefix, step, epoch)`` if ``name`` is a periodic checkpoint name, else None.

    Names with ``best``, ``last`` or ``latest`` as a word are never periodic (they are pinned).
    """
    if _PINNED.search(name):
        return None
    if is_dir:
        m = _HF_DIR.fullmatch(name)
        if m:
            return "checkpoint-{N}/", "checkpoint", int(m["step"]), None
        m = _ORBAX_DIR.fullmatch(name)
        if m:
            prefix = m["prefix"] or ""
            return f"{prefix + '_' if prefix else ''}{{N}}/", prefix, int(m["step"]), None
        return None
    m = _TF_INDEX.fullmatch(name)
    if m:
        return f"{m['prefix']}-{{N}}.index", m["prefix"], int(m["step"]), None
    for label, regex in _FILE_PATTERNS:
        m = regex.fullmatch(name)
        if m:
            groups = m.groupdict()
            ext = groups.get("ext") or ".ckpt"
            pattern = label.replace("{prefix}", m["prefix"])
            if not pattern.endswith(".ckpt"):
                pattern += ext
            epoch = int(groups["epoch"]) if groups.get("epoch") else None
            return pattern, m["prefix"], int(m["step"]), epoch
    return None


def _is_orbax_dir(path: Path) -> bool:
    return any((path / m).exists() for m in integrity.ORBAX_MARKERS)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        raise NotFoundError(f"{directory}: no such directory",
                            hint="Pass the run directory that holds the checkpoints",
                            path=str(directory)) from None
    except NotADirectoryError:
        raise UsageError(f"{directory}: not a directory",
                         hint="Pass the run directory that holds the checkpoints") from None


def _scan_one(directory: Path, root: Path) -> tuple[list[Checkpoint], list[Path]]:
    """Checkpoints directly in ``directory`` and the subdirectories that are not checkpoints."""
    entries = _entries(directory)
    names = {e.name for e in entries}
    found: list[Checkpoint] = []
    subdirs: list[Path] = []
    orbax_candidates: list[tuple[Path, tuple[str, str, int, int | None]]] = []
    # Group names are relative to the scanned root: "thinker_step_{N}.pt", "vision_tiny/...".
    rel = "" if directory == root else f"{directory.relative_to(root)}/"
    for e in entries:
        path = Path(e.path)
        if e.is_symlink():
            continue  # links are pinned (and never followed)
        if e.is_dir(follow_symlinks=False):
            parsed = parse_name(e.name, is_dir=True)
            if parsed and parsed[0] == "checkpoint-{N}/":
                found.append(Checkpoint(path, f"{rel}{parsed[0]}", parsed[1], parsed[2], "dir",
                                        (path,)))
            elif parsed:
                orbax_candidates.append((path, parsed))
            elif not e.name.startswith("."):
                subdirs.append(path)
            continue
        parsed = parse_name(e.name)
        if parsed is None:
            continue
        pattern, prefix, step, epoch = parsed
        if pattern.endswith(".index"):
            stem = e.name[: -len(".index")]
            shards = tuple(directory / n for n in sorted(names)
                           if n.startswith(stem + ".data-"))
            # The index goes first: a TF checkpoint without it reads as absent, not as broken.
            found.append(Checkpoint(path, f"{rel}{pattern}", prefix, step, "tf",
                                    (path, *shards)))
        else:
            found.append(Checkpoint(path, f"{rel}{pattern}", prefix, step, "file", (path,),
                                    epoch))
    # Numeric directories count as Orbax steps only if one of their group carries an Orbax
    # marker: a folder named "2024" beside the checkpoints is not a checkpoint.
    by_pattern: dict[str, list[tuple[Path, tuple[str, str, int, int | None]]]] = {}
    for path, parsed in orbax_candidates:
        by_pattern.setdefault(parsed[0], []).append((path, parsed))
    for pattern, members in by_pattern.items():
        if any(_is_orbax_dir(p) for p, _ in members):
            found.extend(Checkpoint(p, f"{rel}{pattern}", parsed[1], parsed[2], "dir", (p,))
                         for p, parsed in members)
        else:
            subdirs.extend(p for p, _ in members)
    return found, sorted(subdirs)


def scan(directory: str | os.PathLike[str], recursive: bool = False) -> list[Checkpoint]:
    """Periodic checkpoints in ``directory`` (and its run subdirectories if ``recursive``).

    Recognised: ``{prefix}_step_{N}.pt`` / ``{prefix}_step{N}.pt`` (also .pth, .pth.tar,
    .ckpt, .bin, .safetensors), ``[prefix]epoch_{N}.pt`` / ``epoch{N}.pt``, Lightning
    ``epoch={E}-step={S}[-...].ckpt``, HF ``checkpoint-{N}/``, Orbax ``{N}/`` or
    ``{prefix}_{N}/`` (when a marker file shows the group is Orbax's) and TF
    ``{prefix}-{N}.index`` with its ``.data-*`` shards.  Symlinks are never followed and, like
    names containing best/last/latest, never periodic.  Sorted by group, then step.
    """
    root = Path(directory)
    found, subdirs = _scan_one(root, root)
    while recursive and subdirs:
        sub = subdirs.pop(0)
        more, deeper = _scan_one(sub, root)
        found.extend(more)
        subdirs.extend(deeper)
    return sorted(found, key=lambda c: (c.group, c.step, c.name))


def pinned_targets(directory: Path) -> dict[Path, str]:
    """Checkpoints something points at: symlink targets and the TF state file's latest."""
    from ckptkit.formats import tf_checkpoint

    pins: dict[Path, str] = {}
    root = directory.resolve()
    for e in _entries(directory):
        if e.is_symlink():
            target = Path(e.path).resolve()
            if target.parent == root or root in target.parents:
                pins[target] = f"target of symlink {e.name}"
    latest, _all = tf_checkpoint.read_state(directory / tf_checkpoint.STATE_FILE)
    if latest:
        index = Path(latest if os.path.isabs(latest) else directory / latest)
        pins[Path(str(index) + ".index").resolve()] = "latest in the TF 'checkpoint' file"
    return pins


# --------------------------------------------------------------------------- deciding


def plan_cleanup(directory: str | os.PathLike[str], keep_last: int, keep_every: int | None = None,
                 keep_best: str | None = None, recursive: bool = False) -> CleanupPlan:
    """Decide which periodic checkpoints of ``directory`` to delete, and say why for each.

    Per run group (same directory and name pattern), ordered by step number (never mtime):
    the newest ``keep_last`` are kept, so are steps divisible by ``keep_every`` and the best
    one by ``keep_best`` (``METRIC[:min|max]``, read from inside the checkpoint or from HF's
    ``trainer_state.json``/Orbax ``metrics``; checkpoints without it are kept and noted).
    Then the newest kept checkpoint is verified with :func:`ckptkit.integrity.check_complete`;
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
    root = Path(directory)
    checkpoints = scan(root, recursive=recursive)
    notes: list[str] = []
    items: list[PlanItem] = []
    groups: dict[str, list[Checkpoint]] = {}
    for ckpt in checkpoints:
        groups.setdefault(ckpt.group, []).append(ckpt)
    pins: dict[Path, str] = {}
    for folder in {root, *(c.path.parent for c in checkpoints)}:
        pins.update(pinned_targets(folder))
    for group, members in groups.items():
        items.extend(_plan_group(group, members, keep_last, keep_every, spec, pins, notes))
    recognised = {c.path for c in checkpoints}
    finals = {c.path.parent / f"{c.prefix}{c.path.suffix}": c.group for c in checkpoints
              if c.kind == "file" and c.prefix}
    folders = [root] + (sorted({c.path.parent for c in checkpoints} - {root}) if recursive else [])
    for folder in folders:
        for e in _entries(folder):
            path = Path(e.path)
            if path not in recognised:
                reason = (f"final checkpoint of {finals[path]}" if path in finals
                          else _unrecognised_reason(e, pins))
                items.append(PlanItem(path, "keep", reason))
    items.sort(key=lambda i: (str(i.path.parent), i.group or "~", i.step or 0, i.path.name))
    return CleanupPlan(root, tuple(items), tuple(notes))


def _unrecognised_reason(e: os.DirEntry[str], pins: dict[Path, str]) -> str:
    if e.is_symlink():
        return "symlink (never touched, nor is its target)"
    if _PINNED.search(e.name):
        return "best/last/latest checkpoint (always kept)"
    if SAVE_TEMP_NAME.fullmatch(e.name):
        return "temporary file of an interrupted ckptkit.save (remove it by hand when no " \
               "save is running)"
    if pins and Path(e.path).resolve() in pins:
        return pins[Path(e.path).resolve()]
    if e.is_dir(follow_symlinks=False):
        return "not a periodic checkpoint (directory)"
    return "not a periodic checkpoint"


def _plan_group(group: str, members: list[Checkpoint], keep_last: int, keep_every: int | None,
                spec: MetricSpec | None, pins: dict[Path, str],
                notes: list[str]) -> list[PlanItem]:
    ordered = sorted(members, key=lambda c: c.step)
    reasons: dict[Path, str] = {}
    for ckpt in ordered[len(ordered) - keep_last:] if keep_last else []:
        reasons[ckpt.path] = f"newest {keep_last} of {group}"
    if keep_every:
        for ckpt in ordered:
            if ckpt.step % keep_every == 0:
                reasons.setdefault(ckpt.path, f"step {ckpt.step} is a multiple of {keep_every}")
    for ckpt in ordered if pins else ():  # resolving 10,000 paths costs; skip when no pins
        pin = pins.get(ckpt.path.resolve())
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
    deletable = True
    kept = [c for c in ordered if c.path in reasons]
    if kept:
        newest = kept[-1]
        verdict = integrity.check_complete(newest.path)
        if not verdict:
            good = next((c for c in reversed(ordered)
                         if c.step < newest.step and integrity.check_complete(c.path)), None)
            if good is None:
                deletable = False
                notes.append(f"{group}: no complete checkpoint (newest {newest.name}: "
                             f"{verdict.reason}); nothing in this group is deleted")
            else:
                reasons.setdefault(good.path, f"newest complete checkpoint ({newest.name} "
                                              f"is incomplete)")
                notes.append(f"{group}: newest kept {newest.name} is incomplete "
                             f"({verdict.reason}); also keeping {good.name}, the newest "
                             f"complete one")
    items = []
    for ckpt in ordered:
        size = sum(_tree_size(m) for m in ckpt.members)
        if ckpt.path in reasons:
            items.append(PlanItem(ckpt.path, "keep", reasons[ckpt.path], ckpt.step, group, size,
                                  ckpt.members))
        elif not deletable:
            items.append(PlanItem(ckpt.path, "keep", "group has no complete checkpoint",
                                  ckpt.step, group, size, ckpt.members))
        else:
            items.append(PlanItem(ckpt.path, "delete", _delete_reason(keep_last, keep_every,
                                                                     spec),
                                  ckpt.step, group, size, ckpt.members,
                                  _fingerprint(ckpt.members)))
    return items


def _delete_reason(keep_last: int, keep_every: int | None, spec: MetricSpec | None) -> str:
    parts = [f"older than the newest {keep_last}" if keep_last else "not among the kept"]
    if keep_every:
        parts.append(f"step not a multiple of {keep_every}")
    if spec is not None:
        parts.append(f"not the best {spec.name}")
    return "; ".join(parts)


__all__ = ["Checkpoint", "CleanupPlan", "CleanupResult", "PlanItem", "parse_name",
           "plan_cleanup", "scan"]
