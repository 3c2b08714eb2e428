"""One name, short form, help text and meaning per flag across every command; every help ends
with real examples.  Data-driven from COMMANDS, so new commands are held to the same rules."""

from __future__ import annotations

import re
from typing import Any

import click
import pytest

from ckptkit.cli import options as shared
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


@pytest.mark.parametrize("path", [p for p, _ in all_commands()])
def test_help_ends_with_real_examples(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_main(capsys, *path.split(), "--help")
    assert code == 0
    assert "Examples:" in out, f"`ckpt {path} --help` has no Examples section"
    head, examples = out.split("Examples:", 1)
    assert "Options:" in head, "the examples must come last, after the options"
    lines = [line.strip() for line in examples.splitlines() if line.strip()]
    runs = [line for line in lines if re.search(rf"\bckpt {re.escape(path)}\b", line)]
    assert len(runs) >= 2, f"`ckpt {path} --help` shows fewer than 2 examples: {lines}"


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from ckptkit.cli.main import COMMANDS

    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    listed = out.split("Commands:", 1)[1].split("Examples:", 1)[0]
    assert {line.split()[0] for line in listed.splitlines() if line.strip()} == set(COMMANDS)
