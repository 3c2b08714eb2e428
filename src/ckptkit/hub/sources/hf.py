"""``ckpt fetch hf:ORG/REPO[@REVISION]``: a Hugging Face Hub snapshot, through ckptkit's engine,
into the Hub client's own cache.

:func:`plan_snapshot` decides: it resolves the revision to a commit with the Hub API (or, offline,
with the cache's ``refs/``), lists the files with their sizes and LFS sha256, applies
``--include``/``--exclude`` and sees which blobs the cache already holds.
:meth:`SnapshotPlan.execute` does the work, several files at once, each under a cross-process
lock named by its etag: a blob already in the cache (fetched by ckpt or by ``huggingface_hub``)
is re-hashed and reused; any other file is downloaded by
:func:`ckptkit.hub.download.download.download` (parallel ranges, sha256 while streaming against
the LFS oid, resumable after ``kill -9``) into
ckpt's staging folder, checked (size, and Git's blob id for a file outside LFS), and renamed
into ``blobs/``.  Only when every file is there are the snapshot links made, then the ref
written (:mod:`ckptkit.hub.sources.hf_cache`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ckptkit.config import Settings
from ckptkit.errors import AuthError, CkptkitError, IntegrityError, NotFoundError, UsageError
from ckptkit.hub.download import waiting
from ckptkit.hub.sources.hf_api import (REPO_TYPES, HubEnv, RepoFile, RepoRevision, RepoType,
                                        access_error, check_repo_id, fetch_revision,
                                        resolve_url)
from ckptkit.hub.sources.hf_cache import (HubRepoCache, SnapshotFile, SnapshotRecord,
                                          git_blob_id, identity_matches, read_record,
                                          record_path, write_record)

PREFIX = "hf:"
MAX_PARALLEL_FILES = 4
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRef:
    """``hf:[datasets/]ORG/REPO[@REVISION]`` as parsed."""

    repo_id: str
    revision: str = "main"
    repo_type: RepoType = "model"

    @classmethod
    def parse(cls, text: str, repo_type: str | None = None) -> HubRef:
        body = text[len(PREFIX):] if text.startswith(PREFIX) else text
        kind: str = repo_type or "model"
        for plural in ("datasets/", "models/"):
            if body.startswith(plural) and body.count("/") >= 2:
                kind, body = plural[:-2], body[len(plural):]
        if kind not in REPO_TYPES:
            raise UsageError(f"--repo-type {kind!r} is not one of {', '.join(REPO_TYPES)}")
        repo, _, revision = body.partition("@")
        if _ and not revision:
            raise UsageError(f"{text!r} names no revision after '@'",
                             hint="Write hf:ORG/REPO@REVISION, or leave out '@' for main")
        return cls(check_repo_id(repo), revision or "main", kind)  # type: ignore[arg-type]


def selected(path: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """``huggingface_hub``'s rule: a path is kept when it matches an include pattern (any
    path without includes) and no exclude pattern; a pattern ending in ``/`` means the
    folder's contents."""
    def matches(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatch(path, p + "*" if p.endswith("/") else p) for p in patterns)

    return (not include or matches(include)) and not matches(exclude)


@dataclass(frozen=True)
class PlannedHubFile:
    file: RepoFile
    cached: bool  # a blob of the right size is in the cache (hashed again before use)


@dataclass(frozen=True)
class HubFileResult:
    """One file of a fetched snapshot, as ``--json`` reports it."""

    path: str
    size: int
    sha256: str
    lfs: bool
    source: str          # "hf" (downloaded now) or "cache"
    transferred: int = 0
    resumed: int = 0     # bytes an interrupted earlier run had already fetched

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "lfs": self.lfs,
                "source": self.source}


@dataclass(frozen=True)
class SnapshotResult:
    """A complete snapshot folder, every file in it verified."""

    repo_id: str
    repo_type: RepoType
    revision: str
    commit: str
    snapshot: Path
    files: tuple[HubFileResult, ...]

    @property
    def transferred(self) -> int:
        return sum(f.transferred for f in self.files)

    @property
    def resumed(self) -> int:
        return sum(f.resumed for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo_id, "repo_type": self.repo_type, "revision": self.revision,
                "commit": self.commit, "snapshot": str(self.snapshot),
                "files": [f.to_dict() for f in self.files]}


