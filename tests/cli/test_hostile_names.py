"""Names cannot attack the terminal: every command prints the names it shows through one helper
(``ckptkit.cli.render.safe``) in every human output mode, stderr included, and ``--json``
carries the real name.

The name holds an OSC title sequence ended by BEL, a CSI clear-screen, a newline, a C1 CSI,
DEL, a right-to-left override and one byte that is not UTF-8 (0x9B, CSI on 8-bit terminals).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SRC

torch = pytest.importorskip("torch")

TEXT = "ev\x1b]0;owned\x07il\x1b[2J\n\x9b31m\x7f\u202e"
HOSTILE = TEXT + os.fsdecode(b"\x9b")
ESCAPED = "ev\\x1b]0;owned\\x07il\\x1b[2J\\x0a\\x9b31m\\x7f\\u202e\\x9b"
#: Error lines are one line: whitespace in them, a name's newline too, folds to one space.
FOLDED = ESCAPED.replace("\\x0a", " ")
SAMPLE_TF = SRC / "ckptkit" / "samples" / "tf_ckpt"


def ckpt(*args: str | Path) -> tuple[int, str, str]:
    """Run ``ckpt`` as a user would; stdout and stderr as the bytes written, decoded so that
    a raw byte that is not UTF-8 stays visible (as a lone surrogate)."""
    proc = subprocess.run([sys.executable, "-m", "ckptkit", *map(str, args)],
                          capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    return (proc.returncode, proc.stdout.decode("utf-8", "surrogateescape"),
            proc.stderr.decode("utf-8", "surrogateescape"))


#: What a terminal would act on: C0 but newline and tab, DEL, C1, raw bytes, bidi controls.
FORBIDDEN = ({*range(0x20), *range(0x7F, 0xA0), *range(0xD800, 0xE000), 0x061C, 0x200E, 0x200F,
              0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)} - {0x0A, 0x09})


def assert_inert(text: str) -> None:
    bad = sorted({f"U+{ord(c):04X}" for c in text if ord(c) in FORBIDDEN})
    assert not bad, f"raw control characters {bad} reached the terminal in:\n{text!r}"


def human(*args: str | Path, shows: str = ESCAPED, code: int = 0) -> str:
    """Run a human-output command: no raw controls on stdout or stderr, the name escaped."""
    rc, out, err = ckpt(*args)
    assert rc == code, (args, err)
    assert_inert(out)
    assert_inert(err)
    assert shows in out + err, (args, out, err)
    return out + err


def as_json(*args: str | Path) -> object:
    rc, out, err = ckpt(*args, "--json")
    assert rc == 0, (args, err)
    return json.loads(out)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run whose checkpoints and tensor names carry the hostile name."""
    folder = tmp_path / "run"
    folder.mkdir()
    for step in (100, 200, 300):
        torch.save({"model": {f"enc{TEXT}.weight": torch.full((2, 2), float(step))},
                    "step": step, "val_loss": 1.0 / step}, folder / f"{HOSTILE}_step_{step}.pt")
    return folder


def test_latest_cleanup_compare(run: Path) -> None:
    newest = run / f"{HOSTILE}_step_300.pt"
    out = human("latest", run)
    assert out.startswith(str(run / ESCAPED)) and out.count("\n") == 1
    assert as_json("latest", run) == {"path": str(newest), "step": 300}
    human("cleanup", run, "--keep-last", "1", "--dry-run")
    planned = as_json("cleanup", run, "--keep-last", "1", "--dry-run")
    assert {d["path"] for d in planned["deleted"]} == {
        str(run / f"{HOSTILE}_step_{s}.pt") for s in (100, 200)}
    human("compare", run)
    assert str(newest) in {r["path"] for r in as_json("compare", run)["rows"]}
    human("latest", run / HOSTILE, code=4, shows=FOLDED)  # the error line on stderr


