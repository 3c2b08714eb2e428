"""Orbax checkpoints (``orbax.checkpoint``): step directories of TensorStore zarr arrays.

The structure (tree, shapes, dtypes, chunking, sharding) comes from Orbax's own metadata files
and the OCDBT database's B+tree (:mod:`ckptkit.formats.orbax_layout`), without JAX or
TensorStore.  Array *data* is read through TensorStore, the engine Orbax writes with
(``pip install 'ckptkit[orbax]'``), one array at a time.

Accepted paths: a PyTree item directory (``_METADATA``), a step directory holding items
(``_CHECKPOINT_METADATA`` with ``default/``...), and a checkpoint root of step directories,
which names its steps (:func:`list_steps`) instead of picking one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ckptkit.errors import FormatError, IntegrityError, MissingDependencyError, UsageError
from ckptkit.formats import ocdbt
from ckptkit.formats.orbax_layout import (CHECKPOINT_METADATA, METADATA, STEP_NAME, Array,
                                          Item, Step, is_item, is_step, list_steps,
                                          read_item, read_json)
from ckptkit.model import Problem, RawCheckpoint, TensorRef
from ckptkit.storage.budget import metered
from ckptkit.storage.location import LocalLocation, Location, locate

FORMAT = "orbax"
__all__ = ["FORMAT", "Step", "iter_arrays", "tensor_reader", "list_steps", "load", "read_info", "sniff", "verify"]


def sniff(path: Path) -> bool:
    try:
        loc = locate(path)
        if not loc.is_dir():
            return False
        return is_step(loc) or bool(list_steps(path))
    except (OSError, IntegrityError):
        return False


def _items(path: Path) -> tuple[list[Item], dict[str, Any]]:
    """The PyTree items of ``path`` and the other items' JSON (``JsonSave``) by name."""
    loc = locate(path)
    if not loc.is_dir():
        raise FormatError(f"{path}: not an Orbax checkpoint (a step or item directory)",
                          hint="Pass the step directory", path=str(path))
    if is_item(loc):
        return [read_item(loc)], {}
    subdirs = [e.name for e in loc.list() if e.is_dir]
    items = [read_item(loc.child(n), n) for n in subdirs if is_item(loc.child(n))]
    others: dict[str, Any] = {}
    for name in subdirs:
        meta = loc.child(name).child("metadata")
        if not is_item(loc.child(name)) and meta.is_file():
            try:
                others[name] = read_json(meta, f"item {name!r} metadata")
            except IntegrityError:
                others[name] = f"<unreadable item {name!r}>"
    if not items and not others:
        steps = list_steps(path)
        if steps:
            listed = ", ".join(str(s.step) for s in steps[:12])
            more = f" and {len(steps) - 12} more" if len(steps) > 12 else ""
            raise UsageError(f"{path}: an Orbax checkpoint root with steps {listed}{more}, "
                             "not one checkpoint", hint=f"Name one step, e.g. "
                             f"{steps[-1].path}")
        raise IntegrityError(f"{loc.child(METADATA)}: no such file (an Orbax step without "
                             "its tree metadata)", path=str(loc.child(METADATA)),
                             hint="The checkpoint is incomplete; re-save it")
    return items, others


def _tree(items: list[Item], others: dict[str, Any]) -> Any:
    if len(items) == 1 and not others and items[0].name in ("", "default"):
        return items[0].tree
    tree: dict[str, Any] = {item.name: item.tree for item in items}
    tree.update(others)
    return tree


def _prefix(item: Item, items: list[Item], others: dict[str, Any]) -> tuple[str, ...]:
    single = len(items) == 1 and not others and item.name in ("", "default")
    return () if single else (item.name,)


