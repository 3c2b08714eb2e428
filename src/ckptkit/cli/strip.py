"""``ckpt strip``: an inference checkpoint without optimizer, scheduler or scaler state."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (cache_options, confirm, dry_run_option, json_option,
                                  quiet_option, resolve_checkpoints, yes_option)
from ckptkit.errors import ExitCode

EXAMPLES = (
    "ckpt strip thinker_best.pt",
    "ckpt strip epoch_5.pt -o deploy/model.pt",
    "ckpt strip last.ckpt --keep ema --in-place --yes",
    "ckpt strip thinker_step_200.pt --dry-run --json",
)


@command("strip", EXAMPLES)
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path, dir_okay=False),
              help="Output file [default: <stem>.stripped.pt beside SRC; never an existing "
                   "file].")
@click.option("--keep", "keep", multiple=True, metavar="KEY",
              help="Keep this top-level entry although it is training state (repeatable).")
@click.option("--in-place", is_flag=True,
              help="Replace SRC itself (temporary file, then an atomic rename; asks first).")
@dry_run_option
@yes_option
@cache_options
@json_option
@quiet_option
def strip_command(src: Path, out: Path | None, keep: tuple[str, ...], in_place: bool,
                  dry_run: bool, yes: bool, cache_dir: Path | None, catalogs: tuple[Path, ...],
                  as_json: bool, quiet: bool) -> int:
    """Drop training-only entries from PyTorch checkpoint SRC and write the rest atomically.

    Drops optimizer, scheduler, AMP scaler, Lightning callbacks/loops and RNG state (by name
    or by content); keeps model and EMA weights and metadata (step, epoch, best_val_loss,
    config), nested as they were.  Tensors are copied byte for byte, without torch; the result
    loads with torch.load(weights_only=True).  A file with nothing to strip is not copied
    unless -o is given.  --in-place asks first on a terminal and needs --yes without one.
    With --quiet only the path written is printed.  SRC may be a catalogue name of a cached
    file; the default output then goes to the current directory, never into the cache.
    """
    from ckptkit.errors import UsageError
    from ckptkit.runs.strip import plan_strip

    [checkpoint] = resolve_checkpoints([src], cache_dir, catalogs)
    if checkpoint.name is not None and in_place:
        raise UsageError(f"refusing to change {checkpoint.name} in place: it is the verified "
                         f"copy in the download cache ({checkpoint.path})",
                         hint="Write the stripped copy elsewhere with -o FILE")
    plan = plan_strip(checkpoint.path, out, keep=keep, in_place=in_place,
                      out_dir=None if checkpoint.name is None else Path("."))
    if dry_run:
        data = {"source": str(plan.source), "output": str(plan.output) if plan.output else None,
                "size_before": plan.size_before, "size_after": None,
                "dropped": plan.dropped, "kept": list(plan.kept), "tensor_count": None,
                "note": plan.note, "dry_run": True}
    else:
        if in_place and plan.output is not None:
            dropped = ", ".join(plan.dropped) or "nothing"
            if not confirm(f"Replace {render.safe(plan.source)} in place, dropping {dropped}?",
                           yes, action=f"replace {plan.source} in place"):
                click.echo("nothing written", err=True)
                return ExitCode.OK
        data = {**plan.execute().to_dict(), "dry_run": False}
    if as_json:
        render.emit_json(data)
    elif quiet and not dry_run:
        if data["output"] is not None:
            click.echo(render.safe(data["output"]))
    else:
        click.echo(_human(data))
    return ExitCode.OK


def _human(data: dict) -> str:
    lines = [render.label("Source", f"{render.safe(data['source'])}  "
                                    f"{render.size(data['size_before'])}")]
    for key, reason in data["dropped"].items():
        lines.append(render.label("Drop", f"{render.safe(key)}  ({render.safe(reason)})"))
    kept = data["kept"]
    shown = ", ".join(render.safe(k) for k in kept[:8]) or "(nothing)"
    if len(kept) > 8:
        shown += f", … ({len(kept)} entries)"
    lines.append(render.label("Keep", shown))
    if data["note"]:
        lines.append(render.label("Note", render.safe(data["note"])))
    if data["output"] is None:
        lines.append(render.label("Output", "none written"))
    elif data["dry_run"]:
        lines.append(render.label("Output", f"{render.safe(data['output'])}  (dry run: not "
                                            "written)"))
    else:
        before, after = data["size_before"], data["size_after"]
        change = 100 * (1 - after / before) if before else 0.0
        saved = (f", {change:.0f}% smaller" if change >= 0 else f", {-change:.0f}% larger") \
            if before else ""
        lines.append(render.label("Output", f"{render.safe(data['output'])}  "
                                            f"{render.size(after)}{saved}"))
    return "\n".join(lines)
