"""What the shared flags promise, through the real entry point: --version, NO_COLOR and
non-terminals (no escape sequences), --json (one document, nothing else on stdout), --quiet
(results and errors only) and --dry-run (nothing changes)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SRC, run_ckpt, run_python

SAMPLES = SRC / "ckptkit" / "samples"
THINKER = SAMPLES / "thinker_step_200.pt"


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: to prove that nothing changed."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file()} if root.exists() else {}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run with three periodic checkpoints (the sample under three step numbers)."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (100, 200, 300):
        shutil.copy(THINKER, run / f"thinker_step_{step}.pt")
    return run


@pytest.fixture
def local_catalogue(tmp_path: Path) -> Path:
    """A catalogue with one model whose only source is a local file (no network needed)."""
    path = tmp_path / "mine.toml"
    path.write_text('[files."mine/thinker.pt"]\n'
                    f'sources = [{{ type = "local", path = "{THINKER}" }}]\n'
                    '[models.mine]\nfiles = ["mine/thinker.pt"]\n')
    return path


def run_in_terminal(args: list[str], env: dict[str, str]) -> bytes:
    """Run ``ckpt`` with stdin, stdout and stderr on a pseudo-terminal; returns what it drew."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower,
                                env={**env, "PYTHONPATH": str(SRC), "TERM": "xterm-256color"})
    finally:
        os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    proc.wait(timeout=120)
    return b"".join(chunks)


# --version ------------------------------------------------------------------------------------

def test_version_is_the_installed_metadata_and_imports_no_framework() -> None:
    code = ("import sys\nfrom ckptkit.cli.main import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit as exc:\n    code = exc.code\n"
            "heavy = sorted(m for m in ('numpy', 'torch', 'tensorflow', 'jax')\n"
            "               if m in sys.modules)\n"
            "print(code, heavy, file=sys.stderr)")
    result = run_python(code)
    assert result.stdout == f"ckpt, version {importlib.metadata.version('ckptkit')}\n"
    assert result.stderr.strip() == "0 []"


# colour -------------------------------------------------------------------------------------

STYLED = """
import sys, types, click
from ckptkit.cli import main as entry

@click.command("styled", epilog="Examples:\\n\\n  ckpt styled\\n\\n  ckpt styled")
def styled():
    \"\"\"A command that styles its output, as a future one might.\"\"\"
    click.secho("warning", fg="red", bold=True)
    click.echo(click.style("error", fg="yellow"), err=True)

module = types.ModuleType("styled_command")
module.styled = styled
sys.modules["styled_command"] = module
entry.COMMANDS["styled"] = ("styled_command", "styled")
entry.main(["styled"])
"""


def test_no_color_strips_styles_on_a_terminal() -> None:
    without = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    drawn = run_in_terminal([sys.executable, "-c", STYLED], without)
    assert b"\x1b[31m" in drawn  # the control: a terminal without NO_COLOR gets colour
    drawn = run_in_terminal([sys.executable, "-c", STYLED], {**without, "NO_COLOR": "1"})
    assert b"warning" in drawn and b"error" in drawn and b"\x1b" not in drawn


def test_no_styles_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    result = run_python(STYLED)
    assert "warning" in result.stdout and "error" in result.stderr
    assert "\x1b" not in result.stdout + result.stderr


@pytest.mark.parametrize("args", [
    ["--help"], ["inspect", "--help"], ["inspect", str(THINKER)], ["inspect", "missing.pt"],
    ["inspect", "--depth", "0", "x"], ["list"], ["cache", "ls"],
    ["strip", str(THINKER), "--dry-run"],
    ["compare", str(THINKER)], ["diff", str(THINKER), str(THINKER)], ["completion", "bash"],
], ids=lambda a: " ".join(a)[:40])
def test_no_escape_sequences_with_no_color_on_a_terminal(args: list[str]) -> None:
    drawn = run_in_terminal([sys.executable, "-m", "ckptkit", *args], dict(os.environ))
    assert drawn.strip() and b"\x1b" not in drawn


# --json ---------------------------------------------------------------------------------------

def json_cases(run: Path, catalogue: Path, tmp: Path) -> list[list[str]]:
    copy = tmp / "copy.pt"
    shutil.copy(THINKER, copy)
    return [
        ["inspect", str(THINKER)], ["list"], ["cache", "ls"], ["cache", "verify"],
        ["cache", "rm", "mine", "--catalog", str(catalogue), "--dry-run"],
        ["cache", "prune", "--yes"], ["compare", str(run)],
        ["diff", str(THINKER), str(copy)], ["strip", str(copy), "--dry-run"],
        ["strip", str(copy), "-o", str(tmp / "small.pt")],
        ["convert", str(THINKER), "--to", "safetensors", "-o", str(tmp / "t.safetensors")],
        ["cleanup", str(run), "--keep-last", "1", "--dry-run"], ["latest", str(run)],
        ["fetch", "mine", "--catalog", str(catalogue)],
        ["fetch", "mine", "--catalog", str(catalogue), "--dry-run"],
    ]


def test_json_is_one_document_and_nothing_else(run_dir: Path, local_catalogue: Path,
                                               tmp_path: Path) -> None:
    for args in json_cases(run_dir, local_catalogue, tmp_path):
        result = run_ckpt(*args, "--json")
        assert result.returncode == 0, (args, result.stderr)
        json.loads(result.stdout)  # raises on anything but exactly one JSON document


