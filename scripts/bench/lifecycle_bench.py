"""Training-run lifecycle benchmarks: `ckpt diff` of two ~1 GiB checkpoints (peak RSS against
2 × largest tensor + 100 MiB) and `ckpt cleanup` planning over 10,000 small checkpoints
(≤ 1 s).  Results go to docs/performance.md."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BIN, Check, Run, measure, record, update_section

CLEANUP_TARGET_S = 1.0


def write_pair(directory: Path, size_gib: float, tensors: int) -> int:
    """Two checkpoints of ``tensors`` equal float32 tensors; B differs in one element of
    every other tensor.  Returns the largest tensor's size in bytes."""
    import torch

    rows = max(1, int(size_gib * 2**30 / 4 / tensors) // 1024)
    g = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.weight": torch.empty(rows, 1024).normal_(generator=g)
             for i in range(tensors)}
    torch.save({"model": state, "step": 1000}, directory / "a.pt")
    for i in range(0, tensors, 2):
        state[f"model.layers.{i}.weight"][rows // 2, 7] += 0.5
    torch.save({"model": state, "step": 2000}, directory / "b.pt")
    return rows * 1024 * 4


def write_run(directory: Path, files: int) -> None:
    """``files`` μOmni-style periodic checkpoints of one tiny model, plus best and final."""
    import torch

    sample = directory / "thinker_step_0.pt"
    torch.save({"model": {"w": torch.zeros(4)}, "step": 0, "best_val_loss": 1.0}, sample)
    data = sample.read_bytes()
    for step in range(100, files * 100, 100):
        (directory / f"thinker_step_{step}.pt").write_bytes(data)
    shutil.copy(sample, directory / "thinker_best.pt")
    shutil.copy(sample, directory / "thinker.pt")


def row(name: str, run: Run) -> str:
    return f"| {name} | {run.wall_s:.2f} s | {run.peak_rss_mib:.0f} MiB |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=1.0, help="size of each checkpoint")
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write-fixtures", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_fixtures:
        fixtures = Path(args.write_fixtures)
        largest = write_pair(fixtures, args.size_gib, args.tensors)
        (fixtures / "largest").write_text(str(largest))
        (fixtures / "run").mkdir()
        write_run(fixtures / "run", args.files)
        return
    ckpt = str(BIN / "ckpt")
    cleanup = (Path(__file__).resolve().parents[2] / "src/ckptkit/cli/cleanup.py").exists()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        print(f"writing 2 × {args.size_gib} GiB checkpoints and {args.files} small ones ...",
              file=sys.stderr)
        # In a child process: the parent must stay small, or forked children would inherit
        # its resident set and every peak-RSS figure would include it.
        subprocess.run([sys.executable, __file__, "--write-fixtures", tmp, "--size-gib",
                        str(args.size_gib), "--tensors", str(args.tensors), "--files",
                        str(args.files)], check=True)
        largest = int((Path(tmp) / "largest").read_text())
        size = (Path(tmp) / "a.pt").stat().st_size
        ours = measure([ckpt, "diff", "--json", f"{tmp}/a.pt", f"{tmp}/b.pt"], args.repeat)
        plan = (measure([ckpt, "cleanup", f"{tmp}/run", "--keep-last", "3", "--dry-run",
                         "--json"], args.repeat) if cleanup else None)
    limit = 2 * largest / 2**20 + 100
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    rows = [row(f"`ckpt diff --json a.pt b.pt` ({size / 2**30:.2f} GiB each, "
                f"{args.tensors} × {largest / 2**20:.0f} MiB tensors)", ours)]
    checks = [f"| ckpt diff peak RSS | {ours.peak_rss_mib:.0f} MiB | ≤ 2 × largest tensor + "
              f"100 MiB = {limit:.0f} MiB ({verdict(ours.peak_rss_mib <= limit)}) |"]
    if plan is not None:
        rows.append(row(f"`ckpt cleanup run/ --keep-last 3 --dry-run --json` "
                        f"({args.files:,} checkpoints)", plan))
        checks.append(f"| ckpt cleanup planning wall | {plan.wall_s:.2f} s | ≤ "
                      f"{CLEANUP_TARGET_S:.0f} s ({verdict(plan.wall_s <= CLEANUP_TARGET_S)}) |")
    else:
        checks.append("| ckpt cleanup planning | not measured | `ckpt cleanup` did not exist "
                      "when this ran |")
    body = "## Training-run lifecycle (`ckpt diff`, `ckpt cleanup`)\n\n" \
        f"Whole-process wall time (median of {args.repeat} warm runs) and peak RSS.\n\n" \
        "| command | wall | peak RSS |\n|---|---|---|\n" + "\n".join(rows) + \
        "\n\n| check | value | target |\n|---|---|---|\n" + "\n".join(checks) + "\n"
    update_section("lifecycle", body, "scripts/bench/lifecycle")
    facts = [Check(f"ckpt diff peak RSS, 2 × {size / 2**30:.2f} GiB",
                   f"{ours.peak_rss_mib:.0f} MiB",
                   f"≤ {limit:.0f} MiB (2 × largest tensor + 100 MiB)",
                   ours.peak_rss_mib <= limit)]
    if plan is not None:
        facts.append(Check(f"ckpt cleanup planning, {args.files:,} checkpoints",
                           f"{plan.wall_s:.2f} s", f"≤ {CLEANUP_TARGET_S:.0f} s",
                           plan.wall_s <= CLEANUP_TARGET_S))
    record("lifecycle", [], facts)
    print(body)


if __name__ == "__main__":
    main()
