"""One name, short form, help text and meaning per flag across every command; every help ends
with real examples.  Data-driven from COMMANDS, so new commands are held to the same rules."""

from __future__ import annotations

import re
import shlex
from typing import Any

import click
import pytest

from ckptkit.cli import options as shared
from ckptkit.cli.examples import ExamplesCommand, ExamplesGroup
from ckptkit.cli.main import cli
from tests.cli.commands import all_commands, leaf_commands, options
from tests.conftest import run_main


def _reference() -> dict[str, click.Option]:
    """The options the shared decorators in cli/options.py make, by long name."""
    made: dict[str, click.Option] = {}
    for decorator in (shared.json_option, shared.quiet_option, shared.dry_run_option,
                      shared.yes_option, shared.cache_options, shared.network_options):
        def command(**_kwargs: Any) -> None: ...

        for param in click.command()(decorator(command)).params:
            made[next(o for o in param.opts if o.startswith("--"))] = param
    return made


REFERENCE = _reference()

#: Where each shared flag must be.  Commands not listed may still have the flag (checked
#: for sameness below), e.g. `ckpt doctor --offline`.
REQUIRED = {
    "--json": {"inspect", "fetch", "list", "cache ls", "cache verify", "cache rm",
               "cache prune", "convert", "compare", "diff", "strip", "cleanup", "latest"},
    "--quiet": {"fetch", "convert", "strip", "cleanup", "latest", "cache rm", "cache prune"},
    "--dry-run": {"fetch", "convert", "strip", "cleanup", "cache rm", "cache prune"},
    "--yes": {"strip", "cleanup", "cache rm", "cache prune"},
    "--cache-dir": {"fetch", "list", "cache ls", "cache verify", "cache rm", "cache prune",
                    "convert"},
    "--catalog": {"fetch", "list", "cache ls", "cache verify", "cache rm", "cache prune",
                  "convert"},
    "--offline": {"fetch", "convert"},
    "--mirror": {"fetch", "convert"},
    "--local-dir": {"fetch", "convert"},
}
LEAVES = leaf_commands()
IDS = [path for path, _ in LEAVES]


def _facts(option: click.Option) -> dict[str, Any]:
    return {"opts": sorted(option.opts), "secondary": sorted(option.secondary_opts),
            "dest": option.name, "help": option.help, "flag": option.is_flag,
            "multiple": option.multiple, "metavar": option.metavar,
            "type": type(option.type).__name__, "envvar": option.envvar}


@pytest.mark.parametrize("path, command", LEAVES, ids=IDS)
def test_shared_flags_are_identical_everywhere(path: str, command: click.Command) -> None:
    for name, option in options(command).items():
        if name in REFERENCE:
            assert _facts(option) == _facts(REFERENCE[name]), (
                f"ckpt {path} {name} differs from the shared flag: use the decorator in "
                "ckptkit/cli/options.py")


@pytest.mark.parametrize("path, command", LEAVES, ids=IDS)
def test_short_forms_mean_one_thing(path: str, command: click.Command) -> None:
    shorts = {"-q": "--quiet", "-y": "--yes", "-o": "--output", "-r": "--recursive",
              "-h": "--help"}
    for name, option in options(command).items():
        for short in (o for o in option.opts if not o.startswith("--")):
            assert shorts.get(short) == name, f"ckpt {path}: {short} is taken by {name}"


@pytest.mark.parametrize("flag", sorted(REQUIRED))
def test_every_command_that_needs_a_flag_has_it(flag: str) -> None:
    having = {path for path, command in LEAVES if flag in options(command)}
    assert REQUIRED[flag] <= having, f"{flag} missing on {sorted(REQUIRED[flag] - having)}"


@pytest.mark.parametrize("path, command", LEAVES, ids=IDS)
def test_flags_that_go_together(path: str, command: click.Command) -> None:
    have = set(options(command))
    if "--yes" in have:  # whoever may delete or replace shows the plan first
        assert "--dry-run" in have, f"ckpt {path} has --yes but no --dry-run"
    if "--offline" in have:  # a command that downloads puts what it gets in the cache
        assert "--cache-dir" in have, f"ckpt {path} has --offline but no --cache-dir"


HELP_PAGES = [("", cli), *all_commands()]


@pytest.mark.parametrize("path, command", HELP_PAGES, ids=[p or "ckpt" for p, _ in HELP_PAGES])
@pytest.mark.parametrize("columns", ["80", "200"])
def test_help_ends_with_examples_printed_verbatim(
        path: str, command: click.Command, columns: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # One mechanism for every page: examples kept apart from a free-form epilog.
    assert isinstance(command, (ExamplesCommand, ExamplesGroup)) and command.epilog is None
    monkeypatch.setenv("COLUMNS", columns)
    code, out, _err = run_main(capsys, *path.split(), "--help")
    assert code == 0
    head, sep, block = out.partition("\nExamples:\n")
    assert sep and "Options:" in head, "the examples must come last, after the options"
    assert block == "".join(f"  {line}\n" for line in command.examples)  # never re-wrapped
    own = [line for line in command.examples
           if any(args[:len(path.split())] == path.split() for args in ckpt_invocations(line))]
    assert len(own) >= 2, f"`ckpt {path} --help` shows fewer than 2 examples of itself"


EXAMPLES = sorted({(p or "ckpt", line) for p, c in HELP_PAGES for line in c.examples})


@pytest.mark.parametrize("page, line", EXAMPLES, ids=[line for _p, line in EXAMPLES])
def test_every_example_is_a_command_line_that_parses(page: str, line: str) -> None:
    invocations = ckpt_invocations(line)
    assert invocations, f"{page}: {line!r} runs no ckpt command"
    for args in invocations:
        parse(args)  # raises for an unknown command or option, or a bad value


def ckpt_invocations(line: str) -> list[list[str]]:
    """The ``ckpt`` argument lists a shell line runs: simple commands (split at ``|``, ``;``,
    ``&&``; redirections and leading ``NAME=value`` assignments left out) whose program is
    ckpt, and ``$(ckpt ...)`` substitutions anywhere."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    found: list[list[str]] = []
    words: list[str] = []
    tokens = iter([*lexer, ";"])
    for token in tokens:
        if token in ("|", "||", "&&", ";", "&"):
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words.pop(0)
            if words and words[0] == "ckpt":
                found.append(words[1:])
            words = []
        elif token in (">", ">>", "<", "2>"):
            next(tokens)  # the redirection's target
        else:
            for inner in re.findall(r"\$\(([^()]*)\)", token):
                found += ckpt_invocations(inner)
            words.append(token)
    return found


def parse(args: list[str]) -> None:
    """Parse ``ckpt ARGS`` as the real command would, without running it."""
    command: click.Command = cli
    words, names = list(args), ["ckpt"]
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        sub = command.get_command(click.Context(command), words[0])
        assert sub is not None, f"`{' '.join(names)}` has no command {words[0]!r}"
        names.append(words.pop(0))
        command = sub
    if words:
        command.make_context(" ".join(names), words)


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from ckptkit.cli.main import COMMANDS

    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    listed = out.split("Commands:", 1)[1].split("Examples:", 1)[0]
    assert {line.split()[0] for line in listed.splitlines() if line.strip()} == set(COMMANDS)
