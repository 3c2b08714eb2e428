"""``ckptkit.runs.compare``: the checkpoints of a run side by side, and the one to deploy.

Only metadata is read (:func:`ckptkit.inspect`): epoch, step, metrics, size, tensor count and
whether optimizer state is present.  No tensor bytes, no code from the files.

The recommendation is the checkpoint with the best value of one metric; ties go to the
smaller file (the same weights without optimizer state deploy better), then to the first one
given.  The metric is ``--metric`` or the first of :data:`DEFAULT_METRICS` that any
checkpoint has; its direction is ``min`` unless the name says accuracy, score, F1, AUC, BLEU,
mAP, precision, recall, IoU, PSNR or SSIM.  Checkpoints without it are listed but never
recommended; when none has it, the recommendation falls back to a file named ``*best*``, then
to the highest step/epoch, and says so.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ckptkit.errors import CkptkitError, NotFoundError, UsageError
from ckptkit.runs.metrics import direction_of

Direction = Literal["min", "max"]
#: Tried in order when no --metric is given.
DEFAULT_METRICS = ("val_loss", "best_val_loss", "eval_loss", "valid_loss", "validation_loss",
                   "val_acc", "best_val_acc", "loss", "best_loss", "best_metric", "metric")
_METRIC_WORDS = re.compile(r"loss|acc|score|f1|auc|bleu|map|precision|recall|iou|psnr|ssim|"
                           r"rouge|eer|wer|cer|ppl|perplexity|error|metric", re.IGNORECASE)
_STEP_KEYS = ("step", "global_step", "steps", "iteration", "iter")
_EPOCH_KEYS = ("epoch", "epochs", "cur_epoch")
_NAME_STEP = re.compile(r"(?:step|iter|checkpoint)[-_=]?(\d+)", re.IGNORECASE)
_NAME_EPOCH = re.compile(r"epoch[-_=]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class CompareRow:
    """One checkpoint: where it is, training position, metrics and what it holds.

    ``error`` is set (and the other facts empty) when the file could not be read.
    """

    path: str
    format: str | None
    epoch: int | None
    step: int | None
    metrics: dict[str, float]
    size_bytes: int
    tensor_count: int
    optimizer: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path, "format": self.format, "epoch": self.epoch,
                                "step": self.step, "metrics": dict(self.metrics),
                                "size_bytes": self.size_bytes,
                                "tensor_count": self.tensor_count, "optimizer": self.optimizer}
        if self.error:
            data["error"] = self.error
        return data


@dataclass(frozen=True)
class Comparison:
    """The rows, the metric judged by, and the recommended checkpoint (with the reason)."""

    rows: tuple[CompareRow, ...]
    metric: str | None
    direction: Direction | None
    recommended: str | None
    reason: str
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form printed by ``ckpt compare --json``."""
        return {"rows": [r.to_dict() for r in self.rows], "metric": self.metric,
                "direction": self.direction, "recommended": self.recommended,
                "reason": self.reason, "notes": list(self.notes)}


def parse_metric(spec: str | None) -> tuple[str | None, Direction | None]:
    """``"val_acc:max"`` -> ``("val_acc", "max")``; no suffix -> direction from the name.

    Raises:
        UsageError: an empty name or a suffix other than ``min``/``max``.
    """
    if spec is None:
        return None, None
    name, _, way = spec.partition(":")
    if not name or way not in ("", "min", "max"):
        raise UsageError(f"--metric {spec!r}: expected NAME or NAME:min or NAME:max",
                         hint="For example --metric val_loss or --metric val_acc:max")
    return name, (way or direction_of(name))  # type: ignore[return-value]


