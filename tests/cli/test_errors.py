"""Bad input, command by command: one line on stderr naming the file or value and the next
step, a non-zero exit code, never a traceback."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

from ckptkit.cli.errors import error_line
from ckptkit.errors import IntegrityError, UsageError
from tests.cli.commands import leaf_commands
from tests.conftest import SRC, run_ckpt, run_main

SAMPLES = SRC / "ckptkit" / "samples"
THINKER = SAMPLES / "thinker_step_200.pt"
NPZ = SAMPLES / "spaq_ckpt.npz"


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    """Inputs that are wrong in the ways users get them wrong."""
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    depth = 3000  # a torch zip whose pickle nests far deeper than any state dict
    with zipfile.ZipFile(tmp_path / "deep.pt", "w") as archive:
        archive.writestr("deep/data.pkl", b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
        archive.writestr("deep/version", "3\n")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "broken.toml").write_text("[models.x\nfiles = ")
    return tmp_path


#: (arguments, exit code, text the one line must contain); ``{d}`` is the fixture directory.
CASES = [
    (["inspect", "{d}/missing.pt"], 4, "{d}/missing.pt"),
    (["inspect", "{d}/notes.pt"], 1, "{d}/notes.pt"),
    (["inspect", "{d}/empty.pt"], 3, "{d}/empty.pt"),
    (["inspect", "{d}/deep.pt"], 3, "{d}/deep.pt"),
    (["inspect", "{d}/notes.pt", "--depth", "0"], 2, "'--depth': 0"),
    (["fetch", "no-such-model"], 4, "'no-such-model'"),
    (["fetch", "loftr", "--connections", "0"], 2, "'--connections': 0"),
    (["fetch", "loftr", "--source", "ftp"], 2, "'ftp'"),
    (["fetch", "loftr", "--catalog", "{d}/broken.toml"], 2, "{d}/broken.toml"),
    (["list", "--catalog", "{d}/nope.toml"], 4, "{d}/nope.toml"),
    (["list", "--catalog", "{d}/broken.toml"], 2, "{d}/broken.toml"),
    (["cache", "verify", "no-such-model"], 4, "'no-such-model'"),
    (["cache", "rm", "no-such-model", "--yes"], 4, "'no-such-model'"),
    (["cache", "prune", "--catalog", "{d}/nope.toml"], 4, "{d}/nope.toml"),
    (["convert", "{d}/missing.pt", "--to", "flax"], 4, "{d}/missing.pt"),
    (["convert", "{d}/notes.pt", "--to", "flax"], 1, "{d}/notes.pt"),
    (["convert", str(THINKER), "--to", "onnx"], 2, "'onnx'"),
    (["convert", str(THINKER), "--to", "flax", "--layers", "x-y", "--dry-run"], 2, "x-y"),
    (["convert", str(THINKER), "--to", "flax", "--target", "{d}/nope.json"], 4,
     "{d}/nope.json"),
    (["compare", "{d}/missing.pt"], 4, "{d}/missing.pt"),
    (["compare", str(THINKER), "--metric", "loss:up"], 2, "'loss:up'"),
    (["diff", "{d}/missing.pt", str(THINKER)], 4, "{d}/missing.pt"),
    (["diff", str(THINKER), "{d}/notes.pt"], 1, "{d}/notes.pt"),
    (["diff", str(THINKER), str(THINKER), "--atol", "-1"], 2, "'--atol': -1"),
    (["strip", "{d}/missing.pt"], 4, "{d}/missing.pt"),
    (["strip", str(NPZ), "--dry-run"], 2, str(NPZ)),
    (["strip", str(THINKER), "--keep", "nosuchkey", "--dry-run"], 2, "nosuchkey"),
    (["strip", "{d}/deep.pt"], 3, "{d}/deep.pt"),
    (["cleanup", "{d}/missing", "--keep-last", "1"], 4, "{d}/missing"),
    (["cleanup", "{d}/empty_dir", "--keep-last", "-1"], 2, "-1"),
    (["cleanup", "{d}/empty_dir", "--keep-last", "1", "--keep-best", "loss:up"], 2, "'loss:up'"),
    (["latest", "{d}/missing"], 4, "{d}/missing"),
    (["latest", "{d}/empty_dir"], 4, "{d}/empty_dir"),
    (["completion", "tcsh"], 2, "'tcsh'"),
    (["no-such-command"], 2, "'no-such-command'"),
]


def check_one_line(code: int, err: str, expected_code: int, fragment: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("ckpt: error: ") and fragment in line, line
    assert re.search(r"[.?] [A-Z`]", line), f"no next step in: {line}"
    assert code == expected_code, line


@pytest.mark.parametrize("args, code, fragment", CASES, ids=[" ".join(c[0])[:50] for c in CASES])
def test_bad_input_is_one_line_naming_the_value(bad: Path, capsys: pytest.CaptureFixture[str],
                                                args: list[str], code: int,
                                                fragment: str) -> None:
    argv = [a.format(d=bad) for a in args]
    got, _out, err = run_main(capsys, *argv)
    check_one_line(got, err, code, fragment.format(d=bad))


@pytest.mark.parametrize("path", [p for p, _ in leaf_commands()])
def test_an_unknown_option_is_one_line_for_every_command(
        path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_main(capsys, *path.split(), "--no-such-flag")
    check_one_line(code, err, 2, "'--no-such-flag'")
    assert f"`ckpt {path} --help`" in err


def test_through_the_real_entry_point(bad: Path) -> None:
    result = run_ckpt("inspect", str(bad / "deep.pt"))
    check_one_line(result.returncode, result.stderr, 3, str(bad / "deep.pt"))
    result = run_ckpt("cleanup", str(bad / "empty_dir"), "--keep-last", "1", env={
        "CKPTKIT_CONNECTIONS": "many"})  # not read by cleanup: no error
    assert result.returncode == 0
    result = run_ckpt("fetch", "loftr", "--dry-run", env={"CKPTKIT_CONNECTIONS": "many"})
    check_one_line(result.returncode, result.stderr, 2, "CKPTKIT_CONNECTIONS='many'")


def test_every_error_gets_a_next_step() -> None:
    assert error_line(UsageError("--x 3 is too big"), "ckpt diff") == (
        "ckpt: error: --x 3 is too big. Run `ckpt diff --help` for the options")
    assert error_line(IntegrityError("a.pt: cut short")).endswith(
        "The file is truncated or corrupt: copy, fetch or save it again")
    # A hint is printed as it is, braces and all (run patterns look like thinker_step_{N}.pt).
    assert error_line(UsageError("two runs", hint="Pick 'x_step_{N}.pt'?")) == (
        "ckpt: error: two runs. Pick 'x_step_{N}.pt'?")
    assert error_line(UsageError("multi\n  line.", hint="Fix it")) == (
        "ckpt: error: multi line. Fix it")


def test_two_runs_sharing_a_prefix_can_be_told_apart(tmp_path: Path) -> None:
    (tmp_path / "thinker_step_1.pt").write_bytes(THINKER.read_bytes())
    (tmp_path / "thinker_step_2.safetensors").write_bytes((SAMPLES / "model.safetensors")
                                                          .read_bytes())
    result = run_ckpt("latest", str(tmp_path), "--prefix", "thinker")
    check_one_line(result.returncode, result.stderr, 2, "'thinker_step_{N}.pt'")
    picked = run_ckpt("latest", str(tmp_path), "--prefix", "thinker_step_{N}.pt")
    assert picked.returncode == 0 and picked.stdout.strip().endswith("thinker_step_1.pt")
