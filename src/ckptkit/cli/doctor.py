"""``ckpt doctor``: can each model be fetched, is what is cached intact, and what is installed."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (cache_options, log_to_stderr, network_options,
                                  output_options)
from ckptkit.config import DOCTOR_TIMEOUT

if TYPE_CHECKING:
    from ckptkit.hub.diagnosis import Check, DoctorReport, ModelReport, SourceReport

EXAMPLES = (
    "ckpt doctor",
    "ckpt doctor musiq-spaq jukebox-1b_lyrics --timeout 2",
    "ckpt doctor --offline --json",
    "ckpt doctor musiq-spaq --mirror https://tfhub.dev=http://127.0.0.1:8000/tfhub",
)

COLUMNS = ("SOURCE", "REACHABLE", "AUTH", "CACHED", "VERIFIED", "WHERE")
VERDICT_WORDS = {"ok": "ok", "degraded": "DEGRADED", "unavailable": "UNAVAILABLE",
                 "damaged": "DAMAGED"}


@command("doctor", EXAMPLES)
@click.argument("names", nargs=-1)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DOCTOR_TIMEOUT,
              show_default=True, metavar="S",
              help="Seconds to wait for each source to connect and to answer.")
@network_options
@cache_options
@output_options
def doctor_command(names: tuple[str, ...], timeout: float, offline: bool | None,
                   mirror: str | None, local_dirs: tuple[Path, ...], cache_dir: Path | None,
                   catalogs: tuple[Path, ...], as_json: bool, quiet: bool) -> int:
    """Check catalogue models (NAMES, or all) without downloading or loading them.

    For ckptkit's cache and every source of every file: reachable (the first request the
    source's client sends, with --mirror applied), authenticated (Kaggle credentials; 401/403
    answers), cached (ckptkit's cache, the TF Hub and kagglehub caches, local paths) and
    verified (re-hashed against the catalogue sha256 or the lock.json pin).  Also prints the
    environment first (versions, installed extras, cache size and free disk, relevant
    variables), except with --quiet.  Offline (--offline, CKPTKIT_OFFLINE=1) no request is sent.

    Exits 0 when every model is fine, 1 when a source failed but every file can still be had,
    4 when a file has no cached copy and no working source, 3 when a cached copy fails
    verification.
    """
    from ckptkit.config import settings
    from ckptkit.hub.doctor import plan_doctor

    conf = settings(cache_dir=cache_dir, offline=offline, mirror=mirror, local_dirs=local_dirs,
                    catalogs=catalogs)
    report = plan_doctor(list(names), conf, timeout=timeout).execute(log=log_to_stderr(quiet))
    if as_json:
        render.emit_json(report.to_dict())
    else:
        click.echo(report_text(report, conf.mirrors.rules, environment=not quiet))
    return int(report.exit_code)


def report_text(report: DoctorReport, mirror_rules: tuple[tuple[str, str], ...] = (), *,
                environment: bool = True) -> str:
    """The human report: environment (unless ``environment`` is false: ``--quiet``), one
    table per model, one summary line."""
    parts = [_environment_text(report, mirror_rules)] if environment else []
    parts += [_model_text(model) for model in report.models]
    counts: dict[str, int] = {}
    for model in report.models:
        counts[model.verdict] = counts.get(model.verdict, 0) + 1
    tally = ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
    parts.append(f"-: does not apply.  {len(report.models)} model(s): {tally or 'none'}; "
                 f"exit {int(report.exit_code)}")
    return "\n\n".join(parts)


def _environment_text(report: DoctorReport, mirror_rules: tuple[tuple[str, str], ...]) -> str:
    env = report.environment
    have = [f"{e.module} {e.version or '?'}" for e in env.extras if e.installed]
    lacking = [f"{e.module} (ckptkit[{e.extra}])" for e in env.extras if not e.installed]
    cache = env.cache
    size = (f"{render.count(cache.files)} files, {render.size(cache.bytes)}" if cache.exists
            else "not created yet")
    free = (f"{render.size(cache.free_bytes)} free" if cache.free_bytes is not None
            else cache.problem or "free space not checked")
    pins = (f"{env.pins} pin(s) in lock.json" if env.pins is not None
            else f"lock.json not read: {env.pins_problem}")
    if report.offline:
        network = "offline: no request sent, reachability not checked"
    else:
        network = f"{report.requests} request(s), timeout {report.timeout:g} s"
    if mirror_rules:
        network += f"; {len(mirror_rules)} mirror rule(s)"
    lines = [
        f"ckptkit {env.ckptkit}  Python {env.python} ({env.implementation})  {env.platform}",
        render.label("extras", ", ".join(have) or "none")
        + (f"; not installed: {', '.join(lacking)}" if lacking else ""),
        render.label("cache", f"{env.cache.path} ({size}; {free})"),
        render.label("config", f"{env.config_dir} ({pins})"),
        render.label("tfhub", str(env.tfhub_cache_dir)),
        render.label("kagglehub", str(env.kagglehub_cache_dir)),
        render.label("kaggle", f"credentials from {env.kaggle_credentials}"
                     if env.kaggle_credentials else env.kaggle_credentials_problem
                     or "no credentials (public models only)"),
        render.label("network", network),
    ]
    for i, (name, value) in enumerate(env.variables):
        lines.append(render.label("env" if i == 0 else "", f"{name}={value}"))
    return "\n".join(render.safe(line) for line in lines)


def _model_text(model: ModelReport) -> str:
    head = render.safe(f"{model.name}: {VERDICT_WORDS[model.verdict]} - {model.summary}")
    rows: list[tuple[str, ...]] = [COLUMNS]
    groups: list[tuple[str, int]] = []  # (file header, index of its first row)
    for f in model.files:
        groups.append((f"{f.id} ({f.kind}"
                       + (f", sha256 from {f.hash_from}" if f.hash_from else ", no sha256 yet")
                       + ")", len(rows)))
        rows += [_row(r) for r in f.rows]
    table = render.table(rows, indent=4).split("\n")
    lines = [head, table[0]]
    starts = dict((start, header) for header, start in groups)
    for i, line in enumerate(table[1:], start=1):
        if i in starts:
            lines.append("  " + render.safe(starts[i]))
        lines.append(line)
    return "\n".join(lines)


def _row(r: SourceReport) -> tuple[str, ...]:
    return (r.type, _reachable(r), _cell(r.authenticated, shown=("not needed",)), _cached(r),
            _cell(r.verified), _where(r))


def _cell(check: Check, shown: tuple[str, ...] = ()) -> str:
    """One check in a few words; "does not apply" is "-" unless its detail is in ``shown``."""
    if check.status == "ok":
        return "yes" + (f" ({check.detail})" if check.detail else "")
    if check.status == "fail":
        return f"FAILED: {check.detail}"
    if check.status == "absent":
        return "no"
    if check.status == "not_checked":
        return f"not checked: {check.detail}"
    return check.detail if check.detail in shown else "-"


def _reachable(r: SourceReport) -> str:
    if r.reachable.status == "ok" and r.http_status is not None and r.seconds is not None:
        return f"yes ({r.http_status}, {r.seconds * 1000:.0f} ms)"
    return _cell(r.reachable)


def _cached(r: SourceReport) -> str:
    if r.cached.status != "ok":
        return _cell(r.cached)
    extra = [x for x in (r.cached.detail, render.size(r.size) if r.size is not None else "")
             if x]
    return "yes" + (f" ({', '.join(extra)})" if extra else "")


def _where(r: SourceReport) -> str:
    if r.type == "cache":
        return "ckptkit cache"
    target = r.copy if r.type == "local" and r.copy else r.target or ""
    if target.startswith(("http://", "https://")):
        return urllib.parse.urlsplit(target).netloc
    home = str(Path.home())
    return "~" + target[len(home):] if home != "/" and target.startswith(home + "/") else target
