"""``ckptkit.runs.diff``: which tensors changed between two checkpoints, and by how much.

Every tensor of A is paired with one of B (by name, across wrappers and across PyTorch/Flax
naming: :mod:`ckptkit.runs.diff_names`) and classified as ``changed``, ``unchanged`` (every
element within ``atol``; ``atol=0`` means equal values, NaN equal to NaN),
``shape_changed``, ``only_a`` or ``only_b``.  For compared pairs it reports the largest
absolute difference and the relative change ``max|a-b| / max(max|a|, tiny)``.

Memory stays bounded: one pair is compared at a time, and contiguous tensors (what
``torch.save``, safetensors and C-ordered npz hold) are streamed in windows of about a
million elements, never read whole.  Strided views and transposed Flax kernels have their
storage read whole, one pair at a time, and are compared window by window through a view.
A broadcast view (stride 0) is compared the same way; the elements it has beyond its storage
are charged to its file's reading budget first (:mod:`ckptkit.storage.budget`), so a four-byte
storage viewed as 40000 x 40000 is refused, not walked.

Tensors under training-state entries (optimizer, scheduler, scaler: see
:func:`ckptkit.runs.strip.training_reason`) are compared too, but reported in their own section.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Iterator, Literal

import numpy as np

from ckptkit.storage import budget
from ckptkit.runs.diff_names import Entry, Match, Pair, pair
from ckptkit.model import RawCheckpoint, TensorRef, packed_types

Status = Literal["changed", "unchanged", "shape_changed", "only_a", "only_b"]
Section = Literal["weights", "training"]
STATUSES: tuple[Status, ...] = ("changed", "unchanged", "shape_changed", "only_a", "only_b")
#: Elements per window of a streamed comparison (4 MiB of float64 per side).
WINDOW = 1 << 19
TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class TensorDiff:
    """One tensor's verdict.  ``name`` is A's name (B's for ``only_b``); ``max_abs`` and
    ``relative`` are None unless the pair was compared (NaN where only one side is NaN)."""

    name: str
    name_b: str | None
    section: Section
    group: str
    status: Status
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    dtype_a: str | None
    dtype_b: str | None
    max_abs: float | None = None
    relative: float | None = None
    match: Match | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "name_b": self.name_b, "section": self.section,
                "group": self.group, "status": self.status,
                "shape_a": None if self.shape_a is None else list(self.shape_a),
                "shape_b": None if self.shape_b is None else list(self.shape_b),
                "dtype_a": self.dtype_a, "dtype_b": self.dtype_b, "max_abs": self.max_abs,
                "relative": self.relative, "match": self.match}


@dataclass(frozen=True)
class GroupSummary:
    """Counts per status for one module prefix, and its largest changes."""

    name: str
    section: Section
    counts: dict[str, int]
    max_abs: float | None
    relative: float | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "section": self.section, "total": self.total,
                **self.counts, "max_abs": self.max_abs, "relative": self.relative}


@dataclass(frozen=True)
class DiffReport:
    """Everything ``ckpt diff`` prints (``to_dict()`` is ``--json``)."""

    a: str
    b: str
    format_a: str
    format_b: str
    atol: float
    depth: int
    tensors: tuple[TensorDiff, ...]
    groups: tuple[GroupSummary, ...]
    matched: dict[str, int] = field(default_factory=dict)

    def counts(self, section: Section | None = None) -> dict[str, int]:
        """Tensors per status (in one section, or overall)."""
        out = {s: 0 for s in STATUSES}
        for t in self.tensors:
            if section is None or t.section == section:
                out[t.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "format_a": self.format_a, "format_b": self.format_b,
                "atol": self.atol, "depth": self.depth, "summary": self.counts(),
                "matched": dict(self.matched), "groups": [g.to_dict() for g in self.groups],
                "tensors": [t.to_dict() for t in self.tensors]}


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str], *, atol: float = 0.0,
         depth: int = 1, weights_only: bool = False) -> DiffReport:
    """Compare checkpoints ``a`` and ``b`` tensor by tensor with bounded memory.

    Args:
        a, b: checkpoints of any format ckptkit reads (they may differ).
        atol: largest absolute difference still counted as unchanged (0: equal values).
        depth: module-name components per summary group, after a root shared by every
            weight of A (``model`` in ``{"model": sd}``) is set aside.
        weights_only: leave out optimizer, scheduler and scaler tensors.

    Returns:
        A :class:`DiffReport`.

    Raises:
        NotFoundError, FormatError, IntegrityError: a file is missing, unknown or corrupt.
        UsageError: a negative ``atol`` or a ``depth`` below 1.

    Example:
        >>> report = diff("epoch_0.pt", "epoch_5.pt")               # doctest: +SKIP
        >>> [(g.name, g.counts["changed"], g.total) for g in report.groups]  # doctest: +SKIP
        [('backbone', 0, 7), ('head', 2, 2)]
    """
    from ckptkit import formats
    from ckptkit.errors import UsageError, naming

    if not atol >= 0 or depth < 1:
        raise UsageError(f"--atol must be >= 0 and --depth >= 1 (got {atol}, {depth})",
                         hint="Pass atol=0 or more and depth=1 or more")
    path_a, path_b = Path(a), Path(b)
    with naming(path_a), budget.reading(path_a) as account_a:
        reader_a = formats.detect(path_a)
        raw_a = reader_a.read_info(path_a)
    with naming(path_b), budget.reading(path_b) as account_b:
        reader_b = formats.detect(path_b)
        raw_b = reader_b.read_info(path_b)
    side_a, training_a = _entries(raw_a, _values(reader_a, path_a))
    side_b, training_b = _entries(raw_b, _values(reader_b, path_b))
    if weights_only:
        side_a = [e for e in side_a if e.top not in training_a]
        side_b = [e for e in side_b if e.top not in training_b]
    pairs, only_a, only_b = pair(side_a, side_b)
    root = _shared_root(side_a, training_a, raw_a.separator)
    order = {e.name: i for i, e in enumerate(side_a)}
    pairs.sort(key=lambda p: order[p.a.name])
    big = (raw_a.details.get("byteorder") == "big", raw_b.details.get("byteorder") == "big")

    def place(entry: Entry, training: set[str], sep: str) -> tuple[Section, str]:
        if entry.top in training:
            return "training", entry.top
        return "weights", _group(entry.name, sep, root, depth)

    results: list[TensorDiff] = []
    for p in pairs:
        section, group = place(p.a, training_a, raw_a.separator)
        results.append(_compare(p, section, group, atol, big, (account_a, account_b)))
    for e in only_a:
        section, group = place(e, training_a, raw_a.separator)
        results.append(TensorDiff(e.name, None, section, group, "only_a", e.ref.shape, None,
                                  e.ref.dtype, None))
    for e in only_b:
        section, group = place(e, training_b, raw_b.separator)
        results.append(TensorDiff(e.name, e.name, section, group, "only_b", None, e.ref.shape,
                                  None, e.ref.dtype))
    matched = {m: sum(1 for p in pairs if p.match == m) for m in ("exact", "renamed", "flax")}
    return DiffReport(str(path_a), str(path_b), raw_a.format, raw_b.format, atol, depth,
                      tuple(results), _summaries(results), matched)


def _values(reader: Any, path: Path) -> Callable[[str, TensorRef], Any] | None:
    """The format's own tensor reader (``tensor_reader``), built on first use, for tensors
    whose values are not plain bytes of the file; None for formats without one."""
    if not hasattr(reader, "tensor_reader"):
        return None
    made: list[Callable[[str, TensorRef], Any]] = []

    def read(name: str, ref: TensorRef) -> Any:
        if not made:
            made.append(reader.tensor_reader(path))
        return made[0](name, ref)

    return read


def _entries(raw: RawCheckpoint, values: Callable[[str, TensorRef], Any] | None = None
             ) -> tuple[list[Entry], set[str]]:
    from ckptkit.runs.strip import training_reason

    root = raw.tree if isinstance(raw.tree, dict) else {}
    training = {str(k) for k, v in root.items() if training_reason(k, v)}
    entries = []
    for where, ref in raw.tensors:
        if isinstance(where, str):
            name, top = where, where.split(raw.separator, 1)[0]
        else:
            name, top = raw.separator.join(str(p) for p in where), str(where[0])
        read = None
        if values is not None and ref.span is None and not ref.chunks:
            read = (lambda n=name, r=ref: values(n, r))
        entries.append(Entry(name, top if name != top else "", ref, read=read))
    return entries, training


def _shared_root(entries: list[Entry], training: set[str], sep: str) -> str:
    tops = {e.top for e in entries if e.top not in training}
    if len(tops) == 1:
        (top,) = tops
        if top and all(e.name.startswith(top + sep) for e in entries if e.top == top):
            return top
    return ""


def _group(name: str, sep: str, root: str, depth: int) -> str:
    body = name[len(root) + len(sep):] if root and name.startswith(root + sep) else name
    module = body.split(sep)[:-1]  # the last component is the leaf (weight, bias, kernel)
    return sep.join(module[:depth]) if module else "(top level)"


def _compare(p: Pair, section: Section, group: str, atol: float,
             big: tuple[bool, bool], accounts: tuple[budget.Budget, budget.Budget]) -> TensorDiff:
    ra, rb = p.a.ref, p.b.ref
    shape_a = p.a.transform.shape(ra.shape)
    shape_b = p.b.transform.shape(rb.shape)
    base = dict(name=p.a.name, name_b=p.b.name, section=section, group=group,
                shape_a=ra.shape, shape_b=rb.shape, dtype_a=ra.dtype, dtype_b=rb.dtype,
                match=p.match)
    if shape_a != shape_b:
        return TensorDiff(status="shape_changed", **base)  # type: ignore[arg-type]
    if ra.dtype in packed_types() or rb.dtype in packed_types():
        return _compare_packed(p, base, big, accounts)
    stats = _Stats()
    try:
        for win_a, win_b in _windows(p, big, accounts):
            stats.add(win_a, win_b)
    except MemoryError:
        from ckptkit.errors import IntegrityError

        raise IntegrityError(
            f"{accounts[0].name}: tensor {p.a.name!r} ({ra.dtype}{list(ra.shape)}, "
            f"{ra.nbytes:,} bytes) and its pair in {accounts[1].name} do not fit in memory to "
            "compare", hint="Free memory, or compare on a machine with more",
            path=accounts[0].name) from None
    changed = stats.nan_mismatch or stats.max_abs > atol
    max_abs = math.nan if stats.nan_mismatch and stats.max_abs == 0 else stats.max_abs
    relative = max_abs / max(stats.max_a, TINY)
    return TensorDiff(status="changed" if changed else "unchanged",  # type: ignore[arg-type]
                      max_abs=float(max_abs), relative=float(relative), **base)


def _compare_packed(p: Pair, base: dict[str, Any], big: tuple[bool, bool],
                    accounts: tuple[budget.Budget, budget.Budget]) -> TensorDiff:
    """Block-quantized tensors (GGUF Q4_0, Q8_0...): equal when their packed bytes are;
    a difference has no element-wise size (NaN), the blocks are not decoded."""
    ra, rb = p.a.ref, p.b.ref
    same = ra.dtype == rb.dtype and ra.nbytes == rb.nbytes and p.a.transform.name == "none" \
        and p.b.transform.name == "none"
    if same:
        raw_a = TensorRef("uint8", (ra.nbytes,), ra.span)
        raw_b = TensorRef("uint8", (rb.nbytes,), rb.span)
        stats = _Stats()
        for win_a, win_b in zip(_stream(raw_a, False, accounts[0]),
                                _stream(raw_b, False, accounts[1]), strict=True):
            stats.add(win_a, win_b)
        same = stats.max_abs == 0
    return TensorDiff(status="unchanged" if same else "changed",  # type: ignore[arg-type]
                      max_abs=0.0 if same else math.nan, relative=0.0 if same else math.nan,
                      **base)


def _windows(p: Pair, big: tuple[bool, bool],
             accounts: tuple[budget.Budget, budget.Budget]
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Aligned 1-D windows of both tensors, in the canonical layout."""
    from ckptkit.formats.chunks import is_contiguous

    streamed = all(e.transform.name == "none" and e.read is None and is_contiguous(e.ref)
                   for e in (p.a, p.b))
    if streamed:
        yield from zip(_stream(p.a.ref, big[0], accounts[0]),
                       _stream(p.b.ref, big[1], accounts[1]), strict=True)
        return
    view_a = _view(p.a, big[0], accounts[0])
    view_b = _view(p.b, big[1], accounts[1])
    yield from zip(_flat_windows(view_a), _flat_windows(view_b), strict=True)


def _view(entry: Entry, big: bool, account: budget.Budget) -> np.ndarray:
    """The tensor in the canonical layout, as a view of its storage (read whole)."""
    from ckptkit.formats.tensor_io import expansion, tensor_view

    ref = entry.ref
    if entry.read is not None:
        with budget.using(account):
            view = np.asarray(entry.read())
        order = entry.transform.permutation(view.ndim)
        return view if order is None else view.transpose(order)
    extra = expansion(ref)
    if extra:  # every element is visited: a broadcast costs what materialising it would
        stored = ref.span.length if ref.span is not None else 0
        account.charge("expanded", extra, f"tensor {entry.name!r}, a {ref.dtype}"
                       f"{list(ref.shape)} view of {stored:,} stored bytes")
    with budget.using(account):
        view = tensor_view(ref, big_endian=big)
    order = entry.transform.permutation(view.ndim)
    return view if order is None else view.transpose(order)  # still a view


def _flat_windows(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array``'s elements in C order, as 1-D windows of about WINDOW elements; only a
    window at a time is copied out of a strided view."""
    if array.ndim == 0 or array.size == 0:
        yield array.reshape(-1)
        return
    inner = math.prod(array.shape[1:])
    if inner > WINDOW:
        for row in array:
            yield from _flat_windows(row)
        return
    rows = max(1, WINDOW // max(inner, 1))
    for start in range(0, array.shape[0], rows):
        yield np.ascontiguousarray(array[start:start + rows]).reshape(-1)


def _stream(ref: TensorRef, big: bool, account: budget.Budget) -> Iterator[np.ndarray]:
    from ckptkit.formats.chunks import iter_bytes, tensor_range
    from ckptkit.formats.tensor_io import numpy_dtype

    dtype = numpy_dtype(ref.dtype)
    if big:
        dtype = dtype.newbyteorder(">")
    start, length = tensor_range(ref)
    if length == 0 or ref.span is None:
        yield np.zeros(0, dtype)
        return
    for data in iter_bytes(ref.span, start, length, chunk=WINDOW * dtype.itemsize,
                           account=account):
        yield np.frombuffer(data, dtype)


class _Stats:
    """Running max |a-b|, max |a| and whether NaNs disagree, window by window."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.max_a = 0.0
        self.nan_mismatch = False

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size == 0:
            return
        kind = np.complex128 if "c" in (a.dtype.kind, b.dtype.kind) else np.float64
        fa, fb = a.astype(kind), b.astype(kind)
        with np.errstate(invalid="ignore", over="ignore"):
            nan_a, nan_b = np.isnan(fa), np.isnan(fb)
            delta = np.abs(fa - fb)
            delta[(fa == fb) | (nan_a & nan_b)] = 0  # equal infinities, matching NaNs
            bad = np.isnan(delta)
            if bad.any():
                self.nan_mismatch = True
                delta[bad] = 0
            self.max_abs = max(self.max_abs, float(delta.max()))
            mag = np.abs(fa)
            mag[nan_a] = 0
            self.max_a = max(self.max_a, float(mag.max()))


def _summaries(results: list[TensorDiff]) -> tuple[GroupSummary, ...]:
    groups: dict[tuple[Section, str], list[TensorDiff]] = {}
    for t in results:
        groups.setdefault((t.section, t.group), []).append(t)
    out = []
    for (section, name), items in sorted(groups.items(), key=lambda kv: kv[0][0] == "training"):
        counts = {s: sum(1 for t in items if t.status == s) for s in STATUSES}
        compared = [t for t in items if t.max_abs is not None]
        out.append(GroupSummary(name, section, counts,
                                max((t.max_abs for t in compared), default=None, key=_nan_high),
                                max((t.relative for t in compared), default=None,
                                    key=_nan_high)))
    return tuple(out)


def _nan_high(value: float | None) -> float:
    return math.inf if value is None or math.isnan(value) else value
