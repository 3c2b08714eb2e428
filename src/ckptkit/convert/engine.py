"""Run a conversion: resolve the source, plan it, stream tensors through the writer, verify.

:func:`convert` is what ``ckpt convert`` calls.  The decisions are in
:mod:`ckptkit.convert.plan`; here tensors are read one at a time (by byte span, without torch
and without running pickle code), transformed, and handed to
:func:`ckptkit.formats.writers.write`, which streams them into an atomically renamed file.  The
result is then re-read (structure only) and checked against the plan.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptkit.storage import budget
from ckptkit.convert.consolidate import TARGETS, Target, is_chunked
from ckptkit.convert.plan import (ConversionPlan, LayerSpec, Mismatch, TargetSpec, Unused,
                                  plan_conversion, source_layout)
from ckptkit.convert.recipes import Layout, Recipe, load_recipe
from ckptkit.formats.writers import Fmt, WriteResult, sidecar_path, write
from ckptkit.errors import IntegrityError, NotFoundError, UsageError, naming
from ckptkit.model import RawCheckpoint
from ckptkit.tree import is_scalar, join

if TYPE_CHECKING:
    from ckptkit.config import Settings

#: Suffixes dropped from the input's name to build the default output name.
_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".pth.tar", ".safetensors",
             ".msgpack", ".ckpt", ".pth", ".pt", ".bin", ".npz", ".tar", ".flax", ".torch",
             ".npy", ".pkl", ".pickle", ".joblib")
_EXTENSIONS = {"flax": ".flax.npz", "npz": ".npz", "safetensors": ".safetensors",
               "torch": ".torch.pt", "dcp": ".dcp"}
#: The directory a --max-shard-size output gets by default: ``<stem>.shards/``.
_SHARDS_EXTENSION = ".shards"
#: The layout an output format implies; npz and safetensors hold either.
_LAYOUT_OF: dict[str, Layout] = {"flax": "flax", "torch": "torch"}
#: Training facts carried from the source's top level into the output's metadata.
_CARRIED = ("epoch", "global_step", "step")


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did (or, for a dry run or a refused one, would do).

    ``filled`` counts output arrays; ``unfilled`` lists target params no source filled;
    ``unused`` selected source tensors not written, with the reason; ``mismatched`` source
    tensors whose shape differs from their target's.
    """

    source: str
    output: str | None
    format: str | None
    layout: str | None
    recipe: str | None
    prefix: str | None
    layers: tuple[int, ...] | None
    target: str | None
    tensor_count: int
    param_count: int
    bytes: int
    filled: int
    unfilled: tuple[str, ...] = ()
    unused: tuple[Unused, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    tied: int = 0
    excluded: int = 0
    base: str = ""
    shards: int | None = None

    @classmethod
    def from_plan(cls, plan: ConversionPlan, source: Path,
                  result: WriteResult | None = None, fmt: str | None = None) -> ConversionReport:
        coverage = plan.coverage()
        return cls(
            source=str(source), output=str(result.path) if result else None,
            format=result.format if result else fmt, layout=plan.layout, recipe=plan.recipe,
            prefix=plan.prefix, layers=plan.layers, target=plan.target,
            tensor_count=result.tensor_count if result else plan.filled,
            param_count=result.param_count if result else plan.param_count,
            bytes=result.bytes if result else 0, filled=coverage["filled"],
            unfilled=plan.unfilled, unused=plan.unused, mismatched=plan.mismatched,
            tied=plan.tied, excluded=plan.excluded, base=plan.base)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object: ``{output, tensor_count, param_count, filled, unfilled,
        unused, mismatched}`` plus ``source, format, layout, recipe, prefix, layers, target,
        bytes, tied, excluded, base``."""
        return {
            "source": self.source, "output": self.output, "format": self.format,
            "layout": self.layout, "recipe": self.recipe, "prefix": self.prefix,
            "layers": list(self.layers) if self.layers is not None else None,
            "target": self.target, "tensor_count": self.tensor_count,
            "param_count": self.param_count, "bytes": self.bytes, "filled": self.filled,
            "unfilled": list(self.unfilled),
            "unused": [{"name": u.name, "reason": u.reason} for u in self.unused],
            "mismatched": [{"source": m.source, "target": m.target, "shape": list(m.shape),
                            "target_shape": list(m.target_shape)} for m in self.mismatched],
            "tied": self.tied, "excluded": self.excluded, "base": self.base,
            "shards": self.shards}


def convert(src: str | Path, to: Target, out: str | Path | None = None, *,
            recipe: str | Path | Recipe | None = None, prefix: str | None = None,
            target: TargetSpec = None, layers: LayerSpec = None, allow_partial: bool = False,
            max_shard_size: int | None = None, dry_run: bool = False) -> ConversionReport:
    """Convert the checkpoint file ``src`` to ``to``.

    With no recipe, prefix, target or layers, and no change of layout, this is a plain format
    change (``convert_format``).  Otherwise the conversion is planned
    (:func:`~ckptkit.convert.plan.plan_conversion`), tensors are streamed one at a time into
    ``out``, and the output is re-read and checked.  A catalogue model's recipe (``loftr``) is
    is passed as ``recipe`` by the caller that resolved the name
    (:func:`ckptkit.hub.resolver.checkpoint_source`).

    A sharded or distributed source (DCP, Orbax, Hugging Face shards), ``to="dcp"`` and
    ``max_shard_size`` go through :mod:`ckptkit.convert.consolidate` instead: one global
    tensor gathered at a time, names kept.

    Args:
        src: a checkpoint path (a file, or a sharded checkpoint's directory).
        to: ``flax`` (an ``.npz`` with ``/`` keys, or Flax msgpack when ``out`` ends with
            ``.msgpack``), ``npz``, ``safetensors``, ``torch`` or ``dcp`` (a directory).
        out: output file (directory for ``dcp`` and shards); default
            ``./<stem>[.<prefix>]<ext>`` (see docs/convert.md).
        max_shard_size: write Hugging Face shards of at most this many bytes plus
            ``model.safetensors.index.json`` into the directory ``out``.
        dry_run: plan and report only; nothing is written.

    Returns:
        The :class:`ConversionReport`.

    Raises:
        UsageError: bad options, an output that would replace the input, a model of several
            files named alone.
        CoverageError: unfilled or mismatched target params (unless ``allow_partial``), or
            nothing to convert.
        NotFoundError: ``src`` does not exist.
        IntegrityError: the written file does not read back as planned (it is removed).

    Example:
        >>> convert("outdoor_ds.ckpt", "flax", recipe="loftr").param_count  # doctest: +SKIP
        5251072
    """
    if to not in TARGETS:
        raise UsageError(f"--to {to!r} is not one of {', '.join(TARGETS)}",
                         hint=f"Pass one of: {', '.join(TARGETS)}")
    out = Path(out) if out is not None else None
    path = Path(src).expanduser()
    from ckptkit import formats

    if to == "dcp" or max_shard_size is not None or is_chunked(path):
        chosen_by = [flag for flag, value in (("--recipe", recipe), ("--prefix", prefix),
                                              ("--target", target), ("--layers", layers))
                     if value is not None]
        if chosen_by:
            raise UsageError(f"{chosen_by[0]} renames tensors of one file; it does not combine "
                             "with consolidating or resharding",
                             hint="Consolidate first (ckpt convert SRC --to safetensors), then "
                                  f"convert that file with {chosen_by[0]}")
        return _consolidated(path, to, out, max_shard_size, dry_run)

    with naming(path):
        raw = formats.detect(path).read_info(path)
    layout = source_layout(raw)
    if (recipe is None and prefix is None and target is None and layers is None
            and _LAYOUT_OF.get(to, layout) == layout):
        return _plain(path, to, out, dry_run)
    chosen = load_recipe(recipe)
    # npz and safetensors hold either layout: the recipe's, else the source's (no renaming).
    plan = plan_conversion(raw, chosen, prefix=prefix, target=target, layers=layers,
                           allow_partial=allow_partial,
                           layout=_LAYOUT_OF.get(to, chosen.layout or layout))
    fmt: Fmt = "flax" if to == "flax" and out is not None and out.suffix == ".msgpack" else (
        "npz" if to == "flax" else to)
    if dry_run:
        return ConversionReport.from_plan(plan, path, fmt=fmt)
    out = _output(path, out, to, plan.prefix)
    with budget.reading(path):
        result = write(out, fmt, _arrays(plan, raw, path), metadata=_metadata(raw, path, plan),
                       separator=plan.separator, layout=plan.outputs())
    verify(result.path, plan)
    return ConversionReport.from_plan(plan, path, result)


def default_output(src: Path, to: Target, tag: str | None = None,
                   directory: Path | None = None) -> Path:
    """``<dir>/<stem>[.<tag>]<ext>``: in the current directory, the input's name without its
    checkpoint suffixes, the selected prefix, and ``.flax.npz`` / ``.npz`` / ``.safetensors``
    / ``.torch.pt``.  E.g. ``outdoor_ds.ckpt`` + ``loftr_coarse`` ->
    ``outdoor_ds.loftr_coarse.flax.npz``; ``cnn.flax.npz`` -> ``cnn.torch.pt`` (never back to
    ``cnn.pt``, which is likely the original).
    """
    stem = src.name
    while True:
        suffix = next((s for s in _SUFFIXES if stem.lower().endswith(s) and len(stem) > len(s)),
                      None)
        if suffix is None:
            break
        stem = stem[:-len(suffix)]
    name = stem + (f".{tag.replace('/', '.')}" if tag else "") + _EXTENSIONS[to]
    return (directory or Path.cwd()) / name


def _output(src: Path, out: Path | None, to: Fmt, tag: str | None) -> Path:
    """``out``, or the default name; a default name never replaces an existing file (an
    explicit ``-o`` does: the user named it)."""
    chosen = out or default_output(src, to, tag)
    refuse_overwrite(src, chosen)
    if out is None and chosen.exists():
        raise UsageError(f"{chosen} already exists",
                         hint=f"Pass -o {chosen.name} to replace it, or -o with another name",
                         path=str(chosen))
    return chosen


def refuse_overwrite(src: Path, out: Path) -> None:
    """Raise :class:`UsageError` if writing ``out`` would replace the input ``src``."""
    same = out.resolve() == src.resolve()
    if not same and out.exists() and src.exists():
        same = os.path.samefile(out, src)
    if same:
        raise UsageError(f"refusing to write the output over the input {src}",
                         hint="Choose another output with -o", path=str(out))


def _consolidated(path: Path, to: Target, out: Path | None, max_shard_size: int | None,
                  dry_run: bool) -> ConversionReport:
    from ckptkit.convert.consolidate import plan_consolidation

    if out is None:
        if max_shard_size is not None:
            out = default_output(path, to if to != "dcp" else "safetensors").with_suffix("")
            out = out.with_name(out.name + _SHARDS_EXTENSION)
        else:
            out = default_output(path, to)
        if out.exists():
            raise UsageError(f"{out} already exists",
                             hint=f"Pass -o {out.name} to replace it, or -o with another name",
                             path=str(out))
    target: Target = ("flax" if to == "flax" and out.suffix == ".msgpack" else
                      "npz" if to == "flax" else to)
    decided = plan_consolidation(path, target, out, max_shard_size=max_shard_size)
    shards = len(decided.shards.files) if decided.shards is not None else None
    count = len(decided.source.tensors)
    if dry_run:
        return ConversionReport(str(path), None, target, None, None, None, None, None, count,
                                decided.param_count, 0, count, shards=shards)
    result = decided.execute()
    return ConversionReport(str(path), str(result.path), result.format, None, None, None, None,
                            None, result.tensor_count, result.param_count, result.bytes,
                            result.tensor_count, shards=shards)


def _plain(path: Path, to: Fmt, out: Path | None, dry_run: bool) -> ConversionReport:
    from ckptkit.convert.passthrough import plan_format_conversion

    out = _output(path, out, to, None)
    decided = plan_format_conversion(path, to, out)
    count = len(decided.tensors)
    if dry_run:
        return ConversionReport(str(path), None, to, None, None, None, None, None, count,
                                decided.param_count, 0, count)
    result = decided.execute()
    return ConversionReport(str(path), str(result.path), result.format, None, None, None, None,
                            None, result.tensor_count, result.param_count, result.bytes,
                            result.tensor_count)


def _arrays(plan: ConversionPlan, raw: RawCheckpoint,
            path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(output name, array)`` one tensor at a time, transformed as planned."""
    from ckptkit.formats.tensor_io import materialised, numpy_dtype

    big = raw.details.get("byteorder") == "big"
    whole: Any = None
    for entry in plan.entries:
        if entry.source is None:
            array = np.full(entry.shape, entry.fill or 0, dtype=numpy_dtype(entry.dtype))
        else:
            ref = plan.refs[entry.source]
            if ref.span is None:
                # Flax msgpack has no byte offsets to seek to: the file is decoded once.
                if whole is None:
                    from ckptkit import formats

                    whole = formats.detect(path).load(path, "numpy")
                array = np.asarray(reduce(lambda node, key: node[key], entry.path, whole))
            else:
                array = materialised(ref, entry.source, big_endian=big)
            array = entry.transform.apply(array)
        for name in entry.targets:
            yield name, array
        del array  # one source tensor alive at a time


def _metadata(raw: RawCheckpoint, path: Path, plan: ConversionPlan) -> dict[str, str]:
    from ckptkit import __version__

    meta = {"converted_by": f"ckptkit {__version__}", "source": path.name,
            "recipe": plan.recipe, "layout": plan.layout}
    if plan.prefix:
        meta["prefix"] = plan.prefix
    if plan.layers is not None:
        meta["layers"] = ",".join(map(str, plan.layers))
    if isinstance(raw.tree, dict):
        for key in _CARRIED:
            value = raw.tree.get(key)
            if is_scalar(value) and value is not None:
                meta[key] = str(value)
    return meta


def verify(out: Path, plan: ConversionPlan) -> None:
    """Re-read ``out``'s structure and compare names, dtypes and shapes with the plan.

    Raises:
        IntegrityError: the file differs (it is removed, with its sidecar).
    """
    from ckptkit import formats

    raw = formats.detect(out).read_info(out)
    found = {(w if isinstance(w, str) else join(w, raw.separator)): (r.dtype, tuple(r.shape))
             for w, r in raw.tensors}
    expected = {name: (dtype, shape) for name, dtype, shape in plan.outputs()}
    problems = [f"{n}: missing" for n in expected if n not in found]
    problems += [f"{n}: {found[n][0]}{list(found[n][1])}, planned {d}{list(s)}"
                 for n, (d, s) in expected.items() if n in found and found[n] != (d, s)]
    problems += [f"{n}: not planned" for n in found if n not in expected]
    if problems:
        for leftover in (out, sidecar_path(out)):
            leftover.unlink(missing_ok=True)
        raise IntegrityError(f"{out} does not read back as written ({len(problems)} "
                             f"problem(s): {'; '.join(problems[:3])}); it was removed",
                             hint="Please report this with CKPTKIT_DEBUG=1 output",
                             path=str(out))
