"""`ckpt scan` against picklescan, modelscan and fickling on the same files: the hostile corpus
of scripts/scan_corpus.py and a tree of real benign checkpoints (the corpus' benign files and
src/ckptkit/samples).  Writes the table of docs/security.md between its scanners markers.

Each peer is installed (pinned) into its own venv under .venv-peers/ and driven through its
Python API by scan_peer_driver.py, one process per tool over every path; ckpt runs as
`ckpt scan --json` over the same paths, one process.  Files per second is paths / wall time of
that one process, given every path REPEAT times so that start-up weighs little (the same for
every tool).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import ROOT, Check, Ratio, machine, record

#: pip requirements per peer (fickling 0.1.12 imports typing_extensions without declaring it).
PEERS = {"picklescan": "picklescan==1.0.5", "modelscan": "modelscan==0.8.8",
         "fickling": "fickling==0.1.12 typing_extensions==4.15.0"}
SECURITY_DOC = Path(os.environ.get("CKPTKIT_BENCH_SECURITY_DOC")
                    or ROOT / "docs" / "security.md")
DRIVER = Path(__file__).with_name("scan_peer_driver.py")
#: Every path is scanned this many times in the one process per tool (files / s counts them).
REPEAT = 5


def peer_python(tool: str, peers: Path) -> Path:
    """The python of ``tool``'s own venv, created and installed on first use."""
    venv = peers / tool
    python = venv / "bin" / "python"
    stamp = venv / ".ckptkit-peer"
    if stamp.is_file() and stamp.read_text() == PEERS[tool]:
        return python
    print(f"installing {PEERS[tool]} into {venv}", file=sys.stderr)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[tool].split()],
                   check=True)
    stamp.write_text(PEERS[tool])
    return python


def build_inputs(work: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """Hostile paths, benign paths, and each hostile path's class of issue 12."""
    corpus = work / "corpus"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "scan_corpus.py"), str(corpus)],
                   check=True, stdout=subprocess.DEVNULL)
    entries = json.loads((corpus / "manifest.json").read_text())
    hostile = [str(corpus / e["path"]) for e in entries if e["hostile"]]
    classes = {str(corpus / e["path"]): e["klass"] for e in entries if e["hostile"]}
    benign = [str(corpus / e["path"]) for e in entries if not e["hostile"]]
    samples = work / "samples"
    shutil.copytree(ROOT / "src" / "ckptkit" / "samples", samples)
    for path in sorted(samples.rglob("*")):
        if path.is_dir() and (path / "saved_model.pb").is_file():
            benign.append(str(path))
        elif path.is_file() and "saved_model" not in str(path) and ".data-" not in path.name \
                and path.name != "checkpoint":
            benign.append(str(path))
    return hostile, benign, classes


