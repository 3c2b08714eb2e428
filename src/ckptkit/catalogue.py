"""The model catalogue: named models, the files they need, and where each file comes from.

The built-in catalogue is data (``data/catalogue.toml``).  Users add or override entries with a
``catalogue.toml`` in the config directory and with ``--catalog FILE``; later files win, entry
by entry.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ckptkit.errors import FormatError, NotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SourceType = Literal["tfhub", "kaggle", "url", "local"]
FileKind = Literal["file", "savedmodel"]
SOURCE_TYPES: tuple[SourceType, ...] = ("tfhub", "kaggle", "url", "local")
_REF_KEY = {"tfhub": "handle", "kaggle": "handle", "url": "url", "local": "path"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KAGGLE_HANDLE = re.compile(r"^[^/\s]+/[^/\s]+/[^/\s]+/[^/\s]+/\d+$")


@dataclass(frozen=True)
class SourceSpec:
    """One place a file can come from."""

    type: SourceType
    ref: str  # the TF Hub or Kaggle handle, the URL, or the local path

    def __str__(self) -> str:
        return f"{self.type}:{self.ref}"


@dataclass(frozen=True)
class FileSpec:
    """One artifact: a file or a SavedModel directory, with its ordered sources."""

    id: str
    kind: FileKind
    sources: tuple[SourceSpec, ...]
    dest: str
    size: int | None = None
    sha256: str | None = None
    aliases: tuple[str, ...] = ()
    origin: str = "built-in"


@dataclass(frozen=True)
class ModelSpec:
    """A name users fetch: one or more files."""

    name: str
    files: tuple[str, ...]
    description: str = ""
    homepage: str = ""
    license: str = ""
    aliases: tuple[str, ...] = ()
    recipe: str | None = None
    origin: str = "built-in"


@dataclass(frozen=True)
class Catalogue:
    """Every known model and file, after merging the built-in and user catalogues."""

    models: dict[str, ModelSpec] = field(default_factory=dict)
    files: dict[str, FileSpec] = field(default_factory=dict)

    def model(self, name: str) -> ModelSpec:
        """The model called ``name`` (or having ``name`` as an alias).

        Raises:
            NotFoundError: no such model; the message suggests close names.
        """
        if name in self.models:
            return self.models[name]
        for model in self.models.values():
            if name in model.aliases:
                return model
        names = sorted(self.models) + sorted(a for m in self.models.values() for a in m.aliases)
        close = difflib.get_close_matches(name, names, n=3)
        hint = (f"Did you mean {', '.join(close)}?" if close else "Run `ckpt list` to see them")
        raise NotFoundError(f"no model named {name!r} in the catalogue", hint=hint)

    def files_of(self, name: str) -> tuple[FileSpec, ...]:
        return tuple(self.files[f] for f in self.model(name).files)

    def users_of(self, file_id: str) -> tuple[str, ...]:
        """Names of the models that need ``file_id`` (shared bundle files have several)."""
        return tuple(m.name for m in self.models.values() if file_id in m.files)


def builtin_path() -> Path:
    return Path(str(resources.files("ckptkit") / "data" / "catalogue.toml"))


def load(extra: list[Path] | tuple[Path, ...] = ()) -> Catalogue:
    """The built-in catalogue merged with each of ``extra`` in order (later entries win).

    Raises:
        FormatError: a catalogue file is not valid TOML or breaks the schema; the message names
            the file and the entry.
        NotFoundError: an ``extra`` file does not exist.
    """
    models: dict[str, ModelSpec] = {}
    files: dict[str, FileSpec] = {}
    for path in (builtin_path(), *extra):
        origin = "built-in" if path == builtin_path() else str(path)
        data = _read(path)
        for file_id, entry in (data.get("files") or {}).items():
            files[file_id] = _file(file_id, entry, origin)
        for name, entry in (data.get("models") or {}).items():
            models[name] = _model(name, entry, origin)
    catalogue = Catalogue(models, files)
    _check_references(catalogue)
    return catalogue


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NotFoundError(f"catalogue file {path} does not exist",
                            hint="Check the --catalog path", path=str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid TOML ({exc})",
                          hint="Fix the file; see docs/catalogue.md for the schema",
                          path=str(path)) from exc
    if data.get("schema", 1) != 1:
        raise FormatError(f"{path}: catalogue schema {data.get('schema')!r} is not supported",
                          hint="This ckptkit reads schema 1", path=str(path))
    return data


def _bad(origin: str, where: str, problem: str) -> FormatError:
    return FormatError(f"{origin}: {where}: {problem}",
                       hint="See docs/catalogue.md for the schema", path=origin)


def _file(file_id: str, entry: Any, origin: str) -> FileSpec:
    where = f"files.{file_id!r}"
    if not isinstance(entry, dict):
        raise _bad(origin, where, "must be a table")
    if not _is_inside(file_id):
        raise _bad(origin, where, "the id is a cache path: it must be relative, without '..', "
                                  "'~', backslashes or empty parts (e.g. \"team/model.pt\")")
    kind = entry.get("kind", "file")
    if kind not in ("file", "savedmodel"):
        raise _bad(origin, where, f"kind {kind!r} is not 'file' or 'savedmodel'")
    sources = tuple(_source(s, origin, where) for s in entry.get("sources") or [])
    if not sources:
        raise _bad(origin, where, "needs at least one source")
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise _bad(origin, where, f"size {size!r} is not a byte count")
    sha256 = entry.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.match(sha256)):
        raise _bad(origin, where, f"sha256 {sha256!r} is not 64 lowercase hex digits")
    dest = str(entry.get("dest") or file_id.rsplit("/", 1)[-1])
    if not _is_inside(dest):
        raise _bad(origin, where, f"dest {dest!r} must be a relative path inside --dest")
    return FileSpec(file_id, kind, sources, dest, size, sha256,
                    tuple(str(a) for a in entry.get("aliases") or ()), origin)


def _is_inside(rel: str) -> bool:
    """A relative POSIX path that cannot leave the folder it is joined to."""
    parts = rel.split("/")
    return (bool(rel) and not rel.startswith(("/", "~")) and "\\" not in rel
            and ":" not in parts[0] and all(p not in ("", ".", "..") for p in parts))


def _source(entry: Any, origin: str, where: str) -> SourceSpec:
    if not isinstance(entry, dict) or entry.get("type") not in SOURCE_TYPES:
        raise _bad(origin, where, f"source {entry!r} needs type = one of {list(SOURCE_TYPES)}")
    kind = entry["type"]
    ref = entry.get(_REF_KEY[kind])
    if not isinstance(ref, str) or not ref:
        raise _bad(origin, where, f"{kind} source needs {_REF_KEY[kind]} = \"...\"")
    if kind == "kaggle" and not _KAGGLE_HANDLE.match(ref):
        raise _bad(origin, where, f"Kaggle handle {ref!r} must be owner/model/framework/"
                                  "variation/version (versions are pinned)")
    if kind in ("tfhub", "url") and not ref.startswith(("http://", "https://")):
        raise _bad(origin, where, f"{kind} source {ref!r} must be an http(s) URL")
    return SourceSpec(kind, ref)


def _model(name: str, entry: Any, origin: str) -> ModelSpec:
    where = f"models.{name}"
    if not isinstance(entry, dict) or not entry.get("files"):
        raise _bad(origin, where, "needs files = [\"<file id>\", ...]")
    return ModelSpec(name, tuple(entry["files"]), str(entry.get("description", "")),
                     str(entry.get("homepage", "")), str(entry.get("license", "")),
                     tuple(entry.get("aliases") or ()), entry.get("recipe"), origin)


def _check_references(catalogue: Catalogue) -> None:
    for model in catalogue.models.values():
        for file_id in model.files:
            if file_id not in catalogue.files:
                raise _bad(model.origin, f"models.{model.name}",
                           f"names file {file_id!r}, which no catalogue defines")
