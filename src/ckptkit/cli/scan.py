"""``ckpt scan``: is a file safe to load?  A verdict per file, without running anything."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import cache_options, json_option, quiet_option, resolve_checkpoints

EXAMPLES = (
    "ckpt scan downloaded_model.pt",
    "ckpt scan checkpoints/ --quiet",
    'ckpt scan models.zip hps.pkl --json | jq \'.files[] | select(.verdict == "unsafe")\'',
)


@command("scan", EXAMPLES)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@cache_options
@json_option
@quiet_option
def scan_command(paths: tuple[Path, ...], cache_dir: Path | None, catalogs: tuple[Path, ...],
                 as_json: bool, quiet: bool) -> int:
    """Say for each file whether loading it would run code: safe, unknown-objects or unsafe.

    Reads every pickle inside PyTorch zip and legacy files, TorchScript archives, .npz object
    arrays, plain .pkl and joblib files (also compressed), and the members of zip and tar
    archives, without importing or calling anything they name.  Directories are scanned
    recursively (links to folders are not followed).  Exits 5 when any file is unsafe, else 3
    when one is corrupt, 1 when a file named explicitly is not a format ckptkit reads.
    A catalogue name scans the cached files of that model.
    """
    from ckptkit.scanning import scan

    report = scan([c.path for c in resolve_checkpoints(paths, cache_dir, catalogs,
                                                       several=True)])
    if as_json:
        render.emit_json(report.to_dict())
        return report.exit_code
    rows = [(r.verdict, render.safe(r.path), r.format or "?", _facts(r))
            for r in report.results if not (quiet and r.verdict == "safe")]
    if rows:
        click.echo(render.table(rows, indent=0))
    counts = report.counts()
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    skipped = f" ({report.skipped} other files skipped)" if report.skipped else ""
    click.echo(f"Scanned {len(report.results)} file(s): {summary or 'nothing to scan'}{skipped}"
               "; nothing was executed")
    return report.exit_code


def _facts(result) -> str:
    if result.unsafe:
        return "calls " + ", ".join(render.safe(d.describe()) for d in result.unsafe)
    if result.verdict == "unknown-objects":
        return "constructs " + ", ".join(render.safe(o) for o in result.objects)
    if result.verdict == "unreadable":
        return render.safe(result.note)
    pickles = f"{result.pickles} pickle(s): tensors and plain data only" if result.pickles \
        else ""
    return "; ".join(x for x in (pickles, render.safe(result.note)) if x)
