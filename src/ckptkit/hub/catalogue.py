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
from urllib.parse import urlsplit

from ckptkit.errors import CatalogueError, NotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SourceType = Literal["hf", "tfhub", "kaggle", "url", "local"]
FileKind = Literal["file", "savedmodel"]
SOURCE_TYPES: tuple[SourceType, ...] = ("hf", "tfhub", "kaggle", "url", "local")
_REF_KEY = {"tfhub": "handle", "kaggle": "handle", "url": "url", "local": "path"}
#: The Hub a ``type = "hf"`` source names (its ``ref`` is the file's URL there, which mirror
#: rules and ``ckpt mirror export`` see; fetching asks ``HF_ENDPOINT`` instead when set).
HF_HUB = "https://huggingface.co"
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KAGGLE_HANDLE = re.compile(r"[^/\s]+/[^/\s]+/[^/\s]+/[^/\s]+/[1-9][0-9]*", re.ASCII)


@dataclass(frozen=True)
class SourceSpec:
    """One place a file can come from."""

    type: SourceType
    ref: str  # the TF Hub or Kaggle handle, the URL, or the local path (hf: the resolve URL)
    #: hf sources: the repo (ORG/NAME), its revision, the file in it and the kind of repo
    repo: str | None = None
    revision: str = "main"
    filename: str | None = None
    repo_type: Literal["model", "dataset"] = "model"

    def __str__(self) -> str:
        return f"{self.type}:{self.ref}"


def hf_source(repo: str, filename: str, revision: str = "main",
              repo_type: Literal["model", "dataset"] = "model") -> SourceSpec:
    """A ``type = "hf"`` source; its ``ref`` is the file's ``resolve`` URL on the Hub."""
    from urllib.parse import quote

    prefix = "datasets/" if repo_type == "dataset" else ""
    ref = f"{HF_HUB}/{prefix}{repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"
    return SourceSpec("hf", ref, repo, revision, filename, repo_type)


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
        CatalogueError: a catalogue file is not valid TOML or breaks the schema (exit 2); the
            one-line message names the file, the entry and the field.
        NotFoundError: an ``extra`` file does not exist.
    """
    models: dict[str, ModelSpec] = {}
    files: dict[str, FileSpec] = {}
    for path in (builtin_path(), *extra):
        origin = "built-in" if path == builtin_path() else str(path)
        data = _read(path)
        for file_id, entry in _table(data, "files", origin).items():
            files[file_id] = _file(file_id, entry, origin)
        for name, entry in _table(data, "models", origin).items():
            models[name] = _model(name, entry, origin)
    catalogue = Catalogue(models, files)
    _check_references(catalogue)
    return catalogue


#: Longest file id, model name or alias: ids become cache paths, and every name is printed.
MAX_NAME = 200
#: Longest part of a file id between slashes, in UTF-8 bytes: with the cache's own suffixes
#: (``.part.json``, ``.lock``, temporary names) it must stay below the 255-byte file name limit.
MAX_PART_BYTES = 200
_MAX_REF = 4096


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NotFoundError(f"catalogue file {path} does not exist",
                            hint="Check the --catalog path", path=str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"{path}: not valid TOML ({' '.join(str(exc).split())})",
                             hint="Fix the file; see docs/catalogue.md for the schema",
                             path=str(path)) from exc
    except RecursionError as exc:
        raise CatalogueError(f"{path}: not valid TOML (arrays or tables nested too deeply)",
                             hint="Fix the file; see docs/catalogue.md for the schema",
                             path=str(path)) from exc
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot be read ({exc.strerror or exc})",
                             hint="Check the file's permissions", path=str(path)) from exc
    schema = data.get("schema", 1)
    if type(schema) is not int or schema != 1:
        raise CatalogueError(f"{path}: schema: {_show(schema)} is not supported",
                             hint="This ckptkit reads schema = 1", path=str(path))
    return data


def _bad(origin: str, where: str, problem: str) -> CatalogueError:
    return CatalogueError(f"{origin}: {where}: {problem}",
                          hint="See docs/catalogue.md for the schema", path=origin)


def _show(value: Any) -> str:
    """``value`` as it appears in an error: repr (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}… ({len(text)} characters)"