def test_cache_rm_and_prune_json(local_catalogue: Path) -> None:
    assert run_ckpt("fetch", "mine", "--catalog", str(local_catalogue)).returncode == 0
    leftover = Path(os.environ["CKPTKIT_CACHE"]) / "staging" / "old.bin.part"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"x" * 100)
    pruned = json.loads(run_ckpt("cache", "prune", "--yes", "--json").stdout)
    assert pruned == {"kept": [], "deleted": [{"name": None, "path": str(leftover), "bytes": 100,
                                               "reason": "incomplete or unreferenced"}],
                      "freed_bytes": 100, "dry_run": False}
    args = ("cache", "rm", "mine", "--catalog", str(local_catalogue), "--json")
    planned = json.loads(run_ckpt(*args, "--dry-run").stdout)
    assert planned["dry_run"] and [d["name"] for d in planned["deleted"]] == ["mine/thinker.pt"]
    assert planned["freed_bytes"] == THINKER.stat().st_size
    refused = run_ckpt(*args)  # no terminal, no --yes
    assert refused.returncode == 2 and refused.stdout == ""
    done = json.loads(run_ckpt(*args, "--yes").stdout)
    assert done["deleted"] == planned["deleted"] and not done["dry_run"]
    assert json.loads(run_ckpt("cache", "ls", "--json").stdout) == []


# --quiet --------------------------------------------------------------------------------------

def test_quiet_fetch_convert_strip_print_only_the_paths(local_catalogue: Path,
                                                          tmp_path: Path) -> None:
    fetched = run_ckpt("fetch", "mine", "--catalog", str(local_catalogue), "-q")
    assert fetched.returncode == 0 and fetched.stderr == ""
    assert Path(fetched.stdout.strip()).is_file() and len(fetched.stdout.splitlines()) == 1
    out = tmp_path / "t.safetensors"
    converted = run_ckpt("convert", str(THINKER), "--to", "safetensors", "-o", str(out), "-q")
    assert converted.returncode == 0 and converted.stdout == f"{out}\n" and out.is_file()
    assert converted.stderr == ""
    report = run_ckpt("convert", str(THINKER), "--to", "npz", "-q", "--dry-run", cwd=tmp_path)
    assert "Arrays" in report.stdout  # a dry run's plan is its result
    small = tmp_path / "small.pt"
    stripped = run_ckpt("strip", str(THINKER), "-o", str(small), "--quiet")
    assert stripped.returncode == 0 and stripped.stdout == f"{small}\n" and stripped.stderr == ""


def test_quiet_cleanup_prints_only_what_it_did(run_dir: Path) -> None:
    result = run_ckpt("cleanup", str(run_dir), "--keep-last", "1", "--yes", "-q")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("deleted 2 checkpoint(s), freed ")
    assert len(result.stdout.splitlines()) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["thinker_step_300.pt"]
    again = run_ckpt("cleanup", str(run_dir), "--keep-last", "1", "--yes", "-q")
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""
    plan = run_ckpt("cleanup", str(run_dir), "--keep-last", "1", "--dry-run", "-q")
    assert "Plan for" in plan.stdout  # a dry run's plan is its result


def test_quiet_latest_drops_the_notes(run_dir: Path) -> None:
    newest = run_dir / "thinker_step_300.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    loud = run_ckpt("latest", str(run_dir))
    assert "skipped" in loud.stderr and loud.stdout == f"{run_dir / 'thinker_step_200.pt'}\n"
    quiet = run_ckpt("latest", str(run_dir), "--quiet")
    assert quiet.stderr == "" and quiet.stdout == loud.stdout


def test_quiet_prune_prints_only_what_it_freed() -> None:
    leftover = Path(os.environ["CKPTKIT_CACHE"]) / "staging" / "old.bin.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x" * 2000)
    result = run_ckpt("cache", "prune", "--yes", "-q")
    assert result.returncode == 0 and result.stdout == "freed 2.0 KB\n" and result.stderr == ""
    assert not leftover.exists()


# --dry-run ------------------------------------------------------------------------------------

def test_dry_runs_change_nothing(run_dir: Path, local_catalogue: Path, tmp_path: Path) -> None:
    cache = Path(os.environ["CKPTKIT_CACHE"])
    before, cached_before = tree(tmp_path), tree(cache)
    for args in (["cleanup", str(run_dir), "--keep-last", "1"],
                 ["strip", str(run_dir / "thinker_step_100.pt"), "--in-place"],
                 ["convert", str(THINKER), "--to", "flax", "-o", str(tmp_path / "f.npz")],
                 ["fetch", "mine", "--catalog", str(local_catalogue)],
                 ["cache", "prune", "--unreferenced"]):
        result = run_ckpt(*args, "--dry-run")
        assert result.returncode == 0, (args, result.stderr)
    assert tree(tmp_path) == before and tree(cache) == cached_before


def test_convert_dry_run_does_not_fetch_a_catalogue_name(local_catalogue: Path,
                                                         tmp_path: Path) -> None:
    cache = Path(os.environ["CKPTKIT_CACHE"])
    args = ("convert", "mine", "--catalog", str(local_catalogue), "--to", "safetensors",
            "--dry-run")
    refused = run_ckpt(*args, cwd=tmp_path)
    assert refused.returncode == 4 and tree(cache) == {}  # not found, as for every command
    assert "is not in the cache" in refused.stderr and "ckpt fetch mine" in refused.stderr
    assert run_ckpt("fetch", "mine", "--catalog", str(local_catalogue), "-q").returncode == 0
    cached = tree(cache)
    planned = run_ckpt(*args, "--json", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    assert report["output"] is None and report["tensor_count"] > 0
    assert tree(cache) == cached and not list(tmp_path.glob("*.safetensors"))


def test_names_from_files_cannot_drive_the_terminal() -> None:
    """C0, DEL and C1 controls (U+009B is CSI on some terminals) are escaped, text is kept."""
    from ckptkit.cli.render import safe

    assert safe("w\x1b[2J\x9b31m\x7fé") == "w\\x1b[2J\\x9b31m\\x7fé"
