"""``ckpt compare``: a run's checkpoints side by side, and the one to deploy."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (PATH_OR_URL, cache_options, is_remote, json_option,
                                  resolve_checkpoints)
from ckptkit.errors import ExitCode

EXAMPLES = (
    "ckpt compare runs/mrl/",
    "ckpt compare epoch_0.pt epoch_5.pt best.pt latest.pt",
    "ckpt compare checkpoints/ --metric val_acc:max",
    "ckpt compare runs/mrl/ --json | jq .recommended",
)


@command("compare", EXAMPLES)
@click.argument("paths", nargs=-1, required=True, type=PATH_OR_URL)
@click.option("--metric", metavar="NAME[:min|max]",
              help="Metric to judge by [default: the first of val_loss, best_val_loss, "
                   "eval_loss, ... present; max for acc/score/f1/auc/bleu/map names].")
@cache_options
@json_option
def compare_command(paths: tuple[Path | str, ...], metric: str | None, cache_dir: Path | None,
                    catalogs: tuple[Path, ...], as_json: bool) -> int:
    """Compare checkpoints (files, or directories of them) and recommend one for deployment.

    Shows epoch/step, metrics, file size, tensor count and whether optimizer state is present,
    read from metadata only.  The recommendation is the best value of the metric, ties going
    to the smaller file; checkpoints without the metric are listed, never recommended.
    Exits 3 if a file could not be read (the others are still compared).  A catalogue name
    stands for the cached files of that model.  A URL (s3://bucket/run/, https://...) is
    read by ranged requests, headers only.
    """
    from ckptkit.runs.compare import compare

    targets: list[Path | str] = []
    for given in paths:  # URLs as they are (read by ranges); names resolved from the cache
        targets.extend([given] if is_remote(given) else
                       [c.path for c in resolve_checkpoints([given], cache_dir, catalogs,
                                                            several=True)])
    result = compare(targets, metric)
    if as_json:
        render.emit_json(result.to_dict())
    else:
        click.echo(_human(result))
    for row in result.rows:
        if row.error:
            click.echo(f"ckpt: {render.safe(row.path)}: {render.safe(row.error)}", err=True)
    return ExitCode.INTEGRITY if any(r.error for r in result.rows) else ExitCode.OK


def _human(result) -> str:
    names = sorted({m for r in result.rows for m in r.metrics},
                   key=lambda m: (m != result.metric, m))
    header = ["file", "epoch", "step", *names, "size", "tensors", "optimizer"]
    rows = [header]
    for r in result.rows:
        mark = "*" if r.path == result.recommended else " "
        if r.error:
            rows.append([f"{mark}{r.path}", "", "", *["" for _ in names], render.size(r.size_bytes),
                         "", "unreadable"])
            continue
        rows.append([f"{mark}{r.path}", _opt(r.epoch), _opt(r.step),
                     *[f"{r.metrics[m]:.6g}" if m in r.metrics else "-" for m in names],
                     render.size(r.size_bytes), render.count(r.tensor_count),
                     "yes" if r.optimizer else "no"])
    right = tuple(range(1, len(header) - 1))
    lines = [render.table(rows, indent=0, right=right)]
    judged = f" by {result.metric} ({result.direction})" if result.metric else ""
    if result.recommended:
        lines.append(f"\nRecommended{judged}: {render.safe(result.recommended)}  "
                     f"({render.safe(result.reason)})")
    else:
        lines.append(f"\nNo recommendation: {render.safe(result.reason)}")
    for note in result.notes:
        lines.append(f"  note: {render.safe(note)}")
    return "\n".join(lines)


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)
