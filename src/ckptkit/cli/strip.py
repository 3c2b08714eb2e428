"""``ckpt strip``: an inference checkpoint without optimizer, scheduler or scaler state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (PATH_OR_URL, cache_options, confirm, dry_run_option,
                                  is_remote, json_option, local_source, output_target,
                                  quiet_option, resolve_checkpoints, yes_option)
from ckptkit.errors import ExitCode
from ckptkit.storage.remote import display

EXAMPLES = (
    "ckpt strip thinker_best.pt",
    "ckpt strip epoch_5.pt -o deploy/model.pt",
    "ckpt strip last.ckpt --keep ema --in-place --yes",
    "ckpt strip thinker_step_200.pt --dry-run --json",
)


@command("strip", EXAMPLES)
@click.argument("src", type=PATH_OR_URL)
@click.option("-o", "--output", "out", type=PATH_OR_URL,
              help="Output file or URL (s3://, gs://: uploaded atomically) [default: "
                   "<stem>.stripped.pt beside SRC (in . for a URL SRC); never an existing "
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
def strip_command(src: Path | str, out: Path | str | None, keep: tuple[str, ...], in_place: bool,
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
    SRC and -o may be URLs (s3://, gs://, https://, hf:// for SRC): a URL SRC is copied to a
    temporary file first, a URL output is uploaded atomically once written and re-read.
    """
    from ckptkit.errors import UsageError

    if is_remote(src) and in_place:
        raise UsageError(f"refusing to change {display(str(src))} in place",
                         hint="Write the stripped copy with -o FILE or -o URL")
    with local_source(src) as local_src, output_target(out, dry_run=dry_run) as local_out:
        data = _strip(src, local_src, local_out, keep, in_place, dry_run, yes, cache_dir,
                      catalogs)
    if data is None:
        return ExitCode.OK
    if is_remote(src):
        data["source"] = display(str(src))
    if is_remote(out) and data["output"] is not None:
        data["output"] = display(str(out))
    if as_json:
        render.emit_json(data)
    elif quiet and not dry_run:
        if data["output"] is not None:
            click.echo(render.safe(data["output"]))
    else:
        click.echo(_human(data))
    return ExitCode.OK


def _strip(src: Any, local_src: Any, out: Any, keep: tuple[str, ...], in_place: bool,
           dry_run: bool, yes: bool, cache_dir: Path | None,
           catalogs: tuple[Path, ...]) -> dict[str, Any] | None:
    """Plan and (unless a dry run) execute; None when the user declined."""
    from ckptkit.errors import UsageError
    from ckptkit.runs.strip import plan_strip

    if is_remote(src):
        source, out_dir = local_src, Path(".")
    else:
        [checkpoint] = resolve_checkpoints([src], cache_dir, catalogs)
        if checkpoint.name is not None and in_place:
            raise UsageError(f"refusing to change {checkpoint.name} in place: it is the "
                             f"verified copy in the download cache ({checkpoint.path})",
                             hint="Write the stripped copy elsewhere with -o FILE")
        source, out_dir = checkpoint.path, None if checkpoint.name is None else Path(".")
    plan = plan_strip(source, out, keep=keep, in_place=in_place, out_dir=out_dir)
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
                return None
        data = {**plan.execute().to_dict(), "dry_run": False}
    return data


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
