"""``ckptkit.runs.strip``: an inference checkpoint from a training one, without optimizer state.

Deciding is apart from doing: :func:`plan_strip` reads the checkpoint's structure (no tensor
bytes, no code run) and returns a frozen :class:`StripPlan` naming every top-level entry it
keeps or drops and why; :meth:`StripPlan.execute` writes the result.

What is dropped (top-level entries only; ``--keep KEY`` keeps any of them):

- by name: ``optimizer*``, ``optim``, ``opt``, ``opt_*``, ``optimizers``; ``scheduler*``,
  ``sched``, ``lr_scheduler*``, ``lr_schedulers``; ``scaler``, ``grad_scaler``,
  ``amp_scaler``, ``*amp_scaling_state``; Lightning's ``callbacks`` and ``loops``; RNG state
  (``rng_state(s)``, ``*_rng_state``, ``random_state(s)``);
- by content, whatever the name: optimizer state dicts (``state`` + ``param_groups``),
  LR-scheduler state (``last_epoch`` + ``base_lrs``/``_step_count``), GradScaler state;
- custom objects (and entries holding one) without tensors: ``torch.load(weights_only=True)``
  would refuse the whole file because of them.  They cannot be kept.

Everything else stays, in its original nesting: model weights, EMA weights (``ema``,
``model_ema``: they are deployable weights, often the better ones), and metadata such as
``step``, ``epoch``, ``best_val_loss``, ``config`` and version strings.

The output is a torch zip written by :mod:`ckptkit.formats.tree_writer`: no torch needed, storages
copied byte for byte (bit-identical weights), written atomically by :mod:`ckptkit.storage.atomic`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkit.storage import budget
from ckptkit.errors import FormatError, UnsafeContentError, UsageError, naming
from ckptkit.model import Opaque, RawCheckpoint, TensorRef

#: (pattern on the top-level key, why it is training-only)
NAME_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"optimi[sz]ers?(_.*)?|optim|opt|opt_.*"), "optimizer state"),
    (re.compile(r"(lr_)?sched(uler)?s?(_.*)?"), "scheduler state"),
    (re.compile(r"(grad_|amp_)?scaler(_state_dict)?|.*amp_scaling_state"), "AMP scaler state"),
    (re.compile(r"callbacks|loops"), "trainer state (Lightning callbacks/loops)"),
    (re.compile(r"rng_states?|.*_rng_states?|random_states?"), "RNG state"),
)


def training_reason(key: Any, value: Any) -> str | None:
    """Why a top-level entry is training-only state, or None if it is not.

    Used by ``strip`` to drop entries and by ``diff`` to show them apart from weights.
    """
    if isinstance(key, str) and any(p.fullmatch(key.lower()) for p, _ in NAME_RULES):
        return next(r for p, r in NAME_RULES if p.fullmatch(key.lower()))
    probe = value[0] if isinstance(value, list) and value else value
    if isinstance(probe, dict):
        keys = set(probe)
        if {"state", "param_groups"} <= keys:
            return "optimizer state"
        if "last_epoch" in keys and ({"base_lrs", "_step_count"} & keys):
            return "scheduler state"
        if {"scale", "growth_factor", "backoff_factor"} <= keys:
            return "AMP scaler state"
    return None


@dataclass(frozen=True)
class StripResult:
    """What :meth:`StripPlan.execute` did.  ``output`` is None when nothing was written."""

    source: str
    output: str | None
    size_before: int
    size_after: int | None
    dropped: dict[str, str]
    kept: tuple[str, ...]
    tensor_count: int
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form printed by ``ckpt strip --json``."""
        return {"source": self.source, "output": self.output, "size_before": self.size_before,
                "size_after": self.size_after, "dropped": dict(self.dropped),
                "kept": list(self.kept), "tensor_count": self.tensor_count, "note": self.note}


@dataclass(frozen=True)
class StripPlan:
    """Which top-level entries of ``source`` are kept and which dropped (key -> reason).

    ``output`` is None when there is nothing to strip and no output was asked for.
    """

    source: Path
    output: Path | None
    format: str
    size_before: int
    kept: tuple[str, ...]
    dropped: dict[str, str]
    note: str | None = None
    raw: RawCheckpoint | None = field(default=None, repr=False, compare=False)

    def execute(self) -> StripResult:
        """Write the stripped checkpoint (atomically) and report sizes before and after."""
        from ckptkit.formats.tree_writer import write_torch_tree

        if self.output is None or self.raw is None:
            return StripResult(str(self.source), None, self.size_before, None,
                               self.dropped, self.kept, 0, self.note)
        root = self.raw.tree
        kept = {key: value for key, value in root.items() if str(key) in self.kept}
        with budget.reading(self.source):  # deflated storages inflate within its budget
            written = write_torch_tree(self.output, kept,
                                       big_endian=self.raw.details.get("byteorder") == "big")
        return StripResult(str(self.source), str(self.output), self.size_before, written.bytes,
                           self.dropped, self.kept, written.tensor_count, self.note)


