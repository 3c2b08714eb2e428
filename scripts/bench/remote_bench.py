"""Remote reads: `ckpt inspect` of a 2 GiB safetensors file and a 2 GiB torch zip over HTTP with
50 ms per request (the project's range server), against downloading the file and inspecting
it, and against huggingface_hub.get_safetensors_metadata (the Hub stand-in, same latency); then
`ckpt scan` of 1,000 small objects under an S3 prefix (moto) with --jobs 1 and the default;
and `ckpt inspect` of a 72-shard Hugging Face repository over HTTP (``--only sharded``).
Requests and bytes are counted by the servers.  Results go to docs/performance.md."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, Check, Ratio, record, update_section

SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

LATENCY = 0.05


def write_safetensors(path: Path, size_gib: float, tensors: int = 256) -> None:
    """A real safetensors layout (header written by the library's rules, data zero-filled
    sparsely), so a 2 GiB fixture costs no RAM and seconds to write."""
    per = int(size_gib * 2**30 / 4 / tensors) // 1024 * 1024
    header, offset = {"__metadata__": {"format": "pt", "step": "1000"}}, 0
    for i in range(tensors):
        header[f"model.layers.{i // 8}.block{i % 8}.weight"] = {
            "dtype": "F32", "shape": [per // 1024, 1024], "data_offsets": [offset, offset + per * 4]}
        offset += per * 4
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)


def write_torch_zip(path: Path, size_gib: float, tensors: int = 512) -> None:
    import torch

    cols = 1024
    rows = max(1, int(size_gib * 2**30 / 4 / tensors) // cols)
    state = {f"model.layers.{i // 8}.block{i % 8}.weight": torch.zeros(rows, cols)
             for i in range(tensors)}
    torch.save({"model": state, "step": 1000, "best_val_loss": 0.5}, path)


def ckpt(*args: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall time and stdout of one `ckpt` process."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ckptkit", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})})
    wall = time.perf_counter() - began
    if done.returncode not in (0, 5):
        raise SystemExit(f"ckpt {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return wall, done.stdout


def median_ckpt(repeat: int, *args: str, env: dict[str, str] | None = None) -> float:
    ckpt(*args, env=env)  # warm-up: imports in the page cache
    return statistics.median(ckpt(*args, env=env)[0] for _ in range(repeat))


def http_rows(folder: Path, repeat: int) -> tuple[list[str], list[Check], list[Ratio]]:
    import requests

    from ckptkit.testing.static import StaticServer

    rows, checks, ratios = [], [], []
    with StaticServer(folder, record=True, latency=LATENCY) as server:
        for name in ("model.safetensors", "checkpoint.pt"):
            local = folder / name
            size = local.stat().st_size
            url = f"{server.base}/{name}"
            local_wall = median_ckpt(repeat, "inspect", str(local), "--json")
            server.reset_counts()
            ckpt("inspect", url, "--json")
            requests_made, sent = len(server.requests), server.bytes_sent()
            remote_wall = median_ckpt(repeat, "inspect", url, "--json")
            server.reset_counts()
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / name
                with requests.get(url, stream=True) as answer, open(copy, "wb") as fh:
                    for chunk in answer.iter_content(8 << 20):
                        fh.write(chunk)
                ckpt("inspect", str(copy), "--json")
            download_wall = time.perf_counter() - began
            extra = remote_wall - local_wall
            rows.append(f"| `ckpt inspect URL` ({name}, {size / 2**30:.1f} GiB) | "
                        f"{requests_made} | {sent / 2**10:,.0f} KiB | {remote_wall * 1000:.0f} ms "
                        f"| {extra * 1000:+.0f} ms vs local |")
            rows.append(f"| download, then `ckpt inspect` ({name}) | {len(server.requests)} | "
                        f"{server.bytes_sent() / 2**20:,.0f} MiB | {download_wall * 1000:.0f} ms | |")
            checks.append(Check(f"remote inspect {name}: requests", str(requests_made),
                                "<= 2" if name.endswith("safetensors") else "tail + data.pkl",
                                requests_made <= (2 if name.endswith("safetensors") else 3)))
            if name.endswith("safetensors"):
                checks.append(Check("remote inspect safetensors: bytes", f"{sent:,}",
                                    "<= 1 MiB", sent <= 1 << 20))
            checks.append(Check(f"remote inspect {name}: wall over local",
                                f"{extra * 1000:.0f} ms", f"<= 3 x {LATENCY * 1000:.0f} ms",
                                extra <= 3 * LATENCY))
            ratios.append(Ratio("remote", f"download+inspect ({name})", "wall",
                                download_wall / remote_wall))
            rows.append(f"| local `ckpt inspect` ({name}) | 0 | 0 | {local_wall * 1000:.0f} ms | |")
    return rows, checks, ratios


def hub_rows(folder: Path, repeat: int) -> list[str]:
    """`ckpt inspect hf://...` and huggingface_hub.get_safetensors_metadata, same repo, same
    latency (the Hub stand-in; each runs in a fresh process pointed at it)."""
    from ckptkit.testing.hf_hub import HfHubStandIn

    rows = []
    with tempfile.TemporaryDirectory() as home, HfHubStandIn() as hub:
        hub.add_repo("org/big", {"model.safetensors": folder / "model.safetensors"})
        hub.hub.latency = hub.cdn.latency = LATENCY
        env = {**hub.client_env(Path(home)), "PYTHONPATH": str(SRC)}
        script = ("import huggingface_hub as h; m = h.get_safetensors_metadata('org/big'); "
                  "print(sum(len(f.tensors) for f in m.files_metadata.values()))")
        for label, cmd in (
                ("`ckpt inspect hf://org/big/model.safetensors`",
                 [sys.executable, "-m", "ckptkit", "inspect", "hf://org/big/model.safetensors",
                  "--json"]),
                ("`huggingface_hub.get_safetensors_metadata`", [sys.executable, "-c", script])):
            walls = []
            for i in range(repeat + 1):
                hub.hub.requests.clear()
                hub.cdn.requests.clear()
                began = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env=env)
                if i:
                    walls.append(time.perf_counter() - began)
            made = len(hub.hub.requests) + len(hub.cdn.requests)
            sent = hub.hub.bytes_sent() + hub.cdn.bytes_sent()
            rows.append(f"| {label} | {made} | {sent / 2**10:,.0f} KiB | "
                        f"{statistics.median(walls) * 1000:.0f} ms | |")
    return rows


def scan_rows(objects: int) -> tuple[list[str], list[Ratio]]:
    import boto3
    from moto.server import ThreadedMotoServer
    from safetensors.numpy import save
    import numpy as np

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                              aws_access_key_id="bench", aws_secret_access_key="bench",
                              region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        blob = save({"w": np.ones((16, 16), np.float32)})
        for i in range(objects):
            client.put_object(Bucket="bench", Key=f"prefix/model_{i:04d}.safetensors", Body=blob)
        rows, rates = [], {}
        for jobs in ("1", "8"):
            wall, out = ckpt("scan", "s3://bench/prefix/", "--jobs", jobs, "--json", env=env)
            scanned = len(json.loads(out)["files"])
            rates[jobs] = scanned / wall
            rows.append(f"| `ckpt scan s3://bench/prefix/ --jobs {jobs}`"
                        f"{' (default)' if jobs == '8' else ''} | {scanned:,} objects | "
                        f"{wall:.1f} s | {rates[jobs]:,.0f} objects/s |")
        return rows, [Ratio("remote", "scan --jobs 1", "objects/s", rates["8"] / rates["1"])]
    finally:
        server.stop()


def write_sharded(folder: Path, shards: int) -> Path:
    """A Hugging Face sharded checkpoint of ``shards`` shards (1 MiB tensors, one per shard),
    written by ckpt's own resharding (the layout huggingface_hub writes)."""
    from safetensors.numpy import save_file

    single = folder / "single.safetensors"
    rng = np.random.default_rng(0)
    save_file({f"layers.{i}.weight": rng.standard_normal((512, 512)).astype(np.float32)
               for i in range(shards)}, str(single))
    repo = folder / "repo"
    repo.mkdir()
    ckpt("convert", str(single), "--to", "safetensors", "--max-shard-size", "1MiB",
         "-o", str(repo))
    single.unlink()
    return repo / "model.safetensors.index.json"


