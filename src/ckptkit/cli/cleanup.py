"""``ckpt cleanup``: delete old periodic checkpoints of a run, never the ones that matter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ckptkit.cli import render
from ckptkit.cli.options import (confirm, confirm_options, json_option, quiet_option,
                                  show_plan)
from ckptkit.errors import ExitCode

EXAMPLES = """Examples:

  ckpt cleanup checkpoints/thinker_tiny --keep-last 2 --dry-run

  ckpt cleanup checkpoints --recursive --keep-last 1 --keep-every 1000 --yes

  ckpt cleanup runs/hf --keep-last 1 --keep-best eval_loss:min

  ckpt cleanup . --keep-last 3 --dry-run --json | jq '.deleted[].path'
"""


@click.command("cleanup", epilog=EXAMPLES)
@click.argument("directory", default=".", type=click.Path(path_type=Path, file_okay=False))
@click.option("--keep-last", type=int, required=True, metavar="N",
              help="Keep the newest N periodic checkpoints of each run (by step number).")
@click.option("--keep-every", type=int, metavar="K",
              help="Also keep checkpoints whose step is a multiple of K.")
@click.option("--keep-best", metavar="METRIC[:min|max]",
              help="Also keep the best checkpoint by METRIC (read from the checkpoint or "
                   "trainer_state.json); names with acc/score/f1/auc/bleu default to max.")
@click.option("--recursive", "-r", is_flag=True, help="Also clean run subdirectories.")
@confirm_options
@json_option
@quiet_option
def cleanup_command(directory: Path, keep_last: int, keep_every: int | None,
                    keep_best: str | None, recursive: bool, dry_run: bool, yes: bool,
                    as_json: bool, quiet: bool) -> int:
    """Delete old periodic checkpoints in DIRECTORY (default: .), keeping the newest N per run.

    Periodic checkpoints: NAME_step_N.pt, epoch_N.pt, epoch=E-step=S.ckpt, checkpoint-N/,
    Orbax step directories, TF ckpt-N.index with its shards.  Always kept: *best*, the final
    NAME.pt, last/latest files and symlinks (and their targets), and everything else
    (tokenizers, configs, notes).  Before deleting, the newest kept checkpoint of each run is
    checked to be complete; if it is truncated the newest complete one is kept as well.
    With --quiet (and --yes) only the final "deleted ..." line is printed.

    Exit codes: 0 done (or nothing to do), 1 some deletions skipped, 2 bad flags or no
    terminal to confirm on without --yes, 4 DIRECTORY missing.
    """
    from ckptkit.retention import plan_cleanup

    plan = plan_cleanup(directory, keep_last=keep_last, keep_every=keep_every,
                        keep_best=keep_best, recursive=recursive)
    if not as_json and show_plan(quiet=quiet, dry_run=dry_run, yes=yes):
        _print_plan(plan, directory)
    if not plan.deleted or dry_run:
        if as_json:
            render.emit_json(_json(plan, plan.deleted, (), dry_run))
        return ExitCode.OK
    if not confirm(f"Delete {len(plan.deleted)} checkpoint(s), "
                   f"{render.size(plan.freed_bytes)}?", yes):
        click.echo("nothing deleted", err=True)
        if as_json:
            render.emit_json(_json(plan, (), (), dry_run))
        return ExitCode.OK
    result = plan.execute()
    for item, why in result.skipped:
        click.echo(f"ckpt: skipped {render.safe(item.path)}: {why}", err=True)
    if as_json:
        render.emit_json(_json(plan, result.deleted, result.skipped, dry_run))
    else:
        click.echo(f"deleted {len(result.deleted)} checkpoint(s), freed "
                   f"{render.size(result.freed_bytes)}")
    return ExitCode.ERROR if result.skipped else ExitCode.OK


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _print_plan(plan: Any, root: Path) -> None:
    rows = []
    for item in plan.items:
        name = _rel(item.path, root) + ("/" if item.path.is_dir() else "")
        if len(item.members) > 1:
            name += f" (+{len(item.members) - 1} shard(s))"
        rows.append((item.action, name, render.size(item.size) if item.step is not None else "",
                     item.reason))
    click.echo(f"Plan for {render.safe(root)}")
    if rows:
        click.echo(render.table(rows, right=(2,)))
    for note in plan.notes:
        click.echo(f"note: {render.safe(note)}")
    if plan.deleted:
        click.echo(f"{len(plan.deleted)} checkpoint(s) to delete, "
                   f"{render.size(plan.freed_bytes)} to free")
    else:
        click.echo("nothing to delete")


def _json(plan: Any, deleted: Any, skipped: Any, dry_run: bool) -> dict[str, Any]:
    def row(item: Any, reason: str | None = None) -> dict[str, Any]:
        return {"path": str(item.path), "step": item.step, "reason": reason or item.reason,
                "bytes": item.size, "action": item.action}

    gone = {i.path for i in deleted}
    kept = [row(i) for i in plan.kept] + [row(i, f"skipped: {why}") for i, why in skipped]
    return {"kept": kept, "deleted": [row(i) for i in plan.deleted if i.path in gone],
            "freed_bytes": sum(i.size for i in deleted), "dry_run": dry_run,
            "notes": list(plan.notes)}
