"""``ckpt latest``: the newest complete periodic checkpoint of a run, by step number."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import PATH_OR_URL, json_option, quiet_option

EXAMPLES = (
    "ckpt latest checkpoints/thinker_tiny",
    "ckpt latest checkpoints/thinker_tiny --prefix thinker --json",
    'python train.py --resume "$(ckpt latest runs/hf)"',
)


@command("latest", EXAMPLES)
@click.argument("directory", type=PATH_OR_URL)
@click.option("--prefix", metavar="P",
              help="Run prefix (thinker for thinker_step_N.pt, checkpoint for HF, ckpt for TF) "
                   "when DIRECTORY holds several runs; runs sharing a prefix are named by "
                   "the pattern the error lists.")
@json_option
@quiet_option
def latest_command(directory: Path | str, prefix: str | None, as_json: bool, quiet: bool) -> None:
    """Print the newest complete periodic checkpoint in DIRECTORY (by step, not mtime).

    DIRECTORY may be a URL of a prefix (s3://bucket/run/, gs://..., hf://...), listed with
    the store's own listing; the URL of the checkpoint is printed.

    Newer checkpoints that are incomplete (truncated, uncommitted) are skipped with a note on
    stderr (not with --quiet).  Exit codes: 0 found, 2 several runs and no --prefix, 4 none found.
    """
    from ckptkit.errors import NotFoundError
    from ckptkit.runs.saving import find_latest

    result = find_latest(directory, prefix)
    for ckpt, why in () if quiet else result.skipped:
        click.echo(f"ckpt: skipped {render.safe(ckpt.path)} (step {ckpt.step}): {why}",
                   err=True)
    if result.checkpoint is None:
        what = f" with prefix {prefix!r}" if prefix is not None else ""
        raise NotFoundError(f"{directory}: no complete periodic checkpoint{what}",
                            hint="Periodic names look like step_N.pt, NAME_step_N.pt, "
                                 "model_N.pt, epoch_N.pt, checkpoint-N/ or ckpt-N.index "
                                 "(docs/cleanup.md lists them)", path=str(directory))
    if as_json:
        render.emit_json({"path": str(result.checkpoint.path), "step": result.checkpoint.step})
    else:
        click.echo(render.safe(result.checkpoint.path))
