"""``ckpt inspect``: what a checkpoint holds, instantly and without running code from it."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import format_sections, render
from ckptkit.cli.examples import command
from ckptkit.cli.options import (PATH_OR_URL, cache_options, is_remote, json_option,
                                  resolve_checkpoints)
from ckptkit.errors import ExitCode

EXAMPLES = (
    "ckpt inspect thinker_best.pt",
    "ckpt inspect prior_level_2.pth.tar --depth 3",
    "ckpt inspect spaq_ckpt.npz --filter 'opt/target/Transformer/*' --tensors",
    "ckpt inspect saved_model_dir --json | jq .signatures",
    "ckpt inspect tiny_llama.gguf --json | jq '.details.metadata'",
    "ckpt inspect step-1000/ --tensors   # a DCP directory: chunks per rank",
    "ckpt inspect model.safetensors.index.json",
    "ckpt inspect https://huggingface.co/org/model/resolve/main/model.safetensors",
)


@command("inspect", EXAMPLES)
@click.argument("path", type=PATH_OR_URL)
@json_option
@click.option("--depth", metavar="N", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Collapse the module tree to this many name components.")
@click.option("--filter", "pattern", metavar="GLOB",
              help="Only tensors whose name matches GLOB (implies --tensors).")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@cache_options
def inspect_command(path: Path | str, as_json: bool, depth: int, pattern: str | None,
                    show_tensors: bool, cache_dir: Path | None, catalogs: tuple[Path, ...]) -> int:
    """Describe a checkpoint of any format without executing code from it.

    PATH is a file or directory, a URL (https://, s3://, gs://, hf://: only the bytes the
    header needs are read, with ranged requests), or a catalogue name of a cached model
    (loftr, or MODEL/FILE for one file of a bundle, e.g. musiq-spaq/spaq_ckpt.npz).

    Reads PyTorch (zip and legacy), TorchScript, .npz, safetensors, sharded Hugging Face
    checkpoints (directory or *.index.json), PyTorch DCP directories, TensorFlow SavedModel
    and checkpoints, Flax msgpack, GGUF, ONNX, Keras (.keras, .h5), Orbax step directories and
    DeepSpeed ZeRO checkpoints.  Tensor bytes are never read.  Exits 5 when the file names
    dangerous callables (it still prints what it could read safely).
    """
    from ckptkit.inspection import inspect

    if not is_remote(path):
        [checkpoint] = resolve_checkpoints([path], cache_dir, catalogs)
        path = checkpoint.path
    info = inspect(path)
    if as_json:
        data = info.to_dict()
        if pattern:
            data["tensors"] = [t for t in data["tensors"]
                               if t["name"] in {x.name for x in info.filtered(pattern)}]
        render.emit_json(data)
    else:
        click.echo(_human(info, depth, pattern, show_tensors or bool(pattern)))
    if info.unsafe:
        click.echo(f"ckpt: {render.safe(path)}: unsafe content: "
                   f"{render.safe(', '.join(info.unsafe))}. Do not load it "
                   f"{_LOADERS.get(info.format, _LOADERS['pickle'])}; `ckpt inspect` ran none "
                   "of it", err=True)
        return ExitCode.UNSAFE
    return ExitCode.OK


#: How loading would run what inspect found, per format (the stderr warning).
_LOADERS = {
    "pickle": "with pickle or torch.load(weights_only=False)",
    "keras": "with keras.saving.load_model(safe_mode=False)",
    "keras-h5": "with keras.saving.load_model(safe_mode=False)",
    "onnx": "with onnx.load or onnxruntime (they would read files outside its folder)",
}


def _human(info, depth: int, pattern: str | None, show_tensors: bool) -> str:
    from ckptkit.summary import module_tree

    lines = [render.label("File", f"{render.safe(info.path)}  {render.size(info.size_bytes)}")]
    lines.append(render.label("Format", f"{info.format}{_format_facts(info)}   "
                                        "code executed: none"))
    lines.append(render.label("Kind", info.kind.replace("-", " ")))
    lines.extend(format_sections.sections(info))
    if info.metadata:
        facts = "  ".join(f"{render.safe(k)}={_short(v)}" for k, v in info.metadata.items())
        lines.append(render.label("Training", facts))
    if info.signatures:
        lines.append("Signatures")
        for sig in info.signatures:
            ins = ", ".join(f"{s.name}:{s.dtype}{_shape(s.shape)}" for s in sig.inputs)
            outs = ", ".join(f"{s.name}:{s.dtype}{_shape(s.shape)}" for s in sig.outputs)
            lines.append(render.safe(f"  {sig.key}({ins}) -> {outs}"))
    lines.append(render.label(
        "Tensors", f"{render.count(info.tensor_count)}  {render.count(info.param_count)} params  "
                   f"{render.size(info.tensor_bytes)}  dtypes "
                   + " ".join(f"{d}×{n}" for d, n in info.dtype_breakdown().items())))
    shards = info.details.get("shards")
    if isinstance(shards, list) and shards:
        lines.append(render.label("Shards", _shard_summary(info, shards)))
        lines.append(render.table(
            [(render.safe(s["file"]), render.size(s.get("size") or 0),
              f"{render.count(s.get('tensors', s.get('items', 0)))} "
              f"{'tensors' if 'tensors' in s else 'items'}",
              render.size(s.get("tensor_bytes", s.get("bytes", 0))))
             for s in shards[:64]], right=(1, 2, 3)))
        if len(shards) > 64:
            lines.append(f"  … {len(shards) - 64} more shards (--json lists them all)")
    if info.groups:
        lines.append("Groups")
        lines.append(render.table(
            [(g.name or ('""  (bare state dict)' if info.kind == "state-dict" else '""  (top level)'),
              f"{render.count(g.tensor_count)} tensors",
              f"{render.count(g.param_count)} params", render.size(g.bytes))
             for g in info.groups], right=(1, 2, 3)))
    if info.optimizer:
        opt = info.optimizer
        rates = ", ".join(f"{r:g}" for r in opt.learning_rates) or "?"
        lines.append(render.label(
            "Optimizer", f"{opt.kind} (inferred from its state) in '{render.safe(opt.key)}', "
                         f"lr {rates}, {opt.param_groups} param group(s), "
                         f"{opt.params_with_state} params with state"))
    if info.format.startswith("torch"):
        lines.append(render.label("Scheduler", "present" if info.scheduler else "none")
                     + "   " + f"Scaler {'present' if info.scaler else 'none'}")
    rows = module_tree(info, depth)
    if rows:
        lines.append(f"Tree (depth {depth})")
        lines.append(render.table(
            [(name, f"{render.count(n)}", f"{render.count(p)}", render.size(b))
             for name, n, p, b in rows[:200]], right=(1, 2, 3)))
        if len(rows) > 200:
            lines.append(f"  … {len(rows) - 200} more rows (use a smaller --depth)")
    if show_tensors:
        chosen = info.filtered(pattern) if pattern else info.tensors
        lines.append(render.safe(f"Tensors matching {pattern!r}: {len(chosen)}") if pattern
                     else "Tensor list")
        # Sharded formats say where each tensor lives (shard, chunks, device mesh).
        placement = info.details.get("placement") or {}
        lines.append(render.table([(t.name, t.dtype, _shape(t.shape), *_placement(t))
                                   + ((render.safe(placement.get(t.name, "")),) if placement
                                      else ()) for t in chosen]))
    for key, obj in info.opaque.items():
        state = obj["state"]
        preview = (", ".join(f"{k}={_short(v)}" for k, v in list(state.items())[:8])
                   if isinstance(state, dict) else _short(state))
        lines.append(render.label("Object", f"{render.safe(key)} = <object "
                                  f"{render.safe(obj['class'])}> {{{preview}}}"))
    if info.objects:
        lines.append(render.label("Objects", "recorded, not constructed: "
                                  + ", ".join(render.safe(o) for o in info.objects)))
    if info.unsafe:
        via = info.details.get("unsafe_via", {})
        lines.append(render.label("UNSAFE", ", ".join(
            f"{render.safe(u)} (via {via.get(u, '?')})" for u in info.unsafe)
            + "  -- never called by ckpt"))
    return "\n".join(lines)


def _shard_summary(info, shards) -> str:
    world = info.details.get("world_size")
    text = f"{len(shards)} file(s)"
    if world:
        text += f", world size {world}"
    if info.details.get("index"):
        text += f", index {render.safe(info.details['index'])}"
    return text


def _placement(t) -> tuple[str, ...]:
    """Where a tensor of a multi-file checkpoint lives: its shard, or its chunks."""
    if len(t.chunks) > 1:
        return (render.safe("  ".join(
            f"{c['file']}@{list(c['offsets'])}" for c in t.chunks[:4])
            + (f"  … {len(t.chunks) - 4} more" if len(t.chunks) > 4 else "")),)
    if t.file is not None:
        return (render.safe(t.file),)
    return ()


def _format_facts(info) -> str:
    d = info.details
    facts = []
    for key in ("zip_prefix", "container", "byteorder", "protocol_version", "storages", "pickles",
                "header_bytes", "compressed", "code_files", "num_shards", "tags", "step", "layout",
                "items", "files", "data_bytes", "zero_stage", "world_size"):
        if key in d and d[key] not in (None, "", []):
            if key == "data_bytes":
                value = render.size(d[key])
            elif key == "container":
                value = render.safe(d[key])
            elif isinstance(d[key], (list, str)) and key in ("layout", "items"):
                value = render.safe(", ".join(d[key]) if isinstance(d[key], list) else d[key])
            else:
                value = _short(d[key])
            facts.append(f"{key.replace('_', ' ')} {value}")
    return f" ({', '.join(facts)})" if facts else ""


def _shape(shape) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if s is None or s < 0 else str(s) for s in shape) + "]"


def _short(value) -> str:
    text = render.safe(repr(value) if isinstance(value, str) else value)
    return text if len(text) <= 60 else text[:57] + "..."