@metered
def read_info(path: Path) -> RawCheckpoint:
    items, others = _items(path)
    tensors = []
    arrays: dict[str, Any] = {}
    for item in items:
        _check_data(item)
        for array in item.arrays:
            name = "/".join(str(p) for p in (*_prefix(item, items, others), *array.path))
            tensors.append((name, array.ref))
            arrays[name] = _describe(array)
    loc = locate(path)
    details: dict[str, Any] = {
        "layout": "ocdbt" if all(i.ocdbt for i in items) else "per-array",
        "zarr_format": 3 if any(i.zarr3 for i in items) else 2,
        "items": [i.name or "(root)" for i in items] + sorted(others),
        "arrays": arrays,
        "placement": {name: a["placement"] for name, a in arrays.items()},
        **_files(loc),
    }
    meta_file = loc.child(CHECKPOINT_METADATA)
    if meta_file.is_file():
        meta = read_json(meta_file, CHECKPOINT_METADATA)
        if isinstance(meta, dict):
            details["checkpoint_metadata"] = {k: meta[k] for k in (
                "commit_timestamp_nsecs", "metrics", "custom_metadata") if meta.get(k)}
    match = STEP_NAME.fullmatch(loc.name)
    if match:
        details["step"] = int(match.group(1))
    return RawCheckpoint(FORMAT, _tree(items, others), tuple(tensors), details=details,
                         separator="/")


def _describe(array: Array) -> dict[str, Any]:
    sharding = array.sharding or {}
    kind = sharding.get("sharding_type")
    text = f"{array.chunk_count} chunk(s) of {list(array.chunk_shape)}"
    if kind == "NamedSharding":
        axes = sharding.get("axis_names") or []
        mesh = sharding.get("shape") or []
        spec = sharding.get("partition_spec") or []
        where = " x ".join(f"{a}={n}" for a, n in zip(axes, mesh))
        text += f", NamedSharding over mesh {where}, spec {tuple(spec)}"
    elif kind:
        device = sharding.get("device_str")
        text += f", {kind}" + (f" on {device}" if device else "")
    return {"param": array.param, "value_type": array.value_type,
            "chunk_shape": list(array.chunk_shape), "chunks": array.chunk_count,
            "compressor": array.compressor, "sharding": array.sharding, "placement": text}


def _files(loc: Location) -> dict[str, Any]:
    """How many files the directory holds and their bytes (two levels of items below)."""
    count = total = 0
    pending = [loc]
    while pending:
        here = pending.pop()
        for entry in here.list():
            if entry.is_dir:
                pending.append(here.child(entry.name))
            else:
                count += 1
                total += entry.size or 0
    return {"files": count, "data_bytes": total}


def _check_data(item: Item) -> None:
    """Data that inspect can vouch for without reading it: every out-of-line value's file is
    there and long enough (OCDBT), every chunk file is there (one directory per array)."""
    if item.database is not None:
        ends: dict[str, int] = {}
        for value in item.database.entries.values():
            if isinstance(value, ocdbt.ValueRef):
                ends[value.file] = max(ends.get(value.file, 0), value.offset + value.length)
        for file, end in sorted(ends.items()):
            ocdbt.check_extent(item.root, file, end)
        if item.store_fill_chunks:
            for array in item.arrays:
                missing = [k for k in array.chunk_keys if k.encode() not in item.database.entries]
                if missing:
                    raise IntegrityError(f"{item.root}: array {array.param!r} lacks "
                                         f"{len(missing)} of its {array.chunk_count} chunks "
                                         f"(first: {missing[0]})", path=str(item.root),
                                         hint="The checkpoint is incomplete or corrupt")
        return
    if item.store_fill_chunks:
        for array in item.arrays:
            for key in array.chunk_keys:
                if not item.root.child(key).is_file():
                    raise IntegrityError(f"{item.root.child(key)}: missing chunk of array "
                                         f"{array.param!r}", path=str(item.root.child(key)),
                                         hint="The checkpoint is incomplete; re-save it")


def _tensorstore() -> Any:
    try:
        import tensorstore
    except ImportError:
        raise MissingDependencyError("tensorstore", "orbax", "reading Orbax array data") from None
    return tensorstore


def _open(ts: Any, item: Item, array: Array) -> Any:
    if not isinstance(item.root, LocalLocation):
        raise UsageError(f"{item.root}: Orbax array data is read from local directories only",
                         hint="Download the step directory first (its structure can be "
                              "inspected where it is)")
    root = item.root.path.resolve()
    base: dict[str, Any] = {"driver": "file", "path": str(root) + "/"}
    kvstore = ({"driver": "ocdbt", "base": base, "path": array.param + "/"} if item.ocdbt
               else {"driver": "file", "path": str(root / array.param) + "/"})
    spec = {"driver": "zarr3" if item.zarr3 else "zarr", "kvstore": kvstore}
    try:
        return ts.open(spec, open=True, read=True).result()
    except (ValueError, OSError) as exc:
        raise IntegrityError(f"{root}: TensorStore cannot open array {array.param!r} ({exc})",
                             path=str(root), hint="The checkpoint is incomplete or corrupt") \
            from None


