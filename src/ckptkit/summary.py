"""Turning a format reader's raw tree into :class:`CheckpointInfo`: groups, training state,
optimizer, module tree.  Pure functions over the model; no I/O."""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ckptkit.model import Chunk, Opaque, RawCheckpoint, Signature, TensorRef
from ckptkit.tree import is_scalar, join

OPTIMIZER_KEYS = ("optimizer", "opt", "optim", "optimizer_state", "optimizer_state_dict",
                  "optimizer_states", "opt_g", "opt_d", "optimizers")
SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "sched", "lr_schedulers", "scheduler_g",
                  "scheduler_d", "scheduler_state_dict")
SCALER_KEYS = ("scaler", "grad_scaler", "amp_scaler", "scaler_state_dict")
_ADAM_LIKE = {("exp_avg", "exp_avg_sq"): "Adam", ("exp_avg",): "Lion-like",
              ("momentum_buffer",): "SGD (momentum)", ("square_avg", "acc_delta"): "Adadelta",
              ("square_avg",): "RMSprop", ("sum",): "Adagrad", ("exp_inf",): "Adamax",
              ("prev", "step_size"): "Rprop"}


@dataclass(frozen=True)
class Group:
    """A top-level entry that holds tensors (``model``, ``optimizer``, ``""`` for a bare
    state dict)."""

    name: str
    tensor_count: int
    param_count: int
    bytes: int


@dataclass(frozen=True)
class OptimizerSummary:
    """What an optimizer state dict says about its optimizer (kind is inferred)."""

    key: str
    kind: str
    learning_rates: tuple[float, ...]
    param_groups: int
    params_with_state: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor; ``file`` and ``chunks`` say where it lives in a multi-file checkpoint
    (``chunks``: ``{"offsets", "sizes", "file", "offset", "length"}`` per stored piece)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str | None = None
    chunks: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.file is not None:
            out["file"] = self.file
        if self.chunks:
            out["chunks"] = [dict(c) for c in self.chunks]
        return out


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything ``ckpt inspect`` knows about a checkpoint (the same data as ``--json``)."""

    path: str
    format: str
    size_bytes: int
    kind: str
    tensor_count: int
    param_count: int
    tensor_bytes: int
    groups: tuple[Group, ...]
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    objects: tuple[str, ...]
    unsafe: tuple[str, ...]
    optimizer: OptimizerSummary | None = None
    scheduler: bool = False
    scaler: bool = False
    signatures: tuple[Signature, ...] = ()
    opaque: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    separator: str = "."
    tree: Any = field(default=None, repr=False, compare=False)

    def dtype_breakdown(self) -> dict[str, int]:
        """Tensor count per dtype, most common first."""
        return dict(Counter(t.dtype for t in self.tensors).most_common())

    def filtered(self, pattern: str) -> tuple[TensorInfo, ...]:
        """Tensors whose name matches the glob ``pattern`` (``*`` crosses separators)."""
        return tuple(t for t in self.tensors if fnmatch.fnmatchcase(t.name, pattern))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form printed by ``ckpt inspect --json``."""
        out: dict[str, Any] = {
            "path": self.path, "format": self.format, "size_bytes": self.size_bytes,
            "kind": self.kind, "tensor_count": self.tensor_count,
            "param_count": self.param_count, "tensor_bytes": self.tensor_bytes,
            "groups": [asdict(g) for g in self.groups],
            "metadata": {k: _jsonable(v) for k, v in self.metadata.items()},
            "tensors": [t.to_dict() for t in self.tensors],
            "objects": list(self.objects), "unsafe": list(self.unsafe),
            "optimizer": asdict(self.optimizer) if self.optimizer else None,
            "scheduler": self.scheduler, "scaler": self.scaler, "opaque": self.opaque,
            "details": {k: _jsonable(v) for k, v in self.details.items()},
        }
        if self.format == "savedmodel":
            out["signatures"] = [_signature_dict(s) for s in self.signatures]
        return out


def _signature_dict(sig: Signature) -> dict[str, Any]:
    def spec(s: Any) -> dict[str, Any]:
        return {"name": s.name, "dtype": s.dtype,
                "shape": list(s.shape) if s.shape is not None else None,
                "tensor_name": s.tensor_name}

    return {"key": sig.key, "method": sig.method, "tags": list(sig.tags),
            "inputs": [spec(s) for s in sig.inputs], "outputs": [spec(s) for s in sig.outputs]}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, TensorRef):
        return {"dtype": value.dtype, "shape": list(value.shape)}
    return repr(value)


