"""``ckpt scan``: is a file safe to load?  A verdict per file, without running anything."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (PATH_OR_URL, cache_options, is_remote, json_option,
                                  quiet_option, resolve_checkpoints)

EXAMPLES = (
    "ckpt scan downloaded_model.pt",
    "ckpt scan checkpoints/ --fail-on unknown",
    'ckpt scan models.zip hps.pkl --json | jq \'.files[] | select(.verdict == "unsafe")\'',
    "ckpt scan s3://bucket/checkpoints/ --jobs 16",
)
#: Files read at once by default: enough to hide a remote store's latency, few enough for a
#: laptop's disk and the 2-core CI machines.
DEFAULT_JOBS = 8


@command("scan", EXAMPLES)
@click.argument("paths", nargs=-1, required=True, type=PATH_OR_URL)
@click.option("--fail-on", type=click.Choice(["unsafe", "unreadable", "unknown"]),
              default="unreadable", show_default=True,
              help="Mildest verdict that fails the command: unsafe (exit 5 only for unsafe "
                   "files), unreadable (also 3 or 1 for files no loader can read), unknown "
                   "(also 5 for unknown-objects: anything not proven safe).")
@click.option("--trust-torchscript", is_flag=True,
              help="Count TorchScript code as vetted: such an archive is safe when its "
                   "pickles are (by default its code makes it unknown-objects).")
@click.option("--jobs", type=click.IntRange(1, 256), default=DEFAULT_JOBS,
              show_default=True, metavar="N",
              help="Files read at once (remote prefixes: requests in flight).")
@cache_options
@json_option
@quiet_option
def scan_command(paths: tuple[Path | str, ...], fail_on: str, trust_torchscript: bool,
                 jobs: int, cache_dir: Path | None, catalogs: tuple[Path, ...], as_json: bool,
                 quiet: bool) -> int:
    """Say for each file whether loading it would run code: safe, unknown-objects, unsafe
    or unreadable.

    Reads every pickle inside PyTorch zip and legacy files, TorchScript archives, PyTorch
    distributed (DCP) checkpoints, .npy and .npz object arrays, plain .pkl and joblib files
    (also compressed), and the members of zip and tar archives, the way the loaders read
    them, without importing or calling anything they name.  Directories are scanned
    recursively (links to folders are not followed); files that are no checkpoint are
    listed as skipped, with the reason.  Exits 5 when any file is unsafe, else 3 when one is
    corrupt, 1 when a file named explicitly is not a format ckptkit reads; --fail-on changes
    which verdicts fail.  A catalogue name scans the cached files of that model.  A URL
    (s3://bucket/prefix/, gs://, hf://, https:// for one file) is listed with the store's
    listing and read with ranged requests, --jobs files at once; on a terminal, progress
    goes to stderr as files finish.
    """
    from ckptkit.cli.progress import counter
    from ckptkit.scan.scanning import ScanOptions, scan

    targets: list[Path | str] = []
    for given in paths:  # a catalogue name may stand for several cached files
        targets.extend([given] if is_remote(given) else
                       [c.path for c in resolve_checkpoints([given], cache_dir, catalogs,
                                                            several=True)])
    with counter("scanned", quiet=quiet or as_json) as tick:
        report = scan(targets, ScanOptions(trust_torchscript=trust_torchscript), jobs=jobs,
                      on_result=tick)
    code = report.exit_code_for(fail_on)
    if as_json:
        render.emit_json(report.to_dict())
        return code
    rows = [(r.verdict, render.safe(r.path), r.format or "?", _facts(r))
            for r in report.results if not (quiet and r.verdict == "safe")]
    rows += [("skipped", render.safe(s.path), "-", render.safe(s.reason))
             for s in report.skipped]
    if rows:
        click.echo(render.table(rows, indent=0))
    counts = report.counts()
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    skipped = f" ({len(report.skipped)} other files skipped)" if report.skipped else ""
    click.echo(f"Scanned {len(report.results)} file(s): {summary or 'nothing to scan'}{skipped}"
               "; nothing was executed")
    return code


def _facts(result) -> str:
    if result.unsafe:
        return "calls " + ", ".join(render.safe(d.describe()) for d in result.unsafe)
    if result.verdict == "unreadable":
        return render.safe(result.note)
    classes = [o for o in result.objects if not o.startswith("<")]
    marks = [o.strip("<>") for o in result.objects if o.startswith("<")]
    facts = ([f"constructs {', '.join(classes)}"] if classes else []) + marks
    if result.verdict == "safe" and result.pickles:
        facts.append(f"{result.pickles} pickle(s): tensors and plain data only")
    if result.note:
        facts.append(result.note)
    return render.safe("; ".join(facts))
