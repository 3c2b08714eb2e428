"""Help pages that end with examples, printed verbatim so they can be pasted into a shell.

click re-wraps an epilog to the help width (80 columns at most, whatever ``COLUMNS`` says),
which breaks a long example in two.  Commands made here keep their examples apart from the
epilog and print them after the options, one per line, exactly as written:

    Examples:
      ckpt fetch musiq-spaq
      ckpt fetch loftr --dry-run --json

Every command uses :func:`command` (or :func:`group`, whose subcommands get the same layout),
so every help page lays its examples out the same way; tests/cli/test_consistency.py parses each
line as ckpt would, to keep it a real command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import click

F = Callable[..., Any]


class _Examples:
    """Keeps ``examples`` apart from the epilog and prints them after it, verbatim."""

    def __init__(self, *args: Any, examples: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.examples = tuple(examples)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)  # type: ignore[misc]
        if not self.examples:
            return
        with formatter.section("Examples"):
            for line in self.examples:
                # formatter.write, not write_text: written as is, never wrapped.
                formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


class ExamplesCommand(_Examples, click.Command):
    """A command whose help ends with ``examples``, one command line each, never re-wrapped."""


class ExamplesGroup(_Examples, click.Group):
    """A group laid out like :class:`ExamplesCommand`; its subcommands are such commands."""

    command_class = ExamplesCommand


ExamplesGroup.group_class = ExamplesGroup


def command(name: str, examples: Sequence[str], **kwargs: Any) -> Callable[[F], ExamplesCommand]:
    """``@click.command(name)`` whose help ends with ``examples`` (see the module docstring)."""
    return click.command(name, cls=ExamplesCommand, examples=examples, **kwargs)


def group(name: str, examples: Sequence[str], **kwargs: Any) -> Callable[[F], ExamplesGroup]:
    """``@click.group(name)`` likewise; ``@the_group.command(name, examples=[...])`` makes its
    subcommands."""
    return click.group(name, cls=ExamplesGroup, examples=examples, **kwargs)
