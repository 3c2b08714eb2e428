"""``ckpt diff``: which tensors changed between two checkpoints, grouped by module."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (PATH_OR_URL, cache_options, is_remote, json_option,
                                  local_source, resolve_checkpoints)
from ckptkit.errors import ExitCode

EXAMPLES = (
    "ckpt diff epoch_0.pt epoch_5.pt",
    "ckpt diff model.pt model.flax.npz --atol 1e-6",
    "ckpt diff thinker_step_100.pt thinker_step_200.pt --weights-only --depth 2",
    "ckpt diff a.pt b.safetensors --json | jq '.groups[] | {name, changed, total}'",
)
#: Tensors listed in the human report; --all or --json show every one.
SHOWN = 40


@command("diff", EXAMPLES)
@click.argument("a", type=PATH_OR_URL)
@click.argument("b", type=PATH_OR_URL)
@click.option("--atol", metavar="X", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Largest absolute difference still counted as unchanged (0: equal values).")
@click.option("--depth", metavar="N", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Module-name components per summary row (after a shared root such as "
                   "'model').")
@click.option("--weights-only", is_flag=True,
              help="Leave out optimizer, scheduler and scaler tensors.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, unchanged ones too.")
@cache_options
@json_option
def diff_command(a: Path | str, b: Path | str, atol: float, depth: int, weights_only: bool, show_all: bool,
                 cache_dir: Path | None, catalogs: tuple[Path, ...], as_json: bool) -> int:
    """Compare checkpoints A and B tensor by tensor, with bounded memory.

    Reports tensors changed, unchanged, only in A, only in B and with changed shapes, with the
    largest absolute and relative change, summarised per module.  Works across formats and
    naming: exact names first, then without wrappers (module., _orig_mod., model.), then a
    Flax-layout side mapped back with the generic conversion rules (kernels transposed back).
    Exits 0 whenever the comparison ran, whatever it found.  A or B may be a catalogue name
    of a cached file, or a URL (s3://, gs://, https://, hf://): it is copied to a temporary
    file first, as the comparison reads every tensor byte anyway.
    """
    import dataclasses

    from ckptkit.runs.diff import diff
    from ckptkit.storage.remote import display

    local = [p for p in (a, b) if not is_remote(p)]
    resolved = iter(c.path for c in resolve_checkpoints(local, cache_dir, catalogs))
    with local_source(a) as copy_a, local_source(b) as copy_b:
        report = diff(copy_a if is_remote(a) else next(resolved),
                      copy_b if is_remote(b) else next(resolved),
                      atol=atol, depth=depth, weights_only=weights_only)
    if is_remote(a) or is_remote(b):  # name what the user named, not the temporary copies
        report = dataclasses.replace(report, a=display(str(a)) if is_remote(a) else report.a,
                                     b=display(str(b)) if is_remote(b) else report.b)
    if as_json:
        render.emit_json(report.to_dict())
    else:
        click.echo(_human(report, show_all))
    return ExitCode.OK


def _human(report, show_all: bool) -> str:
    c = report.counts()
    matched = ", ".join(f"{n} {m}" for m, n in report.matched.items() if n)
    lines = [render.label("A", f"{render.safe(report.a)}  ({report.format_a})"),
             render.label("B", f"{render.safe(report.b)}  ({report.format_b})"),
             render.label("Matched", (matched or "nothing") + " (exact names, renamed = "
                          "without wrappers, flax = by conversion rules)"),
             render.label("Summary", f"{c['changed']} changed, {c['unchanged']} unchanged, "
                          f"{c['shape_changed']} shape changed, {c['only_a']} only in A, "
                          f"{c['only_b']} only in B  (atol {report.atol:g})")]
    for section, title in (("weights", f"Weights by module (depth {report.depth})"),
                           ("training", "Training state")):
        groups = [g for g in report.groups if g.section == section]
        if not groups:
            continue
        lines.append(title)
        lines.append(render.table([_group_row(g) for g in groups], right=(1,)))
    listed = [t for t in report.tensors if show_all or t.status != "unchanged"]
    if listed:
        lines.append("Tensors" if show_all else "Differences")
        lines.append(render.table([_tensor_row(t) for t in listed[:None if show_all else SHOWN]]))
        if not show_all and len(listed) > SHOWN:
            lines.append(f"  … {len(listed) - SHOWN} more (--all or --json lists every one)")
    return "\n".join(lines)


def _group_row(g) -> list[str]:
    n = g.counts
    extra = ", ".join(f"{n[k]} {label}" for k, label in (
        ("shape_changed", "shape changed"), ("only_a", "only in A"), ("only_b", "only in B"))
        if n[k])
    change = (f"max abs {_num(g.max_abs)}  rel {_num(g.relative)}"
              if g.max_abs is not None else "")
    return [g.name, f"{n['changed']}/{g.total} changed", extra, change]


def _tensor_row(t) -> list[str]:
    shape = _shape(t.shape_a if t.shape_a is not None else t.shape_b)
    if t.status == "shape_changed":
        shape = f"{_shape(t.shape_a)} -> {_shape(t.shape_b)}"
    via = f"(B: {t.name_b})" if t.name_b and t.name_b != t.name and t.status != "only_b" else ""
    stats = (f"max abs {_num(t.max_abs)}  rel {_num(t.relative)}"
             if t.max_abs is not None else "")
    return [t.status.replace("_", " "), t.name, shape, stats, via]


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]" if shape is not None else ""


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
