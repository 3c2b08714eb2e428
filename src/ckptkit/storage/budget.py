"""One budget of work and memory for reading any input, shared by every reader and by scan.

A hostile file of a few KiB can ask for gigabytes: ten million ``EMPTY_SET`` opcodes in a
deflated ``data.pkl``, a zip nested in a zip where each level may inflate 64-fold, a stride-0
view of four bytes as a 40000 x 40000 tensor.  Every reader therefore charges what it does to
one :class:`Budget` per input, opened when the input is opened (:func:`reading`), and the
budget is sized by the input: an input of N bytes may cost at most ``max(floor, N x rate)``
of each kind of work, so it costs O(N) time and about ``max(256 MiB, 64 x N)`` memory.

Nested reads share the account that is already open: the members of an archive scanned
inside ``ckpt scan``, a zip inside that zip, the pickles of one torch file.  Going over a
limit raises :class:`~ckptkit.errors.BudgetError` (exit 3), naming the input, what ran over
and the ``CKPTKIT_MAX_*`` setting that raises it (read by :func:`configured`).

What is counted, by kind:

``opcodes``
    Pickle opcodes interpreted or scanned statically, plus one per object of a tuple hashed
    as a dict key or set member (hashing a tuple walks it again every time).
``nodes``
    Containers and records a pickle builds, weighted by size (an empty set costs three, a
    class stand-in forty: a dict is the unit).
``stack``
    Values pushed onto a pickle's stack and entries put into its memo.
``tree``
    Nodes walked when a tree is resolved (a memo-shared subtree counts each time it is
    reachable) plus, for each tensor found, the length of its path: depth x width.
``decompressed``
    Bytes inflated from compressed members and streams, across every nesting level together.
``expanded``
    Bytes a broadcast (stride-0) view would materialise beyond the bytes its storage holds.
``key``, ``depth``, ``header``
    Per-item caps: objects in one dict key, nesting depth, bytes of one format header.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from ckptkit.errors import BudgetError, UsageError

Kind = Literal["opcodes", "nodes", "stack", "tree", "decompressed", "expanded", "key", "depth",
               "header"]


@dataclass(frozen=True)
class Limits:
    """The budget of an input: floors that any input gets, however small.

    Counted kinds grow with the input's size N: ``max(floor, N x rate)`` (see :data:`RATE`);
    byte kinds are ``max(bytes, ratio x N)``.  Defaults keep the worst case of each near
    256 MiB; ``CKPTKIT_MAX_<FIELD>`` raises any of them (:func:`configured`).
    """

    opcodes: int = 2_000_000
    nodes: int = 1_000_000
    stack: int = 2_000_000
    tree: int = 5_000_000
    key: int = 1_000
    depth: int = 400
    header: int = 100_000_000
    bytes: int = 256 << 20
    ratio: int = 64

    @classmethod
    def variable(cls, name: str) -> str:
        """The environment variable that sets field ``name``."""
        return f"CKPTKIT_MAX_{name.upper()}"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The fields, each a ``CKPTKIT_MAX_<FIELD>`` setting."""
        return tuple(f.name for f in fields(cls))


def configured() -> Limits:
    """The reading budget: :class:`Limits`, each field raised (or lowered) by its
    ``CKPTKIT_MAX_<FIELD>`` variable, a whole number above 0 (``_`` allowed: 500_000_000).

    Raises:
        UsageError: a variable that is not a whole number above 0.
    """
    from ckptkit.config import max_settings

    raw_values = max_settings()
    values: dict[str, int] = {}
    for name in Limits.names():
        variable = Limits.variable(name)
        raw = raw_values.get(variable)
        if raw is None:
            continue
        text = raw.strip().replace("_", "")
        value = int(text) if text.isascii() and text.isdigit() and len(text) < 20 else 0
        if value < 1:
            raise UsageError(f"{variable}={raw!r} is not a whole number above 0",
                             hint=f"Example: {variable}={getattr(Limits, name) * 4}")
        values[name] = value
    return Limits(**values)


