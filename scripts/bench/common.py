"""Shared benchmark plumbing: timing whole processes, rewriting docs/performance.md, and
recording each benchmark's headline ratios for the summary ``scripts/bench/all`` writes.

``scripts/bench/all`` points two variables at a scratch directory (the doc is replaced only
once every benchmark has succeeded): ``CKPTKIT_BENCH_DOC``, the copy of docs/performance.md
the sections are written to, and ``CKPTKIT_BENCH_RESULTS``, where :func:`record` leaves one
``<area>.json`` per benchmark.  Run alone, a benchmark rewrites docs/performance.md itself.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = Path(os.environ.get("CKPTKIT_BENCH_DOC") or ROOT / "docs" / "performance.md")
RESULTS = os.environ.get("CKPTKIT_BENCH_RESULTS")
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


@dataclass(frozen=True)
class Ratio:
    """ckpt against one peer on one measure: ``value`` is how many times better ckpt did
    (peer time / ckpt time, peer RSS / ckpt RSS, ckpt throughput / peer throughput)."""

    benchmark: str
    peer: str
    measure: str
    value: float
    #: the smallest ``value`` the issue asks for; None where it sets none.
    target: float | None = None


@dataclass(frozen=True)
class Check:
    """A target without a peer: the measured ``value`` against ``target`` (both as text)."""

    name: str
    value: str
    target: str
    met: bool


def record(area: str, ratios: Sequence[Ratio], checks: Sequence[Check] = ()) -> None:
    """Leave this run's headline figures for ``scripts/bench/all``'s summary table.

    Does nothing when the benchmark runs on its own (``CKPTKIT_BENCH_RESULTS`` unset).
    """
    if not RESULTS:
        return
    data = {"ratios": [asdict(r) for r in ratios], "checks": [asdict(c) for c in checks]}
    (Path(RESULTS) / f"{area}.json").write_text(json.dumps(data, indent=1) + "\n")
