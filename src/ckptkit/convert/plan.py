"""Decide a conversion before reading any tensor byte: what is taken, where it goes, what is left.

:func:`plan_conversion` works on a checkpoint's structure only (a
:class:`~ckptkit.model.RawCheckpoint`): it finds the state dict inside its container, removes
wrapper prefixes, selects a module prefix and layers, applies a recipe's rules (or the generic
rules of :mod:`ckptkit.name_rules`), matches the result against a target layout if one is
given, and returns a frozen :class:`ConversionPlan` with the coverage report.  The engine then
only reads, transforms and writes what the plan lists.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkit import name_rules as rules
from ckptkit.convert.recipes import Layout, Recipe, load_recipe
from ckptkit.name_rules import Dropped, Mapped, TargetSpec, Transform, read_target
from ckptkit.errors import CkptkitError, UsageError
from ckptkit.model import RawCheckpoint, TensorRef
from ckptkit.tree import join

#: Keys a training script keeps its model's state dict under, most specific first.
CONTAINERS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params",
              "ema")
LayerSpec = str | Sequence[int] | None
_NOT_ARRAYS = {"string", "resource", "variant", "structured", "qint8", "quint8", "qint32",
               "quint4x2", "quint2x4"}


class CoverageError(CkptkitError):
    """The conversion would leave target params unfilled, disagree on shapes, or write nothing.

    Carries the :class:`ConversionPlan` (``None`` when nothing could be mapped) so callers can
    show the coverage report; exit code 1.
    """

    def __init__(self, message: str, *, plan: ConversionPlan | None, hint: str | None = None,
                 path: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.plan = plan


@dataclass(frozen=True)
class Entry:
    """One source tensor (or a generated constant) and the output name(s) it is written to."""

    source: str | None  # None: generated (num_batches_tracked for torch BatchNorm)
    targets: tuple[str, ...]
    transform: Transform
    shape: tuple[int, ...]  # after the transform
    dtype: str
    path: tuple[Any, ...] = ()  # the source tensor's path in its checkpoint tree
    fill: int | None = None


@dataclass(frozen=True)
class Unused:
    """A selected source tensor that is not written, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Mismatch:
    """A source tensor whose (transformed) shape differs from the target parameter's."""

    source: str
    target: str
    shape: tuple[int, ...]
    target_shape: tuple[int, ...]