#: Per input byte, how much of each counted kind an input may use beyond its floor.
RATE: dict[str, float] = {"opcodes": 4, "nodes": 0.25, "stack": 1, "tree": 1}
#: What each kind counts, for messages.
_WHAT: dict[str, str] = {
    "opcodes": "pickle opcodes",
    "nodes": "objects built (containers and records)",
    "stack": "values pushed onto pickle stacks and memos",
    "tree": "tree nodes and tensor path entries",
    "decompressed": "decompressed bytes (a decompression bomb?)",
    "expanded": "bytes materialised by broadcast views",
    "key": "objects in one dict key or set member",
    "depth": "nesting levels",
    "header": "header bytes",
}
#: The Limits field behind each byte kind (the others have a field of their own name).
_FIELD: dict[str, str] = {"decompressed": "ratio", "expanded": "ratio"}


class Budget:
    """The running account of one input against its limits.

    Example::

        with reading(path) as budget:
            budget.charge("decompressed", len(chunk))
    """

    def __init__(self, name: str, size: int, limits: Limits | None = None):
        if limits is None:
            limits = configured()
        self.name = name
        self.size = max(0, size)
        self.limits = limits
        self.used: dict[str, int] = dict.fromkeys(_WHAT, 0)
        self._limit = {kind: self._compute(kind) for kind in _WHAT}

    def _compute(self, kind: str) -> int:
        lim = self.limits
        if kind in ("decompressed", "expanded"):
            return max(lim.bytes, lim.ratio * self.size)
        floor = getattr(lim, kind)
        return max(floor, int(self.size * RATE[kind])) if kind in RATE else floor

    def limit(self, kind: Kind) -> int:
        """How much of ``kind`` this input may use in all."""
        return self._limit[kind]

    def room(self, kind: Kind) -> int:
        """How much of ``kind`` is left (never below 0)."""
        return max(0, self._limit[kind] - self.used[kind])

    def charge(self, kind: Kind, amount: int = 1, what: str = "") -> None:
        """Spend ``amount`` of ``kind``, or raise if that would pass the limit (then nothing
        is spent: ``used`` never passes a limit).

        Raises:
            BudgetError: naming the input, ``what`` (the entry being read), the limit and the
                setting that raises it.
        """
        if self.used[kind] + amount > self._limit[kind]:
            raise self.over(kind, what)
        self.used[kind] += amount

    def check(self, kind: Kind, value: int, what: str = "") -> None:
        """A per-item cap (``key``, ``depth``, ``header``): ``value`` may not pass the limit."""
        if value > self._limit[kind]:
            raise self.over(kind, what, value)

    def over(self, kind: Kind, what: str = "", value: int | None = None) -> BudgetError:
        """The error for going over ``kind`` (``value`` for a per-item cap)."""
        noun = _WHAT[kind]
        field = _FIELD.get(kind, kind)
        variable = Limits.variable(field)
        where = f" in {what}" if what else ""
        if value is not None:
            text = f"{value:,} {noun}{where}, more than the limit of {self._limit[kind]:,}"
        else:
            text = (f"more than {self._limit[kind]:,} {noun}{where} (the budget for a "
                    f"{self.size:,}-byte input)")
        if field == "ratio":
            hint = (f"If the file is genuine, raise {variable} (now {self.limits.ratio}x the "
                    f"input) or {Limits.variable('bytes')}; see docs/security.md")
        else:
            hint = f"If the file is genuine, raise {variable}; see docs/security.md"
        return BudgetError(f"{self.name}: reading it needs {text}", limit=kind,
                           variable=variable, hint=hint, path=self.name)


_CURRENT: ContextVar[Budget | None] = ContextVar("ckptkit_budget", default=None)


def current() -> Budget:
    """The account open for the input being read; outside :func:`reading`, a fresh one with
    the floors only (an input of unknown size)."""
    return _CURRENT.get() or Budget("input", 0)


