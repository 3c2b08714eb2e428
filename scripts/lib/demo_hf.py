"""The Hugging Face Hub part of the demo (``scripts/lib/demo.py`` runs :func:`steps`): a repo
served by the Hub stand-in, fetched by ``ckpt fetch hf:``, killed with -9 at 40 % and resumed,
then read offline by ``huggingface_hub`` itself.  Torch-free: the weights are written with
numpy."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HF_REPO = "demo/tiny-encoder"
HF_OFFLINE = ('import huggingface_hub as hf; print(hf.snapshot_download("demo/tiny-encoder")); '
              'print(hf.hf_hub_download("demo/tiny-encoder", "model-big.safetensors"))')


def steps(demo: Any, samples: Path) -> None:
    """A Hub repo fetched from a stand-in into the Hugging Face cache: killed with -9 at 40 %,
    resumed, then read offline by huggingface_hub itself."""
    from ckptkit.testing.hf_hub import HfHubStandIn

    work = demo.work
    files = _hub_repo(work / "hub", samples)
    demo.say("The Hugging Face Hub: a stand-in on 127.0.0.1 (HF_ENDPOINT points at it, 2 MiB/s "
             "per connection) serves demo/tiny-encoder; ckpt writes the Hub client's own cache")
    with HfHubStandIn(rate=2 << 20) as hub:
        hub.add_repo(HF_REPO, files)
        demo.env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(work / "hf"),
                        HF_HUB_DISABLE_TELEMETRY="1")
        demo.run("hf-plan", "fetch", f"hf:{HF_REPO}", "--dry-run")
        big = len(files["model-big.safetensors"])
        cache = work / "hf" / "hub" / "models--demo--tiny-encoder"
        demo.shell("hf-kill", f"ckpt fetch hf:{HF_REPO} &  # kill -9 $! at 40 %, then: "
                              f"ls {cache.relative_to(work)}",
                   lambda: _killed_at(demo, hub, 0.4 * big, cache))
        hub.rate = None
        demo.run("hf-resume", "fetch", f"hf:{HF_REPO}")
        demo.shell("hf-offline", f"HF_HUB_OFFLINE=1 python -c '{HF_OFFLINE}'",
                   lambda: _offline_client(demo))
        demo.run("hf-cache", "cache", "verify", f"hf:{HF_REPO}")


def _hub_repo(folder: Path, samples: Path) -> dict[str, bytes]:
    """A config, the small sample safetensors and a bigger one (8 MiB of float32, numpy
    only): what the stand-in serves."""
    import numpy as np

    values = np.random.default_rng(0).standard_normal((2048, 1024)).astype("<f4").tobytes()
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2048, 1024],
                                    "data_offsets": [0, len(values)]}}).encode()
    header += b" " * (-len(header) % 8)
    big = len(header).to_bytes(8, "little") + header + values
    folder.mkdir()
    (folder / "big.safetensors").write_bytes(big)  # what the offline check compares with
    return {"config.json": b'{"model_type": "tiny-encoder", "hidden_size": 64}\n',
            "model.safetensors": (samples / "model.safetensors").read_bytes(),
            "model-big.safetensors": big}


def _killed_at(demo: Any, hub: Any, threshold: float, cache: Path) -> str:
    """``ckpt fetch`` killed with SIGKILL once the CDN has sent ``threshold`` bytes (counted
    by the stand-in); what the Hub cache holds then."""
    command = [*(demo.ckpt or [sys.executable, "-m", "ckptkit"]), "fetch", f"hf:{HF_REPO}",
               "--quiet"]
    proc = subprocess.Popen(command, cwd=demo.work, env=demo.environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while hub.cdn.bytes_sent() < threshold:
        if proc.poll() is not None:
            raise SystemExit("demo: the fetch ended before it could be killed")
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    return "".join(f"{p.name}\n" for p in sorted(cache.iterdir()))


def _offline_client(demo: Any) -> str:
    proc = subprocess.run([sys.executable, "-c", HF_OFFLINE], cwd=demo.work, text=True,
                          capture_output=True, env=demo.environment({"HF_HUB_OFFLINE": "1"}))
    if proc.returncode != 0:
        raise SystemExit(f"demo: huggingface_hub could not read the cache:\n{proc.stderr}")
    weights = Path(proc.stdout.splitlines()[-1])
    if weights.read_bytes() != (demo.work / "hub" / "big.safetensors").read_bytes():
        raise SystemExit(f"demo: huggingface_hub read other bytes than the Hub's from {weights}")
    return proc.stdout
