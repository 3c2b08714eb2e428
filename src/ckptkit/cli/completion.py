"""``ckpt completion``: the script that makes a shell complete ckpt's commands and options.

The scripts are click's own (https://click.palletsprojects.com/en/stable/shell-completion/):
on every <Tab> the shell runs ``ckpt`` with ``_CKPT_COMPLETE=<shell>_complete`` and the words
typed so far, and ckpt answers with the candidates.  This command only prints the script, so
that nobody has to remember the variable.
"""

from __future__ import annotations

import os

import click

from ckptkit.cli.examples import command
from ckptkit.errors import UsageError

SHELLS = ("bash", "zsh", "fish")

EXAMPLES = (
    'eval "$(ckpt completion bash)"        # this bash session; add the line to ~/.bashrc',
    'eval "$(ckpt completion zsh)"         # this zsh session; add the line to ~/.zshrc',
    "ckpt completion fish > ~/.config/fish/completions/ckpt.fish",
    "_CKPT_COMPLETE=bash_source ckpt       # the same bash script, click's way",
)


@command("completion", EXAMPLES)
@click.argument("shell", required=False, type=click.Choice(SHELLS))
def completion_command(shell: str | None) -> None:
    """Print the completion script for SHELL (bash, zsh or fish; default: from $SHELL).

    Completes command names, options, choices (--to flax|npz|...) and file paths.  bash needs
    version 4.4 or later.  The script runs `ckpt` on every <Tab>, so `ckpt` must be on PATH.
    """
    from click.shell_completion import get_completion_class

    from ckptkit.cli.main import cli

    name = shell or _shell_from_environment()
    completer = get_completion_class(name)
    if completer is None:  # click knows these three; guard against a future click
        raise UsageError(f"click has no completion for {name!r}",
                         hint=f"Use one of: {', '.join(SHELLS)}")
    click.echo(completer(cli, {}, "ckpt", "_CKPT_COMPLETE").source())


def _shell_from_environment() -> str:
    value = os.environ.get("SHELL", "")
    name = os.path.basename(value)
    if name not in SHELLS:
        raise UsageError(f"cannot tell the shell from SHELL={value!r}",
                         hint="Name it: ckpt completion bash, ckpt completion zsh or "
                              "ckpt completion fish")
    return name
