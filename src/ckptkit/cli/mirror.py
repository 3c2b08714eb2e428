"""``ckpt mirror export|serve``: a site mirror for machines without internet."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import group
from ckptkit.cli.options import cache_options, log_to_stderr, output_options


@group("mirror", ("ckpt mirror export /srv/ckpt-mirror musiq-spaq jukebox-5b loftr",
                  "ckpt mirror serve /srv/ckpt-mirror --port 8000",
                  "ckpt mirror rules /srv/ckpt-mirror --base-url http://mirror.lan/ckpt"))
def mirror_group() -> None:
    """Make a static mirror of cached models for machines without internet, and try it.

    On a machine with internet: fetch the models, then export them into a tree any web
    server (or a shared disk, through file:// URLs) can serve.  Elsewhere: fetch with the
    --mirror rules it prints (`ckpt mirror rules` prints them again).  docs/mirror.md shows
    both ends.
    """


@mirror_group.command("export", examples=(
    "ckpt mirror export /srv/ckpt-mirror",
    "ckpt mirror export /srv/ckpt-mirror musiq-spaq loftr --base-url http://mirror.lan/ckpt",
    "ckpt mirror export /media/usb/ckpt-mirror jukebox-5b --quiet"))
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.argument("names", nargs=-1)
@click.option("--base-url", metavar="URL",
              help="Where DIRECTORY will be served from, for the rules printed "
                   "[default: its file:// URL].")
@cache_options
@output_options
def export_command(directory: Path, names: tuple[str, ...], base_url: str | None,
                   cache_dir: Path | None, catalogs: tuple[Path, ...], as_json: bool,
                   quiet: bool) -> None:
    """Write cached files of NAMES (default: every cached catalogue file) into DIRECTORY.

    Each file is placed at the path its source URL names, in a folder per host (TF Hub and
    Kaggle models as the .tar.gz those hubs serve), and DIRECTORY/ckpt-mirror.json lists the
    rules.  Prints the --mirror value that sends fetches to DIRECTORY as served from
    --base-url (with --quiet only that value).  Files already there are kept, so exporting
    again adds what is new.  Exits 4 when a name is not cached.
    """
    from ckptkit.config import settings
    from ckptkit.hub.mirror_tree import base_url as file_base
    from ckptkit.hub.mirror_tree import mirror_value, plan_export

    conf = settings(cache_dir=cache_dir, catalogs=catalogs)
    plan = plan_export(directory, names, conf)
    log = log_to_stderr(quiet)
    for name, why in plan.skipped:
        log(f"{name}: not exported, {why}")
    result = plan.execute()
    base = base_url or file_base(directory)
    if as_json:
        render.emit_json(result.to_dict(base))
        return
    value = mirror_value(result.rules, base)
    if quiet:
        click.echo(value)
        return
    total = sum(f.size for f in result.files)
    click.echo(f"Exported {len(result.files)} file(s), {render.size(total)}, to "
               f"{render.safe(directory)} ({result.written} written, {result.kept} already there)")
    click.echo(f"Fetch from it (served at {render.safe(base)}) with:\n  --mirror {value}")


@mirror_group.command("rules", examples=(
    "ckpt mirror rules /media/usb/ckpt-mirror",
    "ckpt mirror rules /srv/ckpt-mirror --base-url http://mirror.lan/ckpt",
    'ckpt fetch loftr --mirror "$(ckpt mirror rules /media/usb/ckpt-mirror)"'))
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--base-url", metavar="URL",
              help="Where DIRECTORY is served from [default: its file:// URL].")
def rules_command(directory: Path, base_url: str | None) -> None:
    """Print the --mirror value for the mirror tree DIRECTORY, as served from --base-url.

    Reads the tree's ckpt-mirror.json only: no cache needed, so any machine that sees the tree
    can run it.  Exits 4 when DIRECTORY is not a tree `ckpt mirror export` wrote.
    """
    from ckptkit.hub.mirror_tree import base_url as file_base
    from ckptkit.hub.mirror_tree import mirror_value, read_rules

    click.echo(mirror_value(read_rules(directory), base_url or file_base(directory)))


@mirror_group.command("serve", examples=(
    "ckpt mirror serve /srv/ckpt-mirror",
    "ckpt mirror serve mirror/ --port 0 --verbose"))
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              metavar="N", help="Port on 127.0.0.1 to listen on (0: any free port).")
@click.option("--verbose", is_flag=True, help="Log each request to stderr.")
def serve_command(directory: Path, port: int, verbose: bool) -> None:
    """Serve the mirror tree DIRECTORY on 127.0.0.1 until Ctrl-C, to try it.

    A static file server with byte ranges, as a real web server would serve the tree.
    Prints the --mirror value for it on stdout (one line, at once), then serves; Ctrl-C or
    SIGTERM stops it (exit 0).  Exits 1 when the port is taken, 4 when DIRECTORY is not a tree
    `ckpt mirror export` wrote.
    """
    from ckptkit.errors import CkptkitError
    from ckptkit.hub.mirror_tree import mirror_value, read_rules
    from ckptkit.testing.static import StaticServer

    rules = read_rules(directory)
    try:
        server = StaticServer(directory, port=port, verbose=verbose)
    except OSError as exc:
        raise CkptkitError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}",
                           hint="Pick another --port, or --port 0 for any free one") from exc
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server:
            click.echo(f"ckpt: serving {render.safe(directory)} on {server.base}; "
                       "Ctrl-C stops", err=True)
            click.echo(mirror_value(rules, server.base))
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("ckpt: stopped", err=True)