def sharded_rows(folder: Path, shards: int, repeat: int) -> tuple[list[str], list[Check]]:
    """Inspect of a ``shards``-shard repository over HTTP: requests, bytes, wall over local."""
    from ckptkit.testing.static import StaticServer

    index = write_sharded(folder, shards)
    made = len(list(index.parent.glob("*.safetensors")))
    local_wall = median_ckpt(repeat, "inspect", str(index), "--json")
    with StaticServer(index.parent, record=True, latency=LATENCY) as server:
        url = f"{server.base}/{index.name}"
        server.reset_counts()
        ckpt("inspect", url, "--json")
        requests_made, sent = len(server.requests), server.bytes_sent()
        remote_wall = median_ckpt(repeat, "inspect", url, "--json")
    extra = remote_wall - local_wall
    rows = [f"| `ckpt inspect URL` ({made}-shard repo, index URL) | {requests_made} | "
            f"{sent / 2**10:,.0f} KiB | {remote_wall * 1000:.0f} ms | "
            f"{extra * 1000:+.0f} ms vs local |",
            f"| local `ckpt inspect` ({made}-shard repo) | 0 | 0 | {local_wall * 1000:.0f} ms | |"]
    checks = [Check(f"{made}-shard inspect: requests per shard",
                    f"{(requests_made - 1) / made:.2f}", "<= 2",
                    requests_made - 1 <= 2 * made),
              Check(f"{made}-shard inspect: wall over local", f"{extra * 1000:.0f} ms",
                    f"<= 10 x {LATENCY * 1000:.0f} ms", extra <= 10 * LATENCY)]
    return rows, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shards", type=int, default=72)
    parser.add_argument("--only", choices=["sharded"], help="run only the sharded-repo row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-remote-") as tmp:
        sharded, sharded_checks = sharded_rows(Path(tmp), args.shards, args.repeat)
    body = ("## Remote reads of a sharded repository\n\n"
            f"Every request waits {LATENCY * 1000:.0f} ms at the server; requests and body "
            "bytes are counted by the server. Walls are whole `ckpt` processes, medians.\n\n"
            "| what | requests | bytes | wall | |\n|---|---|---|---|---|\n" + "\n".join(sharded)
            + "\n\nTargets: " + "; ".join(f"{c.name} {c.value} ({c.target}: "
                                          f"{'met' if c.met else 'NOT met'})"
                                          for c in sharded_checks)
            + ".")
    print(body)
    update_section("remote-sharded", body, "scripts/bench/remote --only sharded")
    if args.only:
        record("remote-sharded", [], sharded_checks)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-remote-") as tmp:
        folder = Path(tmp)
        write_safetensors(folder / "model.safetensors", args.size_gib)
        write_torch_zip(folder / "checkpoint.pt", args.size_gib)
        rows, checks, ratios = http_rows(folder, args.repeat)
        rows += hub_rows(folder, args.repeat)
    scan, scan_ratios = scan_rows(args.objects)
    body = ("## Remote reads (`ckpt inspect URL`, `ckpt scan s3://...`)\n\n"
            f"Every request waits {LATENCY * 1000:.0f} ms at the server (a far region); "
            "requests and body bytes are counted by the servers. Walls are whole `ckpt` "
            "processes (interpreter start included), medians.\n\n"
            "| what | requests | bytes | wall | |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\nTargets: " + "; ".join(f"{c.name} {c.value} ({c.target}: "
                                          f"{'met' if c.met else 'NOT met'})" for c in checks)
            + ".\n\nThe sharded-repository row has its own section below.\n\n"
            "| scan under an S3 prefix (moto on 127.0.0.1) | objects | wall | rate |\n"
            "|---|---|---|---|\n" + "\n".join(scan))
    print(body)
    update_section("remote", body, "scripts/bench/remote")
    record("remote", ratios + scan_ratios, checks + sharded_checks)


if __name__ == "__main__":
    main()
