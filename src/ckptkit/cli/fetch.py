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
)


@command("fetch", EXAMPLES)
@click.argument("names", nargs=-1, required=True)
@click.option("--source", type=click.Choice(["tfhub", "kaggle", "url", "local"]),
              help="Use only this kind of source.")
@click.option("--dest", metavar="DIR", type=click.Path(path_type=Path, file_okay=False),
              help="Also place the files here, in the layout the origin tool expects.")
@click.option("--connections", metavar="N", type=click.IntRange(1, 64),
              help="Parallel connections per file [env: CKPTKIT_CONNECTIONS, default 8].")
@click.option("--pin-unsized", is_flag=True, default=None,
              help="Pin a first download even when neither its server nor the catalogue stated "
                   "its size [env: CKPTKIT_PIN_UNSIZED=1].")
@dry_run_option
@network_options
@cache_options
@output_options
def fetch_command(names: tuple[str, ...], source: str | None, dest: Path | None,
                  connections: int | None, pin_unsized: bool | None, dry_run: bool,
                  offline: bool | None,
                  mirror: str | None, local_dirs: tuple[Path, ...], cache_dir: Path | None,
                  catalogs: tuple[Path, ...], as_json: bool, quiet: bool) -> None:
    """Fetch models by catalogue name; prints the local path of every file.

    Sources are tried in catalogue order (TF Hub, Kaggle Hub, direct URL, local folders); each
    download is verified (size, sha256 or the first-use pin, format) before it is used.
    A failed source is reported on its own line as it happens. Exits 4 when every source
    failed, 3 on a hash or size mismatch.
    """
    from ckptkit.config import settings
    from ckptkit.hub.fetch import FetchError, plan_fetch

    conf = settings(cache_dir=cache_dir, offline=offline, mirror=mirror, local_dirs=local_dirs,
                    catalogs=catalogs, connections=connections, pin_unsized=pin_unsized)
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


def _plan_text(plan) -> str:
    lines = [f"Plan for {render.safe(', '.join(plan.models))}"
             + ("  (offline: local sources only)" if plan.settings.offline else "")]
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
