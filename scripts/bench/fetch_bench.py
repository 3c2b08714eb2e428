"""`ckpt fetch` of a 3-file bundle against aria2c -x8 -s8 -j3 and curl, from one local server
whose every connection is capped (default 25 MB/s).  All three verify sha256."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BIN, ROOT, Ratio, record, update_section

SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.servers.http import HTTPTestServer
server = HTTPTestServer().start()
for path in sys.argv[3:]:
    server.add("/" + Path(path).name, Path(path), rate=float(sys.argv[2]))
print(server.port, flush=True)
while True:
    time.sleep(3600)
"""


def make_files(folder: Path, count: int, mib: int) -> list[Path]:
    files = []
    for i in range(count):
        path = folder / f"prior_level_{i}.bin"
        with open(path, "wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(1 << 20))
        files.append(path)
    return files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--file-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--rate-mb", type=float, default=25.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-fetch-bench-") as tmp:
        root = Path(tmp)
        (root / "served").mkdir()
        print(f"writing {args.files} x {args.file_mib} MiB ...", file=sys.stderr)
        files = make_files(root / "served", args.files, args.file_mib)
        hashes = {f.name: sha256(f) for f in files}
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT),
                                   str(args.rate_mb * 1e6), *map(str, files)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            urls = [f"http://127.0.0.1:{port}/{f.name}" for f in files]
            results = run_all(root, files, urls, hashes, args.repeat)
        finally:
            server.kill()
    total = args.files * args.file_mib * (1 << 20)
    report(results, total, args)


def run_all(root: Path, files: list[Path], urls: list[str], hashes: dict[str, str],
            repeat: int) -> dict[str, float]:
    catalogue = root / "bench.toml"
    lines = ["schema = 1"]
    for f, url in zip(files, urls, strict=True):
        lines += [f'[files."bench/{f.name}"]', f"size = {f.stat().st_size}",
                  f'sha256 = "{hashes[f.name]}"', f'sources = [{{ type = "url", url = "{url}" }}]']
    lines += ["[models.bench-bundle]", "files = [" + ", ".join(
        f'"bench/{f.name}"' for f in files) + "]"]
    catalogue.write_text("\n".join(lines) + "\n")
    aria_input = root / "aria2.txt"
    aria_input.write_text("".join(f"{url}\n  out={f.name}\n  checksum=sha-256={hashes[f.name]}\n"
                                  for f, url in zip(files, urls, strict=True)))
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, seconds), seconds)

    for _ in range(repeat):
        cache = root / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        keep("ckpt", timed([str(BIN / "ckpt"), "fetch", "bench-bundle", "--catalog",
                            str(catalogue), "--quiet"],
                           env={"CKPTKIT_CACHE": str(cache),
                                "CKPTKIT_CONFIG": str(root / "config")}))
        if shutil.which("aria2c"):
            out = root / "aria2"
            shutil.rmtree(out, ignore_errors=True)
            keep("aria2c", timed(["aria2c", "-x8", "-s8", "-j3", "-k1M", "--quiet=true",
                                  "--file-allocation=none", "-d", str(out), "-i",
                                  str(aria_input)]))
        out = root / "curl"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        start = time.perf_counter()
        for f, url in zip(files, urls, strict=True):
            subprocess.run(["curl", "-sSf", "-o", str(out / f.name), url], check=True)
        subprocess.run(["sha256sum", *[str(out / f.name) for f in files]], check=True,
                       stdout=subprocess.DEVNULL)
        keep("curl", time.perf_counter() - start)
    return best


def report(best: dict[str, float], total: int, args: argparse.Namespace) -> None:
    from ckptkit.config import DEFAULT_CONNECTIONS as connections
    from ckptkit.hub.fetch import MAX_PARALLEL_FILES as parallel

    mbps = {k: total / v / 1e6 for k, v in best.items()}
    aria = mbps.get("aria2c")
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    rows = "\n".join(f"| {name} | {best[name]:.1f} s | {mbps[name]:.0f} MB/s |"
                     for name in ("ckpt", "aria2c", "curl") if name in best)
    aria_ratio = (f"| ckpt / aria2c throughput | {mbps['ckpt'] / aria:.2f}× | ≥ 1.0× "
                  f"({verdict(mbps['ckpt'] / aria >= 1.0)}) |" if aria else
                  "| ckpt / aria2c throughput | aria2c unavailable | ≥ 1.0× |")
    body = f"""## `ckpt fetch`

A Jukebox-shaped bundle of {args.files} × {args.file_mib} MiB served from 127.0.0.1 by one server
that caps every connection at {args.rate_mb:g} MB/s.  Best of {args.repeat} runs, sha256
verification included for every tool (`ckpt` verifies against the catalogue hashes while
streaming; aria2c gets `checksum=sha-256=` per file; curl is followed by `sha256sum`).

| tool | wall | throughput |
|---|---|---|
{rows}

| ratio | value | target |
|---|---|---|
{aria_ratio}
| ckpt / curl throughput | {mbps['ckpt'] / mbps['curl']:.1f}× | ≥ 6× ({verdict(mbps['ckpt'] / mbps['curl'] >= 6)}) |

Commands: `ckpt fetch bench-bundle --catalog bench.toml` (default {connections} connections per
file, up to {parallel} files at once); `aria2c -x8 -s8 -j3 -k1M -i list`; `curl -o` per file, one
after another.  aria2c's `-x` caps connections per *server*, so its three files share 8
connections while ckpt opens {connections} per file: the ratio measures the tools as configured,
not equal connection counts.
"""
    update_section("fetch", body, "scripts/bench/fetch")
    name = f"fetch, {args.files} × {args.file_mib} MiB at {args.rate_mb:g} MB/s per connection"
    ratios = [Ratio(name, "aria2c -x8 -s8", "throughput", mbps["ckpt"] / aria, 1.0)] if aria else []
    ratios.append(Ratio(name, "curl", "throughput", mbps["ckpt"] / mbps["curl"], 6.0))
    record("fetch", ratios)
    print(body)


if __name__ == "__main__":
    main()
