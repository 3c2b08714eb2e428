"""`ckpt fetch hf:` against `huggingface_hub.snapshot_download` (its defaults, and
max_workers=8) on the Hugging Face Hub stand-in, every connection capped (default 16 MiB/s),
a repo of 4 LFS files (default 512 MiB each).  Then, for each tool, a kill -9 once 40 % of the
repo has crossed the wire and a rerun: the bytes the servers sent in total, counted by the
stand-in (not estimated from the clock).

The stand-in runs in this process (its request log gives the byte counts); each tool runs in
its own interpreter with HF_ENDPOINT pointed at it and a fresh HF_HOME.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Ratio, record, update_section

sys.path.insert(0, str(ROOT / "src"))

from ckptkit.testing.hf_hub import HfHubStandIn  # noqa: E402

REPO = "bench/big"
MiB = 1 << 20
SNAPSHOT = """
import sys, huggingface_hub as hf
workers = sys.argv[1]
kwargs = {} if workers == "default" else {"max_workers": int(workers)}
print(hf.snapshot_download(sys.argv[2], **kwargs))
"""
SHA256_AFTER = """
import hashlib, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
"""


def make_repo(folder: Path, files: int, mib: int) -> None:
    folder.mkdir(parents=True)
    for i in range(files):
        with open(folder / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(MiB))


def tools(py: str) -> dict[str, list[str]]:
    return {
        "ckpt fetch hf:": [py, "-m", "ckptkit", "fetch", f"hf:{REPO}", "--quiet"],
        "snapshot_download (default)": [py, "-c", SNAPSHOT, "default", REPO],
        "snapshot_download (max_workers=8)": [py, "-c", SNAPSHOT, "8", REPO],
    }


class Bench:
    def __init__(self, hub: HfHubStandIn, scratch: Path, total: int) -> None:
        self.hub, self.scratch, self.total = hub, scratch, total

    def env(self, name: str) -> dict[str, str]:
        home = self.scratch / "homes" / name.split()[0].replace(":", "")
        return {**self.hub.client_env(home), "PYTHONPATH": str(ROOT / "src"),
                "CKPTKIT_CACHE": str(home / "ckpt"), "CKPTKIT_CONFIG": str(home / "config")}

    def fresh(self) -> None:
        shutil.rmtree(self.scratch / "homes", ignore_errors=True)
        self.hub.hub.requests.clear()
        self.hub.cdn.requests.clear()

    def sent(self) -> int:
        return self.hub.hub.bytes_sent() + self.hub.cdn.bytes_sent()

    def timed(self, name: str, cmd: list[str]) -> tuple[float, str]:
        self.fresh()
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env(name), capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        return wall, proc.stdout.strip().splitlines()[-1]

    def killed_then_rerun(self, name: str, cmd: list[str]) -> float:
        """Total bytes sent for a run killed at 40 % plus a rerun, as a multiple of the repo."""
        self.fresh()
        proc = subprocess.Popen(cmd, env=self.env(name), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        while self.sent() < 0.4 * self.total:
            if proc.poll() is not None:
                raise SystemExit(f"{name} ended before 40 %: {proc.stderr.read()[-2000:]!r}")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rerun = subprocess.run(cmd, env=self.env(name), capture_output=True, text=True)
        if rerun.returncode != 0:
            raise SystemExit(f"{name} rerun failed:\n{rerun.stderr[-3000:]}")
        return self.sent() / self.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--file-mib", type=int, default=512)
    parser.add_argument("--rate-mib", type=float, default=16.0)
    args = parser.parse_args()
    total = args.files * args.file_mib * MiB
    py = sys.executable
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ckpt-hf-bench-") as tmp:
        scratch = Path(tmp)
        print(f"writing {args.files} x {args.file_mib} MiB ...", file=sys.stderr)
        make_repo(scratch / "repo", args.files, args.file_mib)
        with HfHubStandIn(rate=args.rate_mib * MiB) as hub:
            hub.add_repo(REPO, scratch / "repo")
            bench = Bench(hub, scratch, total)
            walls, resumed = {}, {}
            for name, cmd in tools(py).items():
                print(f"bench: {name}", file=sys.stderr)
                walls[name], snapshot = bench.timed(name, cmd)
                if name.startswith("snapshot_download (default)"):
                    start = time.perf_counter()
                    subprocess.run([py, "-c", SHA256_AFTER, snapshot], check=True)
                    walls["snapshot_download (default) + sha256"] = (
                        walls[name] + time.perf_counter() - start)
                print(f"bench: {name}: kill -9 at 40 % and rerun", file=sys.stderr)
                resumed[name] = bench.killed_then_rerun(name, cmd)
    report(walls, resumed, total, args, (load_before, os.getloadavg()[0]))


def report(walls: dict[str, float], resumed: dict[str, float], total: int,
           args: argparse.Namespace, load: tuple[float, float]) -> None:
    from ckptkit.config import DEFAULT_CONNECTIONS as connections

    mbps = {k: total / v / MiB for k, v in walls.items()}
    ckpt = mbps["ckpt fetch hf:"]
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    rows = "\n".join(f"| {name} | {walls[name]:.1f} s | {mbps[name]:.0f} MiB/s | "
                     f"{ckpt / mbps[name]:.2f}× | "
                     + (f"{resumed[name]:.2f}× |" if name in resumed else "— |")
                     for name in walls)
    peer = "snapshot_download (default)"
    ratio, again = ckpt / mbps[peer], resumed["ckpt fetch hf:"]
    body = f"""## `ckpt fetch hf:`

A Hub repo of {args.files} LFS files × {args.file_mib} MiB on the Hugging Face Hub stand-in
(`ckptkit.testing.hf_hub`, the Hub endpoint redirecting every LFS download to a second "CDN"
port), every connection capped at {args.rate_mib:g} MiB/s.  Fresh caches for every run.
`ckpt fetch hf:{REPO}` opens up to {connections} ranged connections per file and verifies each
file's sha256 against its LFS oid while streaming; `huggingface_hub.snapshot_download`
downloads each file over one connection, {args.files} files at once, and hashes nothing (the
`+ sha256` row adds a hash of the snapshot afterwards).

| tool | wall | throughput | ckpt / tool | bytes sent, kill -9 at 40 % + rerun |
|---|---|---|---|---|
{rows}

| ratio | value | target |
|---|---|---|
| ckpt / snapshot_download throughput | {ratio:.2f}× | ≥ 1.5× ({verdict(ratio >= 1.5)}) |
| ckpt bytes, kill -9 at 40 % + rerun | {again:.2f}× the repo | ≤ 1.1× ({verdict(again <= 1.1)}) |

Bytes are counted by the stand-in (every body byte either server wrote, API answers
included); the kill lands once they pass 40 % of the repo.  The stand-in runs in the
benchmark's own process and shares the CPU with the tools; load average {load[0]:.1f} at the
start, {load[1]:.1f} at the end ({os.cpu_count()} cores).
"""
    update_section("hf", body, "scripts/bench/hf")
    name = f"hf, {args.files} × {args.file_mib} MiB at {args.rate_mib:g} MiB/s per connection"
    record("hf", [Ratio(name, "huggingface_hub.snapshot_download", "throughput", ratio, 1.5)])
    print(body)


if __name__ == "__main__":
    main()
