"""Waiting on worker threads without going deaf to Ctrl-C.

A thread blocked in an untimed lock wait (``Future.result()``, ``as_completed``) can sleep
through SIGINT: when the kernel hands the signal to another thread, nothing wakes the waiter,
and Python's handler only runs once the main thread returns to the interpreter.  Waiting in
short slices returns to the interpreter regularly, so a pending Ctrl-C is raised at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TypeVar

T = TypeVar("T")

#: Longest uninterrupted sleep of a waiting thread, in seconds.
SLICE = 0.2


def result(future: Future[T]) -> T:
    """``future.result()``, interruptible by signals delivered to any thread."""
    while not wait([future], timeout=SLICE).done:
        pass
    return future.result()


def as_completed(futures: Iterable[Future[T]]) -> Iterator[Future[T]]:
    """Like :func:`concurrent.futures.as_completed`, interruptible by signals."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=SLICE, return_when=FIRST_COMPLETED)
        yield from done