_TF_VALUE_SUFFIX = (".ATTRIBUTES", "VARIABLE_VALUE")


def _without_tf_suffix(parts: tuple[Any, ...]) -> tuple[Any, ...]:
    """TF2 object checkpoints end every variable name in ``/.ATTRIBUTES/VARIABLE_VALUE``;
    it says nothing about the model, so groups and the tree leave it out."""
    return parts[:-2] if tuple(parts[-2:]) == _TF_VALUE_SUFFIX and len(parts) > 2 else parts


def _root_mapping(tree: Any) -> dict[Any, Any]:
    if isinstance(tree, dict):
        return tree
    if isinstance(tree, Opaque) and isinstance(tree.state, dict):
        return tree.state
    return {}


def summarise(raw: RawCheckpoint, path: str, size_bytes: int) -> CheckpointInfo:
    """Build the public summary from a reader's raw result."""
    tensors = []
    group_stats: dict[str, list[int]] = {}
    for where, ref in raw.tensors:
        parts = tuple(where.split(raw.separator)) if isinstance(where, str) else tuple(where)
        name = where if isinstance(where, str) else join(parts, raw.separator)
        tensors.append(TensorInfo(name, ref.dtype, ref.shape, ref.nbytes, ref.file,
                                  tuple(_chunk(c) for c in ref.chunks)))
        parts = _without_tf_suffix(parts)
        group = str(parts[0]) if len(parts) > 1 else ""
        stats = group_stats.setdefault(group, [0, 0, 0])
        stats[0] += 1
        stats[1] += ref.numel
        stats[2] += ref.nbytes
    groups = tuple(Group(n, *s) for n, s in group_stats.items())
    root = _root_mapping(raw.tree)
    metadata = {str(k): v for k, v in root.items() if is_scalar(v)}
    if raw.format == "safetensors":
        metadata.update(raw.details.get("metadata", {}))
    optimizer = _optimizer(root)
    scheduler = any(k in root for k in SCHEDULER_KEYS) or any(
        _looks_like_scheduler(v) for v in root.values())
    scaler = any(k in root for k in SCALER_KEYS) or any(_looks_like_scaler(v)
                                                        for v in root.values())
    return CheckpointInfo(
        path=path, format=raw.format, size_bytes=size_bytes,
        kind=_kind(raw, root, optimizer, groups),
        tensor_count=len(tensors), param_count=sum(s[1] for s in group_stats.values()),
        tensor_bytes=sum(s[2] for s in group_stats.values()), groups=groups,
        metadata=metadata, tensors=tuple(tensors), objects=raw.safety.objects,
        unsafe=raw.safety.unsafe, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        signatures=raw.signatures, details=dict(raw.details), separator=raw.separator,
        opaque={str(k): {"class": v.qualname, "state": plain_state(v)}
                for k, v in root.items()
                if isinstance(v, Opaque) and not v.qualname.startswith("__torch__")},
        tree=raw.tree)


def _chunk(chunk: Chunk) -> dict[str, Any]:
    out: dict[str, Any] = {"offsets": list(chunk.offsets), "sizes": list(chunk.sizes),
                           "file": chunk.file, "offset": chunk.span.offset,
                           "length": chunk.span.length}
    if chunk.transforms:
        out["transforms"] = list(chunk.transforms)
    return out


def plain_state(obj: Opaque) -> Any:
    """What an opaque object would have been built from, as JSON-ready plain values."""
    if isinstance(obj.state, dict):
        return _jsonable(obj.state)
    pairs = [i for i in obj.items if isinstance(i, tuple) and len(i) == 2]
    if pairs and len(pairs) == len(obj.items):
        return {str(k): _jsonable(v) for k, v in pairs}
    if obj.state is not None:
        return _jsonable(obj.state)
    return _jsonable(list(obj.args) + list(obj.items))