@dataclass(frozen=True)
class ConversionPlan:
    """Everything decided about one conversion; nothing here has read a tensor."""

    source_format: str
    layout: Layout
    separator: str
    recipe: str
    base: str  # container and wrappers removed before selection, e.g. "state_dict.matcher."
    prefix: str | None
    layers: tuple[int, ...] | None
    target: str | None
    entries: tuple[Entry, ...]
    unfilled: tuple[str, ...] = ()
    unused: tuple[Unused, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    excluded: int = 0  # source tensors outside the selection (other prefixes, optimizer state)
    refs: Mapping[str, TensorRef] = field(default_factory=dict, compare=False, repr=False)

    @property
    def filled(self) -> int:
        """Output arrays that will be written (tied copies count once each)."""
        return sum(len(e.targets) for e in self.entries)

    @property
    def tied(self) -> int:
        """Source tensors written to more than one output."""
        return sum(1 for e in self.entries if len(e.targets) > 1)

    @property
    def param_count(self) -> int:
        return sum(math.prod(e.shape) * len(e.targets) for e in self.entries)

    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(name, dtype, shape)`` of every output array, in write order."""
        return [(t, e.dtype, e.shape) for e in self.entries for t in e.targets]

    def coverage(self) -> dict[str, Any]:
        """The coverage report: ``{filled, unfilled, unused, mismatched, tied, excluded}``."""
        return {"filled": self.filled, "unfilled": list(self.unfilled),
                "unused": [{"name": u.name, "reason": u.reason} for u in self.unused],
                "mismatched": [{"source": m.source, "target": m.target, "shape": list(m.shape),
                                "target_shape": list(m.target_shape)} for m in self.mismatched],
                "tied": self.tied, "excluded": self.excluded}


def parse_layers(spec: LayerSpec) -> tuple[int, ...] | None:
    """``"0-3"`` -> (0, 1, 2, 3); ``"0,2,5-6"`` -> (0, 2, 5, 6); a sequence is taken as is.

    Raises:
        UsageError: not a comma-separated list of indices and ranges.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        return tuple(sorted(set(int(i) for i in spec)))
    picked: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not found or (found.group(2) and int(found.group(2)) < int(found.group(1))):
            raise UsageError(f"--layers {spec!r}: {part!r} is not an index or a range like 0-3",
                             hint="Examples: --layers 0-3, --layers 0,2,4-5")
        first = int(found.group(1))
        picked.update(range(first, int(found.group(2) or first) + 1))
    return tuple(sorted(picked))


@dataclass
class _Source:
    path: tuple[Any, ...]
    full: str  # the whole name, for messages
    inner: str  # after the container
    rel: str  # after the container and the wrappers
    ref: TensorRef


def plan_conversion(raw: RawCheckpoint, recipe: Recipe | str | Path | None = None, *,
                    prefix: str | None = None, target: TargetSpec = None,
                    layers: LayerSpec = None, allow_partial: bool = False,
                    layout: Layout | None = None) -> ConversionPlan:
    """Decide how ``raw`` converts; see the module docstring and docs/convert.md.

    Args:
        raw: the source checkpoint's structure (``formats.detect(p).read_info(p)``).
        recipe: a :class:`Recipe`, a built-in recipe name or a recipe file; None = generic rules.
        prefix: module prefix to select (e.g. ``loftr_fine``); default: the recipe's ``select``.
        target: the destination layout (see :func:`read_target`); enables coverage checks
            and tying.
        layers: layer indices to take (``"0-3"``); other layers are reported unused.
        allow_partial: accept unfilled target params and shape mismatches.
        layout: output layout; default the recipe's, else ``flax``.

    Raises:
        UsageError: a prefix matching nothing (the message lists the prefixes that exist),
            bad ``layers``, two sources for one output.
        CoverageError: unfilled targets or mismatches (unless ``allow_partial``), or an empty
            result (always).
    """
    recipe = load_recipe(recipe)
    out_layout: Layout = layout or recipe.layout or "flax"
    if recipe.layout and layout and recipe.layout != layout:
        raise UsageError(f"recipe {recipe.name!r} writes {recipe.layout} layout, not {layout}",
                         hint=f"Use --to {recipe.layout} (or npz/safetensors), or another recipe")
    items = _items(raw)
    flax_source = source_layout(raw) == "flax"
    sep = "/" if flax_source else "."
    sources, base, excluded = _unwrap(items, sep, recipe, flax_source)
    selected, chosen = _select(sources, prefix, recipe, sep, base)
    excluded += len(sources) - len(selected)
    picked = parse_layers(layers)
    unused: list[Unused] = []
    kept = _filter_layers(selected, picked, layers, recipe, unused)
    entries = _map(kept, recipe, flax_source, out_layout, unused)
    target_shapes = read_target(target)
    mismatched: list[Mismatch] = []
    unfilled: list[str] = []
    if target_shapes:
        entries, unfilled = _match_target(entries, target_shapes, unused, mismatched)
    else:
        _check_unique(entries)
    plan = ConversionPlan(
        source_format=raw.format, layout=out_layout, separator="/" if out_layout == "flax" else ".",
        recipe=recipe.name, base=base, prefix=chosen, layers=picked,
        target=None if target is None or isinstance(target, Mapping) else str(target),
        entries=tuple(entries), unfilled=tuple(unfilled), unused=tuple(unused),
        mismatched=tuple(mismatched), excluded=excluded,
        refs={s.full: s.ref for s in kept})
    _check(plan, allow_partial, len(kept))
    return plan


def _items(raw: RawCheckpoint) -> list[tuple[tuple[Any, ...], str, TensorRef]]:
    return [(w if isinstance(w, tuple) else (w,),
             w if isinstance(w, str) else join(w, raw.separator), r) for w, r in raw.tensors]


def source_layout(raw: RawCheckpoint) -> Layout:
    """``flax`` if the checkpoint's names look like a Flax tree (``.../kernel``), else ``torch``."""
    return "flax" if rules.is_flax_layout(n for _p, n, _r in _items(raw)) else "torch"


def _unwrap(items: list[tuple[tuple[Any, ...], str, TensorRef]], sep: str, recipe: Recipe,
            flax_source: bool) -> tuple[list[_Source], str, int]:
    """Find the container (``state_dict``, ``opt/target``) and strip wrapper prefixes."""
    container: tuple[Any, ...] = ()
    if flax_source:
        if any(p[:2] == ("opt", "target") for p, _n, _r in items):
            container = ("opt", "target")  # Flax optimizer checkpoints (MUSIQ): params in target
    else:
        firsts = Counter(p[0] for p, _n, _r in items if len(p) > 1)
        if len(firsts) == 1 and all(len(p) > 1 for p, _n, _r in items):
            container = (next(iter(firsts)),)
        else:
            container = next(((c,) for c in CONTAINERS if c in firsts), ())
    inside = [(p, n, r) for p, n, r in items
              if p[:len(container)] == container and len(p) > len(container)]
    sources = [_Source(p, n, join(p[len(container):], sep), join(p[len(container):], sep), r)
               for p, n, r in inside]
    base = join(container, sep) + sep if container else ""
    stripped = True
    while stripped and sources:
        stripped = False
        for wrapper in recipe.strip:
            if all(s.rel.startswith(wrapper) and len(s.rel) > len(wrapper) for s in sources):
                for s in sources:
                    s.rel = s.rel[len(wrapper):]
                base += wrapper
                stripped = True
    return sources, base, len(items) - len(inside)


def top_prefixes(names: Sequence[str], sep: str) -> list[tuple[str, int]]:
    """First name components and how many tensors each holds, largest first."""
    return Counter(n.split(sep, 1)[0] for n in names).most_common()


def _select(sources: list[_Source], prefix: str | None, recipe: Recipe, sep: str,
            base: str) -> tuple[list[_Source], str | None]:
    wanted = (prefix or recipe.select or "").strip(" ./")
    if not wanted:
        return sources, None
    # Relative to the unwrapped names first, then as written inside the container (so
    # `matcher.loftr_coarse` works), then from the root (`state_dict.matcher.loftr_coarse`).
    for attempt in ("rel", "inner", "full"):
        picked = [_Source(s.path, s.full, s.inner, name[len(wanted) + 1:], s.ref)
                  for s in sources for name in (getattr(s, attempt),)
                  if name.startswith(wanted + sep)]
        if picked:
            return picked, wanted
    if prefix is None:
        # The recipe's default module is absent: the file may be that module's own state dict.
        return sources, None
    found = top_prefixes([s.rel for s in sources], sep)
    listing = ", ".join(f"{name} ({count})" for name, count in found[:12])
    close = difflib.get_close_matches(wanted, [n for n, _c in found], n=1)
    raise UsageError(
        f"--prefix {prefix!r} matches no tensor; top-level prefixes"
        f"{f' under {base!r}' if base else ''}: {listing or 'none'}",
        hint=(f"Did you mean --prefix {close[0]}?" if close else
              "Run `ckpt inspect FILE` to see the module tree"))


def _filter_layers(selected: list[_Source], picked: tuple[int, ...] | None, spec: LayerSpec,
                   recipe: Recipe, unused: list[Unused]) -> list[_Source]:
    if picked is None:
        return selected
    present: set[int] = set()
    kept = []
    for s in selected:
        found = recipe.layers.search(s.rel)
        if found is None:
            kept.append(s)
            continue
        index = int(found.group(1))
        present.add(index)
        if index in picked:
            kept.append(s)
        else:
            unused.append(Unused(s.full, f"layer {index} not selected (--layers {spec})"))
    if not present:
        raise UsageError(f"--layers {spec}: no selected tensor has a layer index "
                         f"(pattern {recipe.layers.pattern!r})",
                         hint="Set `layers` in the recipe to a regex whose group 1 is the index")
    missing = sorted(set(picked) - present)
    if missing:
        raise UsageError(f"--layers {spec}: layer(s) {', '.join(map(str, missing))} do not exist; "
                         f"the source has layers {min(present)}-{max(present)}",
                         hint=f"Pick layers from {min(present)}-{max(present)}")
    return kept


def _map(kept: list[_Source], recipe: Recipe, flax_source: bool, out_layout: Layout,
         unused: list[Unused]) -> list[Entry]:
    """Apply the recipe's rules, then (if allowed) the generic rules, to every kept tensor."""
    shapes = {s.rel: tuple(s.ref.shape) for s in kept}
    direction = (None if flax_source == (out_layout == "flax") else
                 "to_torch" if flax_source else "to_flax")
    kinds: dict[str, rules.Kind] = {}
    if direction == "to_flax":
        kinds = rules.infer_kinds(shapes, recipe.kinds)
    elif direction == "to_torch":
        kinds = rules.infer_flax_kinds(shapes, shapes)
    entries: list[Entry] = []
    for s in kept:
        if s.ref.dtype in _NOT_ARRAYS:
            unused.append(Unused(s.full, f"{s.ref.dtype} values are not a numeric array"))
            continue
        outcome = _outcome(s, recipe, direction, kinds)
        if isinstance(outcome, Dropped):
            unused.append(Unused(s.full, outcome.reason))
            continue
        try:
            shape = outcome.transform.shape(s.ref.shape)
        except ValueError as exc:
            raise UsageError(f"{s.full}: {exc} (shape {tuple(s.ref.shape)})",
                             hint=f"Fix the transform in recipe {recipe.origin}") from None
        entries.append(Entry(s.full, outcome.names, outcome.transform, shape, s.ref.dtype,
                             s.path))
    if direction == "to_torch":
        # torch's BatchNorm keeps a step counter that strict loading insists on.
        for name in rules.batchnorm_counters(kinds):
            entries.append(Entry(None, (name,), rules.NONE, (), "int64", fill=0))
    return entries


def _outcome(s: _Source, recipe: Recipe, direction: str | None,
             kinds: Mapping[str, rules.Kind]) -> Mapped | Dropped:
    found = recipe.match(s.rel)
    if found is not None:
        rule, match = found
        if not rule.to:
            return Dropped(f"dropped by rule {rule.number} of recipe {recipe.name}")
        return Mapped(rule.names(match), rule.transform)
    if recipe.fallback == "none":
        return Dropped(f"no rule of recipe {recipe.name} matches")
    if direction == "to_flax":
        kind = kinds[rules.split_torch(s.rel)[0]]
        return rules.torch_to_flax(s.rel, kind, s.ref.shape, style=recipe.style,
                                   collections=recipe.collections)
    if direction == "to_torch":
        kind = kinds[rules.split_flax(s.rel)[1]]
        return rules.flax_to_torch(s.rel, kind, s.ref.shape)
    return Mapped((s.rel,))


def _check_unique(entries: list[Entry]) -> None:
    seen: dict[str, str | None] = {}
    for entry in entries:
        for name in entry.targets:
            if name in seen:
                raise UsageError(f"output {name!r} would be written from both {seen[name]} and "
                                 f"{entry.source}",
                                 hint="Narrow the selection with --prefix/--layers or fix the "
                                      "recipe's rules")
            seen[name] = entry.source


def _match_target(entries: list[Entry], shapes: Mapping[str, tuple[int, ...]],
                  unused: list[Unused], mismatched: list[Mismatch]
                  ) -> tuple[list[Entry], list[str]]:
    """Rename entries to the target's names (by structure, tying copies); collect problems."""
    index = rules.TargetIndex(shapes)
    owner: dict[str, str | None] = {}
    matched: list[Entry] = []
    for entry in entries:
        found: list[str] = []
        for name in entry.targets:
            found += [t for t in index.find(name) if t not in found]
        if not found:
            if entry.source is not None:
                unused.append(Unused(entry.source, f"not in the target (as {entry.targets[0]})"))
            continue
        good = []
        for name in found:
            if name in owner:
                raise UsageError(f"target {name!r} would be filled from both {owner[name]} and "
                                 f"{entry.source}", hint="Narrow the selection with --layers or "
                                                         "--prefix")
            owner[name] = entry.source
            if tuple(shapes[name]) == entry.shape:
                good.append(name)
            else:
                mismatched.append(Mismatch(entry.source or name, name, entry.shape,
                                           tuple(shapes[name])))
        if good:
            matched.append(Entry(entry.source, tuple(good), entry.transform, entry.shape,
                                 entry.dtype, entry.path, entry.fill))
    unfilled = [t for t in shapes if t not in owner]
    return matched, unfilled


def _check(plan: ConversionPlan, allow_partial: bool, kept: int) -> None:
    if not plan.entries:
        reasons = Counter(u.reason for u in plan.unused).most_common(2)
        why = "; ".join(f"{count}× {reason}" for reason, count in reasons)
        raise CoverageError(
            f"nothing to convert: 0 output arrays from {kept} selected tensor(s)"
            + (f" ({why})" if why else ""), plan=plan,
            hint="Check --prefix/--layers/--recipe against `ckpt inspect FILE`")
    if (plan.unfilled or plan.mismatched) and not allow_partial:
        problems = []
        if plan.unfilled:
            problems.append(f"{len(plan.unfilled)} target param(s) unfilled "
                            f"({_examples(plan.unfilled)})")
        if plan.mismatched:
            problems.append(f"{len(plan.mismatched)} shape mismatch(es) ("
                            + _examples([f"{m.target} {list(m.shape)} vs {list(m.target_shape)}"
                                         for m in plan.mismatched]) + ")")
        raise CoverageError("; ".join(problems) + "; nothing written", plan=plan,
                            hint="Pass --allow-partial to write the arrays that do match")


def _examples(items: Sequence[str], shown: int = 3) -> str:
    more = f", … {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more

