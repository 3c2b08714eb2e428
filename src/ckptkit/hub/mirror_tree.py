"""A static mirror tree: cached files laid out at the URLs their sources name, and the
``--mirror`` rules that send fetches there, for machines without internet.

``ckpt mirror export DIR`` writes, for every remote source of every exported file, what that
source delivers at the path its URL names, in a folder per host::

    DIR/storage.googleapis.com/gresearch/musiq/spaq_ckpt.npz        a URL: the file
    DIR/tfhub.dev/google/musiq/spaq/1                               a TF Hub handle: the .tar.gz
    DIR/www.kaggle.com/api/v1/models/google/musiq/tensorFlow2/spaq/1/download   Kaggle: the same
    DIR/ckpt-mirror.json                                            rules and files (the manifest)

and one rule per host, ``https://tfhub.dev=<BASE>/tfhub.dev``, BASE being wherever the tree is
served from: ``file:///path/to/DIR`` or the URL a web server gives it.  Any static file server
will do: TF Hub's ``?tf-hub-format=compressed`` query is ignored as static servers ignore
queries, and Kaggle versions are fetched by their REST download URL (a GET), not by kagglesdk's
RPCs (:mod:`ckptkit.hub.sources.kaggle`).  ``local`` sources are not exported: they are paths.

Directories (SavedModels) are packed once, reproducibly, and the archive is hardlinked at every
path that serves it; cached files are hardlinked where the disk allows, else copied.  Each file
appears under its final name only when complete (a temporary file, then a rename), and files
already in place are left alone, so exporting again adds what is new.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckptkit.hub.catalogue import Catalogue, FileSpec, SourceSpec
from ckptkit.config import Settings
from ckptkit.errors import FormatError, NotFoundError, UsageError
from ckptkit.storage.atomic import staged, temp_path, write_bytes

MANIFEST = "ckpt-mirror.json"
SCHEMA = 1


@dataclass(frozen=True)
class ExportedFile:
    """One catalogue file and the tree paths that serve it (POSIX, relative to the root)."""

    id: str
    kind: str
    cached: Path
    sha256: str
    size: int
    paths: tuple[str, ...]


@dataclass(frozen=True)
class ExportPlan:
    """What :meth:`execute` writes; ``skipped`` says which sources cannot be exported, why."""

    root: Path
    files: tuple[ExportedFile, ...]
    rules: dict[str, str]  # FROM (scheme://host) -> the host's folder in the tree
    skipped: tuple[tuple[str, str], ...] = ()
    previous: dict[str, Any] = field(default_factory=dict)  # the manifest found, by file id

    def execute(self) -> ExportResult:
        """Write the files, then the manifest; returns what was written and what was there."""
        self.root.mkdir(parents=True, exist_ok=True)
        written = kept = 0
        entries = dict(self.previous)
        for exported in self.files:
            old = self.previous.get(exported.id, {})
            if old.get("sha256") == exported.sha256 and set(exported.paths) <= set(
                    old.get("paths", ())) and all(_holds(self.root / rel, old.get("served_bytes"))
                                                   for rel in exported.paths):
                kept += 1
                entries[exported.id] = old
                continue
            served = self._place(exported)
            written += 1
            entries[exported.id] = {"kind": exported.kind, "sha256": exported.sha256,
                                    "size": exported.size, "served_bytes": served,
                                    "paths": list(exported.paths)}
        manifest = {"schema": SCHEMA, "rules": dict(sorted(self.rules.items())),
                    "files": dict(sorted(entries.items()))}
        write_bytes(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())
        return ExportResult(self.root, self.files, self.rules, written, kept, self.skipped)

    def _place(self, exported: ExportedFile) -> int:
        """Put ``exported`` at each of its paths; returns the bytes one path serves."""
        packed = None
        source = exported.cached
        if source.is_dir():
            packed = temp_path(self.root / "export.tar.gz")  # scratch, never a final name
            pack(source, packed)
            source = packed
        try:
            for rel in exported.paths:
                with staged(self.root / rel, make_parents=True) as tmp:
                    _link_or_copy(source, tmp)
            return source.stat().st_size
        finally:
            if packed is not None:
                packed.unlink(missing_ok=True)


@dataclass(frozen=True)
class ExportResult:
    """What an export did: files in the tree, written now or left as they were."""

    root: Path
    files: tuple[ExportedFile, ...]
    rules: dict[str, str]
    written: int
    kept: int
    skipped: tuple[tuple[str, str], ...]

    def to_dict(self, base: str) -> dict[str, Any]:
        return {"root": str(self.root), "base": base, "mirror": mirror_value(self.rules, base),
                "files": [{"name": f.id, "kind": f.kind, "sha256": f.sha256, "bytes": f.size,
                           "paths": list(f.paths)} for f in self.files],
                "written": self.written, "already_there": self.kept,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


def plan_export(root: Path, names: list[str] | tuple[str, ...], settings: Settings, *,
                catalogue: Catalogue | None = None) -> ExportPlan:
    """Decide what exporting ``names`` (catalogue names; none: every cached catalogue file)
    into the tree ``root`` writes.  Reads the catalogue, the cache and the tree's manifest.

    Raises:
        NotFoundError: a name that is not in the catalogue, or whose files are not cached
            (the message says what to fetch); nothing cached at all.
        UsageError: ``root`` is a non-empty directory that is not a mirror tree; two files
            would be served at one path.
        FormatError: the tree's manifest is damaged.
    """
    from ckptkit.hub import catalogue as catalogue_mod
    from ckptkit.hub.fetch import plan_fetch
    from ckptkit.hub.resolver import cached_files, lookup

    cat = catalogue or catalogue_mod.load(settings.all_catalogs())
    previous = _previous(root)
    chosen: dict[str, tuple[FileSpec, Path]] = {}
    if names:
        for name in names:
            named = lookup(name, cat)
            if named is None:
                cat.model(name)  # raises NotFoundError, naming close names
                raise NotFoundError(f"no model or file named {name!r} in the catalogue",
                                    hint="Run `ckpt list` to see them")
            for resolved in cached_files(name, named, settings, cat):
                chosen[str(resolved.file_id)] = (cat.files[str(resolved.file_id)],
                                                 resolved.path)
    else:
        plan = plan_fetch(sorted(cat.models), replace(settings, offline=False), catalogue=cat)
        chosen = {f.spec.id: (f.spec, Path(f.cached.path)) for f in plan.files
                  if f.cached is not None}
        if not chosen:
            raise NotFoundError(f"nothing is cached in {settings.cache_dir} to export",
                                hint="Fetch the models first: ckpt fetch NAME...")
    cache = _entries(settings)
    files: list[ExportedFile] = []
    rules: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    # Paths other files of the tree already serve, from its manifest.
    owners = {rel: file_id for file_id, entry in previous.get("files", {}).items()
              if file_id not in chosen for rel in entry.get("paths", ())}
    for file_id, (spec, cached) in chosen.items():
        paths, why_not = [], []
        for source in spec.sources:
            where = _place_of(source, spec)
            if isinstance(where, str):
                if source.type != "local":  # local paths are never exported: no news
                    why_not.append(f"{source}: {where}")
                continue
            origin, rel = where
            other = owners.setdefault(rel, file_id)
            if other != file_id:
                raise UsageError(f"{file_id} and {other} would both be served at {rel}",
                                 hint="Export them to separate trees")
            rules[origin] = rel.split("/", 1)[0]
            paths.append(rel)
        skipped += [(file_id, why) for why in why_not]
        if paths:
            sha256, size = cache[file_id]
            files.append(ExportedFile(file_id, spec.kind, cached, sha256, size,
                                      tuple(dict.fromkeys(paths))))
        elif not why_not:
            skipped.append((file_id, "it has no remote source (copy it over and use "
                                     "--local-dir)"))
    return ExportPlan(root, tuple(files), {**previous.get("rules", {}), **rules}, tuple(skipped),
                      previous.get("files", {}))


def mirror_value(rules: dict[str, str], base: str) -> str:
    """The ``--mirror`` value sending each rule's origin to its folder under ``base``."""
    base = base.rstrip("/")
    return ",".join(f"{origin}={base}/{urllib.parse.quote(folder)}"
                    for origin, folder in sorted(rules.items()))


