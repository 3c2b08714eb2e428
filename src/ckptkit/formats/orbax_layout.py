"""What an Orbax checkpoint directory holds, read from Orbax's own metadata files.

An Orbax *step* directory (``orbax.checkpoint`` 0.12) is either one PyTree *item* (a
``_METADATA`` file beside the data) or a step of a ``CheckpointManager`` holding one directory
per item (``default/``, ``params/``...) and ``_CHECKPOINT_METADATA``.  Within an item:

- ``_METADATA`` (JSON): the tree: each leaf's key path (dict keys and sequence indices) and
  value type (``jax.Array``, ``np.ndarray``, ``scalar``, ``string``, ``None``...);
- ``_sharding`` (JSON): per array (keyed by base64 of its name) the sharding it was saved with;
- ``_strings.json``: string leaves;
- the arrays, each a zarr array named by its key path joined with ``.``: either keys of the
  OCDBT database (``manifest.ocdbt``, ``d/``; the default) or a directory per array
  (``use_ocdbt=False``) with ``.zarray`` (zarr v2) or ``zarr.json`` (v3) and one file per chunk.

:func:`read_item` turns that into a frozen :class:`Item` (tree, arrays with shapes, dtypes,
chunking and sharding) without JAX, TensorStore or numpy.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkit.errors import IntegrityError
from ckptkit.formats import ocdbt
from ckptkit.model import TensorRef, checked_shape, itemsize
from ckptkit.storage import budget
from ckptkit.storage.location import Location, locate

METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
SHARDING = "_sharding"
STRINGS = "_strings.json"
TMP_MARK = ".orbax-checkpoint-tmp"
#: Step directory names: ``7``, ``ckpt_7`` (Orbax's ``step_prefix``).
STEP_NAME = re.compile(r"(?:[A-Za-z][\w]*?_)?(\d+)")
_ARRAY_TYPES = {"jax.Array", "np.ndarray", "scalar"}
_EMPTY = {"None": None, "Dict": {}, "List": [], "Tuple": [], "NamedTuple": {}}
#: zarr v2 type codes (``<f4``) by kind letter and byte width.
_ZARR2 = {("f", 2): "float16", ("f", 4): "float32", ("f", 8): "float64", ("i", 1): "int8",
          ("i", 2): "int16", ("i", 4): "int32", ("i", 8): "int64", ("u", 1): "uint8",
          ("u", 2): "uint16", ("u", 4): "uint32", ("u", 8): "uint64", ("b", 1): "bool",
          ("c", 8): "complex64", ("c", 16): "complex128"}


@dataclass(frozen=True)
class Array:
    """One array leaf: its tree path, Orbax parameter name and zarr metadata."""

    path: tuple[str | int, ...]
    param: str
    value_type: str
    ref: TensorRef
    chunk_shape: tuple[int, ...]
    chunk_keys: tuple[str, ...]
    zarr_format: int
    compressor: str | None
    sharding: dict[str, Any] | None = None

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_keys)


@dataclass(frozen=True)
class Item:
    """One PyTree item of a step: its tree (TensorRefs for arrays) and how it is stored."""

    name: str
    root: Location
    tree: Any
    arrays: tuple[Array, ...]
    ocdbt: bool
    zarr3: bool
    store_fill_chunks: bool
    database: ocdbt.Database | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_json(where: Location, what: str) -> Any:
    """A small JSON metadata file, charged to the reading budget's header limit.

    Raises:
        IntegrityError: the file is missing (the checkpoint is incomplete) or not JSON.
    """
    if not where.is_file():
        raise IntegrityError(f"{where}: missing", path=str(where),
                             hint=f"An Orbax checkpoint needs its {what}; it is incomplete")
    size = where.size()
    budget.current().check("header", size, what)
    raw = where.read(0, size)
    budget.current().charge("nodes", raw.count(b"{") + raw.count(b"["), what)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where}: {what} is not valid JSON ({exc})", path=str(where),
                             hint="The checkpoint is corrupt; re-save it") from None


def zarr_dtype(meta: dict[str, Any], zarr3: bool) -> str:
    """ckptkit's dtype name for a zarr array's ``dtype`` (v2) or ``data_type`` (v3)."""
    raw = meta.get("data_type" if zarr3 else "dtype")
    if not isinstance(raw, str):
        raise ValueError(f"no dtype ({raw!r})")
    if raw[:1] in "<>|=" and raw[1:2].isalpha() and raw[2:].isdigit():
        name = _ZARR2.get((raw[1], int(raw[2:])))
        if name:
            return name
    if raw in _ZARR2.values() or (itemsize(raw) and raw not in ("string",)):
        return raw  # bfloat16, float8_*: TensorStore writes the ml_dtypes name
    raise ValueError(f"dtype {raw!r} is not one ckptkit knows")


def _chunk_keys(param: str, meta: dict[str, Any], shape: tuple[int, ...],
                zarr3: bool) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The chunk (v2) or shard (v3) grid's cell shape and the storage key of every cell."""
    if zarr3:
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        encoding = meta.get("chunk_key_encoding") or {}
        separator = (encoding.get("configuration") or {}).get(
            "separator", "/" if encoding.get("name", "default") == "default" else ".")
        default = encoding.get("name", "default") == "default"
    else:
        grid = meta["chunks"]
        separator = meta.get("dimension_separator") or "."
        default = False
    cell = checked_shape(grid, f"array {param!r} chunks")
    if len(cell) != len(shape) or any(c == 0 for c in cell):
        raise ValueError(f"chunk shape {list(cell)} does not fit shape {list(shape)}")
    counts = [math.ceil(s / c) for s, c in zip(shape, cell, strict=True)]
    total = math.prod(counts)
    budget.current().charge("nodes", total, f"chunks of array {param!r}")
    keys = []
    for index in range(total):
        coords = []
        for n in reversed(counts):
            coords.append(index % n)
            index //= n
        text = separator.join(str(c) for c in reversed(coords))
        if default:
            text = "c" + (separator + text if coords else "")
        keys.append(f"{param}/{text or '0'}")
    return cell, tuple(keys)


