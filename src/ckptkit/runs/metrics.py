"""Reading a metric (val loss, accuracy…) for each periodic checkpoint, for ``--keep-best``.

Sources, first hit wins: the checkpoint's own top-level scalars (``ckptkit.inspect`` metadata,
e.g. μOmni's ``best_val_loss``), HF ``trainer_state.json`` ``log_history`` at that step (the
checkpoint's own file, then any sibling's or the run directory's), Orbax ``metrics/metrics``.
A checkpoint without the metric is simply absent from the result: never fatal.
"""

from __future__ import annotations

import re

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckptkit.errors import CkptkitError, UsageError

if TYPE_CHECKING:
    from ckptkit.runs.retention import Checkpoint

#: Names containing one of these are better when larger (unless they also say "loss").
_MAX_WORDS = re.compile(r"acc|score|f1|auc|bleu|map|precision|recall|iou|psnr|ssim|rouge|reward",
                        re.IGNORECASE)


def direction_of(name: str) -> Literal["min", "max"]:
    """``max`` for accuracy-like names (acc, score, f1, auc, bleu, map, ...), else ``min``."""
    return "max" if _MAX_WORDS.search(name) and "loss" not in name.lower() else "min"


@dataclass(frozen=True)
class MetricSpec:
    """A metric name and whether smaller (``min``) or larger (``max``) is better."""

    name: str
    mode: Literal["min", "max"]


def parse_metric(text: str) -> MetricSpec:
    """Parse ``METRIC[:min|max]``; without a direction, names like ``*acc*``/``*f1*`` are max.

    Raises:
        UsageError: an empty name or a direction other than min/max.
    """
    name, _, mode = text.partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"--keep-best {text!r}: no metric name",
                         hint="Pass e.g. --keep-best val_loss or --keep-best eval_accuracy:max")
    if not mode:
        mode = direction_of(name)
    if mode not in ("min", "max"):
        raise UsageError(f"--keep-best {text!r}: direction must be min or max, not {mode!r}",
                         hint="Use METRIC, METRIC:min or METRIC:max")
    return MetricSpec(name, mode)  # type: ignore[arg-type]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _from_file(path: Path, name: str) -> float | None:
    from ckptkit.inspection import inspect

    try:
        return _number(inspect(path).metadata.get(name))
    except CkptkitError:
        return None  # unreadable (truncated) or unknown: no metric, integrity decides the rest


def _trainer_states(ckpt: Checkpoint, siblings: list[Checkpoint]) -> list[Path]:
    paths = [ckpt.path / "trainer_state.json"] if ckpt.kind == "dir" else []
    paths += [s.path / "trainer_state.json" for s in reversed(siblings) if s.kind == "dir"]
    paths.append(ckpt.path.parent / "trainer_state.json")
    return [p for p in dict.fromkeys(paths) if p.is_file()]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _from_trainer_state(state: Any, step: int, name: str) -> float | None:
    if not isinstance(state, dict):
        return None
    keys = (name, f"eval_{name}") if not name.startswith("eval_") else (name,)
    for entry in state.get("log_history") or ():
        if isinstance(entry, dict) and entry.get("step") == step:
            for key in keys:
                value = _number(entry.get(key))
                if value is not None:
                    return value
    if name == "best_metric" and state.get("global_step") == step:
        return _number(state.get("best_metric"))
    return None


def metric_values(checkpoints: list[Checkpoint], spec: MetricSpec) -> dict[Path, float]:
    """The metric of every checkpoint that records it, keyed by checkpoint path."""
    values: dict[Path, float] = {}
    states: dict[Path, Any] = {}
    for ckpt in checkpoints:
        value: float | None = None
        if ckpt.kind == "file":
            value = _from_file(ckpt.path, spec.name)
        elif ckpt.kind == "dir":
            orbax = _read_json(ckpt.path / "metrics" / "metrics")
            if isinstance(orbax, dict):
                value = _number(orbax.get(spec.name))
        if value is None:
            for state_path in _trainer_states(ckpt, checkpoints):
                if state_path not in states:
                    states[state_path] = _read_json(state_path)
                value = _from_trainer_state(states[state_path], ckpt.step, spec.name)
                if value is not None:
                    break
        if value is not None:
            values[ckpt.path] = value
    return values