ProgressFactory = Callable[[str, int | None], Any]


@dataclass(frozen=True)
class SnapshotPlan:
    """What :meth:`execute` will do; ``--dry-run`` prints it."""

    revision: RepoRevision
    files: tuple[PlannedHubFile, ...]
    env: HubEnv
    settings: Settings

    @property
    def cache(self) -> HubRepoCache:
        return HubRepoCache(self.env.hub_cache, self.revision.repo_type, self.revision.repo_id)

    @property
    def total_bytes(self) -> int:
        """Bytes to transfer: the files whose blob is not in the cache."""
        return sum(f.file.size for f in self.files if not f.cached)

    def to_dict(self) -> dict[str, Any]:
        r = self.revision
        return {"repo": r.repo_id, "repo_type": r.repo_type, "revision": r.revision,
                "commit": r.commit, "snapshot": str(self.cache.snapshot(r.commit)),
                "files": [{"path": f.file.path, "size": f.file.size,
                           "sha256": f.file.lfs_sha256, "lfs": f.file.lfs_sha256 is not None,
                           "cached": f.cached} for f in self.files],
                "total_bytes": self.total_bytes, "offline": self.settings.offline}

    def execute(self, progress: ProgressFactory | None = None,
                log: Callable[[str], None] | None = None) -> SnapshotResult:
        """Fetch every file, then link the snapshot and write the ref.

        Raises:
            IntegrityError: a file's bytes did not match the Hub's size and hash (nothing of
                it is left under ``blobs/`` or ``snapshots/``), exit 3.
            CkptkitError: a download failed (the other files are kept, complete, in
                ``blobs/``; partial ones resume next time).
        """
        say = log or (lambda _m: None)
        if self.settings.offline:
            return self._offline()
        files = [f.file for f in self.files]
        workers = max(1, min(MAX_PARALLEL_FILES, len(files)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-hf")
        results: list[HubFileResult] = []
        errors: list[tuple[str, CkptkitError]] = []
        try:
            futures = [pool.submit(self._fetch_file, f, progress) for f in files]
            for file, future in zip(files, futures, strict=True):
                try:
                    results.append(waiting.result(future))
                except CkptkitError as exc:
                    errors.append((file.path, exc))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: .part files resume later
            raise
        pool.shutdown()
        denied = next((e for _p, e in errors if isinstance(e, AuthError)), None)
        if denied is not None:
            raise denied  # about the repo, not one file: the others failed the same way
        if errors:
            if len(errors) > 1:  # the final error names one; the others are listed first
                for path, exc in errors:
                    say(f"{self.revision.label}: {path}: {exc}")
            worst = next((e for _p, e in errors if isinstance(e, IntegrityError)), errors[0][1])
            if len(errors) > 1:
                worst.message += f" (and {len(errors) - 1} more file(s) failed)"
                worst.args = (worst.message,)
            raise worst
        return self._commit(results)

    def _fetch_file(self, file: RepoFile, progress: ProgressFactory | None) -> HubFileResult:
        from ckptkit.hub.download.download import download
        from ckptkit.storage.hashing import sha256_file
        from ckptkit.storage.locks import FileLock

        s, lfs = self.settings, file.lfs_sha256 is not None
        blob = self.cache.blob(file)
        locks = s.cache_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(locks / f"hf-{file.etag}.lock", purpose=f"fetching {file.path}"):
            ok, digest = identity_matches(blob, file)
            if ok:  # in the cache already (ckpt's doing or huggingface_hub's): reused
                return HubFileResult(file.path, file.size, digest or sha256_file(blob), lfs,
                                     "cache")
            staged = s.cache_dir / "staging" / "hf" / file.etag
            url = s.mirrors.rewrite(resolve_url(self.env.endpoint, self.revision.repo_type,
                                                self.revision.repo_id, self.revision.commit,
                                                file.path))
            bar = progress(file.path, file.size) if progress else None
            try:
                got = download(url, staged, expected_size=file.size,
                               expected_sha256=file.lfs_sha256, connections=s.connections,
                               timeout=s.timeout, headers=self.env.headers_for(url),
                               progress=bar, limits=s.limits)
            except AuthError as exc:  # a gated repo: its listing is public, its files are not
                raise access_error(self.env, f"hf:{self.revision.repo_id}", exc.status,
                                   None, url) from None
            finally:
                if bar is not None:
                    bar.close()
            if not lfs and git_blob_id(staged) != file.blob_id:
                staged.unlink()
                raise IntegrityError(f"{self.revision.label}: {file.path} does not match its Git "
                                     f"blob id {file.blob_id}", reason="wrong Git blob id")
            self.cache.put_blob(staged, file)
            return HubFileResult(file.path, file.size, got.sha256, lfs, "hf", got.transferred,
                                 got.resumed_from)

    def _commit(self, results: list[HubFileResult]) -> SnapshotResult:
        r = self.revision
        for planned in self.files:
            self.cache.link(r.commit, planned.file)
        self.cache.write_ref(r.revision, r.commit)  # last: now the snapshot is there
        record = SnapshotRecord(r.repo_id, r.repo_type, r.commit, r.revision,
                                str(self.env.hub_cache),
                                tuple(SnapshotFile(f.path, f.size, f.sha256,
                                                   p.file.etag)
                                      for f, p in zip(results, self.files, strict=True)))
        write_record(self.settings.cache_dir, record)
        return SnapshotResult(r.repo_id, r.repo_type, r.revision, r.commit,
                              self.cache.snapshot(r.commit), tuple(results))

    def _offline(self) -> SnapshotResult:
        from ckptkit.storage.hashing import sha256_file

        r = self.revision
        snapshot = self.cache.snapshot(r.commit)
        old = read_record(record_path(self.settings.cache_dir, r.repo_type, r.repo_id, r.commit))
        known = {f.path: f for f in (old.files if old else ())}
        results = []
        for planned in self.files:
            path = snapshot / planned.file.path
            if not path.is_file():
                raise NotFoundError(f"{r.label}: {planned.file.path} is not in the cache "
                                    f"({snapshot})", hint="Fetch it once online")
            size = path.stat().st_size
            mine = known.get(planned.file.path)
            sha = mine.sha256 if mine and mine.size == size else sha256_file(path)
            results.append(HubFileResult(planned.file.path, size, sha,
                                         planned.file.lfs_sha256 is not None, "cache"))
        return SnapshotResult(r.repo_id, r.repo_type, r.revision, r.commit, snapshot,
                              tuple(results))


def plan_snapshot(ref: HubRef, settings: Settings, *, include: Sequence[str] = (),
                  exclude: Sequence[str] = (), env: HubEnv | None = None) -> SnapshotPlan:
    """Resolve ``ref`` and decide which files to fetch.

    Raises:
        AuthError, NotFoundError, SourceError: from the Hub API (see
            :func:`~ckptkit.hub.sources.hf_api.fetch_revision`).
        NotFoundError: offline, and the cache has no snapshot of the revision; or no file of
            the revision matches the patterns.
    """
    env = env or HubEnv.from_environ()
    if settings.offline:
        revision = _offline_revision(ref, env)
    else:
        revision = fetch_revision(env, ref.repo_id, ref.revision, ref.repo_type,
                                  mirrors=settings.mirrors, timeout=settings.timeout)
    files = tuple(f for f in revision.files if selected(f.path, include, exclude))
    if not files:
        raise NotFoundError(f"{revision.label}: no file matches "
                            f"{' '.join(include) or '*'}" + (f" without {' '.join(exclude)}"
                                                             if exclude else ""),
                            hint="Check --include/--exclude (`ckpt fetch ... --dry-run` with "
                                 "no patterns lists the files)")
    cache = HubRepoCache(env.hub_cache, revision.repo_type, revision.repo_id)
    planned = tuple(PlannedHubFile(f, _blob_size(cache.blob(f)) == f.size) for f in files)
    return SnapshotPlan(replace(revision, files=files), planned, env, settings)


def _blob_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _offline_revision(ref: HubRef, env: HubEnv) -> RepoRevision:
    """The revision as the cache knows it: ``refs/`` (or the commit itself) and the files
    under its snapshot folder."""
    cache = HubRepoCache(env.hub_cache, ref.repo_type, ref.repo_id)
    commit = ref.revision if _COMMIT.fullmatch(ref.revision) else cache.read_ref(ref.revision)
    snapshot = cache.snapshot(commit) if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise NotFoundError(f"hf:{ref.repo_id}@{ref.revision} is not in the Hub cache "
                            f"{env.hub_cache} and --offline allows nothing else",
                            hint="Fetch it once online, or set HF_HUB_CACHE to the cache "
                                 "holding it")
    files = []
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        blob = path.resolve()
        size = blob.stat().st_size
        etag = blob.name
        files.append(RepoFile(path.relative_to(snapshot).as_posix(), size, etag,
                              etag if len(etag) == 64 else None))
    assert commit is not None
    return RepoRevision(ref.repo_id, ref.repo_type, ref.revision, commit, tuple(files))


def fetch_one(repo_id: str, revision: str, filename: str, settings: Settings, *,
              repo_type: RepoType = "model", progress: ProgressFactory | None = None,
              log: Callable[[str], None] | None = None) -> tuple[Path, HubFileResult]:
    """One file of a repo, for a catalogue ``type = "hf"`` source: fetched into the Hub cache
    as :func:`plan_snapshot` does; returns its blob and what it is."""
    plan = plan_snapshot(HubRef(repo_id, revision, repo_type), settings,
                         include=[_escape(filename)])
    exact = tuple(f for f in plan.files if f.file.path == filename)
    if not exact:
        raise NotFoundError(f"hf:{repo_id}@{revision} has no file {filename}",
                            reason="no such file in the repo")
    plan = replace(plan, files=exact, revision=replace(plan.revision,
                                                       files=tuple(f.file for f in exact)))
    result = plan.execute(progress=progress, log=log)
    return plan.cache.blob(exact[0].file), result.files[0]


def _escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass(frozen=True)
class Delivered:
    """What a catalogue ``hf`` source brought to its staging path."""

    url: str
    size: int
    sha256: str
    transferred: int


def deliver(source: Any, staged: Path, settings: Settings, *,
            progress: Any = None) -> Delivered:
    """Bring a catalogue ``type = "hf"`` source's file to ``staged`` (a hardlink or copy).

    Online, the file goes through the Hub protocol into the Hugging Face cache first (so
    ``huggingface_hub`` finds it too); offline, it is taken from that cache.  When a
    ``--mirror`` rule rewrites the file's URL, that URL is downloaded as it is (a static
    mirror serves files, not the Hub's API).

    Raises:
        NotFoundError: offline and not in the Hub cache, or no such file.
        AuthError, SourceError, IntegrityError: as :meth:`SnapshotPlan.execute`.
    """
    from ckptkit.hub.sources import local
    from ckptkit.hub.sources import url as url_source

    repo_type: RepoType = source.repo_type
    mirrored = settings.mirrors.rewrite(source.ref)
    if mirrored != source.ref and not settings.offline:
        got = url_source.fetch(source.ref, staged, mirrors=settings.mirrors,
                               expected_size=None, expected_sha256=None,
                               connections=settings.connections, timeout=settings.timeout,
                               progress=progress, limits=settings.limits)
        return Delivered(got.url, got.size, got.sha256, got.transferred)
    blob, result = fetch_one(source.repo, source.revision, source.filename, settings,
                             repo_type=repo_type,
                             progress=(lambda _n, _t: progress) if progress else None)
    local.place(blob, staged)
    env = HubEnv.from_environ()
    return Delivered(resolve_url(env.endpoint, repo_type, source.repo, source.revision,
                                 source.filename), result.size, result.sha256,
                     result.transferred)