def plan_strip(src: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
               keep: tuple[str, ...] | list[str] = (), in_place: bool = False,
               out_dir: str | os.PathLike[str] | None = None) -> StripPlan:
    """Decide what stripping ``src`` keeps and drops, and where the result goes.

    Args:
        src: a PyTorch checkpoint (zip or legacy format, or a DCP directory: its tensors are
            gathered from their chunks, one at a time, into a torch zip).
        out: the output file [default: ``<dir of src>/<stem>.stripped.pt``; a default name
            never replaces an existing file].
        keep: top-level keys to keep even though they are training state.
        in_place: replace ``src`` itself (atomically: :mod:`ckptkit.storage.atomic`).
        out_dir: where the default output goes [default: beside ``src``]; for a ``src`` that
            must not be written beside, such as a file in the download cache.

    Returns:
        A :class:`StripPlan`; nothing is written until :meth:`StripPlan.execute`.

    Raises:
        UsageError: ``out`` is ``src`` without ``in_place``; ``in_place`` with ``out``; a
            ``--keep`` key that does not exist or cannot be kept; a format without optimizer
            state to strip (safetensors, npz, ...).
        UnsafeContentError: the file names dangerous callables.
        FormatError: the top level is not a dict.

    Example:
        >>> plan = plan_strip("thinker_step_200.pt")          # doctest: +SKIP
        >>> plan.dropped                                      # doctest: +SKIP
        {'optimizer': 'optimizer state', 'scheduler': 'scheduler state', ...}
        >>> plan.execute().size_after                         # doctest: +SKIP
    """
    from ckptkit import formats

    source = Path(src)
    if in_place and out is not None:
        raise UsageError("--in-place and -o/--output contradict each other",
                         hint="Pass one of them")
    with naming(source):
        raw = formats.detect(source).read_info(source)
    if raw.format not in ("torch-zip", "torch-legacy", "torch-dcp"):
        raise UsageError(f"{source}: a {raw.format} file holds no optimizer state to strip",
                         hint="`ckpt strip` works on PyTorch training checkpoints; use "
                              "`ckpt convert` to change formats", path=str(source))
    if raw.safety.unsafe:
        raise UnsafeContentError(f"{source}: refusing to strip, the file calls "
                                 f"{', '.join(raw.safety.unsafe)}", unsafe=list(raw.safety.unsafe),
                                 hint="Run `ckpt inspect` on it; ckpt never runs that code",
                                 path=str(source))
    root = raw.tree
    if not isinstance(root, dict):
        raise FormatError(f"{source}: the top level is a {type(root).__name__}, not a dict of "
                          "entries", hint="Nothing ckpt strip can select from", path=str(source))
    kept, dropped = _classify(source, root, set(keep))
    size = (sum(p.stat().st_size for p in source.iterdir() if p.is_file()) if source.is_dir()
            else source.stat().st_size)  # a DCP step is a directory of data files
    bare = bool(root) and all(isinstance(v, TensorRef) for v in root.values())
    note = None
    if not dropped:
        note = ("a bare state dict: only weights, nothing to strip" if bare
                else "no training-only entries: nothing to strip")
    target = _output(source, out, in_place, write_anyway=bool(dropped),
                     out_dir=None if out_dir is None else Path(out_dir))
    return StripPlan(source, target, raw.format, size, kept, dropped, note, raw)


def _classify(source: Path, root: dict[Any, Any],
              keep: set[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    names = {str(k) for k in root}
    missing = sorted(keep - names)
    if missing:
        raise UsageError(f"--keep {missing[0]}: {source} has no top-level entry of that name",
                         hint="Entries: " + ", ".join(sorted(names)))
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for key, value in root.items():
        name = str(key)
        custom = _custom_object(value)
        if custom is not None:
            if _has_tensors(value):
                raise FormatError(f"{source}: entry {name!r} holds model tensors and a custom "
                                  f"object {custom}, which torch.load(weights_only=True) refuses",
                                  hint="Re-save that entry as a plain state dict",
                                  path=str(source))
            if name in keep:
                raise UsageError(f"--keep {name}: it holds a custom object {custom}, which "
                                 "torch.load(weights_only=True) refuses",
                                 hint="Leave it out of the stripped file")
            dropped[name] = f"custom object {custom} (weights_only loading refuses it)"
            continue
        reason = training_reason(key, value)
        if reason and name not in keep:
            dropped[name] = reason
        else:
            kept.append(name)
    return tuple(kept), dropped


def _custom_object(node: Any) -> str | None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, Opaque):
            return item.qualname
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif not (item is None or isinstance(item, (bool, int, float, str, TensorRef))):
            return type(item).__name__
    return None


def _has_tensors(node: Any) -> bool:
    if isinstance(node, TensorRef):
        return True
    if isinstance(node, dict):
        return any(_has_tensors(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_has_tensors(v) for v in node)
    if isinstance(node, Opaque) and isinstance(node.state, dict):
        return any(_has_tensors(v) for v in node.state.values())
    return False


def default_output(src: Path, directory: Path | None = None) -> Path:
    """``<dir>/<stem>.stripped.pt`` beside the source (``thinker_best.pt`` ->
    ``thinker_best.stripped.pt``), or in ``directory``."""
    return (src.parent if directory is None else directory) / f"{src.stem}.stripped.pt"


def _output(src: Path, out: str | os.PathLike[str] | None, in_place: bool,
            write_anyway: bool, out_dir: Path | None) -> Path | None:
    if in_place:
        # Follow a symlink: replace the file it names, not the link.
        return src.resolve() if write_anyway else None
    if out is None:
        if not write_anyway:
            return None  # nothing stripped and no output asked for: write nothing
        chosen = default_output(src, out_dir)
        if chosen.exists():
            raise UsageError(f"{chosen} already exists",
                             hint=f"Pass -o {chosen.name} to replace it, or -o with another name",
                             path=str(chosen))
        return chosen
    chosen = Path(out)
    if chosen.resolve() == src.resolve() or (chosen.exists() and os.path.samefile(chosen, src)):
        raise UsageError(f"refusing to write the output over the input {src}",
                         hint="Pass --in-place to replace it on purpose, or choose another -o",
                         path=str(chosen))
    return chosen


def strip(src: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
          keep: tuple[str, ...] | list[str] = (), in_place: bool = False) -> StripResult:
    """Plan and execute in one call (see :func:`plan_strip` for arguments and errors)."""
    return plan_strip(src, out, keep=keep, in_place=in_place).execute()
