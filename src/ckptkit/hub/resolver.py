"""Checkpoints named by path or by catalogue name: the one resolver every command uses.

Wherever a command takes a checkpoint (``inspect``, ``scan``, ``diff``, ``compare``, ``strip``,
``convert``), a catalogue name may stand in for the path of the cached file:

* a model name or alias (``loftr``), for a model of one file;
* ``MODEL/FILE`` for one file of a model that has several (a bundle): FILE is the last part
  of the file's id or of its ``--dest`` path (``jukebox-5b/vqvae.pth.tar``,
  ``musiq-spaq/spaq_ckpt.npz``, ``musiq-spaq/saved_model``);
* a file id, as ``ckpt cache ls`` lists it (``jukebox/5b/vqvae.pth.tar``).

A bundle named alone is every one of its files where a command takes several checkpoints
(``scan``, ``compare``) and a usage error listing the ``MODEL/FILE`` choices where it takes one.

A path that exists always wins over a name.  Names are resolved from the catalogue and the
cache only, never over the network; a file that is not cached is a :class:`NotFoundError`
saying to run ``ckpt fetch MODEL`` (``convert`` alone fetches, see :func:`resolve`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptkit.hub.catalogue import Catalogue, FileSpec, ModelSpec
from ckptkit.config import Settings
from ckptkit.errors import NotFoundError, UsageError

if TYPE_CHECKING:
    from ckptkit.hub.fetch import FetchPlan

#: Fetches what a plan lists (``FetchPlan.execute``); passed by commands that may download.
Fetcher = Callable[["FetchPlan"], object]


@dataclass(frozen=True)
class Named:
    """What a catalogue name stands for: files of one model."""

    model: ModelSpec
    files: tuple[FileSpec, ...]


@dataclass(frozen=True)
class Resolved:
    """A checkpoint argument, resolved.

    Attributes:
        path: the file or directory to read.
        name: the catalogue name it was given as (``path`` is then in the cache), else None.
        model: the catalogue model of that name, else None.
        file_id: the catalogue file behind ``path``, else None.
    """

    path: Path
    name: str | None = None
    model: ModelSpec | None = None
    file_id: str | None = None


def exists(path: Path) -> bool:
    """``path`` is there: a file, a directory, or a TF checkpoint prefix (``ckpt-1`` for
    ``ckpt-1.index``)."""
    return path.exists() or path.with_name(path.name + ".index").is_file()


def lookup(ref: str, catalogue: Catalogue) -> Named | None:
    """What catalogue name ``ref`` stands for (see the module docstring), or None."""
    model = _model(ref, catalogue)
    if model is not None:
        return Named(model, catalogue.files_of(model.name))
    if ref in catalogue.files:
        users = catalogue.users_of(ref)
        if users:
            return Named(catalogue.models[users[0]], (catalogue.files[ref],))
    head, sep, tail = ref.partition("/")
    model = _model(head, catalogue) if sep else None
    if model is None:
        return None
    picked = tuple(spec for spec in catalogue.files_of(model.name) if tail in file_names(spec))
    return Named(model, picked) if len(picked) == 1 else None


def file_names(spec: FileSpec) -> tuple[str, ...]:
    """The names ``MODEL/FILE`` may give ``spec`` by: the last part of its id and of its dest,
    and its dest path."""
    return tuple(dict.fromkeys((spec.id.rsplit("/", 1)[-1], spec.dest.rsplit("/", 1)[-1],
                                spec.dest)))


def choices(named: Named) -> list[str]:
    """``MODEL/FILE`` for each file of ``named``: how to name one of them."""
    return [f"{named.model.name}/{file_names(spec)[0]}" for spec in named.files]


def resolve(refs: Sequence[str | os.PathLike[str]], settings: Settings | Callable[[], Settings],
            *,
            several: bool = False, catalogue: Catalogue | None = None,
            fetch: Fetcher | None = None) -> list[Resolved]:
    """Resolve checkpoint arguments to local paths, in order.

    Args:
        refs: paths or catalogue names.
        settings: where the cache and the catalogues are; a callable is called only when
            an argument is not an existing path (reading settings can fail on a bad
            ``CKPTKIT_*`` variable, which must not stop ``ckpt inspect FILE``).
        several: a bundle named alone gives all its files (else it is a usage error).
        catalogue: the catalogue already loaded [default: loaded from ``settings``].
        fetch: ``FetchPlan.execute``-like callable run for a named model whose file is not
            cached (``convert``); without it resolution is offline and such a name fails.

    Returns:
        One :class:`Resolved` per path, and per file of each name.  An argument that neither
        exists nor is a catalogue name is returned as its path, for the command to report
        as missing in its own words.

    Raises:
        UsageError: a bundle named alone where ``several`` is False.
        NotFoundError: a named file is not cached (and there is no ``fetch``).
    """
    resolved: list[Resolved] = []
    for ref in refs:
        path = Path(ref).expanduser()
        if exists(path):
            resolved.append(Resolved(path))
            continue
        if not isinstance(settings, Settings):
            settings = settings()
        if catalogue is None:
            from ckptkit.hub import catalogue as catalogue_mod

            catalogue = catalogue_mod.load(settings.all_catalogs())
        # Names use "/" whatever the platform (a Path of "jukebox-5b/vqvae.pth.tar" would not).
        name = ref if isinstance(ref, str) else Path(ref).as_posix()
        named = lookup(name, catalogue)
        if named is None:
            resolved.append(Resolved(path))
            continue
        if len(named.files) > 1 and not several:
            raise UsageError(f"{name} is a model of {len(named.files)} files; name the one to "
                             "use", hint="Pass one of: " + ", ".join(choices(named)))
        resolved += cached_files(name, named, settings, catalogue, fetch)
    return resolved


def cached_files(ref: str, named: Named, settings: Settings, catalogue: Catalogue,
                 fetch: Fetcher | None = None) -> list[Resolved]:
    """The cached copies of the files ``named`` (what ``ref`` was looked up to), in order.

    Raises:
        NotFoundError: one is not cached, and there is no ``fetch`` to run first.
    """
    from ckptkit.hub.fetch import plan_fetch

    # Planning reads the cache and pins only; online settings so that every file of the plan
    # is listed with its cached copy (or none) rather than refused for want of a source.
    plan = plan_fetch([named.model.name], replace(settings, offline=False),
                      catalogue=catalogue)
    cached = {f.spec.id: f.cached.path for f in plan.files if f.cached is not None}
    missing = [spec.id for spec in named.files if spec.id not in cached]
    if missing and fetch is not None:
        fetch(plan)
        return cached_files(ref, named, settings, catalogue)
    if missing:
        raise NotFoundError(f"{ref}: {', '.join(missing)} of catalogue model {named.model.name} "
                            "is not in the cache (names are read from the cache, offline)",
                            hint=f"Fetch it first: ckpt fetch {named.model.name}", path=ref)
    return [Resolved(Path(cached[spec.id]), ref, named.model, spec.id) for spec in named.files]


def _model(name: str, catalogue: Catalogue) -> ModelSpec | None:
    if name in catalogue.models:
        return catalogue.models[name]
    return next((m for m in catalogue.models.values() if name in m.aliases), None)


def checkpoint_source(src: str | Path, settings: Settings | None = None, *,
                   log: Callable[[str], None] | None = None,
                   progress: Any = None, dry_run: bool = False) -> tuple[Path, str | None]:
    """The local file for ``src`` and the recipe its catalogue entry names (if any).

    A path that exists is used as is; otherwise ``src`` is a catalogue name
    (``loftr``, ``MODEL/FILE``, a file id), fetched (verified,
    cached) with :func:`ckptkit.hub.fetch.plan_fetch` unless it is cached already.  With
    ``dry_run`` nothing is fetched: a name not cached yet is a NotFoundError.
    """
    from ckptkit import config
    from ckptkit.hub import catalogue

    path = Path(src).expanduser()
    if exists(path):
        return path, None
    conf = settings or config.settings()
    cat = catalogue.load(conf.all_catalogs())
    fetch = None if dry_run else (lambda plan: plan.execute(progress=progress, log=log))
    [resolved] = resolve([src], conf, catalogue=cat, fetch=fetch)
    if resolved.model is None:  # neither a file nor a name: say so, with close names
        try:
            cat.model(str(src))
        except NotFoundError as exc:
            raise NotFoundError(f"{src}: no such file, and no catalogue model of that name",
                                hint=exc.hint, path=str(src)) from None
    return resolved.path, resolved.model.recipe if resolved.model else None
