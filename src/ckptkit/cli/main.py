"""Entry point of ``ckpt``: lazy subcommands and the one place errors become exit codes."""

from __future__ import annotations

import importlib
import os
import sys
import click

from ckptkit import config
from ckptkit.cli.errors import command_path, error_line
from ckptkit.cli.examples import ExamplesGroup
from ckptkit.cli.render import safe
from ckptkit.errors import CkptkitError, ExitCode

#: name -> (module, attribute).  Modules are imported only when their command runs or help
#: lists it, so `ckpt --help` never imports numpy, torch or TensorFlow.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("ckptkit.cli.inspect", "inspect_command"),
    "scan": ("ckptkit.cli.scan", "scan_command"),
    "fetch": ("ckptkit.cli.fetch", "fetch_command"),
    "list": ("ckptkit.cli.list", "list_command"),
    "cache": ("ckptkit.cli.cache", "cache_group"),
    "convert": ("ckptkit.cli.convert", "convert_command"),
    "compare": ("ckptkit.cli.compare", "compare_command"),
    "diff": ("ckptkit.cli.diff", "diff_command"),
    "strip": ("ckptkit.cli.strip", "strip_command"),
    "cleanup": ("ckptkit.cli.cleanup", "cleanup_command"),
    "latest": ("ckptkit.cli.latest", "latest_command"),
    "doctor": ("ckptkit.cli.doctor", "doctor_command"),
    "mirror": ("ckptkit.cli.mirror", "mirror_group"),
    "completion": ("ckptkit.cli.completion", "completion_command"),
    "verify": ("ckptkit.cli.verify", "verify_command"),
}


class LazyGroup(ExamplesGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: the installed package's version, from its metadata (nothing imported)."""
    if value and not ctx.resilient_parsing:
        from ckptkit import __version__

        click.echo(f"ckpt, version {__version__}")
        ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             examples=("ckpt fetch musiq-spaq", "ckpt inspect thinker_best.pt",
                       "ckpt convert loftr --to flax", "ckpt cleanup checkpoints/ --keep-last 1",
                       "ckpt cache ls"))
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and exit.")
def cli() -> None:
    """ckpt: fetch, inspect, convert and manage model checkpoints.

    Set CKPTKIT_DEBUG=1 to see tracebacks.
    """


def _error(message: str) -> None:
    click.echo(f"ckpt: error: {safe(' '.join(message.split()))}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Run ``ckpt`` and return (via SystemExit) the exit code from :class:`ExitCode`."""
    try:
        # NO_COLOR: click strips styles from everything echoed through this context.
        result = cli.main(args=argv, prog_name="ckpt", standalone_mode=False,
                          color=False if config.no_color() else None)
        code = int(result) if isinstance(result, int) else ExitCode.OK
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:  # `ckpt` or `ckpt cache` alone: the help
        exc.show()
        code = ExitCode.USAGE
    except click.ClickException as exc:
        click.echo(error_line(exc), err=True)
        code = ExitCode.USAGE if isinstance(exc, click.UsageError) else ExitCode.ERROR
    except CkptkitError as exc:
        if config.debug():
            raise
        click.echo(error_line(exc, command_path(cli, sys.argv[1:] if argv is None else argv)),
                   err=True)
        code = exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):  # click turns Ctrl-C into Abort
        _error("interrupted")
        # Worker threads (parallel downloads) would keep the interpreter alive until they
        # finish; everything on disk is safe to abandon (resumable .part files, atomic
        # renames), so leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        code = ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - last line of defence against tracebacks
        if config.debug():
            raise
        _error(f"internal error: {type(exc).__name__}: {exc}. Run with CKPTKIT_DEBUG=1 for the "
               "traceback and please report it")
        code = ExitCode.ERROR
    sys.exit(int(code))

