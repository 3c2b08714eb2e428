"""Every error ``ckpt`` knows becomes one line: what happened, with the value, and the next step.

The library's errors carry the facts (message, path, hint); this module turns them and click's
own usage errors into ``ckpt: error: <what>. <next step>``.  An error raised without a hint gets
the generic next step of its kind, so no message leaves the user without one.
"""

from __future__ import annotations

import click

from ckptkit.cli import render
from ckptkit.errors import (CkptkitError, FormatError, IntegrityError, NotFoundError,
                            UnsafeContentError, UsageError)

#: The next step for an error raised without a hint, by kind (first match wins).
#: ``{command}`` is the command that failed, e.g. ``ckpt cache rm``.
DEFAULT_HINTS: tuple[tuple[type[CkptkitError], str], ...] = (
    (UnsafeContentError, "Do not load it with pickle or torch.load(weights_only=False); "
                         "`ckpt inspect` shows what it holds without running it"),
    (IntegrityError, "The file is truncated or corrupt: copy, fetch or save it again"),
    (NotFoundError, "Check the path or name"),
    (UsageError, "Run `{command} --help` for the options"),
    (FormatError, "Run `{command} --help` for what it reads"),
    (CkptkitError, "Set CKPTKIT_DEBUG=1 for the traceback"),
)


def command_path(group: click.Group, args: list[str]) -> str:
    """``ckpt cache rm`` for ``["cache", "rm", "x", "--yes"]``: the command an error is about."""
    words = ["ckpt"]
    ctx = click.Context(group, info_name="ckpt")
    command: click.Command = group
    for arg in args:
        if not isinstance(command, click.Group):
            break
        if arg.startswith("-"):
            continue
        sub = command.get_command(ctx, arg)
        if sub is None:
            break
        words.append(arg)
        command = sub
    return " ".join(words)


def error_line(exc: Exception, command: str = "ckpt") -> str:
    """The one line printed for ``exc`` (a :class:`CkptkitError` or a click exception)."""
    if isinstance(exc, CkptkitError):
        hint = exc.hint or next(h for kind, h in DEFAULT_HINTS
                                if isinstance(exc, kind)).format(command=command)
        return _line(exc.message, hint)
    if isinstance(exc, click.UsageError):
        where = exc.ctx.command_path if exc.ctx is not None else command
        return _line(exc.format_message(), f"Run `{where} --help` for the options")
    if isinstance(exc, click.ClickException):
        return _line(exc.format_message(), None)
    return _line(f"{type(exc).__name__}: {exc}", None)


def _line(message: str, hint: str | None) -> str:
    text = message.strip()
    if hint:
        text = text.rstrip(".")
        text += f" {hint}" if text.endswith(("?", "!")) else f". {hint}"
    # Messages quote names read from the file; escape what could drive the terminal.
    return "ckpt: error: " + render.safe(" ".join(text.split()))
