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

import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ckptkit.hub import catalogue as catalogue_mod
from ckptkit.hub.download import waiting
from ckptkit.hub.cache import Cache, CacheEntry
from ckptkit.hub.catalogue import Catalogue, FileSpec, SourceSpec
from ckptkit.config import Settings
from ckptkit.errors import (CkptkitError, DiskFullError, FormatError, IntegrityError,
                            NotFoundError, UsageError, disk_full)
from ckptkit.hub.attempts import Attempt, FetchError, attempt_reason
from ckptkit.hub.pins import Pins
from ckptkit.hub.reasons import sha256_mismatch, shorten

MAX_PARALLEL_FILES = 4
SOURCE_NAMES = ("hf", "tfhub", "kaggle", "url", "local")


class Progress(Protocol):
    def set_total(self, total: int | None) -> None: ...
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


ProgressFactory = Callable[[str, int | None], Progress | None]


@dataclass(frozen=True)
class PlannedFile:
    """One file of the plan: where it may come from and what it must match."""

    spec: FileSpec
    models: tuple[str, ...]
    cached: CacheEntry | None
    sources: tuple[SourceSpec, ...]
    expected_size: int | None
    expected_sha256: str | None
    pinned: bool
    probed_size: int | None = None  # what a server announced; shown, never trusted

    @property
    def size(self) -> int | None:
        """Best known size: verified (catalogue or pin), else announced by a server."""
        return self.expected_size if self.expected_size is not None else self.probed_size

    def to_dict(self, settings: Settings) -> dict[str, Any]:
        return {
            "name": self.spec.id, "kind": self.spec.kind, "models": list(self.models),
            "cached": self.cached is not None,
            "path": self.cached.path if self.cached else None,
            "size": self.size, "sha256": self.expected_sha256,
            "size_from": ("catalogue" if self.spec.size is not None else "pin"
                          if self.expected_size is not None else "server"
                          if self.probed_size is not None else None),
            "hash_from": "catalogue" if self.spec.sha256 else ("pin" if self.pinned else None),
            "sources": [{"type": s.type, "ref": s.ref,
                         "url": settings.mirrors.rewrite(s.ref) if s.type in ("url", "tfhub", "hf")
                         else None} for s in self.sources],
        }


