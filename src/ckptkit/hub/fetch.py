"""``ckpt fetch``: resolve catalogue names to verified files through an ordered source chain.

:func:`plan_fetch` decides (what is cached, which sources will be tried, how many bytes may
move) without I/O beyond reading the cache; :meth:`FetchPlan.execute` does the work: per file,
under a cross-process lock, it tries each source in order, verifies size, sha256 (or the TOFU
pin) and format, commits into the cache, and records every failed attempt for the final error.

Each failed attempt is logged as it happens, one line with a short reason (``host not found``,
``HTTP 404``, ``stalled (…)``); the final :class:`FetchError` is one short line that refers to
them.  A first download is pinned only when its size was stated before the bytes came (by the
server or the catalogue), unless ``Settings.pin_unsized``: an endless or oversized stream must
not become the reference every later fetch is held to.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ckptkit.hub import catalogue as catalogue_mod
from ckptkit.hub.download import waiting
from ckptkit.hub.cache import Cache
from ckptkit.hub.catalogue import Catalogue, FileSpec, SourceSpec
from ckptkit.config import Settings
from ckptkit.errors import NotFoundError, UsageError, disk_full
from ckptkit.hub.attempts import Attempt, FetchError
from ckptkit.hub.pins import Pins
# The per-file work (and the records it returns) is in fetch_files; they are used from here.
from ckptkit.hub.fetch_files import (FetchedFile, Failed, PlannedFile, Progress,
                                     ProgressFactory, Runner, place)

MAX_PARALLEL_FILES = 4
SOURCE_NAMES = ("hf", "tfhub", "kaggle", "url", "local")


@dataclass(frozen=True)
class FetchPlan:
    """What ``execute`` will do; ``--dry-run`` prints it."""

    models: tuple[str, ...]
    files: tuple[PlannedFile, ...]
    settings: Settings
    dest: Path | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes to transfer for files not yet cached (unknown sizes count as 0)."""
        return sum(f.size or 0 for f in self.files if f.cached is None)

    @property
    def unknown_sizes(self) -> int:
        return sum(1 for f in self.files if f.cached is None and f.size is None)

    def with_probed_sizes(self) -> FetchPlan:
        """Ask the URL sources of files of unknown size how big they are (for ``--dry-run``).

        One single-byte ranged request per file, to its first URL source that answers; nothing
        is done offline or for hub sources (their size is only known after download).
        """
        from dataclasses import replace

        from ckptkit.hub.sources.url import probe_size

        if self.settings.offline:
            return self
        files = []
        for planned in self.files:
            if planned.cached is None and planned.size is None:
                for source in (s for s in planned.sources if s.type == "url"):
                    found = probe_size(source.ref, mirrors=self.settings.mirrors)
                    if found is not None:
                        planned = replace(planned, probed_size=found)
                        break
            files.append(planned)
        return replace(self, files=tuple(files))

    def to_dict(self) -> dict[str, Any]:
        return {"models": list(self.models),
                "files": [f.to_dict(self.settings) for f in self.files],
                "total_bytes": self.total_bytes, "unknown_sizes": self.unknown_sizes,
                "offline": self.settings.offline}

    def execute(self, progress: ProgressFactory | None = None,
                log: Callable[[str], None] | None = None) -> list[FetchedFile]:
        """Fetch every file (several at once), then place them under ``dest`` if asked.

        Raises:
            FetchError: a file could not be fetched from any source (after the others
                finished, so nothing fetched is wasted).
            DiskFullError: the cache's disk filled up (other sources are not tried: they
                would need the same room); a partial download stays to resume from.
        """
        runner = Runner(self.settings, progress, log or (lambda _m: None))
        failures: dict[str, list[Attempt]] = {}
        results: dict[str, FetchedFile] = {}
        workers = max(1, min(MAX_PARALLEL_FILES, len(self.files)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-fetch")
        try:
            futures = {f.spec.id: pool.submit(runner.fetch_one, f) for f in self.files}
            for file_id, future in futures.items():
                try:
                    results[file_id] = waiting.result(future)
                except Failed as failed:
                    failures[file_id] = failed.attempts
                except OSError as exc:
                    # Committing, pinning or locking on a full disk: one clear error, no crash.
                    full = disk_full(exc, Cache(self.settings.cache_dir).path(file_id),
                                     f"fetching {file_id}", hint="Free some space, or use "
                                     "another cache directory (--cache-dir or CKPTKIT_CACHE)")
                    if full is None:
                        raise
                    raise full from exc
        except BaseException:
            # Ctrl-C: do not wait for running downloads (their .part files resume later).
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if failures:
            raise FetchError(failures, offline=self.settings.offline)
        ordered = [results[f.spec.id] for f in self.files]
        if self.dest is not None:
            ordered = [place(r, f.spec, self.dest) for r, f in zip(ordered, self.files,
                                                                   strict=True)]
        return ordered


def plan_fetch(names: list[str] | tuple[str, ...], settings: Settings, *,
               source: str | None = None, dest: Path | None = None,
               catalogue: Catalogue | None = None) -> FetchPlan:
    """Decide what fetching ``names`` involves.  Shared bundle files appear once.

    Raises:
        NotFoundError: an unknown model name.
        UsageError: ``source`` is not a source type, or a file that is not cached has no source
            of that type (or none usable offline).
    """
    if source is not None and source not in SOURCE_NAMES:
        raise UsageError(f"--source {source!r} is not one of {', '.join(SOURCE_NAMES)}",
                         hint=f"Pass one of: {', '.join(SOURCE_NAMES)}")
    cat = catalogue or catalogue_mod.load(settings.all_catalogs())
    cache, pins = Cache(settings.cache_dir), Pins(settings.pins_path)
    models = tuple(cat.model(n).name for n in names)
    planned: dict[str, PlannedFile] = {}
    for model in models:
        for spec in cat.files_of(model):
            if spec.id in planned:
                continue
            pin = None if spec.sha256 else pins.get(spec.id)
            size = spec.size if spec.size is not None else (pin.size if pin else None)
            sha = spec.sha256 or (pin.sha256 if pin else None)
            entry = cache.entry(spec.id)
            if entry is not None and ((size is not None and entry.size != size)
                                      or (sha is not None and entry.sha256 != sha)):
                entry = None  # a stale or foreign copy: fetch again
            sources = _eligible(spec, settings, source)
            if entry is None and not sources:
                if settings.offline:
                    raise NotFoundError(_no_source_message(spec, settings, source))
                raise UsageError(_no_source_message(spec, settings, source),
                                 hint="Leave out --source, or pick a kind the file has")
            planned[spec.id] = PlannedFile(spec, cat.users_of(spec.id), entry, sources, size, sha,
                                           pin is not None)
    return FetchPlan(models, tuple(planned.values()), settings, dest)


def _eligible(spec: FileSpec, settings: Settings, only: str | None) -> tuple[SourceSpec, ...]:
    sources = list(spec.sources)
    if settings.local_dirs:
        sources.append(SourceSpec("local", ""))  # "" = search the --local-dir folders
    if settings.offline:  # local folders, and the Hugging Face cache for hf sources
        sources = [s for s in sources if s.type in ("local", "hf")]
    if only:
        sources = [s for s in sources if s.type == only]
    return tuple(sources)


def _no_source_message(spec: FileSpec, settings: Settings, only: str | None) -> str:
    kinds = sorted({s.type for s in spec.sources})
    if settings.offline:
        return (f"{spec.id} is not cached and offline mode allows only local sources and the "
                f"Hugging Face cache (it has: {', '.join(kinds)}); pass --local-dir with the "
                "file, or go online")
    return f"{spec.id} has no {only} source (it has: {', '.join(kinds)})"


__all__ = ["FetchError", "FetchPlan", "FetchedFile", "PlannedFile", "Progress",
           "ProgressFactory", "plan_fetch"]
