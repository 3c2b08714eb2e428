"""Misbehaviour on demand for the local stand-ins: faults queued per target, taken by the
requests they apply to.

A :class:`Fault` says what goes wrong; a :class:`FaultQueue` holds them under a target key
(whatever the stand-in names a route by, e.g. ``"cdn:org/model/model.safetensors"``) and hands
each request the ones that apply to it, consuming them.  The handler base
(:mod:`ckptkit.testing.server`) acts on the body faults; answering a ``status`` fault or
ignoring ``Range`` is up to the stand-in, before it starts the body.

Kinds:

* ``status`` — answer ``status`` (429 by default) with an optional ``Retry-After``.
* ``ignore-range`` — answer 200 with the whole payload whatever ``Range`` asked.
* ``drop`` — close the connection cleanly (FIN) after ``after`` body bytes: the client sees the
  body end early.
* ``reset`` — abort the connection (RST) after ``after`` body bytes: the client's next read fails
  with "connection reset".
* ``corrupt`` — invert the byte at absolute ``offset`` of the payload in every response that
  carries it: with ``times=None`` the stored object itself is damaged (same size, wrong bytes).

Example::

    queue = FaultQueue()
    queue.add("cdn:org/m/model.safetensors", Fault("drop", after=4096))
    queue.add("api:org/m", Fault("status", status=429, retry_after="0", times=2))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

FaultKind = Literal["status", "ignore-range", "drop", "reset", "corrupt"]
BODY_KINDS: frozenset[str] = frozenset({"drop", "reset", "corrupt"})


class Countdown(Protocol):
    """What :func:`consume` needs of a fault: a kind and its skip/times counters."""

    @property
    def kind(self) -> str: ...

    skip: int
    times: int | None


_F = TypeVar("_F", bound=Countdown)


def consume(queued: list[_F], kinds: Collection[str], applies: Callable[[_F], bool]) -> list[_F]:
    """The first fault of each of ``kinds`` in ``queued`` that ``applies``, after counting
    down its ``skip``; each taken one counts down ``times`` and leaves ``queued`` when spent.

    Mutates the faults and ``queued``: the caller holds the lock guarding them.
    """
    taken: list[_F] = []
    for fault in list(queued):
        if fault.kind not in kinds or any(t.kind == fault.kind for t in taken) \
                or not applies(fault):
            continue
        if fault.skip > 0:
            fault.skip -= 1
            continue
        taken.append(fault)
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                queued.remove(fault)
    return taken


@dataclass
class Fault:
    """One misbehaviour for the next ``times`` requests it applies to (None: all of them),
    after letting ``skip`` of them through untouched.

    ``drop``/``reset`` apply only to bodies longer than ``after`` bytes, and ``corrupt`` only to
    responses whose span holds ``offset``, so a fault aimed at the middle of a file survives the
    small requests before it (a probe, a header read).
    """

    kind: FaultKind
    times: int | None = 1
    skip: int = 0
    status: int = 429
    retry_after: str | None = None
    after: int = 0
    offset: int = 0

    def applies(self, start: int, stop: int) -> bool:
        """Whether a response carrying payload bytes ``[start, stop)`` is affected."""
        if self.kind in ("drop", "reset"):
            return stop - start > self.after
        if self.kind == "corrupt":
            return start <= self.offset < stop
        return True


class FaultQueue:
    """Faults waiting under target keys; thread-safe (handlers run one thread per connection)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[str, list[Fault]] = {}

    def add(self, target: str, fault: Fault) -> Fault:
        """Queue ``fault`` for requests to ``target``; returns it (its ``times`` counts down)."""
        with self._lock:
            self._queued.setdefault(target, []).append(fault)
        return fault

    def clear(self) -> None:
        """Forget every queued fault."""
        with self._lock:
            self._queued.clear()

    def pending(self, target: str) -> list[Fault]:
        """The faults still queued for ``target``."""
        with self._lock:
            return list(self._queued.get(target, ()))

    def take(self, target: str, kinds: Collection[str], start: int = 0,
             stop: int | None = None) -> list[Fault]:
        """The first applicable fault of each of ``kinds`` queued for ``target``, consumed.

        ``start``/``stop`` is the payload span the response carries (``stop`` None: unknown
        yet, so span conditions are not checked).
        """
        with self._lock:
            return consume(self._queued.get(target, []), kinds,
                           lambda fault: stop is None or fault.applies(start, stop))
