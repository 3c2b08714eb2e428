"""``ckpt cache``: list, verify, remove and prune cached files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import group
from ckptkit.cli.options import (cache_options, confirm, confirm_options, json_option,
                                  quiet_option, show_plan)
from ckptkit.errors import ExitCode


@group("cache", ("ckpt cache ls", "ckpt cache verify", "ckpt cache rm jukebox-5b --dry-run",
                  "ckpt cache prune --yes"))
def cache_group() -> None:
    """Manage the download cache (CKPTKIT_CACHE)."""


def _open(cache_dir: Path | None, catalogs: tuple[Path, ...]):
    from ckptkit.hub import catalogue
    from ckptkit.hub.cache import Cache
    from ckptkit.config import settings

    conf = settings(cache_dir=cache_dir, catalogs=catalogs)
    return conf, Cache(conf.cache_dir), catalogue.load(conf.all_catalogs())


@cache_group.command("ls", examples=("ckpt cache ls", "ckpt cache ls --json | jq '.[].path'"))
@cache_options
@json_option
def ls_command(cache_dir: Path | None, catalogs: tuple[Path, ...], as_json: bool) -> None:
    """List cached files with size, source and date."""
    from ckptkit.hub.sources import hf_cache

    conf, cache, cat = _open(cache_dir, catalogs)
    entries = cache.entries()
    snapshots = hf_cache.records(conf.cache_dir)
    if as_json:
        render.emit_json([{"name": e.id, "path": e.path, "bytes": e.size, "sha256": e.sha256,
                           "source": e.source, "url": e.url, "fetched_at": e.fetched_at,
                           "models": list(cat.users_of(e.id))} for e in entries]
                         + [{"name": r.name, "path": str(r.snapshot), "bytes": r.size,
                             "sha256": None, "source": "hf", "url": None,
                             "fetched_at": r.fetched_at, "models": [],
                             "files": len(r.files)} for r in snapshots])
        return
    if not entries and not snapshots:
        click.echo(f"cache {render.safe(conf.cache_dir)} is empty")
        return
    if entries:
        click.echo(render.table(
            [("FILE", "SIZE", "SOURCE", "FETCHED", "MODELS")]
            + [(e.id, render.size(e.size), e.source,
                dt.datetime.fromtimestamp(e.fetched_at).strftime("%Y-%m-%d %H:%M"),
                ", ".join(cat.users_of(e.id)) or "-") for e in entries], indent=0, right=(1,)))
        click.echo(f"{len(entries)} file(s), {render.size(sum(e.size for e in entries))} "
                   f"in {render.safe(conf.cache_dir)}")
    if snapshots:  # what ckpt fetch hf: wrote into the Hugging Face cache
        click.echo(render.table(
            [("HUB SNAPSHOT", "SIZE", "FILES", "FETCHED", "FOLDER")]
            + [(r.name, render.size(r.size), len(r.files),
                dt.datetime.fromtimestamp(r.fetched_at).strftime("%Y-%m-%d %H:%M"),
                render.safe(r.snapshot)) for r in snapshots], indent=0, right=(1, 2)))


@cache_group.command("verify", examples=("ckpt cache verify",
                                          "ckpt cache verify jukebox-1b_lyrics --json"))
@click.argument("names", nargs=-1)
@cache_options
@json_option
def verify_command(names: tuple[str, ...], cache_dir: Path | None, catalogs: tuple[Path, ...],
                   as_json: bool) -> int:
    """Re-hash cached files (all, or those of NAMES) against what was recorded and pinned.

    Files that were recorded but are gone count as MISSING.  Exits 3 if any file changed or
    went missing.
    """
    from ckptkit.hub.pins import Pins

    conf, cache, cat = _open(cache_dir, catalogs)
    pins = Pins(conf.pins_path)
    recorded = dict(cache.status())
    catalogued = tuple(n for n in names if not n.startswith("hf:"))
    ids = _file_ids(cat, catalogued) if catalogued else [] if names else sorted(recorded)
    rows = []
    for file_id in ids:
        state = recorded.get(file_id)
        if state is None:
            rows.append({"name": file_id, "status": "not cached"})
            continue
        if state != "ok":
            rows.append({"name": file_id, "status": "MISSING" if state == "missing" else "CHANGED"})
            continue
        entry, actual = cache.verify(file_id)
        spec = cat.files.get(file_id)
        pin = pins.get(file_id)
        expected = (spec.sha256 if spec and spec.sha256 else None) or (
            pin.sha256 if pin else entry.sha256)
        rows.append({"name": file_id, "status": "ok" if actual == expected else "CHANGED",
                     "expected": expected, "actual": actual})
    if not names or any(n.startswith("hf:") for n in names):
        rows.extend(_verify_snapshots(conf.cache_dir, [n for n in names if n.startswith("hf:")]))
    if as_json:
        render.emit_json(rows)
    else:
        for row in rows:
            click.echo(f"{row['status']:<11}{render.safe(row['name'])}")
    bad = [r["name"] for r in rows if r["status"] in ("CHANGED", "MISSING")]
    ours = [n for n in bad if not n.startswith("hf:")]
    hub = sorted({n.split("/")[0] + "/" + n.split("/")[1] for n in bad if n.startswith("hf:")})
    if bad:
        again = ([f"ckpt cache rm {render.safe(' '.join(ours))} --yes && ckpt fetch <model>"]
                 if ours else []) + [f"ckpt fetch {render.safe(h)}" for h in hub]
        click.echo(f"ckpt: {len(bad)} cached file(s) changed or missing; fetch them again: "
                   + "; ".join(again), err=True)
        return ExitCode.INTEGRITY
    return ExitCode.OK


def _verify_snapshots(cache_dir: Path, wanted: list[str]) -> list[dict]:
    """Rows for the files of the Hub snapshots ckpt wrote (those named ``hf:ORG/REPO``, or
    all): each blob re-hashed against the sha256 verified when it was fetched."""
    from ckptkit.hub.sources import hf_cache

    rows = []
    for record in hf_cache.records(cache_dir):
        repo = record.name.split("@")[0]
        if wanted and not any(w.split("@")[0] == repo for w in wanted):
            continue
        for file, state in hf_cache.verify_record(record):
            rows.append({"name": f"{repo}/{file.path}", "status": state,
                         "expected": file.sha256, "path": str(record.snapshot / file.path)})
    return rows


@cache_group.command("rm", examples=("ckpt cache rm jukebox-5b --dry-run",
                                      "ckpt cache rm jukebox/5b/vqvae.pth.tar --yes",
                                      "ckpt cache rm loftr --yes --json | jq .freed_bytes"))
@click.argument("names", nargs=-1, required=True)
@cache_options
@confirm_options
@json_option
@quiet_option
def rm_command(names: tuple[str, ...], cache_dir: Path | None, catalogs: tuple[Path, ...],
               dry_run: bool, yes: bool, as_json: bool, quiet: bool) -> None:
    """Remove the cached files of models (or file ids); shared files another cached model
    still needs are kept."""
    from ckptkit.hub.cache import plan_removal

    _conf, cache, cat = _open(cache_dir, catalogs)
    ids = _file_ids(cat, names)
    targets = {cat.model(n).name for n in names if n not in cat.files}
    explicit = {n for n in names if n in cat.files}  # a file named by id goes, shared or not
    needed: dict[str, list[str]] = {}
    for model in cat.models.values():
        if model.name in targets or not all(cache.entry(f) for f in model.files):
            continue
        for file_id in model.files:
            if file_id not in explicit:
                needed.setdefault(file_id, []).append(model.name)
    _run(plan_removal(cache, ids, needed), cache, dry_run=dry_run, yes=yes, as_json=as_json,
         quiet=quiet)


@cache_group.command("prune", examples=("ckpt cache prune --dry-run",
                                         "ckpt cache prune --unreferenced --yes",
                                         "ckpt cache prune --yes --quiet"))
@cache_options
@confirm_options
@click.option("--unreferenced", is_flag=True,
              help="Also delete cached files no catalogue names (pass the --catalog files "
                   "you fetched with, or they count as unreferenced).")
@json_option
@quiet_option
def prune_command(cache_dir: Path | None, catalogs: tuple[Path, ...], dry_run: bool,
                  yes: bool, unreferenced: bool, as_json: bool, quiet: bool) -> None:
    """Delete partial downloads and staging leftovers (never a download in progress).

    Leftovers are found by where they lie in the cache (tmp/, staging/, files without a
    commit record), never by name.  Every planned path is re-checked (size, mtime, inode)
    before the first deletion; if one changed, nothing is deleted (exit 1).  Also aborts the
    S3 multipart uploads of writes to s3:// that were killed (kill -9) on this machine.
    """
    from ckptkit.hub.cache import plan_prune

    _conf, cache, cat = _open(cache_dir, catalogs)
    _run(plan_prune(cache, set(cat.files) if unreferenced else None), cache, dry_run=dry_run,
         yes=yes, as_json=as_json, quiet=quiet)
    if not dry_run:
        _abort_abandoned_uploads(quiet or as_json)


def _abort_abandoned_uploads(quiet: bool) -> None:
    """Abort multipart uploads of killed ckptkit writers (recorded in the cache's journal);
    S3 never shows them as objects, but keeps their parts (and bills them) until aborted."""
    from ckptkit.storage.remote_write import sweep_abandoned

    for url in sweep_abandoned():
        if not quiet:
            click.echo(f"ckpt: aborted the unfinished upload to {render.safe(url)} "
                       "(its writer was killed)", err=True)


def _file_ids(cat, names: tuple[str, ...]) -> list[str]:
    ids: list[str] = []
    for name in names:
        for file_id in ([name] if name in cat.files else cat.model(name).files):
            if file_id not in ids:
                ids.append(file_id)
    return ids


def _run(plan, cache, *, dry_run: bool, yes: bool, as_json: bool, quiet: bool) -> None:
    """Show the plan (unless --json, or --quiet with nobody to ask), confirm, delete, report."""
    if not as_json and show_plan(quiet=quiet, dry_run=dry_run, yes=yes):
        for kept in plan.kept:
            click.echo(f"keep    {render.safe(kept)}")
        for item in plan.remove:
            click.echo(f"delete  {render.safe(item.file_id or item.path)}  "
                       f"{render.size(item.bytes)}  ({item.reason})")
        if plan.remove:
            click.echo(f"{len(plan.remove)} item(s), {render.size(plan.freed_bytes)} to free")
        else:
            click.echo("nothing to delete")
    deleted = plan.remove if dry_run else ()
    if plan.remove and not dry_run:
        if confirm("Delete them?", yes):
            plan.execute(cache)
            deleted = plan.remove
            if not as_json:
                click.echo(f"freed {render.size(plan.freed_bytes)}")
        else:
            click.echo("nothing deleted", err=True)
    if as_json:
        render.emit_json({
            "kept": list(plan.kept),
            "deleted": [{"name": r.file_id, "path": r.path, "bytes": r.bytes, "reason": r.reason}
                        for r in deleted],
            "freed_bytes": sum(r.bytes for r in deleted), "dry_run": dry_run})
