"""``ckpt fetch``: named models from the catalogue, verified, resumable, cached."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (cache_options, dry_run_option, log_to_stderr, network_options,
                                  output_options)
from ckptkit.cli.progress import progress_bars

EXAMPLES = (
    "ckpt fetch musiq-spaq",
    "ckpt fetch jukebox-1b_lyrics --dest ~/.cache/jukebox/models",
    "ckpt fetch loftr --dry-run --json",
    "CKPTKIT_MIRROR=https://openaipublic.azureedge.net=http://127.0.0.1:8000 ckpt fetch jukebox-5b",
    "ckpt fetch hf:kornia/loftr@main --include '*.ckpt'",
)


@command("fetch", EXAMPLES)
@click.argument("names", nargs=-1, required=True)
@click.option("--source", type=click.Choice(["hf", "tfhub", "kaggle", "url", "local"]),
              help="Use only this kind of source.")
@click.option("--dest", metavar="DIR", type=click.Path(path_type=Path, file_okay=False),
              help="Also place the files here, in the layout the origin tool expects.")
@click.option("--connections", metavar="N", type=click.IntRange(1, 64),
              help="Parallel connections per file [env: CKPTKIT_CONNECTIONS, default 8].")
@click.option("--pin-unsized", is_flag=True, default=None,
              help="Pin a first download even when neither its server nor the catalogue stated "
                   "its size [env: CKPTKIT_PIN_UNSIZED=1].")
@click.option("--include", "includes", multiple=True, metavar="GLOB",
              help="hf: only the repo files matching GLOB (repeatable).")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="hf: leave out the repo files matching GLOB (repeatable).")
@click.option("--repo-type", type=click.Choice(["model", "dataset"]), default=None,
              help="hf: the kind of repo [default: model].")
@dry_run_option
@network_options
@cache_options
@output_options
def fetch_command(names: tuple[str, ...], source: str | None, dest: Path | None,
                  connections: int | None, pin_unsized: bool | None, includes: tuple[str, ...],
                  excludes: tuple[str, ...], repo_type: str | None, dry_run: bool,
                  offline: bool | None,
                  mirror: str | None, local_dirs: tuple[Path, ...], cache_dir: Path | None,
                  catalogs: tuple[Path, ...], as_json: bool, quiet: bool) -> None:
    """Fetch models by catalogue name, or Hub repos as hf:ORG/REPO[@REVISION]; prints the local
    path of every file (of every snapshot folder for hf:).

    Sources are tried in catalogue order (Hugging Face Hub, TF Hub, Kaggle Hub, direct URL,
    local folders); each download is verified (size, sha256 or the first-use pin, format)
    before it is used. A failed source is reported on its own line as it happens. hf: repos
    go into the Hugging Face cache (HF_HUB_CACHE), where huggingface_hub finds them offline.
    Exits 4 when every source failed (or a Hub token is needed), 3 on a hash or size mismatch.
    """
    from ckptkit.config import settings
    from ckptkit.errors import UsageError
    from ckptkit.hub.fetch import FetchError, plan_fetch

    conf = settings(cache_dir=cache_dir, offline=offline, mirror=mirror, local_dirs=local_dirs,
                    catalogs=catalogs, connections=connections, pin_unsized=pin_unsized)
    hub = [n for n in names if n.startswith("hf:")]
    if hub:
        if len(hub) != len(names) or dest is not None or source not in (None, "hf"):
            raise UsageError("hf:ORG/REPO names cannot be mixed with catalogue names, --dest "
                             "or --source", hint="Fetch them in separate commands")
        _fetch_hub(hub, conf, includes, excludes, repo_type, dry_run, as_json, quiet)
        return
    if includes or excludes or repo_type:
        raise UsageError("--include, --exclude and --repo-type apply to hf:ORG/REPO names only",
                         hint="Write the repo as hf:ORG/REPO")
    plan = plan_fetch(list(names), conf, source=source, dest=dest)
    if dry_run:
        plan = plan.with_probed_sizes()
        if as_json:
            render.emit_json(plan.to_dict())
        else:
            click.echo(_plan_text(plan))
        return
    try:
        fetched = plan.execute(progress=progress_bars(quiet), log=log_to_stderr(quiet))
    except FetchError as exc:
        if quiet:  # the attempts were not logged as they happened; they are the error's detail
            for line in exc.attempt_lines():
                click.echo(f"ckpt: {render.safe(line)}", err=True)
        raise
    if as_json:
        render.emit_json([f.to_dict() for f in fetched])
    else:
        for item in fetched:
            click.echo(render.safe(item.path))


def _fetch_hub(refs: list[str], conf, includes: tuple[str, ...], excludes: tuple[str, ...],
               repo_type: str | None, dry_run: bool, as_json: bool, quiet: bool) -> None:
    """``ckpt fetch hf:...``: each repo's snapshot into the Hugging Face cache."""
    from ckptkit.hub.sources.hf import HubRef, plan_snapshot

    plans = [plan_snapshot(HubRef.parse(r, repo_type), conf, include=includes, exclude=excludes)
             for r in refs]
    if dry_run:
        if as_json:
            render.emit_json([p.to_dict() for p in plans])
        else:
            click.echo("\n".join(_hub_plan_text(p) for p in plans))
        return
    log = log_to_stderr(quiet)
    results = [p.execute(progress=progress_bars(quiet), log=log) for p in plans]
    if as_json:
        render.emit_json([r.to_dict() for r in results])
        return
    for result in results:
        resumed = (f", {render.size(result.resumed)} resumed from an interrupted run"
                   if result.resumed else "")
        log(f"{result.repo_id}@{result.commit[:12]}: {len(result.files)} file(s) verified, "
            f"{render.size(result.transferred)} transferred{resumed}")
        click.echo(render.safe(result.snapshot))


def _hub_plan_text(plan) -> str:
    r = plan.revision
    lines = [f"Plan for {render.safe(r.label)} = commit {r.commit}"
             + ("  (offline: Hub cache only)" if plan.settings.offline else ""),
             render.table([(f.file.path, "cached" if f.cached else "fetch",
                            render.size(f.file.size), "lfs" if f.file.lfs_sha256 else "git")
                           for f in plan.files], right=(2,)),
             f"Snapshot: {render.safe(plan.cache.snapshot(r.commit))}",
             f"To transfer: {render.size(plan.total_bytes)}"]
    return "\n".join(lines)


def _plan_text(plan) -> str:
    lines = [f"Plan for {render.safe(', '.join(plan.models))}"
             + ("  (offline: local sources and the Hugging Face cache only)"
                if plan.settings.offline else "")]
    rows = []
    for f in plan.files:
        state = "cached" if f.cached else "fetch"
        size = render.size(f.size) if f.size is not None else "size unknown"
        first = f.sources[0] if f.sources else None
        via = "" if f.cached else (
            f"via {first.type}:{plan.settings.mirrors.rewrite(first.ref) if first.ref else '--local-dir'}"
            + (f" (+{len(f.sources) - 1} fallback)" if len(f.sources) > 1 else "")
            if first else "no source")
        rows.append((f.spec.id, state, size, via))
    lines.append(render.table(rows, right=(2,)))
    total = render.size(plan.total_bytes)
    unknown = f", {plan.unknown_sizes} file(s) of unknown size" if plan.unknown_sizes else ""
    lines.append(f"To transfer: {total}{unknown}")
    return "\n".join(lines)