def _param_name(keys: list[Any]) -> str:
    return ".".join(str(k) for k in keys)


def _sharding_text(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, str):
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_item(root: Location, name: str = "") -> Item:
    """The PyTree item stored in directory ``root``.

    Raises:
        IntegrityError: ``_METADATA`` is missing, metadata that does not parse, an array without its zarr metadata, or
            an OCDBT database that cannot be read (each names its file).
    """
    meta = read_json(root.child(METADATA), f"{METADATA} (the tree of an Orbax item)")
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
        raise IntegrityError(f"{root.child(METADATA)}: no tree_metadata in it",
                             path=str(root.child(METADATA)),
                             hint="Not an Orbax PyTree item, or a corrupt one")
    use_ocdbt = bool(meta.get("use_ocdbt", root.child(ocdbt.MANIFEST).exists()))
    zarr3 = bool(meta.get("use_zarr3", False))
    store_fill = bool(meta.get("store_array_data_equal_to_fill_value", False))
    shardings: dict[str, Any] = {}
    if root.child(SHARDING).is_file():
        table = read_json(root.child(SHARDING), SHARDING)
        if isinstance(table, dict):
            for key, value in table.items():
                try:
                    shardings[base64.b64decode(key).decode("utf-8")] = _sharding_text(value)
                except (ValueError, UnicodeDecodeError):
                    continue
    strings: dict[str, Any] = {}
    if root.child(STRINGS).is_file():
        loaded = read_json(root.child(STRINGS), STRINGS)
        strings = loaded if isinstance(loaded, dict) else {}
    database = read_databases(root) if use_ocdbt else None
    tree: dict[Any, Any] = {}
    arrays = []
    for entry in meta["tree_metadata"].values():
        try:
            keys = [(k["key"], int(k.get("key_type", 2))) for k in entry["key_metadata"]]
            value_meta = entry["value_metadata"]
            value_type = str(value_meta.get("value_type"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"{root.child(METADATA)}: malformed tree entry ({exc!r})",
                                 path=str(root.child(METADATA)),
                                 hint="The checkpoint is corrupt; re-save it") from None
        path = tuple(int(k) if kind == 1 else str(k) for k, kind in keys)
        param = _param_name([k for k, _ in keys])
        if value_type in _ARRAY_TYPES:
            array = describe_array(root, database, path, param, value_type, zarr3,
                           shardings.get(param))
            arrays.append(array)
            value: Any = array.ref
        elif value_type == "string":
            value = strings.get(param)
        elif value_type in _EMPTY:
            value = type(_EMPTY[value_type])() if _EMPTY[value_type] is not None else None
        else:
            value = f"<{value_type}>"
        _place(tree, keys, value)
    return Item(name, root, _lists(tree), tuple(arrays), use_ocdbt, zarr3, store_fill,
                database)


def read_databases(root: Location) -> ocdbt.Database:
    """The item's OCDBT database: the merged root one, or (when Orbax did not merge them) the
    per-process databases ``ocdbt.process_<i>/`` together, their file paths relative to
    ``root``."""
    if root.child(ocdbt.MANIFEST).exists():
        return ocdbt.read_database(root)
    parts = [e.name for e in root.list() if e.is_dir and e.name.startswith("ocdbt.process_")]
    if not parts or root.child("d").is_dir():  # merged (root d/ exists): the manifest is lost
        raise IntegrityError(f"{root.child(ocdbt.MANIFEST)}: missing",
                             path=str(root.child(ocdbt.MANIFEST)),
                             hint="This Orbax item is stored with OCDBT but its manifest is "
                                  "missing; the checkpoint is incomplete")
    entries: dict[bytes, bytes | ocdbt.ValueRef] = {}
    nodes: list[ocdbt.ValueRef] = []
    for part in parts:
        db = ocdbt.read_database(root.child(part))
        for key, value in db.entries.items():
            entries[key] = (ocdbt.ValueRef(f"{part}/{value.file}", value.offset, value.length)
                            if isinstance(value, ocdbt.ValueRef) else value)
        nodes.extend(ocdbt.ValueRef(f"{part}/{n.file}", n.offset, n.length) for n in db.nodes)
    return ocdbt.Database(entries, tuple(nodes))


def _zarr_meta(root: Location, database: ocdbt.Database | None, param: str,
               zarr3: bool) -> tuple[dict[str, Any], str]:
    name = "zarr.json" if zarr3 else ".zarray"
    key = f"{param}/{name}"
    if database is not None:
        value = database.entries.get(key.encode())
        if value is None:
            raise IntegrityError(f"{root}: array {param!r} has no {name} in the OCDBT "
                                 "database", path=str(root),
                                 hint="The checkpoint is incomplete or corrupt")
        raw = value if isinstance(value, bytes) else ocdbt.read_value(root, value)
        where = f"{root} (OCDBT key {key})"
    else:
        loc = root.child(param).child(name)
        if not loc.is_file():
            raise IntegrityError(f"{loc}: missing (array {param!r} has no zarr metadata)",
                                 path=str(loc), hint="The checkpoint is incomplete")
        raw = loc.read(0, min(loc.size(), 1 << 20))
        where = str(loc)
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where}: not valid JSON ({exc})", path=str(root),
                             hint="The checkpoint is corrupt") from None
    if not isinstance(meta, dict):
        raise IntegrityError(f"{where}: zarr metadata is not an object", path=str(root))
    return meta, where


