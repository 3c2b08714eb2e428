"""Progress bars for people watching a terminal; nothing when piped or --quiet."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ckptkit.cli.render import safe


class Bar:
    """A tqdm bar on stderr behind the small progress interface the library calls."""

    def __init__(self, label: str, total: int | None):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=safe(label), unit="B", unit_scale=True,
                         unit_divisor=1024, file=sys.stderr, leave=False, dynamic_ncols=True)

    def set_total(self, total: int | None) -> None:
        self._bar.total = total
        self._bar.refresh()

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def progress_bars(quiet: bool):
    """Progress bars only for a person watching: not with --quiet, not when piped."""
    return None if quiet or not sys.stderr.isatty() else Bar


@contextmanager
def counter(label: str, *, quiet: bool) -> Iterator[Callable[[Any], None]]:
    """A callable counting finished items on a stderr bar (a person at a terminal only);
    safe to call from worker threads."""
    if quiet or not sys.stderr.isatty():
        yield lambda _item: None
        return
    from tqdm import tqdm

    bar = tqdm(desc=safe(label), unit=" files", file=sys.stderr, leave=False,
               dynamic_ncols=True)
    lock = threading.Lock()

    def tick(_item: Any) -> None:
        with lock:
            bar.update(1)

    try:
        yield tick
    finally:
        bar.close()
