"""Per-format sections of ``ckpt inspect``'s human output: GGUF metadata, the ONNX graph's
inputs, outputs and opsets, a Keras model's config summary.

Only rendering: the facts come from the readers (``CheckpointInfo.details``).  Every value
that came from the file goes through :func:`ckptkit.cli.render.safe`, so a chat template or
a key holding escape sequences cannot drive the terminal.
"""

from __future__ import annotations

from typing import Any

from ckptkit.cli import render

#: Characters of one metadata value shown (``--json`` carries it whole).
SHOWN_CHARS = 100
#: Lines of the chat template shown.
TEMPLATE_LINES = 6


def sections(info: Any) -> list[str]:
    """The lines of ``info.format``'s own section (none for formats without one)."""
    render_format = _SECTIONS.get(info.format)
    return render_format(info.details) if render_format else []


def _clip(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    text = render.safe(text)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _gguf(d: dict[str, Any]) -> list[str]:
    lines = [render.label("GGUF", f"version {d.get('gguf_version')}, architecture "
                                  f"{d.get('architecture') or '?'}, alignment "
                                  f"{d.get('alignment')}")]
    types = d.get("tensor_types") or {}
    if types:
        lines.append(render.label("Types", "  ".join(f"{k}×{v}" for k, v in types.items())))
    metadata = d.get("metadata") or {}
    template = metadata.get("tokenizer.chat_template")
    lines.append(f"Metadata ({len(metadata)} keys)")
    rows = []
    for key, value in metadata.items():
        if key == "tokenizer.chat_template":
            value = f"<{len(value)} characters, below>" if isinstance(value, str) else value
            rows.append((render.safe(key), str(value)))
            continue
        if isinstance(value, dict) and "count" in value:
            item = str(value.get("type", "?")).removeprefix("array[").rstrip("]")
            shown = f"[{value['count']:,} × {item}] first {_clip(value.get('first'))}"
            rows.append((render.safe(key), render.safe(shown)))
        else:
            rows.append((render.safe(key), _clip(value)))
    lines.append(render.table(rows))
    if isinstance(template, str):
        lines.append("Chat template (escaped; never rendered)")
        shown = template.split("\n")
        for line in shown[:TEMPLATE_LINES]:
            lines.append("  " + render.safe(line)[:160])
        if len(shown) > TEMPLATE_LINES:
            lines.append(f"  … {len(shown) - TEMPLATE_LINES} more lines (--json has it all)")
    return lines


def _shape(shape: Any) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"


def _onnx(d: dict[str, Any]) -> list[str]:
    opsets = ", ".join(f"{k} {v}" for k, v in (d.get("opsets") or {}).items()) or "none"
    lines = [render.label("ONNX", f"IR {d.get('ir_version')}, opsets {opsets}, producer "
                                  f"{d.get('producer') or '?'}")]
    for title, key in (("Inputs", "inputs"), ("Outputs", "outputs")):
        values = d.get(key) or []
        lines.append(render.label(title, ", ".join(
            f"{v['name']}:{v['dtype']}{_shape(v['shape'])}" for v in values) or "none"))
    operators = d.get("operators") or {}
    if operators:
        ops = sorted(operators.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(render.label("Operators", f"{sum(operators.values())} nodes: " + ", ".join(
            f"{k}×{v}" for k, v in ops[:12]) + (" …" if len(ops) > 12 else "")))
    if d.get("external_files"):
        lines.append(render.label("External", ", ".join(d["external_files"])))
    for key, text in (("external_missing", "missing external data"),
                      ("external_escapes", "external data outside the model folder, not read")):
        for tensor, where in (d.get(key) or {}).items():
            lines.append(render.label("WARNING", f"{text}: {tensor} -> {where}"))
    return lines


def _keras(d: dict[str, Any]) -> list[str]:
    model = d.get("model") or {}
    facts = [f"Keras {d.get('keras_version') or '?'}"]
    if d.get("backend"):
        facts.append(f"backend {d['backend']}")
    if model:
        facts.append(f"{model.get('model_class') or '?'} {model.get('name')!r}")
    lines = [render.label("Keras", ", ".join(facts))]
    if model:
        classes = model.get("layer_classes") or {}
        lines.append(render.label("Layers", f"{model.get('layers', 0)}: " + ", ".join(
            f"{k}×{v}" for k, v in classes.items())))
    if d.get("weights"):
        lines.append(render.label("Weights", d["weights"]))
    return lines


_SECTIONS = {"gguf": _gguf, "onnx": _onnx, "keras": _keras, "keras-h5": _keras}