def describe_array(root: Location, database: ocdbt.Database | None,
                   path: tuple[str | int, ...], param: str, value_type: str, zarr3: bool,
                   sharding: dict[str, Any] | None) -> Array:
    """The :class:`Array` of leaf ``param`` from its zarr metadata (in the OCDBT database
    ``database``, or in its own directory when that is None)."""
    meta, where = _zarr_meta(root, database, param, zarr3)
    try:
        dtype = zarr_dtype(meta, zarr3)
        shape = checked_shape(meta["shape"], f"{where}: array {param!r}", dtype)
        cell, keys = _chunk_keys(param, meta, shape, zarr3)
    except IntegrityError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"{where}: malformed zarr metadata for array {param!r} ({exc})",
                             path=str(root), hint="The checkpoint is corrupt") from None
    if zarr3:
        codecs = [c.get("name") for c in meta.get("codecs", []) if isinstance(c, dict)]
        compressor = ",".join(str(c) for c in codecs) or None
    else:
        comp = meta.get("compressor")
        compressor = comp.get("id") if isinstance(comp, dict) else None
    return Array(path, param, value_type, TensorRef(dtype, shape), cell, keys,
                 3 if zarr3 else 2, compressor, sharding)


def _place(tree: dict[Any, Any], keys: list[tuple[Any, int]], value: Any) -> None:
    node = tree
    for key, kind in keys[:-1]:
        slot = (kind, int(key) if kind == 1 else str(key))
        node = node.setdefault(slot, {})
    key, kind = keys[-1]
    node[(kind, int(key) if kind == 1 else str(key))] = value


def _lists(node: Any) -> Any:
    """Nested ``{(kind, key): value}`` dicts as the tree: sequence levels become lists."""
    if not isinstance(node, dict) or not node or not all(isinstance(k, tuple) for k in node):
        return node
    if all(kind == 1 for kind, _ in node):
        return [_lists(node[k]) for k in sorted(node, key=lambda k: k[1])]
    return {key: _lists(value) for (_kind, key), value in node.items()}


@dataclass(frozen=True)
class Step:
    """One step directory of an Orbax checkpoint root."""

    step: int
    path: Path
    complete: bool


def is_item(loc: Location) -> bool:
    """A PyTree item directory: its tree metadata or its OCDBT manifest is there."""
    return loc.child(METADATA).is_file() or loc.child(ocdbt.MANIFEST).is_file()


def is_step(loc: Location) -> bool:
    """A step directory: an item itself, or Orbax's step metadata or an item inside."""
    if not loc.is_dir():
        return False
    if loc.child(CHECKPOINT_METADATA).is_file() or is_item(loc):
        return True
    return any(e.is_dir and is_item(loc.child(e.name)) for e in loc.list())


def list_steps(root: str | Path) -> tuple[Step, ...]:
    """The step directories (``7/``, ``ckpt_7/``) of an Orbax checkpoint root, by step.

    ``complete`` is False for a step Orbax never finished: a ``.orbax-checkpoint-tmp``
    directory, or one without ``_CHECKPOINT_METADATA``/``commit_success.txt``.
    """
    loc = locate(root)
    steps = []
    for entry in loc.list() if loc.is_dir() else []:
        bare = entry.name.split(TMP_MARK)[0]
        match = STEP_NAME.fullmatch(bare)
        if not entry.is_dir or not match or not is_step(loc.child(entry.name)):
            continue
        child = loc.child(entry.name)
        done = TMP_MARK not in entry.name and (child.child(CHECKPOINT_METADATA).is_file()
                                               or child.child("commit_success.txt").is_file())
        steps.append(Step(int(match.group(1)), Path(root) / entry.name, done))
    return tuple(sorted(steps, key=lambda s: (s.step, s.path.name)))