def test_inspect_scan_diff(run: Path) -> None:
    a, b = run / f"{HOSTILE}_step_100.pt", run / f"{HOSTILE}_step_200.pt"
    human("inspect", a, "--tensors")
    report = as_json("inspect", a)
    assert report["path"] == str(a) and report["tensors"][0]["name"] == f"model.enc{TEXT}.weight"
    human("scan", a)
    assert as_json("scan", a)["files"][0]["path"] == str(a)
    human("diff", a, b)
    assert as_json("diff", a, b)["a"] == str(a)
    human("inspect", run / f"missing{HOSTILE}.pt", code=4, shows=FOLDED)


def test_strip_convert(run: Path, tmp_path: Path) -> None:
    src = run / f"{HOSTILE}_step_100.pt"
    human("strip", src, "--dry-run")
    assert as_json("strip", src, "--dry-run")["source"] == str(src)
    stripped = tmp_path / f"small{HOSTILE}.pt"
    out = human("strip", src, "-o", stripped, "-q", shows="small" + ESCAPED)
    assert out == f"{tmp_path}/small{ESCAPED}.pt\n" and stripped.is_file()
    target = tmp_path / f"t{HOSTILE}.safetensors"
    human("convert", src, "--to", "safetensors", "-o", target, "--dry-run")
    human("convert", src, "--to", "safetensors", "-o", target, shows="t" + ESCAPED)
    human("convert", src, "--to", "torch", "-o", tmp_path / f"v{HOSTILE}.pt", "-q",
          shows="v" + ESCAPED)
    again = tmp_path / f"u{HOSTILE}.safetensors"
    assert as_json("convert", src, "--to", "safetensors", "-o", again)["output"] == str(again)
    # A tensor name holding a byte that is not UTF-8 fits torch only: one clear line.
    raw_key = tmp_path / "raw_key.pt"
    torch.save({f"w{HOSTILE}": torch.ones(2)}, raw_key)
    out = human("convert", raw_key, "--to", "safetensors", "-o", tmp_path / "r.safetensors",
                code=2, shows="not UTF-8 text")
    assert "\\udc9b" in out and "--to torch" in out


def test_cache_commands(tmp_path: Path) -> None:
    from ckptkit.hub.cache import Cache

    cache = Cache(Path(os.environ["CKPTKIT_CACHE"]))
    cache.ensure()
    staged = tmp_path / "staged.bin"
    staged.write_bytes(b"weights")
    file_id = f"odd/{HOSTILE}.bin"
    cache.commit(file_id, "file", staged, sha256=cache.hash_of(staged), source="local",
                 url=str(staged))
    human("cache", "ls")
    assert [e["name"] for e in as_json("cache", "ls")] == [file_id]
    human("cache", "verify")
    leftover = cache.root / "staging" / f"{HOSTILE}.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x")
    human("cache", "prune", "--unreferenced", "--dry-run")
    pruned = as_json("cache", "prune", "--unreferenced", "--dry-run")
    assert {d["path"] for d in pruned["deleted"]} == {str(leftover), str(cache.path(file_id))}


def test_the_tf_shard_rows_of_a_cleanup_plan(tmp_path: Path) -> None:
    for step in (1, 2):
        for part in ("index", "data-00000-of-00001"):
            shutil.copy(SAMPLE_TF / f"ckpt-1.{part}", tmp_path / f"{HOSTILE}-{step}.{part}")
    out = human("cleanup", tmp_path, "--keep-last", "1", "--dry-run")
    assert f"delete  {ESCAPED}-1.data-00000-of-00001" in out


def test_the_helper() -> None:
    from ckptkit.cli.render import safe

    assert safe(HOSTILE) == ESCAPED
    assert safe("w\x1b[2J\x9b31m\x7fé") == "w\\x1b[2J\\x9b31m\\x7fé"
    assert safe(ESCAPED) == ESCAPED  # escaping twice changes nothing
    assert safe("naïve ünïcode 日本 ok") == "naïve ünïcode 日本 ok"