@contextlib.contextmanager
def reading(path: str | os.PathLike[str]) -> Iterator[Budget]:
    """Open the account for reading ``path``, sized by it; inside an open account (an archive
    member, a nested zip), that account is shared instead."""
    open_now = _CURRENT.get()
    if open_now is not None:
        yield open_now
        return
    budget = Budget(str(path), input_size(path))
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def using(account: Budget) -> Iterator[Budget]:
    """Make ``account`` the open one for a while (``diff`` reads two inputs in turns)."""
    token = _CURRENT.set(account)
    try:
        yield account
    finally:
        _CURRENT.reset(token)


# --- pickle opcodes: counted per opcode in the machine's loop, charged in batches -------------

def _table(weights: dict[bytes, int]) -> list[int]:
    table = [0] * 256
    for ops, weight in weights.items():
        for op in ops:
            table[op] = weight
    return table


#: Values an opcode pushes onto the stack (MARK: a new stack frame), or memo entries it adds
#: (a memo entry is a dict slot holding an int key: two units).
_PUSHES = _table({
    b"N\x88\x89IJKML\x8a\x8bFGSTUVX\x8c\x8dBC\x8e\x96\x97)]}\x8fc\x82\x83\x84gh"
    b"j2(Pio": 1,
    b"pqr\x94": 2,
})
#: Containers and records an opcode builds, in units of an empty dict (72 bytes): a set or
#: frozenset is three, an inert record (call, construction) three, a storage reference two.
_BUILDS = _table({
    b"]}ldt\x85\x86\x87\x96": 1,
    b"\x8f\x91R\x81\x92io": 3,
    b"PQ": 2,
})
#: Opcodes between two settlements of the counts with the budget.
_BATCH = 4096


class OpcodeMeter:
    """Counts one pickle machine's opcodes and charges them to ``budget`` in batches.

    The machine's loop does only ``counts[op] += 1`` per opcode and calls :meth:`settle`
    every :data:`_BATCH` opcodes, so metering costs almost nothing per opcode."""

    def __init__(self, budget: Budget, what: str):
        self.budget = budget
        self.what = what
        self.counts = [0] * 256

    def settle(self) -> int:
        """Charge the counts since the last call; returns the opcodes until the next one."""
        counts = self.counts
        ops = sum(counts)
        if ops:
            pushes = sum(map(int.__mul__, counts, _PUSHES))
            built = sum(map(int.__mul__, counts, _BUILDS))
            counts[:] = _ZEROS
            self.budget.charge("opcodes", ops, self.what)
            self.budget.charge("stack", pushes, self.what)
            self.budget.charge("nodes", built, self.what)
        return _BATCH


_ZEROS = [0] * 256


F = TypeVar("F", bound=Callable[..., Any])


def metered(func: F) -> F:
    """Run a reader function ``func(path, ...)`` inside :func:`reading` of its path."""
    @functools.wraps(func)
    def run(path: Any, *args: Any, **kwargs: Any) -> Any:
        with reading(path):
            return func(path, *args, **kwargs)

    return run  # type: ignore[return-value]


def input_size(path: Any) -> int:
    """Bytes of the input: a file's size, a directory's files (two levels, as SavedModels and
    checkpoint folders are laid out), or a TF checkpoint prefix's index and shards."""
    from ckptkit.errors import CkptkitError
    from ckptkit.storage.location import locate

    loc = locate(path)
    try:
        if loc.is_file():
            return loc.size()
        if loc.is_dir():
            total = 0
            for entry in loc.list():
                if not entry.is_dir:
                    total += entry.size or 0
                    continue
                total += sum(e.size or 0 for e in loc.child(entry.name).list() if not e.is_dir)
            return total
        prefix = loc.name + "."
        return sum(e.size or 0 for e in loc.parent().list()
                   if not e.is_dir and e.name.startswith(prefix))
    except (OSError, CkptkitError):
        return 0
