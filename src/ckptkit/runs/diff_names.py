"""Pairing the tensors of two checkpoints whose names may differ (``ckpt diff``).

Tensors are paired in three passes; each pass only sees what earlier passes left unpaired:

1. ``exact``: the same name on both sides (``model.head.weight`` = ``model.head.weight``).
2. ``renamed``: the same name after removing training wrappers at the front (``module.``,
   ``_orig_mod.``, ``matcher.``, ``model.``, repeatedly), so a DDP or ``{"model": sd}`` file
   pairs with a bare state dict or a safetensors export.
3. ``flax``: a side whose names are in Flax layout (``/``-joined with ``kernel``, ``scale`` or
   ``embedding`` leaves, see :func:`ckptkit.name_rules.is_flax_layout`) is mapped back to
   PyTorch names with the generic conversion rules (:func:`~ckptkit.name_rules.flax_to_torch`:
   ``params/fc/kernel`` -> ``fc.weight``, ``batch_stats/bn/mean`` -> ``bn.running_mean``), and
   its kernels are transposed back (Linear ``(in,out)`` -> ``(out,in)``, conv
   ``(*k,in,out)`` -> ``(out,in,*k)``) before values are compared; wrappers are removed as
   in pass 2.

A name pairs only if it is unique on both sides after normalising; anything else is reported
as only in A or only in B.  Custom recipes (LoFTR, ``--target`` layouts, linen ``layers_0``
names) are not reversed: such tensors show up as only in A / only in B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ckptkit.name_rules import (NONE, WRAPPERS, Mapped, Transform, flax_to_torch,
                                   infer_flax_kinds, is_flax_layout, split_flax)
from ckptkit.model import TensorRef

Match = Literal["exact", "renamed", "flax"]


@dataclass(frozen=True)
class Entry:
    """One tensor of one side: display name, top-level key, the tensor, and the layout change
    that brings it to the canonical (PyTorch) layout."""

    name: str
    top: str
    ref: TensorRef
    transform: Transform = NONE
    #: Reads the tensor whole, for formats whose values only their reader can produce
    #: (Orbax through TensorStore, DeepSpeed's flat partitions, HDF5 chunks); None when the
    #: file's bytes are read directly.
    read: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Pair:
    a: Entry
    b: Entry
    match: Match


def unwrap(name: str) -> str:
    """``module._orig_mod.model.fc.weight`` -> ``fc.weight``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPERS:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix):], True
    return name


def pair(side_a: list[Entry], side_b: list[Entry]) -> tuple[list[Pair], list[Entry], list[Entry]]:
    """Pair the two sides; returns the pairs, then the unpaired entries of A and of B."""
    pairs: list[Pair] = []
    by_name = {e.name: e for e in side_b}
    rest_a: list[Entry] = []
    for entry in side_a:
        other = by_name.pop(entry.name, None)
        if other is not None:
            pairs.append(Pair(entry, other, "exact"))
        else:
            rest_a.append(entry)
    rest_b = [e for e in side_b if e.name in by_name]
    for match, canon in (("renamed", _plain), ("flax", _flax)):
        if not rest_a or not rest_b:
            break
        keyed_a, keyed_b = canon(rest_a), canon(rest_b)
        if keyed_a is None or keyed_b is None:
            continue
        unique_a = _unique(keyed_a)
        unique_b = _unique(keyed_b)
        done_a: set[int] = set()
        done_b: set[int] = set()
        for key, (i, entry_a) in unique_a.items():
            hit = unique_b.get(key)
            if hit is None:
                continue
            j, entry_b = hit
            pairs.append(Pair(entry_a, entry_b, match))  # type: ignore[arg-type]
            done_a.add(i)
            done_b.add(j)
        rest_a = [e for i, (_k, e) in enumerate(keyed_a) if i not in done_a]
        rest_b = [e for j, (_k, e) in enumerate(keyed_b) if j not in done_b]
    return pairs, rest_a, rest_b


def _unique(keyed: list[tuple[str, Entry]]) -> dict[str, tuple[int, Entry]]:
    seen: dict[str, tuple[int, Entry] | None] = {}
    for i, (key, entry) in enumerate(keyed):
        seen[key] = None if key in seen else (i, entry)
    return {k: v for k, v in seen.items() if v is not None}


def _plain(entries: list[Entry]) -> list[tuple[str, Entry]]:
    return [(unwrap(e.name), e) for e in entries]


def _flax(entries: list[Entry]) -> list[tuple[str, Entry]] | None:
    """Canonical PyTorch names for a Flax-layout side; other sides keep their names."""
    names = [e.name for e in entries]
    if not is_flax_layout(names):
        return _plain(entries)
    kinds = infer_flax_kinds(names, {e.name: e.ref.shape for e in entries})
    keyed: list[tuple[str, Entry]] = []
    for entry in entries:
        outcome = flax_to_torch(entry.name, kinds[split_flax(entry.name)[1]], entry.ref.shape)
        if not isinstance(outcome, Mapped):
            keyed.append((entry.name, entry))
            continue
        moved = Entry(entry.name, entry.top, entry.ref, outcome.transform)
        keyed.append((unwrap(outcome.names[0]), moved))
    return keyed
