"""Every `ckpt` command and subcommand, found from the COMMANDS table, so that tests written
against this list also cover commands added later."""

from __future__ import annotations

import click

from ckptkit.cli.main import COMMANDS, cli


def all_commands() -> list[tuple[str, click.Command]]:
    """``[("inspect", <Command>), ("cache", <Group>), ("cache ls", <Command>), ...]``."""
    ctx = click.Context(cli, info_name="ckpt")
    found: list[tuple[str, click.Command]] = []

    def visit(command: click.Command | None, path: str) -> None:
        assert command is not None, f"COMMANDS names {path!r} but it cannot be loaded"
        found.append((path, command))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                visit(command.get_command(ctx, name), f"{path} {name}")

    for name in COMMANDS:
        visit(cli.get_command(ctx, name), name)
    return found


def leaf_commands() -> list[tuple[str, click.Command]]:
    """The commands that run (groups such as ``cache`` left out)."""
    return [(path, c) for path, c in all_commands() if not isinstance(c, click.Group)]


def options(command: click.Command) -> dict[str, click.Option]:
    """Options by their long name (``--json``), help left out."""
    return {next(o for o in p.opts if o.startswith("--")): p for p in command.params
            if isinstance(p, click.Option) and p.name != "help"}


def help_column(command: click.Command, option: click.Option) -> str:
    """The option as ``--help`` spells it in its left column, e.g. ``-q, --quiet``."""
    ctx = click.Context(command, info_name=command.name)
    record = option.get_help_record(ctx)
    assert record is not None
    return record[0]
