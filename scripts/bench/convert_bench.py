"""Streaming conversion of a ~2 GiB torch checkpoint to safetensors and to npz, against the
naive path (``torch.load`` + ``safetensors.torch.save_file`` / ``.numpy()`` + ``np.savez``).
Results go to docs/performance.md."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import BIN, ROOT, Ratio, Run, measure, record, update_section

TARGET_RSS_RATIO, TARGET_WALL_RATIO = 3.0, 1.0

#: The naive paths, as a user would write them: load everything, then save everything.
NAIVE_SAFETENSORS = """
import sys, torch
from safetensors.torch import save_file
ckpt = torch.load(sys.argv[1], weights_only=True)
save_file({f"model.{k}": v for k, v in ckpt["model"].items()}, sys.argv[2],
          metadata={"step": str(ckpt["step"])})
"""
NAIVE_NPZ = """
import sys, numpy as np, torch
ckpt = torch.load(sys.argv[1], weights_only=True)
np.savez(sys.argv[2], **{f"model.{k}": v.numpy() for k, v in ckpt["model"].items()})
"""
#: The naive paths again, then fsync: what durability (which ckpt convert gives) costs them.
FSYNC = "\nimport os\nfd = os.open(sys.argv[2], os.O_RDONLY)\nos.fsync(fd)\nos.close(fd)\n"
#: Without the CLI: the library call `ckpt convert` makes for a plain format change.
LIBRARY = ("import sys\nfrom ckptkit.convert.passthrough import convert_format\n"
           "convert_format(sys.argv[1], sys.argv[2], sys.argv[3])\n")


def write_checkpoint(path: Path, size_gib: float, tensors: int) -> None:
    import torch

    per = int(size_gib * 2**30 / 4 / tensors)
    cols = 1024
    rows = max(1, per // cols)
    state = {f"layers.{i // 8}.block{i % 8}.weight": torch.empty(rows, cols).normal_()
             for i in range(tensors)}
    torch.save({"model": state, "step": 1000, "best_val_loss": 0.5}, path)


def ours(src: Path, fmt: str, out: Path) -> list[str]:
    """`ckpt convert` when the CLI has the command, else the library call it makes."""
    ckpt = BIN / "ckpt"
    if (ROOT / "src/ckptkit/cli/convert.py").exists() and subprocess.run(
            [str(ckpt), "convert", "--help"], capture_output=True).returncode == 0:
        return [str(ckpt), "convert", str(src), "--to", fmt, "-o", str(out)]
    return [sys.executable, "-c", LIBRARY, str(src), fmt, str(out)]


def timed(cmd: list[str], repeat: int, out: Path) -> Run:
    os.sync()  # start every command with no dirty pages left by the one before
    run = measure(cmd, repeat)
    out.unlink(missing_ok=True)
    return run


def row(name: str, run: Run) -> str:
    return f"| {name} | {run.wall_s:.2f} s | {run.peak_rss_mib:.0f} MiB |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--tensors", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write-fixture", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_fixture:
        write_checkpoint(Path(args.write_fixture), args.size_gib, args.tensors)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        src = Path(tmp) / "big_checkpoint.pt"
        print(f"writing {args.size_gib} GiB, {args.tensors}-tensor checkpoint ...",
              file=sys.stderr)
        # In a child process: the parent must stay small, or forked children would inherit
        # its resident set and every peak-RSS figure would include it.
        subprocess.run([sys.executable, __file__, "--write-fixture", str(src), "--size-gib",
                        str(args.size_gib), "--tensors", str(args.tensors)], check=True)
        size = src.stat().st_size
        runs: dict[str, Run] = {}
        for fmt, suffix, naive in (("safetensors", "safetensors", NAIVE_SAFETENSORS),
                                   ("npz", "npz", NAIVE_NPZ)):
            out = Path(tmp) / f"out.{suffix}"
            command = ours(src, fmt, out)
            print(f"{fmt}: {' '.join(command[:3])} ...", file=sys.stderr)
            runs[f"ours-{fmt}"] = timed(command, args.repeat, out)
            runs[f"naive-{fmt}"] = timed([sys.executable, "-c", naive, str(src), str(out)],
                                         args.repeat, out)
            runs[f"naive-fsync-{fmt}"] = timed(
                [sys.executable, "-c", naive + FSYNC, str(src), str(out)], args.repeat, out)
        via = "ckpt convert" if command[0].endswith("ckpt") else "convert_format()"
    body = report(runs, size, args, via)
    update_section("convert", body, "scripts/bench/convert")
    name = f"convert, {size / 2**30:.2f} GiB torch zip"
    ratios = []
    for fmt, naive in (("safetensors", "torch.load + save_file"),
                       ("npz", "torch.load + np.savez")):
        mine, theirs = runs[f"ours-{fmt}"], runs[f"naive-{fmt}"]
        ratios += [
            Ratio(f"{name} → {fmt}", naive, "wall time", theirs.wall_s / mine.wall_s,
                  1 / TARGET_WALL_RATIO),
            Ratio(f"{name} → {fmt}", naive, "peak RSS",
                  theirs.peak_rss_mib / mine.peak_rss_mib, TARGET_RSS_RATIO),
        ]
    record("convert", ratios)
    print(body)


def report(runs: dict[str, Run], size: int, args: argparse.Namespace, via: str) -> str:
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    intro = (f"A {size / 2**30:.2f} GiB torch zip checkpoint of {args.tensors} float32 tensors "
             f"converted to safetensors and to npz by `{via}` (streaming, one tensor at a "
             "time, written atomically and fsynced) and by the naive path: `torch.load` + "
             "`safetensors.torch.save_file`, and `torch.load` + `.numpy()` + `np.savez`.  "
             f"Whole-process wall time (median of {args.repeat} runs after a warm-up, page "
             "cache warm for the input, `sync` before each command) and peak RSS.")
    lines = ["## `ckpt convert`", "", textwrap.fill(intro, 95), "",
             "| command | wall | peak RSS |", "|---|---|---|"]
    for fmt, naive in (("safetensors", "torch.load + save_file"),
                       ("npz", "torch.load + np.savez")):
        lines += [row(f"{via} → {fmt}", runs[f"ours-{fmt}"]),
                  row(f"{naive}", runs[f"naive-{fmt}"]),
                  row(f"{naive} + fsync", runs[f"naive-fsync-{fmt}"])]
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for fmt in ("safetensors", "npz"):
        mine, naive = runs[f"ours-{fmt}"], runs[f"naive-{fmt}"]
        durable = runs[f"naive-fsync-{fmt}"]
        lean = naive.peak_rss_mib / mine.peak_rss_mib
        wall = mine.wall_s / naive.wall_s
        lines += [
            f"| {fmt}: naive RSS / ours | {lean:.1f}× | ≥ {TARGET_RSS_RATIO:.0f}× "
            f"({verdict(lean >= TARGET_RSS_RATIO)}) |",
            f"| {fmt}: our wall / naive wall | {wall:.2f} | ≤ {TARGET_WALL_RATIO:.0f} "
            f"({verdict(wall <= TARGET_WALL_RATIO)}) |",
            f"| {fmt}: our wall / naive wall with fsync | {mine.wall_s / durable.wall_s:.2f} | "
            "like for like |",
        ]
    lines += ["", textwrap.fill(
        "The naive path leaves its output in the page cache, not on disk; `ckpt convert` "
        "returns only after fsyncing the file and its directory, so the \"+ fsync\" rows are "
        "the like-for-like comparison.", 95)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
