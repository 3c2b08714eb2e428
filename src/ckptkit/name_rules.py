"""Generic PyTorch <-> Flax rules: module kinds, leaf renames, layout transforms, naming.

This is the default recipe.  PyTorch names a tensor ``<module>.<leaf>`` (``encoder.0.weight``);
Flax names a variable ``<collection>/<module path>/<leaf>`` (``params/encoder/0/kernel``).
What a leaf becomes depends on the kind of module that owns it, and a state dict does not say
that, so :func:`infer_kinds` guesses it from the module's name and its tensors' shapes:

========== ================================ ==========================================
kind       recognised by                    PyTorch -> Flax
========== ================================ ==========================================
batchnorm  has ``running_mean``/``var``     ``weight/bias`` -> params ``scale/bias``;
                                            ``running_mean/var`` -> batch_stats
                                            ``mean/var``; ``num_batches_tracked`` dropped
norm       1-D ``weight`` (LayerNorm, ...)  ``weight`` -> ``scale``
embedding  2-D ``weight``, name says embed  ``weight`` -> ``embedding``
linear     2-D ``weight``                   ``weight (out,in)`` -> ``kernel (in,out)``
conv       >=3-D ``weight``                 ``weight (out,in,*k)`` -> ``kernel (*k,in,out)``
param      anything else                    name and layout kept
========== ================================ ==========================================

The inverse (:func:`flax_to_torch`) reads the kind from Flax leaves (``kernel`` rank,
``scale``, ``embedding``, ``batch_stats``) and recreates ``num_batches_tracked`` (0) so that
``load_state_dict(strict=True)`` accepts the result.

Names also meet a destination's layout here: :func:`read_target` reads a ``--target``
template's names and shapes, and :class:`TargetIndex` finds the target name(s) an output
answers to by structure (collection roots, a shared root module, numbered copies for tying).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ckptkit.errors import NotFoundError, UsageError
from ckptkit.tree import join

TargetSpec = str | Path | Mapping[str, Sequence[int]] | None
Kind = Literal["linear", "conv", "norm", "batchnorm", "embedding", "param"]
Style = Literal["nested", "linen", "dotted"]
KINDS: tuple[Kind, ...] = ("linear", "conv", "norm", "batchnorm", "embedding", "param")
STYLES: tuple[Style, ...] = ("nested", "linen", "dotted")

#: Wrapper prefixes that training code adds around a model: DDP, torch.compile, LoFTR's
#: Lightning module, and the common ``self.model = ...`` wrapper.
WRAPPERS: tuple[str, ...] = ("module.", "_orig_mod.", "matcher.", "model.")
#: Flax variable collections a converted tree may be rooted at.
COLLECTIONS: tuple[str, ...] = ("params", "batch_stats")
#: Leaf names only Flax uses; a tree with them is in Flax layout.
FLAX_LEAVES = frozenset({"kernel", "scale", "embedding"})
_EMBED = re.compile(r"embed|tok_emb|pos_emb|wte|wpe", re.IGNORECASE)
_PERMUTE = re.compile(r"^permute\(\s*(\d+(?:\s*,\s*\d+)*)\s*\)$")


@dataclass(frozen=True)
class Transform:
    """A layout change applied to one array: ``none``, ``T``, ``conv``, ``unconv`` or
    ``permute(i,j,...)``.

    ``T`` reverses the axes (a Linear's ``(out,in)`` <-> ``(in,out)``); ``conv`` moves a torch
    conv weight ``(out,in,*k)`` to Flax ``(*k,in,out)``; ``unconv`` is its inverse.
    """

    name: str = "none"
    axes: tuple[int, ...] | None = None  # explicit permutation for permute(...)

    def permutation(self, ndim: int) -> tuple[int, ...] | None:
        """The axis order for an array of ``ndim`` dimensions; None means unchanged.

        Raises:
            ValueError: the transform cannot apply to that rank.
        """
        if self.name == "none":
            return None
        if self.name == "T":
            return tuple(reversed(range(ndim)))
        if self.name in ("conv", "unconv"):
            if ndim < 3:
                raise ValueError(f"transform {self.name!r} needs a conv weight of 3 or more "
                                 f"dimensions, not {ndim}")
            if self.name == "conv":
                return (*range(2, ndim), 1, 0)
            return (ndim - 1, ndim - 2, *range(ndim - 2))
        axes = self.axes or ()
        if sorted(axes) != list(range(ndim)):
            raise ValueError(f"{self.name} does not permute the {ndim} axes of this tensor")
        return axes

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape after the transform (raises ValueError like :meth:`permutation`)."""
        order = self.permutation(len(shape))
        return tuple(shape) if order is None else tuple(shape[i] for i in order)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The transformed array, C-contiguous (writers stream contiguous buffers)."""
        order = self.permutation(array.ndim)
        return array if order is None else np.ascontiguousarray(array.transpose(order))

    def __str__(self) -> str:
        return self.name


NONE, TRANSPOSE, CONV, UNCONV = Transform(), Transform("T"), Transform("conv"), Transform("unconv")


def parse_transform(text: str) -> Transform:
    """Parse a transform name as written in a recipe.

    Raises:
        ValueError: not ``none``, ``T``, ``conv``, ``unconv`` or ``permute(i,j,...)``.
    """
    text = text.strip()
    if text in ("none", "T", "conv", "unconv"):
        return Transform(text)
    found = _PERMUTE.match(text)
    if found:
        axes = tuple(int(a) for a in found.group(1).split(","))
        return Transform(f"permute({','.join(map(str, axes))})", axes)
    raise ValueError(f"unknown transform {text!r} (use none, T, conv, unconv or "
                     "permute(i,j,...))")


@dataclass(frozen=True)
class Mapped:
    """Where one source tensor goes: output name(s) and the transform on the way."""

    names: tuple[str, ...]
    transform: Transform = NONE


@dataclass(frozen=True)
class Dropped:
    """A tensor left out on purpose, and why (shown in the coverage report)."""

    reason: str


Outcome = Mapped | Dropped


def split_torch(name: str) -> tuple[str, str]:
    """``encoder.0.weight`` -> (``encoder.0``, ``weight``); a root tensor has module ``""``."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def split_flax(name: str) -> tuple[str | None, str, str]:
    """``params/encoder/0/kernel`` -> (``params``, ``encoder/0``, ``kernel``)."""
    parts = name.split("/")
    collection = parts[0] if len(parts) > 1 and parts[0] in COLLECTIONS else None
    body = parts[1:] if collection else parts
    return collection, "/".join(body[:-1]), body[-1]


def is_flax_layout(names: Iterable[str]) -> bool:
    """Whether names look like a Flax tree (``/``-joined with ``kernel``/``scale`` leaves)."""
    return any("/" in n and n.rsplit("/", 1)[1] in FLAX_LEAVES for n in names)


def infer_kinds(shapes: Mapping[str, Sequence[int]],
                overrides: Sequence[tuple[re.Pattern[str], Kind]] = ()) -> dict[str, Kind]:
    """The kind of every module of a PyTorch-style state dict (see the module docstring).

    Args:
        shapes: tensor name (``module.leaf``) -> shape.
        overrides: ``(regex, kind)`` pairs from a recipe's ``kinds``; the first regex found
            in a module's name decides its kind instead of the inference.
    """
    modules: dict[str, dict[str, Sequence[int]]] = {}
    for name, shape in shapes.items():
        module, leaf = split_torch(name)
        modules.setdefault(module, {})[leaf] = shape
    kinds: dict[str, Kind] = {}
    for module, leaves in modules.items():
        kinds[module] = _override(module, overrides) or _guess(module, leaves)
    return kinds


def _override(module: str, overrides: Sequence[tuple[re.Pattern[str], Kind]]) -> Kind | None:
    for pattern, kind in overrides:
        if pattern.search(module):
            return kind
    return None


def _guess(module: str, leaves: Mapping[str, Sequence[int]]) -> Kind:
    if "running_mean" in leaves or "running_var" in leaves:
        return "batchnorm"
    weight = leaves.get("weight")
    if weight is None:
        return "param"
    if len(weight) == 1:
        # LayerNorm/GroupNorm (weight + bias) and RMSNorm (weight only) keep a per-channel scale.
        return "norm"
    if len(weight) == 2:
        return "embedding" if _EMBED.search(module.rsplit(".", 1)[-1]) else "linear"
    return "conv" if len(weight) >= 3 else "param"


def flax_path(module: str, style: Style) -> list[str]:
    """A PyTorch module name as Flax path components.

    ``nested``: ``a.b.0`` -> ``a/b/0``; ``linen``: ``a.b.0`` -> ``a/b_0`` (how linen names
    list attributes; a leading index becomes ``layers_0`` as in ``nn.Sequential``);
    ``dotted``: ``a.b.0`` stays one component (LoFTR/IFViT style ``layers.0/q_proj``).
    """
    if not module:
        return []
    if style == "dotted":
        return [module]
    parts = module.split(".")
    if style == "nested":
        return parts
    merged: list[str] = []
    for part in parts:
        if part.isdigit():
            merged.append(f"{merged.pop()}_{part}" if merged else f"layers_{part}")
        else:
            merged.append(part)
    return merged


def _flax_name(module: str, leaf: str, collection: str, style: Style, collections: bool) -> str:
    # Batch statistics are not parameters: they keep their collection even when params do not.
    root = [collection] if collections or collection != "params" else []
    return "/".join(root + flax_path(module, style) + [leaf])


def torch_to_flax(name: str, kind: Kind, shape: Sequence[int], *, style: Style = "nested",
                  collections: bool = True) -> Outcome:
    """Map one PyTorch tensor to its Flax variable name and layout transform.

    Example:
        >>> torch_to_flax("fc.weight", "linear", (10, 4)).names
        ('params/fc/kernel',)
    """
    module, leaf = split_torch(name)
    collection, transform = "params", NONE
    if kind == "batchnorm" and leaf == "num_batches_tracked":
        return Dropped("num_batches_tracked: Flax BatchNorm keeps no step counter")
    if kind == "batchnorm" and leaf in ("running_mean", "running_var"):
        collection, leaf = "batch_stats", leaf[len("running_"):]
    elif leaf == "weight":
        if kind in ("norm", "batchnorm"):
            leaf = "scale"
        elif kind == "embedding":
            leaf = "embedding"
        elif kind == "linear":
            leaf, transform = "kernel", TRANSPOSE if len(shape) == 2 else NONE
        elif kind == "conv":
            leaf, transform = "kernel", CONV if len(shape) >= 3 else NONE
    return Mapped((_flax_name(module, leaf, collection, style, collections),), transform)


def infer_flax_kinds(names: Iterable[str], shapes: Mapping[str, Sequence[int]]) -> dict[str, Kind]:
    """The kind of every module of a Flax tree, read from its leaves (module path -> kind)."""
    modules: dict[str, dict[str, Sequence[int]]] = {}
    for name in names:
        collection, module, leaf = split_flax(name)
        modules.setdefault(module, {})[f"{collection or 'params'}:{leaf}"] = shapes[name]
    kinds: dict[str, Kind] = {}
    for module, leaves in modules.items():
        kernel = leaves.get("params:kernel")
        if "batch_stats:mean" in leaves or "batch_stats:var" in leaves:
            kinds[module] = "batchnorm"
        elif kernel is not None:
            kinds[module] = "conv" if len(kernel) >= 3 else "linear"
        elif "params:scale" in leaves:
            kinds[module] = "norm"
        elif "params:embedding" in leaves:
            kinds[module] = "embedding"
        else:
            kinds[module] = "param"
    return kinds


def flax_to_torch(name: str, kind: Kind, shape: Sequence[int]) -> Outcome:
    """Map one Flax variable back to its PyTorch state-dict name and layout transform.

    Example:
        >>> flax_to_torch("params/conv/kernel", "conv", (3, 3, 3, 8)).names
        ('conv.weight',)
    """
    _collection, module, leaf = split_flax(name)
    transform = NONE
    if kind == "batchnorm" and leaf in ("mean", "var"):
        leaf = f"running_{leaf}"
    elif leaf == "kernel" and kind in ("linear", "conv"):
        leaf = "weight"
        transform = TRANSPOSE if len(shape) == 2 else UNCONV if len(shape) >= 3 else NONE
    elif (leaf == "scale" and kind in ("norm", "batchnorm")) or (
            leaf == "embedding" and kind == "embedding"):
        leaf = "weight"
    torch_module = ".".join(module.split("/")) if module else ""
    return Mapped((f"{torch_module}.{leaf}" if torch_module else leaf,), transform)


def batchnorm_counters(kinds: Mapping[str, Kind]) -> list[str]:
    """``num_batches_tracked`` names to recreate for the BatchNorm modules of a Flax tree."""
    return [f"{'.'.join(m.split('/'))}.num_batches_tracked" if m else "num_batches_tracked"
            for m, kind in kinds.items() if kind == "batchnorm"]


class TargetIndex:
    """Target names by structure: exact, without a ``params/`` root or the shared root
    module, and as numbered copies of a numbered module (``layers.3.0`` and ``layers.3.1``
    both answer for ``layers.3``: one source layer tied into several target modules)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.names = set(shapes)
        self.forms: dict[tuple[str | None, str], list[str]] = {}
        self.copies: dict[tuple[str | None, str], list[str]] = {}
        split = {t: self._body(t) for t in shapes}
        modules = [parts[:-1] for _c, parts in split.values()]
        root = 0
        while modules and all(len(m) > root for m in modules) and len(
                {m[root] for m in modules}) == 1:
            root += 1
        for name, (collection, parts) in split.items():
            for body in {tuple(parts), tuple(parts[root:])}:
                self._add(self.forms, (collection, "/".join(body)), name)
                for key in uncopied(body):
                    self._add(self.copies, (collection, key), name)

    @staticmethod
    def _body(name: str) -> tuple[str | None, list[str]]:
        parts = name.split("/")
        if len(parts) > 1 and parts[0] in COLLECTIONS:
            return parts[0], parts[1:]
        return None, parts

    @staticmethod
    def _add(index: dict[tuple[str | None, str], list[str]], key: tuple[str | None, str],
             name: str) -> None:
        bucket = index.setdefault(key, [])
        if name not in bucket:
            bucket.append(name)

    def find(self, candidate: str) -> list[str]:
        if candidate in self.names:
            return [candidate]
        collection, parts = self._body(candidate)
        key = "/".join(parts)
        for index in (self.forms, self.copies):
            hits: list[str] = []
            for coll in ((None, *COLLECTIONS) if collection is None else (collection, None)):
                hits += [t for t in index.get((coll, key), ()) if t not in hits]
            if hits:
                return hits
        return []


def uncopied(parts: tuple[str, ...]) -> list[str]:
    """Keys a numbered copy of a numbered module answers to: ``layers.3.1/q`` -> ``layers.3/q``
    and ``layers/3/1/q`` -> ``layers/3/q`` (the copy index follows a layer index)."""
    keys = []
    for j, part in enumerate(parts[:-1]):
        found = re.fullmatch(r"(.*\d)[._](\d+)", part)
        if found:
            keys.append("/".join((*parts[:j], found.group(1), *parts[j + 1:])))
        elif part.isdigit() and j > 0 and parts[j - 1][-1:].isdigit():
            keys.append("/".join((*parts[:j], *parts[j + 1:])))
    return keys


def read_target(spec: TargetSpec) -> dict[str, tuple[int, ...]]:
    """The target layout ``{name: shape}`` from a mapping, a JSON file (flat ``{key: shape}`` or
    nested), or any checkpoint ckptkit reads (.npz, Flax msgpack, ...; names joined with the
    format's separator, ``/`` for Flax trees).  Only structure is read.

    Raises:
        NotFoundError: the file does not exist.
        UsageError: the file holds no tensors or is not a layout.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in spec.items()}
    path = Path(spec)
    if not path.exists():
        raise NotFoundError(f"--target {path}: no such file",
                            hint="Check the path of the destination layout file",
                            path=str(path))
    if path.suffix.lower() == ".json":
        try:
            from ckptkit.storage.location import locate

            loc = locate(path)
            layout = _flatten_json(json.loads(loc.read(0, loc.size()).decode("utf-8")), "")
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--target {path}: not a JSON layout ({exc})",
                             hint='Expected {"name": [dim, ...], ...}') from None
    else:
        from ckptkit import formats

        raw = formats.detect(path).read_info(path)
        layout = {(w if isinstance(w, str) else join(w, raw.separator)): tuple(r.shape)
                  for w, r in raw.tensors}
    if not layout:
        raise UsageError(f"--target {path} holds no parameters",
                         hint="Pass the destination model's parameters: .npz, Flax msgpack, "
                              "a checkpoint, or JSON {key: shape}")
    return layout


def _flatten_json(node: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    if isinstance(node, list) and all(isinstance(d, int) for d in node):
        return {prefix: tuple(node)}
    if isinstance(node, dict) and "shape" in node and isinstance(node["shape"], list):
        return _flatten_json(node["shape"], prefix)
    if not isinstance(node, dict):
        raise TypeError(f"{prefix or 'the root'} is neither a shape list nor an object")
    result: dict[str, tuple[int, ...]] = {}
    for key, value in node.items():
        result.update(_flatten_json(value, f"{prefix}/{key}" if prefix else str(key)))
    return result