def expand(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """The checkpoint files named: files as given, directories as every checkpoint file
    directly inside them (detected by content; sidecars and notes are skipped)."""
    from ckptkit import formats

    from ckptkit.storage.location import locate

    found: list[Any] = []
    for item in paths:
        path = locate(item) if _is_url(item) else Path(item)  # a URL: its location
        if not path.exists():
            raise NotFoundError(f"{path}: no such file or directory", path=str(path))
        if not path.is_dir() or _is_checkpoint(path, formats):
            found.append(path)
            continue
        children = (path.iterdir() if isinstance(path, Path) else
                    (path.child(e.name) for e in path.list() if not e.is_dir))
        for child in sorted(children, key=str):
            if child.name.startswith(".") or not _is_checkpoint(child, formats):
                continue
            found.append(child)
    return found


def _is_url(item: Any) -> bool:
    from ckptkit.storage.location import is_url

    return isinstance(item, str) and is_url(item) and not item.lower().startswith("file:")


def _is_checkpoint(path: Path, formats: Any) -> bool:
    try:
        formats.detect(path)
    except CkptkitError:
        return False
    return True


def compare(paths: list[str | os.PathLike[str]], metric: str | None = None) -> Comparison:
    """Compare checkpoints by metadata and recommend one for deployment.

    Args:
        paths: checkpoint files and/or directories of them.
        metric: ``NAME`` or ``NAME:min|max`` (default: the first of :data:`DEFAULT_METRICS`
            present in any checkpoint).

    Returns:
        A :class:`Comparison`; unreadable files are rows with ``error`` set, not exceptions.

    Raises:
        NotFoundError: a path does not exist.
        UsageError: no checkpoint among ``paths``, or a malformed ``metric``.

    Example:
        >>> result = compare(["runs/mrl"])                   # doctest: +SKIP
        >>> result.recommended, result.reason                # doctest: +SKIP
        ('runs/mrl/best.pt', 'lowest val_loss 18.0021; smaller file among equals')
    """
    name, direction = parse_metric(metric)
    files = expand(list(paths))
    if not files:
        raise UsageError("no checkpoint files among " + ", ".join(str(p) for p in paths),
                         hint="Pass checkpoint files or a directory that holds them")
    rows = tuple(_row(p) for p in files)
    if name is None:
        name = next((m for m in DEFAULT_METRICS if any(m in r.metrics for r in rows)), None)
        if name is None:
            name = next((m for r in rows for m in r.metrics), None)
        direction = direction_of(name) if name else None
    recommended, reason = _recommend(rows, name, direction)
    notes = tuple(f"{r.path}: no {name}" for r in rows
                  if name and not r.error and name not in r.metrics)
    return Comparison(rows, name, direction, recommended, reason, notes)


def _row(path: Path) -> CompareRow:
    from ckptkit.inspection import inspect

    try:
        info = inspect(path)
    except CkptkitError as exc:
        size = (path.stat().st_size if isinstance(path, Path) else path.size()) \
            if path.is_file() else 0
        return CompareRow(str(path), None, None, None, {}, size, 0, False, str(exc))
    meta = info.metadata
    metrics = {k: float(v) for k, v in meta.items()
               if _METRIC_WORDS.search(k) and _is_number(v)}
    return CompareRow(str(path), info.format, _position(meta, _EPOCH_KEYS, _NAME_EPOCH, path),
                      _position(meta, _STEP_KEYS, _NAME_STEP, path), metrics, info.size_bytes,
                      info.tensor_count, info.optimizer is not None)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        try:
            float(value)  # safetensors metadata holds strings
        except ValueError:
            return False
        return True
    return isinstance(value, (int, float))


def _position(meta: dict[str, Any], keys: tuple[str, ...], pattern: re.Pattern[str],
              path: Path) -> int | None:
    for key in keys:
        value = meta.get(key)
        if _is_number(value):
            return int(float(value))
    # Files such as epoch_5.pt or thinker_step_200.pt say it in their name.
    found = pattern.search(path.name)
    return int(found.group(1)) if found else None


def _recommend(rows: tuple[CompareRow, ...], metric: str | None,
               direction: Direction | None) -> tuple[str | None, str]:
    usable = [r for r in rows if not r.error]
    if not usable:
        return None, "no checkpoint could be read"
    scored = [r for r in usable if metric and metric in r.metrics
              and not math.isnan(r.metrics[metric])]
    if scored and metric and direction:
        sign = 1.0 if direction == "min" else -1.0
        best = min(scored, key=lambda r: (sign * r.metrics[metric], r.size_bytes))
        ties = [r for r in scored if r.metrics[metric] == best.metrics[metric]]
        word = "lowest" if direction == "min" else "highest"
        reason = f"{word} {metric} ({best.metrics[metric]:g})"
        if len(ties) > 1:
            reason += f"; smallest file of the {len(ties)} with that value"
        return best.path, reason
    missing = f"no checkpoint has {metric}" if metric else "no checkpoint records a metric"
    named = [r for r in usable if "best" in Path(r.path).name.lower()]
    if named:
        best = min(named, key=lambda r: r.size_bytes)
        return best.path, f"{missing}; chose the file named best"
    best = max(usable, key=lambda r: (r.step if r.step is not None else -1,
                                      r.epoch if r.epoch is not None else -1, -r.size_bytes))
    return best.path, f"{missing}; chose the latest by step/epoch"
