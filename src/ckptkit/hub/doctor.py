"""``ckpt doctor``: can each catalogue model be had, and is what is cached still intact?

:func:`plan_doctor` decides what to look at, per file: ckptkit's cache, then each source the
fetch chain would try (in the same order, ``--local-dir`` folders last) — the request its
client would send first (mirror applied), the origin copy it would reuse (TF Hub cache,
kagglehub cache, a local path) and the hash a copy must have.  It reads no network.

:meth:`DoctorPlan.execute` does it: probes (:mod:`ckptkit.hub.probes`) and re-hashing run in at most
:data:`MAX_WORKERS` threads, each probe bounded by the timeout.  Offline, no request is sent and
reachability is "not checked".  No model is downloaded or loaded.  The verdicts and exit codes
are :mod:`ckptkit.hub.diagnosis`'s.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ckptkit.hub import catalogue as catalogue_mod
from ckptkit.hub.download import waiting
from ckptkit.hub.cache import Cache, CacheEntry
from ckptkit.hub.catalogue import Catalogue, FileSpec, SourceSpec
from ckptkit.config import DOCTOR_TIMEOUT, Settings
from ckptkit.hub.credentials import KaggleLookup, in_colab, look_up_kaggle_credentials
from ckptkit.hub.diagnosis import (Check, DoctorReport, FileReport, SourceReport, judge,
                               not_applicable, not_checked)
from ckptkit.errors import CkptkitError, NotFoundError, UsageError
from ckptkit.storage.hashing import sha256_and_size, tree_size
from ckptkit.hub.pins import Pins, PinsSnapshot
from ckptkit.hub.probes import ProbeRequest, ProbeResult, download_probe, kaggle_probe, send

MAX_WORKERS = 8
_ON_DISK = "on disk"


@dataclass(frozen=True)
class PlannedSource:
    """What to check for one source of one file.

    Attributes:
        target: the URL to probe (mirror applied) or the local path to look at.
        probe: the request to send; None for local sources, offline, or when ``problem``.
        problem: why this source cannot work at all here (kagglehub missing, a bad handle).
        copy: the origin cache entry to look for (None: none, or ``--local-dir`` folders).
        marker: a file that must exist for ``copy`` to count (kagglehub's ``N.complete``).
    """

    source: SourceSpec
    target: str | None
    probe: ProbeRequest | None = None
    problem: str | None = None
    copy: Path | None = None
    marker: Path | None = None


@dataclass(frozen=True)
class PlannedFile:
    spec: FileSpec
    expected_sha256: str | None
    hash_from: str | None  # "catalogue", "pin" or None
    sources: tuple[PlannedSource, ...]


@dataclass(frozen=True)
class DoctorPlan:
    """What :meth:`execute` will check; shared files appear once in ``files``.

    ``pins`` and ``kaggle`` are read once, here, and serve both the checks and the
    environment report.
    """

    models: tuple[tuple[str, tuple[str, ...]], ...]  # (model name, its file ids)
    files: tuple[PlannedFile, ...]
    settings: Settings
    timeout: float
    kaggle: KaggleLookup  # the credentials sent with Kaggle probes, or an unreadable kaggle.json
    pins: PinsSnapshot  # lock.json

    @property
    def probes(self) -> tuple[ProbeRequest, ...]:
        """Every distinct request :meth:`execute` sends (none offline)."""
        seen = dict.fromkeys(s.probe for f in self.files for s in f.sources if s.probe)
        return tuple(seen)

    def execute(self, log: Callable[[str], None] | None = None) -> DoctorReport:
        """Run every check (threads; network only when online) and judge each model."""
        from ckptkit.hub.environment import describe_environment

        if log is not None:
            log(f"checking {len(self.files)} file(s): {len(self.probes)} request(s)"
                + (" (offline: none sent)" if self.settings.offline
                   else f", timeout {self.timeout:g} s"))
        run = _Run(self)
        reports = run.files()
        models = tuple(judge(name, tuple(reports[i] for i in ids), self.settings.offline)
                       for name, ids in self.models)
        environment = describe_environment(self.settings, pins=self.pins, kaggle=self.kaggle)
        return DoctorReport(environment, models, self.settings.offline, self.timeout,
                            len(self.probes))


def plan_doctor(names: list[str] | tuple[str, ...], settings: Settings, *,
                timeout: float = DOCTOR_TIMEOUT,
                catalogue: Catalogue | None = None) -> DoctorPlan:
    """Decide what ``ckpt doctor NAMES`` checks (every model when ``names`` is empty).

    Raises:
        UsageError: an unknown model name (the message suggests close ones), or a timeout
            that is not positive.
        CatalogueError: a catalogue file is broken (exit 2).
    """
    if not timeout > 0:
        raise UsageError(f"timeout {timeout!r} is not a positive number of seconds")
    cat = catalogue or catalogue_mod.load(settings.all_catalogs())
    try:
        chosen = [cat.model(n) for n in names] if names else [cat.models[n]
                                                              for n in sorted(cat.models)]
    except NotFoundError as exc:  # a name typed wrong is a usage error here, not a lookup
        raise UsageError(exc.message, hint=exc.hint) from exc
    pins = Pins(settings.pins_path).snapshot()  # unreadable: no pins, reported with the environment
    files: dict[str, PlannedFile] = {}
    for model in chosen:
        for spec in cat.files_of(model.name):
            if spec.id not in files:
                sha, origin = _expected(spec, pins)
                files[spec.id] = PlannedFile(spec, sha, origin, tuple(
                    _plan_source(s, spec, settings) for s in _chain(spec, settings)))
    return DoctorPlan(tuple((m.name, m.files) for m in chosen), tuple(files.values()), settings,
                      timeout, look_up_kaggle_credentials(), pins)


def _expected(spec: FileSpec, pins: PinsSnapshot) -> tuple[str | None, str | None]:
    """The sha256 a file must have and where it comes from: the catalogue's, else the pin."""
    if spec.sha256:
        return spec.sha256, "catalogue"
    pin = pins.pins.get(spec.id)
    return (pin.sha256, "pin") if pin else (None, None)


def _chain(spec: FileSpec, settings: Settings) -> tuple[SourceSpec, ...]:
    """The sources a fetch would try, in order (``--local-dir`` folders last)."""
    extra = (SourceSpec("local", ""),) if settings.local_dirs else ()
    return (*spec.sources, *extra)


def _plan_source(source: SourceSpec, spec: FileSpec, settings: Settings) -> PlannedSource:
    offline, mirrors = settings.offline, settings.mirrors
    if source.type == "local":
        if not source.ref:
            return PlannedSource(source, "--local-dir folders")
        path = Path(source.ref).expanduser()
        return PlannedSource(source, str(path), copy=path)
    if source.type == "url":
        url = mirrors.rewrite(source.ref)
        return PlannedSource(source, url, None if offline else download_probe(url))
    if source.type == "hf":
        return _plan_hf(source, settings)
    if source.type == "tfhub":
        from ckptkit.hub.sources import tfhub

        url = tfhub.compressed_url(mirrors.rewrite(source.ref))
        return PlannedSource(source, url, None if offline else download_probe(url),
                             copy=settings.tfhub_cache_dir / tfhub.module_key(source.ref))
    return _plan_kaggle(source, settings)


def _plan_hf(source: SourceSpec, settings: Settings) -> PlannedSource:
    """The file's ``resolve`` on the Hub endpoint (``HF_ENDPOINT``, mirror applied) and its
    copy in the Hugging Face cache (the snapshot ``refs/<revision>`` points to)."""
    from ckptkit.hub.sources.hf_api import HubEnv, resolve_url
    from ckptkit.hub.sources.hf_cache import HubRepoCache

    env = HubEnv.from_environ()
    url = settings.mirrors.rewrite(resolve_url(env.endpoint, source.repo_type, source.repo or "",
                                               source.revision, source.filename or ""))
    repo = HubRepoCache(env.hub_cache, source.repo_type, source.repo or "")
    commit = repo.read_ref(source.revision) or source.revision
    copy = repo.snapshot(commit) / (source.filename or "")
    return PlannedSource(source, url, None if settings.offline else download_probe(url),
                         copy=copy)


def _plan_kaggle(source: SourceSpec, settings: Settings) -> PlannedSource:
    from ckptkit.hub.probes import KAGGLE_RPC
    from ckptkit.hub.sources import kaggle

    archive = kaggle.mirrored_archive(source.ref, settings.mirrors)
    if archive is not None:  # a static mirror: fetched as its archive, kagglehub not used
        return PlannedSource(source, archive,
                             None if settings.offline else download_probe(archive))
    base = kaggle.api_base(settings.mirrors) or kaggle.KAGGLE_API
    owner, model, framework, variation, version = source.ref.split("/")
    folder = settings.kagglehub_cache_dir / "models" / owner / model / framework / variation
    planned = PlannedSource(source, base + KAGGLE_RPC, copy=folder / version,
                            marker=folder / f"{version}.complete")
    if importlib.util.find_spec("kagglehub") is None:
        return replace(planned, problem="kagglehub not installed: pip install 'ckptkit[kaggle]'")
    if settings.offline:
        return planned
    try:
        return replace(planned, probe=kaggle_probe(source.ref, base))
    except CkptkitError as exc:
        return replace(planned, problem=str(exc))


class _Run:
    """One execution: submits every probe and hash at once, then reads the results."""

    def __init__(self, plan: DoctorPlan) -> None:
        self.plan = plan
        self.offline = plan.settings.offline
        self.cache = Cache(plan.settings.cache_dir)
        self.recorded = dict(self.cache.status())
        self.pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="ckpt-doctor")
        self.probes: dict[ProbeRequest, Future[ProbeResult]] = {}
        self.hashes: dict[Path, Future[tuple[str, int]]] = {}  # sha256 and size
        self.verified: dict[str, Future[tuple[CacheEntry, str]]] = {}
        self.copies: dict[tuple[str, SourceSpec], list[Path]] = {}
        from ckptkit.hub.sources.hf_api import HubEnv

        self.hf_env = HubEnv.from_environ()

    def files(self) -> dict[str, FileReport]:
        try:
            self._submit()
            reports = {f.spec.id: self._file(f) for f in self.plan.files}
        except BaseException:
            # Ctrl-C: do not wait for a multi-gigabyte hash to finish.
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise
        self.pool.shutdown()
        return reports

    def _submit(self) -> None:
        from ckptkit.hub.sources import local

        auth = self.plan.kaggle.credentials
        for planned in self.plan.files:
            if self.recorded.get(planned.spec.id) == "ok":
                self.verified[planned.spec.id] = self.pool.submit(self.cache.verify,
                                                                  planned.spec.id)
            # Copies are hashed only when there is something to compare them with.
            comparable = (planned.expected_sha256 is not None
                          or self.recorded.get(planned.spec.id) == "ok")
            for s in planned.sources:
                if s.probe is not None and s.probe not in self.probes:
                    # Credentials go with Kaggle API calls only, not to a static mirror.
                    headers = (auth.headers() if auth and s.source.type == "kaggle"
                               and s.probe.method == "POST" else None)
                    if s.source.type == "hf":  # the Hub token, to the Hub endpoint only
                        headers = self.hf_env.headers_for(s.probe.url) or None
                    self.probes[s.probe] = self.pool.submit(
                        send, s.probe, timeout=self.plan.timeout, headers=headers)
                if s.source.type == "local":
                    found = local.candidates(planned.spec, s.source.ref or None,
                                             self.plan.settings.local_dirs)
                elif s.source.type == "hf":
                    found = [s.copy] if s.copy is not None and s.copy.is_file() else []
                else:
                    found = [s.copy] if s.copy is not None and self._present(s) else []
                self.copies[(planned.spec.id, s.source)] = found
                for path in found:
                    if comparable and path not in self.hashes:
                        self.hashes[path] = self.pool.submit(sha256_and_size, path)

    def _present(self, s: PlannedSource) -> bool:
        """An origin cache entry its tool would use: kagglehub needs its ``.complete``
        marker; tensorflow_hub takes any non-empty directory as complete."""
        try:
            if s.copy is None or not s.copy.is_dir():
                return False
            return s.marker.is_file() if s.marker is not None else any(s.copy.iterdir())
        except OSError:
            return False

    def _file(self, planned: PlannedFile) -> FileReport:
        cache_row, recorded_sha = self._cache_row(planned)
        expected = planned.expected_sha256 or recorded_sha
        what = planned.hash_from or ("cached copy" if recorded_sha else None)
        rows = tuple(self._source_row(planned, s, expected, what) for s in planned.sources)
        return FileReport(planned.spec.id, planned.spec.kind, planned.expected_sha256,
                          planned.hash_from, cache_row, rows)

    def _cache_row(self, planned: PlannedFile) -> tuple[SourceReport, str | None]:
        file_id = planned.spec.id
        state = self.recorded.get(file_id)
        path = str(self.cache.path(file_id))
        here = not_applicable(_ON_DISK)  # neither network nor credentials are involved
        if state is None:
            return SourceReport("cache", "", path, None, here, here,
                                Check("absent", "not fetched yet"),
                                not_applicable("nothing cached")), None
        if state != "ok":
            why = "recorded, but the file is gone" if state == "missing" else \
                "changed on disk since it was fetched (size differs)"
            return SourceReport("cache", "", path, None, here, here, Check("fail", why),
                                not_applicable("nothing intact to verify")), None
        try:
            entry, actual = waiting.result(self.verified[file_id])
        except (CkptkitError, OSError) as exc:
            return SourceReport("cache", "", path, path, here, here, Check("ok"),
                                not_checked(f"unreadable: {exc}")), None
        expected = planned.expected_sha256 or entry.sha256
        what = planned.hash_from or "sha256 recorded at fetch"
        verified = (Check("ok", f"matches the {what}") if actual == expected
                    else Check("fail", f"sha256 differs from the {what}"))
        return SourceReport("cache", "", entry.path, entry.path, here, here, Check("ok"),
                            verified, usable=verified.status == "ok",
                            size=entry.size), entry.sha256

    def _source_row(self, planned: PlannedFile, s: PlannedSource, expected: str | None,
                    what: str | None) -> SourceReport:
        kind = s.source.type
        result = waiting.result(self.probes[s.probe]) if s.probe is not None else None
        reachable, auth = self._reachable(s, result), self._auth(s, result)
        found = self.copies[(planned.spec.id, s.source)]
        cached, verified, copy = self._copy(kind, found, expected, what)
        usable = self._usable(s, reachable, auth, cached, verified)
        return SourceReport(kind, s.source.ref, s.target, str(copy) if copy else None,
                            reachable, auth, cached, verified, usable,
                            result.status if result else None,
                            result.seconds if result else None,
                            result.size if result else None, self._size(copy))

    def _reachable(self, s: PlannedSource, result: ProbeResult | None) -> Check:
        if s.source.type == "local":
            return not_applicable(_ON_DISK)
        if s.problem is not None:
            return Check("fail", s.problem)
        if result is None:
            return not_checked("offline")
        if result.status is None:
            return Check("fail", result.error or "no answer")
        took = f"{result.seconds * 1000:.0f} ms"
        if result.status in (401, 403) or (200 <= result.status < 300 and not result.html):
            return Check("ok", f"HTTP {result.status} in {took}")
        if result.status in (404, 410):
            return Check("fail", f"HTTP {result.status}: not there")
        if result.html:
            return Check("fail", f"HTTP {result.status}: an HTML page, not the file")
        return Check("fail", f"HTTP {result.status}")

    def _auth(self, s: PlannedSource, result: ProbeResult | None) -> Check:
        kind = s.source.type
        if kind == "local":
            return not_applicable("not needed")
        if kind == "hf":
            return self._hf_auth(s, result)
        creds = self.plan.kaggle.credentials if kind == "kaggle" else None
        if kind == "kaggle" and self.plan.kaggle.problem:
            return Check("fail", self.plan.kaggle.problem)
        have = (f"credentials from {creds.origin}" if creds else
                "no credentials" + (" (Colab secrets not checked)" if in_colab() else ""))
        if s.problem is not None:
            return not_checked(f"source unusable; {have}")
        if result is None:
            return not_checked(f"offline; {have}" if kind == "kaggle" else "offline")
        if result.status in (401, 403):
            return Check("fail", f"HTTP {result.status}" + (f", {have}" if kind == "kaggle"
                                                            else ""))
        if result.status is None or not 200 <= result.status < 300:
            why = "no answer" if result.status is None else f"HTTP {result.status}"
            return not_checked(why + (f"; {have}" if kind == "kaggle" else ""))
        if creds is not None:
            return Check("ok", have)
        return not_applicable("not needed")

    def _hf_auth(self, s: PlannedSource, result: ProbeResult | None) -> Check:
        env = self.hf_env
        have = (f"token from {env.token_origin}" if env.token and s.target
                and env.headers_for(s.target) else "no token")
        if result is None:
            return not_checked(f"offline; {have}")
        if result.status in (401, 403):
            return Check("fail", f"HTTP {result.status}, {have}"
                         + ("; set HF_TOKEN or run `hf auth login`" if have == "no token"
                            else ""))
        if result.status is None or not 200 <= result.status < 300:
            return not_checked("no answer" if result.status is None
                               else f"HTTP {result.status}")
        return Check("ok", have) if have != "no token" else not_applicable("not needed")

    def _copy(self, kind: str, found: list[Path], expected: str | None,
              what: str | None) -> tuple[Check, Check, Path | None]:
        """(cached, verified, the copy reported) for an origin cache or local source."""
        where = {"tfhub": "TF Hub cache", "kaggle": "kagglehub cache",
                 "hf": "Hugging Face cache"}.get(kind, "")
        if kind == "url":
            return not_applicable("no origin cache"), not_applicable("no origin cache"), None
        if not found:
            return (Check("absent", f"not in {where}" if where else "not on disk"),
                    not_applicable("nothing cached"), None)
        cached = Check("ok", where or (f"{len(found)} candidates" if len(found) > 1 else ""))
        if expected is None:
            return cached, not_checked("no catalogue sha256 or pin to compare with"), found[0]
        for path in found:
            try:
                actual = waiting.result(self.hashes[path])[0]
            except OSError as exc:
                return cached, not_checked(f"unreadable: {exc.strerror or exc}"), path
            if actual == expected:
                return cached, Check("ok", f"matches the {what}"), path
        return cached, Check("fail", f"sha256 differs from the {what}"), found[0]

    def _size(self, copy: Path | None) -> int | None:
        """Bytes of the copy reported: counted while it was hashed, else measured now."""
        if copy is None:
            return None
        job = self.hashes.get(copy)
        if job is not None and job.exception() is None:
            return waiting.result(job)[1]
        return _size_of(copy)

    def _usable(self, s: PlannedSource, reachable: Check, auth: Check, cached: Check,
                verified: Check) -> bool:
        kind = s.source.type
        has_copy = cached.status == "ok" and verified.status != "fail"
        if kind == "local":
            return has_copy
        if kind == "hf" and self.offline:
            return has_copy  # a fetch offline takes hf files from the Hugging Face cache
        if self.offline or s.problem is not None:
            return False  # a fetch offline tries local sources only
        fetchable = reachable.status == "ok" and auth.status != "fail"
        if kind in ("kaggle", "hf"):
            return fetchable or has_copy  # the origin cache is reused before any request
        return fetchable


def _size_of(path: Path) -> int | None:
    try:
        return tree_size(path) if path.is_dir() else path.stat().st_size
    except OSError:
        return None