def _kind(raw: RawCheckpoint, root: dict[Any, Any], optimizer: OptimizerSummary | None,
          groups: tuple[Group, ...]) -> str:
    if raw.format == "savedmodel":
        return "savedmodel"
    if raw.format == "torchscript":
        return "torchscript-module"
    if raw.format in ("gguf", "onnx") or raw.details.get("model"):
        return "model"  # a whole model: architecture or graph, not only weights
    if optimizer is not None:
        return "training-checkpoint"
    if root and all(isinstance(v, TensorRef) for v in root.values()):
        return "state-dict"
    if [g.name for g in groups] == [""] and raw.format != "tf-checkpoint":
        return "state-dict"
    return "weights"


def _optimizer(root: dict[Any, Any]) -> OptimizerSummary | None:
    candidates = [(k, root[k]) for k in OPTIMIZER_KEYS if k in root]
    candidates += [(str(k), v) for k, v in root.items() if k not in OPTIMIZER_KEYS]
    for key, value in candidates:
        if isinstance(value, list) and value and _is_optimizer_state(value[0]):
            value = value[0]
        if _is_optimizer_state(value):
            return _describe_optimizer(str(key), value)
    return None


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, dict) and "param_groups" in value and "state" in value


def _describe_optimizer(key: str, state_dict: dict[str, Any]) -> OptimizerSummary:
    groups = [g for g in state_dict.get("param_groups") or [] if isinstance(g, dict)]
    state = state_dict.get("state") or {}
    names: set[str] = set()
    for per_param in (state.values() if isinstance(state, dict) else []):
        if isinstance(per_param, dict):
            names.update(str(k) for k in per_param)
    kind = "unknown (no per-parameter state yet)" if not names else "unknown"
    for needed, label in _ADAM_LIKE.items():
        if set(needed) <= names:
            kind = label
            break
    if kind == "Adam" and groups and groups[0].get("decoupled_weight_decay") is True:
        kind = "AdamW"
    hyper = {k: v for k, v in (groups[0].items() if groups else ())
             if k != "params" and is_scalar(v) or k == "betas"}
    rates = tuple(float(g["lr"]) for g in groups if isinstance(g.get("lr"), (int, float)))
    return OptimizerSummary(key, kind, rates, len(groups),
                            len(state) if isinstance(state, dict) else 0,
                            {k: _jsonable(v) for k, v in hyper.items()})


def _looks_like_scheduler(value: Any) -> bool:
    return isinstance(value, dict) and "last_epoch" in value and (
        "base_lrs" in value or "_step_count" in value)


def _looks_like_scaler(value: Any) -> bool:
    return isinstance(value, dict) and {"scale", "growth_factor", "backoff_factor"} <= set(value)


def module_tree(info: CheckpointInfo, depth: int) -> list[tuple[str, int, int, int]]:
    """Tensor names collapsed to ``depth`` components: ``(prefix, tensors, params, bytes)``.

    Runs of numbered siblings with identical contents are folded into one row such as
    ``layers.{0..7}``, so an 8-layer stack reads as one line.
    """
    sep = info.separator
    rows: dict[str, list[int]] = {}
    shapes: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for t in info.tensors:
        parts = list(_without_tf_suffix(tuple(t.name.split(sep))))
        prefix = sep.join(parts[:depth])
        stats = rows.setdefault(prefix, [0, 0, 0])
        stats[0] += 1
        stats[1] += _numel(t.shape)
        stats[2] += t.nbytes
        rest = sep.join(parts[depth:])
        shapes.setdefault(prefix, []).append((rest, t.dtype, t.shape))
    return _fold(rows, shapes, sep)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fold(rows: dict[str, list[int]], shapes: dict[str, list[Any]],
          sep: str) -> list[tuple[str, int, int, int]]:
    out: list[tuple[str, int, int, int]] = []
    items = list(rows.items())
    i = 0
    while i < len(items):
        prefix, stats = items[i]
        head, _, last = prefix.rpartition(sep)
        j = i + 1
        if last.isdigit() and shapes[prefix][0][0]:
            expected = int(last) + 1
            while j < len(items):
                nxt = items[j][0]
                nhead, _, nlast = nxt.rpartition(sep)
                if nhead != head or nlast != str(expected) or shapes[nxt] != shapes[prefix]:
                    break
                expected += 1
                j += 1
        if j - i > 1:
            label = f"{head}{sep if head else ''}{{{last}..{expected - 1}}}"
            out.append((label, stats[0] * (j - i), stats[1] * (j - i), stats[2] * (j - i)))
        else:
            out.append((prefix, *stats))
        i = j
    return out
