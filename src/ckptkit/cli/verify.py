"""``ckpt verify``: is a checkpoint complete?  Exit 0 if so, 3 naming every problem if not."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (PATH_OR_URL, cache_options, is_remote, json_option,
                                  resolve_checkpoints)
from ckptkit.errors import ExitCode

EXAMPLES = (
    "ckpt verify step-1000/",
    "ckpt verify model.safetensors.index.json --json",
    "ckpt verify thinker_best.pt",
    "ckpt verify loftr --hashes",
)


@command("verify", EXAMPLES)
@click.argument("path", type=PATH_OR_URL)
@json_option
@click.option("--hashes", is_flag=True,
              help="Also re-hash files whose sha256 is known (catalogue or pin for a catalogue "
                   "name, the Hub's LFS id for a file in a Hugging Face cache).")
@cache_options
def verify_command(path: Path | str, as_json: bool, hashes: bool, cache_dir: Path | None,
                   catalogs: tuple[Path, ...]) -> int:
    """Check that a checkpoint is complete, from its metadata; exit 3 naming each problem.

    PATH is a file, a sharded Hugging Face checkpoint (directory or *.index.json, also as a
    URL), a PyTorch DCP directory, or a catalogue name of a cached model.  Sharded checkpoints: index against
    shard headers, missing, stray or duplicate shards and tensors, byte ranges inside each
    file; DCP: every chunk's byte range, and chunks tiling each tensor exactly.  Single files:
    what `ckpt latest` and `ckpt cleanup` check.  No tensor bytes are read unless --hashes.
    """
    from ckptkit.verification import verify

    if is_remote(path):  # a sharded checkpoint's index or folder URL, or one file's URL
        result = verify(path, hashes=hashes)
    else:
        [checkpoint] = resolve_checkpoints([path], cache_dir, catalogs)
        known = _catalogue_sha256(checkpoint, cache_dir, catalogs) if hashes else {}
        result = verify(checkpoint.path, hashes=hashes, known_sha256=known)
    if as_json:
        render.emit_json(result.to_dict())
    elif result.ok:
        click.echo(f"{render.safe(result.path)}: complete ({result.format}"
                   + (", hashes checked" if hashes else "") + ")")
    else:
        click.echo(f"{render.safe(result.path)}: INCOMPLETE, {len(result.problems)} problem(s)")
        click.echo(render.table([(p.kind, render.safe(p.file), render.safe(p.message))
                                 for p in result.problems]))
    return ExitCode.OK if result.ok else ExitCode.INTEGRITY


def _catalogue_sha256(checkpoint, cache_dir: Path | None,
                      catalogs: tuple[Path, ...]) -> dict[str, tuple[str, str]]:
    """The sha256 the catalogue (or lock.json's pin) gives a cached catalogue file."""
    if checkpoint.file_id is None:
        return {}
    from ckptkit.config import settings
    from ckptkit.hub.catalogue import load
    from ckptkit.hub.pins import Pins

    found = settings(cache_dir=cache_dir, catalogs=catalogs)
    spec = load(found.all_catalogs()).files.get(checkpoint.file_id)
    if spec is not None and spec.sha256:
        return {str(checkpoint.path): (spec.sha256, "catalogue sha256")}
    pin = Pins(found.pins_path).get(checkpoint.file_id)
    return {str(checkpoint.path): (pin.sha256, "pinned sha256 (lock.json)")} if pin else {}
