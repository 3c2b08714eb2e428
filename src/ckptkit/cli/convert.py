"""``ckpt convert``: framework conversion with recipes, coverage reports and verified output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (PATH_OR_URL, is_remote, local_source, output_target,
                                  cache_options, dry_run_option, log_to_stderr, network_options,
                                  output_options)

EXAMPLES = (
    "ckpt convert loftr --to flax",
    "ckpt convert outdoor_ds.ckpt --recipe loftr --prefix loftr_fine --to flax",
    "ckpt convert outdoor_ds.ckpt --recipe loftr --target ifvit.json --layers 0-3 --to flax",
    "ckpt convert model.flax.npz --to torch -o model.pt",
    "ckpt convert thinker_step_200.pt --to safetensors",
    "ckpt convert big.safetensors --to safetensors --max-shard-size 500MB -o big-sharded",
    "ckpt convert model.safetensors --to dcp -o model.dcp",
)
#: Shown per list in the human report; --json always has everything.
SHOWN = 5


@command("convert", EXAMPLES)
@click.argument("src")
@click.option("--to", "to", required=True,
              type=click.Choice(["flax", "npz", "safetensors", "torch", "dcp"]),
              help="Output: flax (.npz with / keys; .msgpack if -o ends so), npz, safetensors, "
                   "torch, dcp (a PyTorch Distributed Checkpoint directory).")
@click.option("-o", "--output", "out", type=PATH_OR_URL,
              help="Output file, or directory for dcp and --max-shard-size; a file may be a "
                   "URL (s3://, gs://: uploaded atomically) [default: ./<stem>[.<prefix>]<ext>].")
@click.option("--max-shard-size", metavar="SIZE",
              help="Write Hugging Face shards of at most SIZE (500MB, 5GB, 2GiB) plus "
                   "model.safetensors.index.json into the output directory.")
@click.option("--recipe", metavar="NAME|FILE",
              help="Built-in recipe (loftr) or a recipe .toml [default: the model's, else the "
                   "generic rules].")
@click.option("--prefix", metavar="P",
              help="Module prefix to select, e.g. loftr_fine [default: auto-detected].")
@click.option("--target", type=click.Path(path_type=Path, dir_okay=False), metavar="TEMPLATE",
              help="Destination layout (.npz, Flax msgpack or JSON {key: shape}) to fill.")
@click.option("--layers", metavar="SPEC", help="Layers to take, e.g. 0-3 or 0,2,4-5.")
@click.option("--allow-partial", is_flag=True,
              help="Write even if target params stay unfilled or shapes disagree.")
@dry_run_option
@network_options
@cache_options
@output_options
def convert_command(src: str, to: str, out: Path | None, recipe: str | None, prefix: str | None,
                    target: Path | None, layers: str | None, allow_partial: bool,
                    max_shard_size: str | None, dry_run: bool,
                    offline: bool | None, mirror: str | None, local_dirs: tuple[Path, ...],
                    cache_dir: Path | None, catalogs: tuple[Path, ...], as_json: bool,
                    quiet: bool) -> None:
    """Convert checkpoint SRC (a file, a sharded or distributed checkpoint, a URL, or a
    catalogue name) to another framework or format; consolidate or reshard it.

    A URL source (s3://, gs://, https://, hf://) is copied to a temporary file first:
    conversion reads every tensor byte anyway.  A URL output is written locally, re-read,
    then uploaded atomically (an S3 multipart upload completed only after the last part).

    Renames and re-lays tensors by a recipe (default: generic PyTorch <-> Flax rules), streams
    them one at a time into an atomically written file, never over the input, and re-reads the
    result.  A sharded source (DCP, Orbax, Hugging Face shards) is consolidated one global
    tensor at a time; --max-shard-size writes Hugging Face shards, --to dcp a DCP checkpoint.
    Prints the coverage report: target params filled and unfilled, source tensors
    unused, shape mismatches (with --quiet only the file written).  Exits 1 on unfilled or
    mismatched target params (unless --allow-partial) or an empty result, 2 on bad options (a
    --prefix that matches nothing lists the prefixes that exist).
    """
    import dataclasses

    from ckptkit.cli.progress import progress_bars
    from ckptkit.storage.remote import display
    from ckptkit.config import settings
    from ckptkit.convert.engine import convert
    from ckptkit.convert.plan import CoverageError
    from ckptkit.formats.shard_writer import parse_size

    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None

    conf = settings(cache_dir=cache_dir, offline=offline, mirror=mirror, local_dirs=local_dirs,
                    catalogs=catalogs)
    from ckptkit.hub.resolver import checkpoint_source

    try:
        if is_remote(out) and (to == "dcp" or shard_bytes is not None):
            from ckptkit.errors import UsageError

            raise UsageError(f"{display(str(out))}: directory outputs (dcp, --max-shard-size) "
                             "cannot go to a URL yet", hint="Write them locally, then upload")
        with local_source(src) as local_src, output_target(out, dry_run=dry_run) as local_out:
            path, model_recipe = (
                (local_src, None) if is_remote(src) else
                checkpoint_source(src, conf, log=log_to_stderr(quiet),
                                  progress=progress_bars(quiet), dry_run=dry_run))
            if recipe is None and to == "flax":
                recipe = model_recipe  # a catalogue model's own recipe (loftr)
            report = convert(path, to, local_out, recipe=recipe, prefix=prefix, target=target,
                             layers=layers, allow_partial=allow_partial,
                             max_shard_size=shard_bytes, dry_run=dry_run)
        if is_remote(src) or is_remote(out):
            # Name what the user named, not the temporary copies the work went through.
            report = dataclasses.replace(
                report, source=display(src) if is_remote(src) else report.source,
                output=display(str(out)) if is_remote(out) and report.output else report.output)
    except CoverageError as exc:
        if exc.plan is not None:
            from ckptkit.convert.engine import ConversionReport

            failed = ConversionReport.from_plan(exc.plan, Path(src))
            if as_json:
                render.emit_json({**failed.to_dict(), "error": exc.message})
            elif not quiet:
                click.echo(report_text(failed.to_dict(), dry_run=True))
        raise
    if as_json:
        render.emit_json(report.to_dict())
    elif quiet and not dry_run:
        click.echo(render.safe(report.output))
    else:
        click.echo(report_text(report.to_dict(), dry_run=dry_run))


def report_text(report: dict[str, Any], *, dry_run: bool = False) -> str:
    """The human coverage report of a conversion (``ConversionReport.to_dict()``)."""
    lines = [_label("Source", render.safe(report["source"]))]
    if report["recipe"] is None:
        lines.append(_label("Recipe", "none (format change only, names kept)"))
    else:
        where = report["prefix"] or "all"
        if report["base"]:
            where += f" (under {render.safe(report['base'])})"
        layers = report["layers"]
        picked = _ranges(layers) if layers is not None else "all"
        lines.append(_label("Recipe", f"{render.safe(report['recipe'])}   layout "
                                      f"{report['layout']}   "
                                      f"prefix {where}   layers {picked}"))
    if report["target"]:
        lines.append(_label("Target", render.safe(report["target"])))
    verb = "would write" if report["output"] is None else "written"
    lines.append(_label("Arrays", f"{render.count(report['tensor_count'])} {verb}   "
                                  f"params {render.count(report['param_count'])}"))
    tied = f"   ({report['tied']} source tensor(s) tied into several)" if report["tied"] else ""
    lines.append(_label("Filled", f"{render.count(report['filled'])}{tied}"))
    lines += _listing("Unfilled", [(n, "") for n in report["unfilled"]])
    lines += _listing("Unused", [(u["name"], u["reason"]) for u in report["unused"]])
    lines += _listing("Mismatched", [(f"{m['source']} -> {m['target']}",
                                      f"{m['shape']} vs target {m['target_shape']}")
                                     for m in report["mismatched"]])
    if report.get("excluded"):
        lines.append(_label("Excluded", f"{render.count(report['excluded'])} source tensor(s) "
                                        "outside the selection"))
    shards = report.get("shards")
    if report["output"] is not None:
        what = f"{shards} shards + index, " if shards and shards > 1 else ""
        lines.append(_label("Output", f"{render.safe(report['output'])}  ({report['format']}, "
                                      f"{what}{render.size(report['bytes'])})"))
    elif not dry_run:
        lines.append(_label("Output", "none"))
    elif shards and shards > 1:
        lines.append(_label("Shards", f"{shards} would be written, plus the index"))
    return "\n".join(lines)


def _label(name: str, text: str) -> str:
    return f"{name:<12}{text}"


def _listing(title: str, items: list[tuple[str, str]]) -> list[str]:
    lines = [_label(title, render.count(len(items)))]
    if items:
        lines.append(render.table(items[:SHOWN], indent=2))
        if len(items) > SHOWN:
            lines.append(f"  … {len(items) - SHOWN} more (--json lists all)")
    return lines


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 6] -> "0-3,6"."""
    parts: list[str] = []
    for i in indices:
        if parts and i == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)
