"""`ckpt completion`: the scripts click generates, and a real bash completing with them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SRC, run_ckpt


@pytest.fixture
def ckpt_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has a `ckpt` running this checkout, as the scripts expect."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "ckpt"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ckptkit "$@"\n')
    launcher.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(SRC)}


def complete_in_bash(env: dict[str, str], script: str, *words: str) -> list[str]:
    """Source ``script`` in a real bash and complete ``words`` (the last one is the one being
    typed) the way bash's programmable completion calls the function."""
    words_array = " ".join(f"'{w}'" for w in words)
    program = (f"{script}\n"
               f"COMP_WORDS=({words_array}); COMP_CWORD={len(words) - 1}; COMPREPLY=()\n"
               "_ckpt_completion ckpt\n"
               'printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_commands_options_and_choices(ckpt_on_path: dict[str, str]) -> None:
    script = run_ckpt("completion", "bash").stdout
    assert "complete -o nosort -F _ckpt_completion ckpt" in script
    assert complete_in_bash(ckpt_on_path, script, "ckpt", "ins") == ["inspect"]
    assert set(complete_in_bash(ckpt_on_path, script, "ckpt", "cache", "")) == {
        "ls", "verify", "rm", "prune"}
    assert complete_in_bash(ckpt_on_path, script, "ckpt", "convert", "x.pt", "--to", "s") == [
        "safetensors"]
    assert "--dry-run" in complete_in_bash(ckpt_on_path, script, "ckpt", "cleanup", "--d")


def test_bash_script_is_clicks_documented_one(ckpt_on_path: dict[str, str]) -> None:
    ours = run_ckpt("completion", "bash").stdout
    clicks = subprocess.run(["ckpt"], env={**ckpt_on_path, "_CKPT_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=120)
    assert clicks.returncode == 0 and clicks.stdout.strip() == ours.strip()


@pytest.mark.parametrize("shell, registration", [
    ("bash", "complete -o nosort -F _ckpt_completion ckpt"),
    ("zsh", "compdef _ckpt_completion ckpt"),
    ("fish", "complete --no-files --command ckpt"),
])
def test_each_shell_gets_its_script(shell: str, registration: str) -> None:
    result = run_ckpt("completion", shell)
    assert result.returncode == 0 and result.stderr == ""
    assert registration in result.stdout and f"_CKPT_COMPLETE={shell}_complete" in result.stdout


@pytest.mark.parametrize("shell, env, expected", [
    ("bash", {"COMP_WORDS": "ckpt ins", "COMP_CWORD": "1"}, "plain,inspect"),
    ("zsh", {"COMP_WORDS": "ckpt ins", "COMP_CWORD": "1"}, "plain\ninspect\n"),
    ("fish", {"COMP_WORDS": "ckpt ins", "COMP_CWORD": "ins"}, "plain,inspect"),
])
def test_each_shells_protocol_answers(shell: str, env: dict[str, str], expected: str) -> None:
    """What each script asks `ckpt` on <Tab>, answered by the real entry point."""
    result = run_ckpt(env={"_CKPT_COMPLETE": f"{shell}_complete", **env})
    assert result.returncode == 0 and expected in result.stdout


def test_shell_from_the_environment() -> None:
    assert "compdef _ckpt_completion ckpt" in run_ckpt("completion",
                                                       env={"SHELL": "/usr/bin/zsh"}).stdout
    result = run_ckpt("completion", env={"SHELL": "/bin/tcsh"})
    assert result.returncode == 2 and "SHELL='/bin/tcsh'" in result.stderr
    assert "ckpt completion bash" in result.stderr and len(result.stderr.splitlines()) == 1
