"""Progress bars for people watching a terminal; nothing when piped or --quiet."""

from __future__ import annotations

import sys

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
