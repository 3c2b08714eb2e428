"""``verify`` for Orbax checkpoints: is every array's data there, whole?

Checked without reading array data (TensorStore is not needed):

- each item's ``_METADATA`` is there and parses; a ``.orbax-checkpoint-tmp`` directory is a
  save that never finished;
- OCDBT: the manifest and every B+tree node decode and pass their CRC-32C; every data file a
  node or value points into exists and is long enough;
- every array has its zarr metadata and every chunk (Orbax 0.12 stores all chunks, also those
  equal to the fill value: ``store_array_data_equal_to_fill_value``);
- one directory per array: each chunk file is there, and a zstd chunk's frames end exactly at
  the end of its file (block headers only), so a truncated chunk is found.

Each problem names its file; problems in one file are reported once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptkit.errors import CkptkitError, IntegrityError
from ckptkit.formats import ocdbt, zstd
from ckptkit.formats.orbax_layout import (METADATA, STRINGS, TMP_MARK, describe_array, is_item,
                                          list_steps, read_databases, read_json)
from ckptkit.model import Problem
from ckptkit.storage.location import Location, locate

_ARRAY_TYPES = {"jax.Array", "np.ndarray", "scalar"}


def _kind(exc: CkptkitError) -> str:
    if isinstance(exc, ocdbt.DataFileError):
        return exc.kind
    return "missing-file" if exc.message.endswith(": missing") else "corrupt"


def _problem(exc: CkptkitError, default: str) -> Problem:
    return Problem(exc.path or default, _kind(exc), exc.message)


def problems(path: Path) -> list[Problem]:
    """Every problem found in the step or item directory ``path`` (empty: complete)."""
    loc = locate(path)
    if not loc.is_dir():
        return [Problem(str(path), "missing-file", f"{path}: no such directory")]
    found: list[Problem] = []
    if TMP_MARK in loc.name:
        found.append(Problem(str(path), "incomplete", f"{path}: an Orbax temporary directory "
                             "(the save never finished)"))
    if is_item(loc):
        items = [loc]
    else:
        items = [loc.child(e.name) for e in loc.list() if e.is_dir and (
            is_item(loc.child(e.name)) or any(
                c.name.startswith("ocdbt.process_") for c in loc.child(e.name).list()))]
    if not items:
        if list_steps(path):
            from ckptkit.errors import UsageError

            raise UsageError(f"{path}: an Orbax checkpoint root, not one checkpoint",
                             hint="Verify one step directory")
        if not any(loc.child(e.name).child("metadata").is_file() for e in loc.list()
                   if e.is_dir):
            found.append(Problem(str(loc.child(METADATA)), "missing-metadata",
                                 f"{loc.child(METADATA)}: missing (the tree of the checkpoint)"))
    for item in items:
        found.extend(_item(item))
    return found


def _item(root: Location) -> list[Problem]:
    found: list[Problem] = []
    meta_file = root.child(METADATA)
    meta: Any = None
    if not meta_file.is_file():
        found.append(Problem(str(meta_file), "missing-metadata",
                             f"{meta_file}: missing (the tree of an Orbax item)"))
    else:
        try:
            meta = read_json(meta_file, METADATA)
        except CkptkitError as exc:
            found.append(_problem(exc, str(meta_file)))
    use_ocdbt = (meta.get("use_ocdbt") if isinstance(meta, dict) else None)
    if use_ocdbt is None:
        use_ocdbt = root.child(ocdbt.MANIFEST).exists() or any(
            e.name.startswith("ocdbt.process_") for e in root.list())
    database = None
    if use_ocdbt:
        node_problems: list[IntegrityError] = []
        try:
            if root.child(ocdbt.MANIFEST).exists() or root.child("d").is_dir():
                database = ocdbt.read_database(root, node_problems)
            else:
                database = read_databases(root)
        except CkptkitError as exc:
            found.append(_problem(exc, str(root.child(ocdbt.MANIFEST))))
        found.extend(_problem(exc, str(root)) for exc in node_problems)
        if database is not None:
            found.extend(_value_files(root, database))
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
        if isinstance(meta, dict):
            found.append(Problem(str(meta_file), "corrupt", f"{meta_file}: no tree_metadata"))
        return found
    if use_ocdbt and (database is None or node_problems):
        return found  # arrays under a lost node would all be reported again
    zarr3 = bool(meta.get("use_zarr3", False))
    store_fill = bool(meta.get("store_array_data_equal_to_fill_value", False))
    strings_needed = False
    for entry in meta["tree_metadata"].values():
        try:
            keys = [str(k["key"]) for k in entry["key_metadata"]]
            value_type = entry["value_metadata"]["value_type"]
        except (KeyError, TypeError) as exc:
            found.append(Problem(str(meta_file), "corrupt",
                                 f"{meta_file}: malformed tree entry ({exc!r})"))
            continue
        strings_needed |= value_type == "string"
        if value_type not in _ARRAY_TYPES:
            continue
        param = ".".join(keys)
        try:
            array = describe_array(root, database, tuple(keys), param, value_type, zarr3, None)
        except CkptkitError as exc:
            found.append(Problem(exc.path or str(root), "missing-array"
                                 if "no " in exc.message or "missing" in exc.message
                                 else "corrupt", exc.message))
            continue
        if database is not None:
            missing = [k for k in array.chunk_keys if k.encode() not in database.entries]
            if missing and store_fill:
                found.append(Problem(str(root), "missing-chunk",
                                     f"{root}: array {param!r} lacks {len(missing)} of its "
                                     f"{array.chunk_count} chunks (first: {missing[0]})"))
        else:
            found.extend(_chunk_files(root, array.param, array.chunk_keys, array.compressor,
                                      store_fill))
    if strings_needed and not root.child(STRINGS).is_file():
        found.append(Problem(str(root.child(STRINGS)), "missing-file",
                             f"{root.child(STRINGS)}: missing (the string leaves of the tree)"))
    return found


def _value_files(root: Location, database: ocdbt.Database) -> list[Problem]:
    """One problem per data file that out-of-line values point into but that is missing or
    too short, naming the keys (arrays) that lose data."""
    ends: dict[str, int] = {}
    users: dict[str, set[str]] = {}
    for key, value in database.entries.items():
        if isinstance(value, ocdbt.ValueRef):
            ends[value.file] = max(ends.get(value.file, 0), value.offset + value.length)
            users.setdefault(value.file, set()).add(key.decode("utf-8", "replace")
                                                    .split("/")[0])
    found = []
    for file, end in sorted(ends.items()):
        try:
            ocdbt.check_extent(root, file, end)
        except ocdbt.DataFileError as exc:
            names = sorted(users[file])
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                            else "")
            found.append(Problem(exc.path or file, exc.kind,
                                 f"{exc.message}; it holds data of {shown}"))
    return found


def _chunk_files(root: Location, param: str, keys: tuple[str, ...], compressor: str | None,
                 store_fill: bool) -> list[Problem]:
    found = []
    missing = []
    for key in keys:
        where = root.child(key)
        if not where.is_file():
            missing.append(key)
            continue
        if compressor == "zstd":
            try:
                zstd.frames_end(where.read, where.size())
            except zstd.ZstdError as exc:
                found.append(Problem(str(where), "truncated" if "truncated" in exc.message
                                     or "cut off" in exc.message else "corrupt",
                                     f"{where}: chunk of array {param!r}: {exc.message}"))
    if missing and store_fill:
        found.append(Problem(str(root.child(missing[0])), "missing-chunk",
                             f"{root.child(param)}: array {param!r} lacks {len(missing)} of "
                             f"its {len(keys)} chunk files (first: {missing[0]})"))
    return found