@dataclass(frozen=True)
class FetchedFile:
    """A verified file, as ``ckpt fetch --json`` reports it."""

    name: str
    path: str
    source: str
    bytes: int
    sha256: str
    transferred: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "source": self.source,
                "bytes": self.bytes, "sha256": self.sha256}


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
        runner = _Runner(self.settings, progress, log or (lambda _m: None))
        failures: dict[str, list[Attempt]] = {}
        results: dict[str, FetchedFile] = {}
        workers = max(1, min(MAX_PARALLEL_FILES, len(self.files)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-fetch")
        try:
            futures = {f.spec.id: pool.submit(runner.fetch_one, f) for f in self.files}
            for file_id, future in futures.items():
                try:
                    results[file_id] = waiting.result(future)
                except _Failed as failed:
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
            ordered = [_place(r, f.spec, self.dest) for r, f in zip(ordered, self.files,
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


class _Failed(Exception):
    def __init__(self, attempts: list[Attempt]):
        super().__init__(f"{len(attempts)} attempts failed")
        self.attempts = attempts


@dataclass
class _Runner:
    settings: Settings
    progress: ProgressFactory | None
    log: Callable[[str], None]
    cache: Cache = field(init=False)
    pins: Pins = field(init=False)

    def __post_init__(self) -> None:
        self.cache = Cache(self.settings.cache_dir)
        self.pins = Pins(self.settings.pins_path)

    def fetch_one(self, planned: PlannedFile) -> FetchedFile:
        from ckptkit.storage.locks import FileLock

        spec = planned.spec
        self.cache.ensure()
        lock = self.cache.lock_path(spec.id)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(lock, purpose=f"fetching {spec.id}", on_wait=lambda holder: self.log(
                f"waiting for {holder.describe() if holder else 'another process'} "
                f"to finish fetching {spec.id}")):
            entry = self.cache.entry(spec.id)
            if entry is not None and self._matches(planned, entry.size, entry.sha256):
                return FetchedFile(spec.id, entry.path, "cache", entry.size, entry.sha256)
            attempts: list[Attempt] = []
            for source in planned.sources:
                label = f"{source.type}:{source.ref}" if source.ref else "local:--local-dir"
                try:
                    return self._from_source(planned, source, label)
                except DiskFullError:
                    raise  # every other source needs the same room: stop, do not fall back
                except CkptkitError as exc:
                    attempt = Attempt(label, attempt_reason(exc, source.ref),
                                      isinstance(exc, IntegrityError))
                    attempts.append(attempt)
                    self.log(attempt.line(spec.id))
            raise _Failed(attempts)

    def _matches(self, planned: PlannedFile, size: int, sha256: str) -> bool:
        return ((planned.expected_size is None or planned.expected_size == size)
                and (planned.expected_sha256 is None or planned.expected_sha256 == sha256))

    def _staging(self, spec: FileSpec) -> Path:
        # Stable per file (not per process), so an interrupted download resumes next time.
        return self.cache.root / "staging" / spec.id

    def _from_source(self, planned: PlannedFile, source: SourceSpec, label: str) -> FetchedFile:
        spec = planned.spec
        staged = self._staging(spec)
        staged.parent.mkdir(parents=True, exist_ok=True)
        got = self._deliver(planned, source, staged)
        try:
            size, sha256 = self._verify(planned, staged, label, got.measured)
        except CkptkitError:
            _remove(staged)
            raise
        entry = self.cache.commit(spec.id, spec.kind, staged, sha256=sha256,
                                  source=source.type, url=got.url)
        if spec.sha256 is None:
            if got.announced or spec.size is not None or self.settings.pin_unsized:
                self.pins.record(spec.id, sha256, size, label)
            else:
                self.log(f"{spec.id}: not pinned: {label} sent it without stating its size and "
                         "the catalogue has no size or hash for it (--pin-unsized pins it)")
        self.log(f"{spec.id}: verified from {label}")
        return FetchedFile(spec.id, entry.path, source.type, size, sha256, got.transferred)

    def _deliver(self, planned: PlannedFile, source: SourceSpec, staged: Path) -> _Delivery:
        """Bring the file to ``staged``."""
        spec, s = planned.spec, self.settings
        bar = self.progress(spec.id, planned.expected_size) if self.progress else None
        try:
            if source.type == "url":
                from ckptkit.hub.sources import url as url_source

                if spec.kind != "file":
                    raise UsageError(f"{spec.id}: url sources deliver files, not directories",
                                     hint="Fix the catalogue entry: give the directory a "
                                          "tfhub or kaggle source")
                result = url_source.fetch(source.ref, staged, mirrors=s.mirrors,
                                          expected_size=planned.expected_size,
                                          expected_sha256=planned.expected_sha256,
                                          connections=s.connections, timeout=s.timeout,
                                          progress=bar, limits=s.limits)
                return _Delivery(result.url, result.transferred, (result.size, result.sha256),
                                 result.announced)
            if source.type == "hf":
                from ckptkit.hub.sources import hf

                _remove(staged)
                got_h = hf.deliver(source, staged, s, progress=bar)
                return _Delivery(got_h.url, got_h.transferred, (got_h.size, got_h.sha256), True)
            if source.type == "tfhub":
                from ckptkit.hub.sources import tfhub

                _remove(staged)
                got = tfhub.fetch(source.ref, staged, mirrors=s.mirrors,
                                  tfhub_cache_dir=s.tfhub_cache_dir, connections=s.connections,
                                  timeout=s.timeout, progress=bar, limits=s.limits)
                return _Delivery(got.url, got.transferred, None, got.announced)
            if source.type == "kaggle":
                from ckptkit.hub.sources import kaggle, local

                archive = kaggle.mirrored_archive(source.ref, s.mirrors)
                if archive is not None:  # a static mirror: the version's archive, no kagglehub
                    _remove(staged)
                    got_a = kaggle.fetch_archive(source.ref, staged, mirrors=s.mirrors,
                                                 connections=s.connections, timeout=s.timeout,
                                                 progress=bar, limits=s.limits)
                    return _Delivery(archive, got_a.transferred, None, got_a.announced)
                got_k = kaggle.fetch(source.ref, mirrors=s.mirrors, quiet=True, limits=s.limits,
                                     timeout=s.timeout)
                _remove(staged)
                local.place(Path(got_k.path), staged)
                return _Delivery(f"kaggle:{source.ref}", 0, None, got_k.announced)
            return self._from_local(planned, source, staged)
        finally:
            if bar is not None:
                bar.close()

    def _from_local(self, planned: PlannedFile, source: SourceSpec,
                    staged: Path) -> _Delivery:
        from ckptkit.hub.sources import local

        found = local.candidates(planned.spec, source.ref or None, self.settings.local_dirs)
        if not found:
            where = source.ref or ", ".join(str(d) for d in self.settings.local_dirs)
            raise NotFoundError(f"not found locally ({where})", reason="not on disk")
        problems = []
        for candidate in found:
            try:
                size, sha256 = self._measure(candidate)
                self._check(planned, size, sha256, str(candidate))
            except IntegrityError as exc:
                problems.append(exc)
                continue
            _remove(staged)
            local.place(candidate, staged)
            return _Delivery(candidate.resolve().as_uri(), 0, (size, sha256), announced=True)
        raise problems[0]

    def _measure(self, path: Path) -> tuple[int, str]:
        from ckptkit.storage.hashing import tree_size

        size = tree_size(path) if path.is_dir() else path.stat().st_size
        return size, self.cache.hash_of(path)

    def _check(self, planned: PlannedFile, size: int, sha256: str, where: str) -> None:
        if planned.expected_size is not None and size != planned.expected_size:
            raise IntegrityError(f"{where} has {size} bytes, expected {planned.expected_size}",
                                 reason=f"{size:,} bytes instead of {planned.expected_size:,}")
        if planned.expected_sha256 is not None and sha256 != planned.expected_sha256:
            origin = "catalogue" if planned.spec.sha256 else "pinned first download"
            raise IntegrityError(f"{where} has sha256 {sha256}, the {origin} says "
                                 f"{planned.expected_sha256}",
                                 reason=sha256_mismatch(sha256, planned.expected_sha256,
                                                        "catalogue" if planned.spec.sha256
                                                        else "pin"))

    def _verify(self, planned: PlannedFile, staged: Path, label: str,
                measured: tuple[int, str] | None) -> tuple[int, str]:
        size, sha256 = measured or self._measure(staged)
        self._check(planned, size, sha256, label)
        _check_format(planned.spec, staged, label)
        return size, sha256


def _check_format(spec: FileSpec, path: Path, label: str) -> None:
    """A download must be what it claims: a SavedModel directory, or a readable checkpoint.

    Files in formats ckptkit does not read (a user's tokenizer, say) pass; a truncated or
    corrupt checkpoint, or a directory that is not a SavedModel, does not.
    """
    from ckptkit.inspection import inspect

    if spec.kind == "savedmodel":
        from ckptkit.formats import savedmodel

        if not (path.is_dir() and savedmodel.sniff(path)):
            raise IntegrityError(f"{label} did not deliver a SavedModel directory",
                                 reason="not a SavedModel directory")
    try:
        inspect(path)
    except FormatError:
        if spec.kind == "savedmodel":
            raise
    except IntegrityError as exc:
        raise IntegrityError(f"{label} delivered a damaged file: {_one_line(exc)}",
                             reason=f"a damaged file ({shorten(exc.reason or exc.message, 60)})"
                             ) from exc


def _place(fetched: FetchedFile, spec: FileSpec, dest: Path) -> FetchedFile:
    """Put a cached file where its origin tool expects it (hardlink, else copy), atomically."""
    from ckptkit.storage.hashing import sha256_file, tree_sha256
    from ckptkit.hub.sources import local

    target = dest / spec.dest
    source = Path(fetched.path)
    if target.exists():
        same = (target.is_dir() == source.is_dir()
                and (tree_sha256(target) if target.is_dir() else sha256_file(target))
                == fetched.sha256)
        if not same:
            raise UsageError(f"{target} exists and differs from the verified {spec.id}",
                             hint="Move it away or choose another --dest")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        local.place(source, tmp)
        tmp.replace(target)
    return FetchedFile(fetched.name, str(target), fetched.source, fetched.bytes, fetched.sha256,
                       fetched.transferred)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


@dataclass(frozen=True)
class _Delivery:
    """What a source brought to the staging path."""

    url: str                              # where it came from (after mirrors and redirects)
    transferred: int                      # bytes moved over the network
    measured: tuple[int, str] | None      # (size, sha256) when hashed while streaming
    announced: bool                       # the size was stated before the bytes arrived
