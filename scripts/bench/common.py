"""Shared benchmark plumbing: timing whole processes and rewriting docs/performance.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "performance.md"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Run:
    wall_s: float
    peak_rss_mib: float


def measure(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> Run:
    """Median wall time and largest peak RSS of ``cmd`` over ``repeat`` runs (after a warm-up).

    Peak RSS comes from ``wait4`` on the child, so it covers the whole process, interpreter
    start-up included.
    """
    walls, peaks = [], []
    for i in range(repeat + 1):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{err[-2000:]}")
        if i:  # the first run only warms the page cache
            walls.append(wall)
            peaks.append(usage.ru_maxrss / 1024)
    return Run(statistics.median(walls), max(peaks))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def update_section(name: str, body: str, command: str) -> None:
    """Replace the ``name`` section of docs/performance.md (between its markers)."""
    stamp = dt.date.today().isoformat()
    block = (f"<!-- bench:{name} -->\n{body.rstrip()}\n\nMeasured {stamp} on {machine()}.  "
             f"Reproduce with `{command}`.\n<!-- /bench:{name} -->")
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    DOC.write_text(text)