def base_url(root: Path) -> str:
    """The ``file:`` URL of the tree ``root``, for fetching from it where it lies."""
    return root.resolve().as_uri()


def read_rules(root: Path) -> dict[str, str]:
    """The rules of the tree at ``root`` (origin -> folder), from its manifest.

    Raises:
        NotFoundError: ``root`` has no manifest (it is not a tree ``ckpt mirror export`` wrote).
        FormatError: the manifest is damaged.
    """
    manifest = _manifest(root)
    if manifest is None:
        raise NotFoundError(f"{root} is not a mirror tree (no {MANIFEST} in it)",
                            hint=f"Make one with: ckpt mirror export {root} NAME...",
                            path=str(root))
    return dict(manifest["rules"])


def pack(tree: Path, target: Path) -> None:
    """Write ``tree`` as a reproducible ``.tar.gz`` (names ``./<path>`` as TF Hub's archives
    have them, sorted, no owners or times), so exporting twice gives the same bytes."""
    files = sorted((p for p in tree.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(tree).as_posix())
    with open(target, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo("./" + path.relative_to(tree).as_posix())
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as fh:
                tar.addfile(info, fh)


def _place_of(source: SourceSpec, spec: FileSpec) -> tuple[str, str] | str:
    """``(FROM, path in the tree)`` of what ``source`` delivers, or why it cannot be exported."""
    from ckptkit.hub.sources import kaggle

    if source.type == "local":
        return "a local path; copy it over and use --local-dir"
    wants_dir = source.type in ("tfhub", "kaggle")
    if wants_dir != (spec.kind == "savedmodel"):
        return f"delivers a {'directory' if wants_dir else 'file'}, the catalogue says {spec.kind}"
    url = kaggle.archive_url(source.ref) if source.type == "kaggle" else source.ref
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    if parts.query or parts.fragment:
        return "a URL with a query cannot be served from a static tree"
    host = parts.hostname + (f"_{parts.port}" if parts.port else "")
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    if not segments or any(s in (".", "..") or "/" in s or "\\" in s or "\0" in s
                           for s in segments):
        return "its URL path cannot name a file in the tree"
    origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    return origin, "/".join([host, *segments])


def _entries(settings: Settings) -> dict[str, tuple[str, int]]:
    from ckptkit.hub.cache import Cache

    return {e.id: (e.sha256, e.size) for e in Cache(settings.cache_dir).entries()}


def _previous(root: Path) -> dict[str, Any]:
    """The manifest of the tree at ``root``, or {} for a new or empty directory."""
    manifest = _manifest(root)
    if manifest is not None:
        return manifest
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is not a directory", hint="Pass a directory")
    if root.is_dir() and any(root.iterdir()):
        raise UsageError(f"{root} is not empty and not a mirror tree (no {MANIFEST})",
                         hint="Export into a new or empty directory")
    return {}


def _manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of the tree at ``root``; None when there is none."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if (data.get("schema") != SCHEMA or not isinstance(data.get("rules"), dict)
                or not isinstance(data.get("files"), dict)):
            raise ValueError("unexpected layout")
    except (OSError, ValueError, AttributeError) as exc:
        raise FormatError(f"{path}: not a ckptkit mirror manifest ({exc})",
                          hint="Export into a new directory", path=str(path)) from exc
    return data


def _holds(path: Path, size: object) -> bool:
    """``path`` is a file of ``size`` bytes (what the manifest says it was written with)."""
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another device, or no hardlinks here
        shutil.copyfile(source, target)


