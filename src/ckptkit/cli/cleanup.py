"""``ckpt cleanup``: delete old periodic checkpoints of a run, never the ones that matter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (PATH_OR_URL, confirm, confirm_options, json_option,
                                  quiet_option, show_plan)
from ckptkit.errors import ExitCode

EXAMPLES = (
    "ckpt cleanup checkpoints/thinker_tiny --keep-last 2 --dry-run",
    "ckpt cleanup checkpoints --recursive --keep-last 1 --keep-every 1000 --yes",
    "ckpt cleanup runs/hf --keep-last 1 --keep-best eval_loss:min",
    "ckpt cleanup . --keep-last 3 --dry-run --json | jq '.deleted[].path'",
    "ckpt cleanup s3://bucket/runs/thinker/ --keep-last 3 --yes",
)


@command("cleanup", EXAMPLES)
@click.argument("directory", default=".", type=PATH_OR_URL)
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
def cleanup_command(directory: Path | str, keep_last: int, keep_every: int | None,
                    keep_best: str | None, recursive: bool, dry_run: bool, yes: bool,
                    as_json: bool, quiet: bool) -> int:
    """Delete old periodic checkpoints in DIRECTORY (default: .), keeping the newest N per run.

    Periodic checkpoints: [NAME_]step_N.pt, epoch_N.pt, NAME_N.pt (model_N, ckpt_N, iter_N),
    epoch=E-step=S.ckpt, checkpoint-N/, Orbax step directories, TF ckpt-N.index with its
    shards; N.pt and NAMEN.pt only when two or more share the pattern (docs/cleanup.md has
    the table).  Always kept: *best*, the final
    NAME.pt, last/latest files and symlinks (and their targets), and everything else
    (tokenizers, configs, notes).  Before deleting, the newest kept checkpoint of each run is
    checked to be complete; if it is truncated the newest complete one is kept as well.
    With --quiet (and --yes) only the final "deleted ..." line is printed.

    Only the paths the plan lists are deleted.  Right before the first deletion (after the
    question) the newest kept checkpoint is proven complete again and every path to delete is
    compared with the plan (size, mtime, inode); if anything changed nothing is deleted.

    DIRECTORY may be a URL of a prefix (s3://bucket/run/, gs://...): the same plan, question
    and checks apply, with each object's size and ETag compared right before it is deleted.

    Exit codes: 0 done (or nothing to do), 1 something changed since the plan (nothing
    deleted) or a deletion failed, 2 bad flags or no terminal to confirm on without --yes,
    4 DIRECTORY missing.
    """
    from ckptkit.runs.retention import plan_cleanup

    plan = plan_cleanup(directory, keep_last=keep_last, keep_every=keep_every,
                        keep_best=keep_best, recursive=recursive)
    if not as_json and show_plan(quiet=quiet, dry_run=dry_run, yes=yes):
        _print_plan(plan, plan.root)
    if not plan.deleted or dry_run:
        if as_json:
            render.emit_json(_json(plan, plan.deleted, dry_run))
        return ExitCode.OK
    if not confirm(f"Delete {len(plan.deleted)} checkpoint(s), "
                   f"{render.size(plan.freed_bytes)}?", yes):
        click.echo("nothing deleted", err=True)
        if as_json:
            render.emit_json(_json(plan, (), dry_run))
        return ExitCode.OK
    result = plan.execute()  # proves and re-checks everything first; raises if it changed
    if as_json:
        render.emit_json(_json(plan, result.deleted, dry_run))
    else:
        click.echo(f"deleted {len(result.deleted)} checkpoint(s), freed "
                   f"{render.size(result.freed_bytes)}")
    return ExitCode.OK


def _rel(path: Any, root: Any) -> str:
    if not isinstance(path, Path):  # a remote location: its URL below the root's
        text, base = str(path), str(root).rstrip("/") + "/"
        return text[len(base):] if text.startswith(base) else text
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _print_plan(plan: Any, root: Any) -> None:
    rows = []
    for item in plan.items:
        size = render.size(item.size) if item.step is not None else ""
        if len(item.snapshots) > 1:
            # Every path a checkpoint is made of gets its own row: the plan names all it deletes.
            rows.append((item.action, _rel(item.path, root), render.size(item.snapshots[0].size),
                         item.reason))
            rows += [(item.action, _rel(snap.path, root), render.size(snap.size),
                      f"data shard of {item.path.name}") for snap in item.snapshots[1:]]
            continue
        name = _rel(item.path, root) + ("/" if item.path.is_dir() else "")
        rows.append((item.action, name, size, item.reason))
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


def _json(plan: Any, deleted: Any, dry_run: bool) -> dict[str, Any]:
    def row(item: Any) -> dict[str, Any]:
        return {"path": str(item.path), "step": item.step, "reason": item.reason,
                "bytes": item.size, "action": item.action,
                "members": [str(m) for m in item.members or (item.path,)]}

    gone = {i.path for i in deleted}
    return {"kept": [row(i) for i in plan.kept],
            "deleted": [row(i) for i in plan.deleted if i.path in gone],
            "freed_bytes": sum(i.size for i in deleted), "dry_run": dry_run,
            "notes": list(plan.notes)}
