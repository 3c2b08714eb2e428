"""The work of ``ckpt fetch`` for one file: under a cross-process lock, each source in turn,
then size, sha256 (or the TOFU pin) and format checks, and the commit into the cache;
``--dest`` placing.  :mod:`ckptkit.hub.fetch` plans and runs these for many files at once.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ckptkit.hub.download import waiting
from ckptkit.hub.cache import Cache, CacheEntry
from ckptkit.hub.catalogue import FileSpec, SourceSpec
from ckptkit.config import Settings
from ckptkit.errors import (CkptkitError, DiskFullError, FormatError, IntegrityError,
                            NotFoundError, UsageError)
from ckptkit.hub.attempts import Attempt, attempt_reason
from ckptkit.hub.pins import Pins
from ckptkit.hub.reasons import sha256_mismatch, shorten
from ckptkit.storage.atomic import staged


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


class Failed(Exception):
    def __init__(self, attempts: list[Attempt]):
        super().__init__(f"{len(attempts)} attempts failed")
        self.attempts = attempts


@dataclass
class Runner:
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
            raise Failed(attempts)

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


def place(fetched: FetchedFile, spec: FileSpec, dest: Path) -> FetchedFile:
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
        with staged(target, make_parents=True) as tmp:
            local.place(source, tmp)
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
