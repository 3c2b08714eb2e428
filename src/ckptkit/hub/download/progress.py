"""Where a transfer's bytes stand: the caller's progress display, the byte count shared by the
piece threads (:class:`Meter`), and each request's write position (:class:`Cursor`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol


class Progress(Protocol):
    """Where :func:`download` reports progress (tqdm-like); the caller creates and closes it.

    ``set_total`` is called once the size is known (None: unknown); ``update(n)`` as bytes
    arrive, from one thread at a time.  A resumed download first reports the bytes it already
    has; after a restart from scratch, updates resume once the new transfer passes the old one.
    """

    def set_total(self, total: int | None) -> None: ...

    def update(self, n: int) -> None: ...


@dataclass
class Cursor:
    """Where the next byte of a request goes; survives the request so a retry resumes.

    For a piece, ``on_progress(pos)`` is called every ``interval`` bytes (from ``synced``, the
    last position made durable), to record the piece's progress.
    """

    pos: int
    sniff_pending: bool = False
    interval: int = 0
    synced: int = 0
    on_progress: Callable[[int], None] | None = None

    def advanced(self) -> None:
        if self.on_progress is not None and self.pos - self.synced >= self.interval:
            self.on_progress(self.pos)
            self.synced = self.pos


class Meter:
    """Counts payload bytes across threads and forwards progress without double counting."""

    def __init__(self, progress: Progress | None) -> None:
        self.transferred = 0
        self._progress = progress
        self._lock = threading.Lock()
        self._position = 0
        self._reported = 0
        self._total: int | None = None
        self._total_sent = False

    def start(self, total: int | None, position: int) -> None:
        with self._lock:
            if self._progress is not None and (not self._total_sent or total != self._total):
                self._progress.set_total(total)
            self._total, self._total_sent, self._position = total, True, position
            self._forward()

    def add(self, n: int) -> None:
        with self._lock:
            self.transferred += n
            self._position += n
            self._forward()

    def _forward(self) -> None:
        if self._progress is not None and self._position > self._reported:
            self._progress.update(self._position - self._reported)
            self._reported = self._position
