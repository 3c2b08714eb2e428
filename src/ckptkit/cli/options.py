"""Flags shared by several commands, with one meaning everywhere."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

F = Callable[..., Any]


def cache_options(func: F) -> F:
    """``--cache-dir`` and ``--catalog``: where files live and which catalogues are read."""
    func = click.option("--catalog", "catalogs", multiple=True, metavar="FILE",
                        type=click.Path(path_type=Path, dir_okay=False),
                        help="Extra catalogue file (repeatable; later files win).")(func)
    return click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
                        help="Cache directory [env: CKPTKIT_CACHE].")(func)


def network_options(func: F) -> F:
    """``--offline``, ``--mirror``, ``--local-dir``: how sources are reached."""
    func = click.option("--local-dir", "local_dirs", multiple=True, metavar="DIR",
                        type=click.Path(path_type=Path, file_okay=False),
                        help="Folder to look for files in (repeatable) "
                             "[env: CKPTKIT_LOCAL_PATH].")(func)
    func = click.option("--mirror", metavar="FROM=TO[,...]",
                        help="Rewrite source URL prefixes [env: CKPTKIT_MIRROR].")(func)
    return click.option("--offline", is_flag=True, default=None,
                        help="Never touch the network [env: CKPTKIT_OFFLINE=1].")(func)


def output_options(func: F) -> F:
    func = click.option("--quiet", "-q", is_flag=True, help="No progress or log lines.")(func)
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def confirm_options(func: F) -> F:
    func = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")(func)
    return click.option("--dry-run", is_flag=True, help="Only print the plan.")(func)


def confirm(question: str, yes: bool) -> bool:
    """Ask on a TTY; without one, refuse unless ``--yes`` (never delete by surprise)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        from ckptkit.errors import UsageError

        raise UsageError("refusing to delete without a terminal to confirm on",
                         hint="Pass --yes to confirm, or --dry-run to only see the plan")
    return click.confirm(question, default=False, err=True)


def log_to_stderr(quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not quiet:
            click.echo(f"ckpt: {message}", err=True)

    return log