def _table(data: dict[str, Any], key: str, origin: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(origin, key, f"must be a table of entries ([{key}.\"<name>\"]), "
                                f"not {_show(value)}")
    return value


def _name_problem(name: Any, what: str) -> str | None:
    """Why ``name`` cannot be a model name or alias (None: it can)."""
    if not isinstance(name, str) or not name:
        return f"{what} {_show(name)} must be a non-empty string"
    if len(name) > MAX_NAME:
        return f"{what} is {len(name)} characters long (at most {MAX_NAME})"
    if not name.isprintable():
        return f"{what} {_show(name)} contains control characters"
    return None


def _path_problem(rel: Any, what: str) -> str | None:
    """Why ``rel`` cannot be a path inside a folder (a file id, dest or alias)."""
    problem = _name_problem(rel, what)
    if problem is not None:
        return problem
    if not _is_inside(rel):
        return (f"{what} {_show(rel)} must be a relative path without '..', '~', backslashes "
                "or empty parts (e.g. \"team/model.pt\")")
    long = next((part for part in rel.split("/") if len(part.encode()) > MAX_PART_BYTES), None)
    if long is not None:
        return f"{what} has a part of {len(long.encode())} bytes (at most {MAX_PART_BYTES})"
    return None


def _strings(entry: dict[str, Any], key: str, where: str, origin: str) -> tuple[str, ...]:
    """``entry[key]``: a list of strings (absent: empty)."""
    value = entry.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(origin, f"{where}: {key}", f"must be a list of strings, not {_show(value)}")
    return tuple(value)


def _text(entry: dict[str, Any], key: str, where: str, origin: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise _bad(origin, f"{where}: {key}", f"must be a string, not {_show(value)}")
    return value


def _file(file_id: str, entry: Any, origin: str) -> FileSpec:
    where = f"files.{_show(file_id)}"
    if not isinstance(entry, dict):
        raise _bad(origin, where, f"must be a table, not {_show(entry)}")
    problem = _path_problem(file_id, "the id")
    if problem is not None:
        raise _bad(origin, where, f"{problem} (the id is a cache path)")
    kind = entry.get("kind", "file")
    if kind not in ("file", "savedmodel"):
        raise _bad(origin, f"{where}: kind", f"{_show(kind)} is not 'file' or 'savedmodel'")
    raw_sources = entry.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise _bad(origin, f"{where}: sources", "needs at least one source: a list of tables "
                   f"like {{ type = \"url\", url = \"https://…\" }}, not {_show(raw_sources)}")
    sources = tuple(_source(s, origin, f"{where}: sources[{i}]")
                    for i, s in enumerate(raw_sources))
    size = entry.get("size")
    if size is not None and (type(size) is not int or size < 0):
        raise _bad(origin, f"{where}: size", f"{_show(size)} is not a byte count")
    sha256 = entry.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.match(sha256)):
        raise _bad(origin, f"{where}: sha256", f"{_show(sha256)} is not 64 lowercase hex digits")
    dest = entry.get("dest") or file_id.rsplit("/", 1)[-1]
    problem = _path_problem(dest, "dest")
    if problem is not None:
        raise _bad(origin, f"{where}: dest", f"{problem} (it is placed inside --dest)")
    aliases = _strings(entry, "aliases", where, origin)
    for alias in aliases:
        problem = _path_problem(alias, "alias")
        if problem is not None:
            raise _bad(origin, f"{where}: aliases", f"{problem} (it is looked for inside "
                                                     "--local-dir folders)")
    return FileSpec(file_id, kind, sources, dest, size, sha256, aliases, origin)


def _is_inside(rel: str) -> bool:
    """A relative POSIX path that cannot leave the folder it is joined to."""
    parts = rel.split("/")
    return (bool(rel) and not rel.startswith(("/", "~")) and "\\" not in rel
            and ":" not in parts[0] and all(p not in ("", ".", "..") for p in parts))


def _source(entry: Any, origin: str, where: str) -> SourceSpec:
    if not isinstance(entry, dict) or entry.get("type") not in SOURCE_TYPES:
        raise _bad(origin, where, f"{_show(entry)} needs type = one of {list(SOURCE_TYPES)}")
    kind = entry["type"]
    if kind == "hf":
        return _hf_source(entry, origin, where)
    key = _REF_KEY[kind]
    ref = entry.get(key)
    if not isinstance(ref, str) or not ref:
        raise _bad(origin, f"{where}: {key}", f"a {kind} source needs {key} = \"...\", "
                                              f"not {_show(ref)}")
    if len(ref) > _MAX_REF or not ref.isprintable():
        raise _bad(origin, f"{where}: {key}", f"{_show(ref)} is too long or contains control "
                                              "characters")
    if kind == "kaggle" and not _KAGGLE_HANDLE.fullmatch(ref):
        raise _bad(origin, f"{where}: {key}", f"Kaggle handle {_show(ref)} must be owner/model/"
                                              "framework/variation/version (versions are pinned)")
    if kind in ("tfhub", "url"):
        problem = _url_problem(ref)
        if problem is not None:
            raise _bad(origin, f"{where}: {key}", f"{_show(ref)} {problem}")
    return SourceSpec(kind, ref)


def _hf_source(entry: dict[str, Any], origin: str, where: str) -> SourceSpec:
    """``{type = "hf", repo = "ORG/NAME", filename = "path/in/repo"[, revision = "main"]
    [, repo_type = "model"|"dataset"]}``."""
    repo, filename = entry.get("repo"), entry.get("filename")
    revision, repo_type = entry.get("revision", "main"), entry.get("repo_type", "model")
    if not isinstance(repo, str) or not _HF_REPO.fullmatch(repo) or len(repo) > 200:
        raise _bad(origin, f"{where}: repo", f"an hf source needs repo = \"ORG/NAME\", not "
                                             f"{_show(repo)}")
    if not isinstance(filename, str) or not _is_inside(filename) or len(filename) > _MAX_REF \
            or not filename.isprintable():
        raise _bad(origin, f"{where}: filename", f"an hf source needs filename = a path in the "
                                                 f"repo (no '..', no leading '/'), not "
                                                 f"{_show(filename)}")
    if not isinstance(revision, str) or not revision or len(revision) > 200 \
            or not revision.isprintable() or any(c.isspace() for c in revision):
        raise _bad(origin, f"{where}: revision", f"{_show(revision)} is not a branch, tag or "
                                                 "commit id")
    if repo_type not in ("model", "dataset"):
        raise _bad(origin, f"{where}: repo_type", f"{_show(repo_type)} is not 'model' or "
                                                  "'dataset'")
    return hf_source(repo, filename, revision, repo_type)


def _url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL a download can start from (None: it is)."""
    if not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
        return "must be an http(s) URL without spaces"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if not parts.hostname:
        return "has no host"
    return None


def _model(name: str, entry: Any, origin: str) -> ModelSpec:
    where = f"models.{_show(name)}"
    problem = _name_problem(name, "the name")
    if problem is not None:
        raise _bad(origin, where, problem)
    if not isinstance(entry, dict):
        raise _bad(origin, where, f"must be a table, not {_show(entry)}")
    files = _strings(entry, "files", where, origin)
    if not files:
        raise _bad(origin, f"{where}: files", "needs files = [\"<file id>\", ...]")
    aliases = _strings(entry, "aliases", where, origin)
    for alias in aliases:
        problem = _name_problem(alias, "alias")
        if problem is not None:
            raise _bad(origin, f"{where}: aliases", problem)
    recipe = entry.get("recipe")
    if recipe is not None and _name_problem(recipe, "recipe") is not None:
        raise _bad(origin, f"{where}: recipe", f"must be a recipe name, not {_show(recipe)}")
    return ModelSpec(name, files, _text(entry, "description", where, origin),
                     _text(entry, "homepage", where, origin),
                     _text(entry, "license", where, origin), aliases, recipe, origin)


def _check_references(catalogue: Catalogue) -> None:
    for model in catalogue.models.values():
        for file_id in model.files:
            if file_id not in catalogue.files:
                raise _bad(model.origin, f"models.{_show(model.name)}: files",
                           f"names file {_show(file_id)}, which no catalogue defines")
    # A file id that is a folder of another cannot be cached: one path, a file and a folder.
    for file_id, spec in catalogue.files.items():
        parts = file_id.split("/")
        folder = next((f for f in ("/".join(parts[:n]) for n in range(1, len(parts)))
                       if f in catalogue.files), None)
        if folder is not None:
            raise _bad(spec.origin, f"files.{_show(file_id)}",
                       f"the id is inside the id {_show(folder)}, which is a file")
