"""The top of docs/performance.md after ``scripts/bench/all``: the machine, the date, the
command, and one table of every ratio of ckpt against its peers from the run that just ended.

Reads the ``<area>.json`` files the benchmarks left through :func:`common.record`; refuses to
write a summary if any benchmark's results are missing, so the table never mixes runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import DOC, ROOT

AREAS = ("inspect", "fetch", "convert", "sharded", "lifecycle", "scan", "adversarial")
#: What a ratio above 1 means, per measure.
BETTER = {"wall time": "faster", "peak RSS": "less memory", "throughput": "more throughput"}
PACKAGES = ("torch", "tensorflow", "numpy", "safetensors")
TOOLS = ("aria2c", "curl")  # saved_model_cli is TensorFlow's: its version is above


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True,
                        help="the directory the benchmarks recorded into")
    parser.add_argument("--command", required=True, help="the command that ran them, verbatim")
    parser.add_argument("--started", type=float, required=True, help="start time (epoch s)")
    parser.add_argument("--load-at-start", type=float, required=True,
                        help="the 1-minute load average when the run started")
    args = parser.parse_args()
    missing = [a for a in AREAS if not (args.results / f"{a}.json").is_file()]
    if missing:
        raise SystemExit(f"no results from: {', '.join(missing)}; summary not written")
    results = {a: json.loads((args.results / f"{a}.json").read_text()) for a in AREAS}
    body = render(results, args.command, args.started, args.load_at_start)
    place(body)
    print(body)


def render(results: dict[str, dict], command: str, started: float,
           load_at_start: float) -> str:
    start = dt.datetime.fromtimestamp(started, dt.timezone.utc)
    minutes, seconds = divmod(round(dt.datetime.now(dt.timezone.utc).timestamp() - started), 60)
    lines = [
        "## Summary", "",
        textwrap.fill(
            f"Every benchmark on this page, run in one go by `{command}` on {start:%Y-%m-%d} "
            f"(started {start:%H:%M} UTC, {minutes} min {seconds} s in all).  To reproduce "
            "on your machine (it installs what it needs into `.venv`, and aria2 and curl with "
            "apt if they are missing):", 95),
        "", "```bash", command, "```", "",
        "| machine | |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine(load_at_start)), "",
        textwrap.fill(
            "How many times better `ckpt` did than each peer on the same input: peer time / "
            "ckpt time, peer peak RSS / ckpt peak RSS, ckpt throughput / peer throughput.  "
            "Higher is better for ckpt; the sections below give the raw figures and the exact "
            "commands.", 95), "",
        "| benchmark | ckpt vs | measure | ratio | target |", "|---|---|---|---|---|",
    ]
    checks = []
    for area in AREAS:
        for r in results[area]["ratios"]:
            verdict = "—" if r["target"] is None else (
                f"≥ {r['target']:g}× ({'met' if r['value'] >= r['target'] else '**missed**'})")
            word = BETTER[r["measure"]] if r["value"] >= 1 else "ckpt behind"
            lines.append(f"| {r['benchmark']} | {r['peer']} | {r['measure']} | "
                         f"{r['value']:.1f}× {word} | {verdict} |")
        checks += results[area]["checks"]
    if checks:
        lines += ["", "| target without a peer | measured | target |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['value']} | {c['target']} "
                  f"({'met' if c['met'] else '**missed**'}) |" for c in checks]
    return "\n".join(lines) + "\n"


def machine(load_at_start: float) -> list[tuple[str, str]]:
    """What the figures depend on, as (label, value) rows.  The load average shows whether
    anything else competed for the CPU while the benchmarks ran."""
    cpu = _first(Path("/proc/cpuinfo"), r"model name\s*:\s*(.+)") or platform.processor() or "?"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_kib = _first(Path("/proc/meminfo"), r"MemTotal:\s*(\d+) kB")
    ram = (f"{int(mem_kib) / 2**20:.1f} GiB" if mem_kib else
           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB")
    distro = _first(Path("/etc/os-release"), r'PRETTY_NAME="?([^"\n]+)') or platform.system()
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    tools = [_tool_version(tool) for tool in TOOLS]
    tmp = tempfile.gettempdir()
    return [
        ("CPU", f"{cpu}, {usable} cores usable ({os.cpu_count()} online)"),
        ("RAM", ram),
        ("OS", f"{distro}, {platform.system()} {platform.release()} {platform.machine()}"),
        ("Python", f"{platform.python_version()} "
                   f"({os.path.relpath(os.path.normpath(sys.executable), ROOT)})"),
        ("frameworks", ", ".join(versions)),
        ("peer tools", ", ".join(tools)),
        ("scratch files", f"{tmp} ({_filesystem(tmp)})"),
        ("load average (1 min)", f"{load_at_start:.2f} at the start, "
                                 f"{os.getloadavg()[0]:.2f} at the end"),
        ("ckptkit", _ckptkit()),
    ]


def place(body: str) -> None:
    """Put the summary section first: right after the page's introduction."""
    block = f"<!-- bench:summary -->\n{body.rstrip()}\n<!-- /bench:summary -->"
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(r"<!-- bench:summary -->.*?<!-- /bench:summary -->\n*", re.S)
    text = pattern.sub("", text)
    first = text.find("<!-- bench:")
    if first < 0:
        text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = text[:first] + block + "\n\n" + text[first:]
    DOC.write_text(text)


def _first(path: Path, pattern: str) -> str | None:
    try:
        match = re.search(pattern, path.read_text(errors="replace"), re.M)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def _tool_version(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        return f"{tool} missing"
    out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"\d+(\.\d+)+", out)
    return f"{tool} {version.group(0) if version else '?'}"


def _filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (longest matching mount point)."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    real = os.path.realpath(path)
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind


def _ckptkit() -> str:
    version = importlib.metadata.version("ckptkit")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return f"{version}, HEAD {head.stdout.strip()}" if head.returncode == 0 else version


if __name__ == "__main__":
    main()