def run_ckpt(paths: list[str]) -> tuple[dict[str, str], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ckptkit", "scan", "--json", *paths],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1, 3, 5):
        raise SystemExit(f"ckpt scan failed ({done.returncode}):\n{done.stderr[-2000:]}")
    outcome = {"unsafe": "detected", "unreadable": "error"}
    found = {f["path"]: outcome.get(f["verdict"], "clean")
             for f in json.loads(done.stdout)["files"]}
    return found, wall


def run_peer(tool: str, python: Path, paths: list[str], work: Path
             ) -> tuple[dict[str, str], float]:
    listing, result = work / f"{tool}-paths.json", work / f"{tool}-found.json"
    listing.write_text(json.dumps(paths))
    start = time.perf_counter()
    subprocess.run([str(python), str(DRIVER), tool, str(listing), str(result)], check=True,
                   stderr=subprocess.DEVNULL, cwd=work)
    return json.loads(result.read_text()), time.perf_counter() - start


def version(tool: str, python: Path) -> str:
    if tool == "ckpt":
        return "this checkout"
    out = subprocess.run([str(python), "-m", "pip", "show", tool], capture_output=True,
                         text=True).stdout
    return re.search(r"^Version: (.+)$", out, re.M).group(1)  # type: ignore[union-attr]


def render(rows: list[dict], classes: dict[str, dict[str, int]], totals: Counter,
           hostile: int, benign: int, command: str) -> str:
    stamp = dt.date.today().isoformat()
    lines = [f"{hostile} hostile files (every one live under its loader) and {benign} benign "
             "checkpoints:", "",
             "| tool | version | hostile detected | benign flagged | errors | files / s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['version']} | {r['detected']} / {hostile} | "
                     f"{r['flagged']} / {benign} | {r['errors']} | {r['fps']:.1f} |")
    tools = [r["tool"] for r in rows]
    lines += ["", "Hostile files detected, by the class of technique (scripts/corpus):", "",
              "| class | files | " + " | ".join(tools) + " |",
              "|---|---:|" + "---:|" * len(tools)]
    for klass in sorted(totals):
        lines.append(f"| {klass} | {totals[klass]} | "
                     + " | ".join(str(classes[t].get(klass, 0)) for t in tools) + " |")
    lines += ["", f"Files / s: every path scanned {REPEAT} times in one process per tool.  "
              f"Measured {stamp} on {machine()}.  Reproduce with `{command}` (it installs "
              "each peer into `.venv-peers/<tool>`: "
              + ", ".join(f"`pip install {spec}`" for spec in PEERS.values())
              + "; every peer runs through `scripts/bench/scan_peer_driver.py TOOL PATHS.json "
              "OUT.json`, ckpt as `ckpt scan --json PATH...`)."]
    return "\n".join(lines)


def place(body: str) -> None:
    text = SECURITY_DOC.read_text()
    pattern = re.compile(r"<!-- scanners:start -->.*?<!-- scanners:end -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{SECURITY_DOC} has no scanners markers")
    SECURITY_DOC.write_text(pattern.sub(
        lambda _m: f"<!-- scanners:start -->\n{body}\n<!-- scanners:end -->", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=Path, default=ROOT / ".venv-peers")
    parser.add_argument("--command", default="scripts/bench/scan")
    args = parser.parse_args()
    pythons = {tool: peer_python(tool, args.peers) for tool in PEERS}
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-scan-") as tmp:
        work = Path(tmp)
        hostile, benign, klass = build_inputs(work)
        paths = hostile + benign
        rows, by_class = [], {}
        for tool in ("ckpt", *PEERS):
            print(f"bench: scanning {len(paths)} paths with {tool}", file=sys.stderr)
            found, wall = run_ckpt(paths * REPEAT) if tool == "ckpt" else run_peer(
                tool, pythons[tool], paths * REPEAT, work)
            outcome = [found.get(p, "error") for p in paths]
            hostile_found = outcome[:len(hostile)]
            rows.append({"tool": tool if tool != "ckpt" else "ckpt scan",
                         "version": version(tool, pythons.get(tool, Path())),
                         "detected": hostile_found.count("detected"),
                         "flagged": outcome[len(hostile):].count("detected"),
                         "errors": outcome.count("error"), "fps": REPEAT * len(paths) / wall})
            by_class[rows[-1]["tool"]] = Counter(
                klass[p] for p, o in zip(hostile, hostile_found) if o == "detected")
        totals = Counter(klass.values())
        body = render(rows, by_class, totals, len(hostile), len(benign), args.command)
    place(body)
    print(body)
    ours = rows[0]
    record("scan", [Ratio("scan", r["tool"], "throughput", ours["fps"] / r["fps"])
                    for r in rows[1:]],
           [Check("scan: hostile corpus files ckpt scan calls unsafe",
                  f"{ours['detected']}/{len(hostile)}", "all",
                  ours["detected"] == len(hostile)),
            Check("scan: benign checkpoints ckpt scan calls unsafe", str(ours["flagged"]), "0",
                  ours["flagged"] == 0)])


if __name__ == "__main__":
    main()