def iter_arrays(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(name, numpy array)`` for every array of the checkpoint, one at a time (names as
    :func:`read_info` gives them: tree paths joined by ``/``).  Needs TensorStore.

    Raises:
        MissingDependencyError: TensorStore is not installed (extra ``orbax``).
        IntegrityError: an array cannot be read.
    """
    ts = _tensorstore()
    items, others = _items(Path(path))
    for item in items:
        for array in item.arrays:
            name = "/".join(str(p) for p in (*_prefix(item, items, others), *array.path))
            yield name, _read(ts, item, array)


def tensor_reader(path: str | Path) -> Callable[[str, TensorRef], Any]:
    """A function reading one array by its name (as :func:`read_info` names it) through
    TensorStore, in any order: what ``ckpt convert`` asks for, one tensor at a time.
    TensorStore is needed only when it reads (extra ``orbax``)."""
    items, others = _items(Path(path))
    where = {"/".join(str(p) for p in (*_prefix(item, items, others), *array.path)):
             (item, array) for item in items for array in item.arrays}

    def read(name: str, ref: TensorRef) -> Any:
        item, array = where[name]
        return _read(_tensorstore(), item, array)

    return read


def _read(ts: Any, item: Item, array: Array) -> Any:
    store = _open(ts, item, array)
    try:
        data = store.read().result()
    except (ValueError, OSError) as exc:
        raise IntegrityError(f"{item.root}: cannot read array {array.param!r} ({exc})",
                             path=str(item.root), hint="The checkpoint is incomplete or "
                             "corrupt; run `ckpt verify` on it") from None
    if tuple(data.shape) != array.ref.shape:
        raise IntegrityError(f"{item.root}: array {array.param!r} read as {list(data.shape)}, "
                             f"metadata says {list(array.ref.shape)}", path=str(item.root))
    return data


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``/``flax``: the tree with numpy arrays (leaves saved as scalars come back as
    Python numbers, as Orbax restores them); ``jax``: the same with ``jax.Array`` leaves on
    the default device.  Needs TensorStore."""
    if framework not in ("numpy", "flax", "jax"):
        raise UsageError(f"{path}: cannot load an Orbax checkpoint as {framework!r}",
                         hint="Use framework='numpy' or framework='jax'")
    ts = _tensorstore()
    items, others = _items(path)
    loaded: list[Item] = []
    for item in items:
        values = {id(a.ref): a for a in item.arrays}

        def fill(node: Any, item: Item = item, values: dict[int, Array] = values) -> Any:
            if id(node) in values:
                array = values[id(node)]
                data = _read(ts, item, array)
                return data[()].item() if array.value_type == "scalar" else data
            if isinstance(node, dict):
                return {k: fill(v) for k, v in node.items()}
            if isinstance(node, list):
                return [fill(v) for v in node]
            return node

        loaded.append(Item(item.name, item.root, fill(item.tree), item.arrays, item.ocdbt,
                           item.zarr3, item.store_fill_chunks))
    tree = _tree(loaded, others)
    if framework == "jax":
        try:
            import jax
            import jax.numpy as jnp
        except ImportError:
            raise MissingDependencyError("jax", "jax", "loading as JAX arrays") from None
        return jax.tree_util.tree_map(
            lambda x: jnp.asarray(x) if hasattr(x, "dtype") else x, tree)
    return tree


def verify(path: Path, *, hashes: bool = False) -> list[Problem]:
    """Everything wrong with the Orbax checkpoint at ``path``, without reading array data.

    See :func:`ckptkit.formats.orbax_check.problems`; ``hashes`` is accepted for the common
    verb (Orbax records no content hashes, so there is nothing more to compare).
    """
    from ckptkit.formats.orbax_check import problems

    return problems(Path(path))
