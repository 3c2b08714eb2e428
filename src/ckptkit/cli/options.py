"""Flags shared by several commands, with one meaning everywhere."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from ckptkit.cli.render import safe

if TYPE_CHECKING:
    from ckptkit.hub.resolver import Resolved

F = Callable[..., Any]


def cache_options(func: F) -> F:
    """``--cache-dir`` and ``--catalog``: where files live and which catalogues are read."""
    func = click.option("--catalog", "catalogs", multiple=True, metavar="FILE",
                        type=click.Path(path_type=Path, dir_okay=False),
                        help="Extra catalogue file (repeatable; later files win).")(func)
    return click.option("--cache-dir", metavar="DIR",
                        type=click.Path(path_type=Path, file_okay=False),
                        help="Cache directory [env: CKPTKIT_CACHE].")(func)


def resolve_checkpoints(refs: Sequence[str | Path], cache_dir: Path | None,
                        catalogs: tuple[Path, ...], *, several: bool = False) -> list[Resolved]:
    """Checkpoint arguments as local paths: a path as given, a catalogue name as its cached
    file (offline; the rules are in :mod:`ckptkit.hub.resolver`)."""
    from functools import partial

    from ckptkit.config import settings
    from ckptkit.hub.resolver import resolve

    return resolve(refs, partial(settings, cache_dir=cache_dir, catalogs=catalogs),
                   several=several)


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


#: One help text per concept, so that ``--help`` says the same thing on every command
#: (tests/cli/test_consistency.py holds every command to it; docs/cli.md explains each).
JSON_HELP = "Print the result as JSON on stdout (nothing else goes to stdout)."
QUIET_HELP = "Print only results and errors: no progress bars, log lines, notes or reports."
DRY_RUN_HELP = "Only print the plan; change nothing."
YES_HELP = "Do not ask before deleting or replacing files (needed without a terminal)."


def json_option(func: F) -> F:
    """``--json``: one JSON object or array on stdout and nothing else there."""
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(func)


def quiet_option(func: F) -> F:
    """``-q, --quiet``: results and errors only (what counts as the result: docs/cli.md)."""
    return click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)(func)


def dry_run_option(func: F) -> F:
    """``--dry-run``: print what would happen; write, delete and download nothing."""
    return click.option("--dry-run", is_flag=True, help=DRY_RUN_HELP)(func)


def yes_option(func: F) -> F:
    """``-y, --yes``: confirm up front; without a terminal it is the only way to confirm."""
    return click.option("--yes", "-y", is_flag=True, help=YES_HELP)(func)


def output_options(func: F) -> F:
    """``--json`` and ``--quiet``."""
    return json_option(quiet_option(func))


def confirm_options(func: F) -> F:
    """``--dry-run`` and ``--yes``, for commands that delete or replace files."""
    return dry_run_option(yes_option(func))


def confirm(question: str, yes: bool, action: str = "delete") -> bool:
    """Ask on a TTY; without one, refuse unless ``--yes`` (never delete by surprise)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        from ckptkit.errors import UsageError

        raise UsageError(f"refusing to {action} without a terminal to confirm on",
                         hint="Pass --yes to confirm, or --dry-run to only see the plan")
    return click.confirm(question, default=False, err=True)


def show_plan(*, quiet: bool, dry_run: bool, yes: bool) -> bool:
    """Whether a destructive command prints its plan before acting.

    Always, except under ``--quiet`` when the plan is neither the result (``--dry-run``) nor
    needed by a person asked to confirm on a terminal.
    """
    return not quiet or dry_run or (not yes and sys.stdin.isatty())


def log_to_stderr(quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not quiet:
            click.echo(f"ckpt: {safe(message)}", err=True)

    return log


class PathOrUrl(click.ParamType):
    """A PATH argument that may also be a URL (``s3://``, ``https://``, ``hf://``...): local
    paths become :class:`~pathlib.Path`, URLs stay strings, as the user typed them."""

    name = "path"

    def convert(self, value: Any, param: Any, ctx: Any) -> Path | str:
        from ckptkit.storage.location import is_url

        if isinstance(value, Path):
            return value
        return value if is_url(value) else Path(value)


PATH_OR_URL = PathOrUrl()


def is_remote(value: Any) -> bool:
    """True for a URL argument other than ``file://``."""
    from ckptkit.storage.location import is_url

    return isinstance(value, str) and is_url(value) and not value.lower().startswith("file://")


@contextmanager
def local_source(value: Any) -> Iterator[Any]:
    """``value`` as a local path: a remote object is copied to a temporary file first (for
    commands that read every tensor byte anyway), removed afterwards."""
    if not is_remote(value):
        yield value
        return
    import shutil
    import tempfile

    from ckptkit.storage.location import locate
    from ckptkit.storage.remote import copy_to

    location = locate(value)
    folder = Path(tempfile.mkdtemp(prefix="ckptkit-source-"))
    try:
        local = folder / (location.name or "checkpoint")
        with open(local, "wb") as fh:
            copy_to(location, fh)  # type: ignore[arg-type]
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def output_target(value: Any, *, dry_run: bool = False) -> Iterator[Any]:
    """Where a writer writes ``value``: itself when local; for a URL, a temporary local file
    uploaded atomically once the block completes (nothing is uploaded on error or dry run)."""
    if not is_remote(value):
        yield value
        return
    if dry_run:
        yield Path(str(value).rstrip("/").rpartition("/")[2] or "output")
        return
    from ckptkit.storage.remote_write import remote_output

    with remote_output(value) as local:
        yield local
