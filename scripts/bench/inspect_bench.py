"""`ckpt inspect` on a ~2 GiB, 512-tensor torch zip against torch.load(mmap=True), on a
SavedModel against `saved_model_cli show --all`, and on a ~2 GiB GGUF against the gguf
package's own `GGUFReader`.  Results go to docs/performance.md (`--only gguf`: the GGUF part
alone)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BIN, Check, Ratio, Run, measure, record, update_section

TARGET_WALL, TARGET_RSS, TARGET_HELP = 0.16, 45.0, 0.15


def write_checkpoint(path: Path, size_gib: float, tensors: int) -> None:
    import torch

    per = int(size_gib * 2**30 / 4 / tensors)
    cols = 1024
    rows = max(1, per // cols)
    state = {f"model.layers.{i // 8}.block{i % 8}.weight": torch.empty(rows, cols).normal_()
             for i in range(tensors)}
    torch.save({"model": state, "step": 1000, "best_val_loss": 0.5}, path)


def write_saved_model(path: Path) -> None:
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            self.layers = [tf.Variable(tf.random.normal([256, 256])) for _ in range(16)]

        @tf.function(input_signature=[tf.TensorSpec([None, 256], tf.float32, name="x")])
        def serve(self, x):
            for w in self.layers:
                x = tf.nn.relu(x @ w)
            return {"y": x}

    model = Model()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})


def write_gguf(path: Path, size_gib: float) -> None:
    """A llama-shaped GGUF of ``size_gib``: a 32k-token vocabulary and chat template, Q8_0
    matrices and F32 norms, written tensor by tensor (the writer's streaming mode), so the
    writer never holds more than one tensor."""
    import gguf
    import numpy as np
    from gguf.constants import GGMLQuantizationType as Q

    rows, blocks = 4096, 64  # 4096 x 2048 elements of Q8_0: 8.5 MiB per matrix
    matrix = np.random.default_rng(0).integers(0, 255, (rows, blocks * 34), dtype=np.uint8)
    count = max(1, int(size_gib * 2**30 / matrix.nbytes) + 1)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("bench")
    writer.add_block_count(count)
    writer.add_token_list([f"token{i}" for i in range(32000)])
    writer.add_token_scores([0.0] * 32000)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    norm = np.ones(blocks * 32, np.float32)
    for i in range(count):
        writer.add_tensor_info(f"blk.{i}.attn_norm.weight", norm.shape, norm.dtype, norm.nbytes)
        writer.add_tensor_info(f"blk.{i}.ffn_up.weight", matrix.shape, matrix.dtype,
                               matrix.nbytes, raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _ in range(count):
        writer.write_tensor_data(norm)
        writer.write_tensor_data(matrix)
    writer.close()


def bench_gguf(tmp: str, size_gib: float, repeat: int) -> tuple[str, list[Ratio]]:
    big = Path(tmp) / "big.gguf"
    print(f"writing a {size_gib} GiB GGUF ...", file=sys.stderr)
    subprocess.run([sys.executable, __file__, "--write-gguf", str(big), "--size-gib",
                    str(size_gib)], check=True)
    size = big.stat().st_size
    ours = measure([str(BIN / "ckpt"), "inspect", "--json", str(big)], repeat)
    # GGUFReader maps the file and builds numpy views of every field and tensor.
    theirs = measure([sys.executable, "-c", "import sys; from gguf import GGUFReader; "
                      "GGUFReader(sys.argv[1])", str(big)], repeat)
    speed, lean = theirs.wall_s / ours.wall_s, theirs.peak_rss_mib / ours.peak_rss_mib
    body = f"""## `ckpt inspect` on GGUF

Whole-process wall time (median of {repeat} warm runs) and peak RSS on a {size / 2**30:.2f} GiB
GGUF (llama-shaped: Q8_0 matrices and F32 norms, a 32,000-token vocabulary).

| command | wall | peak RSS |
|---|---|---|
{row("`ckpt inspect --json big.gguf`", ours)}
{row("`python -c 'gguf.GGUFReader(big.gguf)'`", theirs)}

| ratio | value |
|---|---|
| GGUFReader wall / ckpt inspect wall | {speed:.1f}× |
| GGUFReader RSS / ckpt inspect RSS | {lean:.1f}× |
"""
    name = f"inspect, {size / 2**30:.2f} GiB GGUF"
    return body, [Ratio(name, "gguf.GGUFReader", "wall time", speed),
                  Ratio(name, "gguf.GGUFReader", "peak RSS", lean)]


def row(name: str, run: Run) -> str:
    return f"| {name} | {run.wall_s * 1000:.0f} ms | {run.peak_rss_mib:.0f} MiB |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--tensors", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=["gguf"], help="run only the GGUF part")
    parser.add_argument("--write-fixtures", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--write-gguf", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_gguf:
        write_gguf(Path(args.write_gguf), args.size_gib)
        return
    if args.write_fixtures:
        write_checkpoint(Path(args.write_fixtures) / "big_checkpoint.pt", args.size_gib,
                         args.tensors)
        write_saved_model(Path(args.write_fixtures) / "saved_model")
        return
    if args.only == "gguf" or not args.only:
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
            gguf_body, gguf_ratios = bench_gguf(tmp, args.size_gib, args.repeat)
        update_section("inspect-gguf", gguf_body, "scripts/bench/inspect --only gguf")
        print(gguf_body)
        if args.only:
            record("inspect-gguf", gguf_ratios)
            return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    ckpt = str(BIN / "ckpt")
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        big = Path(tmp) / "big_checkpoint.pt"
        print(f"writing {args.size_gib} GiB, {args.tensors}-tensor checkpoint ...", file=sys.stderr)
        # In a child process: the parent must stay small, or forked children would inherit
        # its resident set and every peak-RSS figure would include it.
        subprocess.run([sys.executable, __file__, "--write-fixtures", tmp, "--size-gib",
                        str(args.size_gib), "--tensors", str(args.tensors)], check=True)
        saved = Path(tmp) / "saved_model"
        size = big.stat().st_size
        ours = measure([ckpt, "inspect", "--json", str(big)], args.repeat)
        mmap = measure([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], "
                        "mmap=True, weights_only=True)", str(big)], args.repeat)
        helps = measure([ckpt, "--help"], args.repeat)
        ours_sm = measure([ckpt, "inspect", "--json", str(saved)], args.repeat)
        cli = measure([str(BIN / "saved_model_cli"), "show", "--all", "--dir", str(saved)],
                      max(1, args.repeat // 2))
    speed, lean = mmap.wall_s / ours.wall_s, mmap.peak_rss_mib / ours.peak_rss_mib
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    body = f"""## `ckpt inspect`

Whole-process wall time (median of {args.repeat} warm runs) and peak RSS, on a
{size / 2**30:.2f} GiB torch zip checkpoint of {args.tensors} tensors and on a 16-variable SavedModel.

| command | wall | peak RSS |
|---|---|---|
{row("`ckpt inspect --json big_checkpoint.pt`", ours)}
{row("`python -c 'torch.load(..., mmap=True, weights_only=True)'`", mmap)}
{row("`ckpt --help`", helps)}
{row("`ckpt inspect --json saved_model`", ours_sm)}
{row("`saved_model_cli show --all --dir saved_model`", cli)}

| ratio | value | target |
|---|---|---|
| torch.load(mmap) wall / ckpt inspect wall | {speed:.1f}× | ≥ 10× ({verdict(speed >= 10)}) |
| torch.load(mmap) RSS / ckpt inspect RSS | {lean:.1f}× | ≥ 5× ({verdict(lean >= 5)}) |
| saved_model_cli wall / ckpt inspect wall | {cli.wall_s / ours_sm.wall_s:.1f}× | faster |
| saved_model_cli RSS / ckpt inspect RSS | {cli.peak_rss_mib / ours_sm.peak_rss_mib:.1f}× | — |
| ckpt inspect wall on 2 GiB | {ours.wall_s:.3f} s | ≤ {TARGET_WALL} s ({verdict(ours.wall_s <= TARGET_WALL)}) |
| ckpt inspect peak RSS | {ours.peak_rss_mib:.0f} MiB | ≤ {TARGET_RSS:.0f} MiB ({verdict(ours.peak_rss_mib <= TARGET_RSS)}) |
| ckpt --help wall | {helps.wall_s:.3f} s | ≤ {TARGET_HELP} s ({verdict(helps.wall_s <= TARGET_HELP)}) |
"""
    update_section("inspect", body, "scripts/bench/inspect")
    record("inspect-gguf", gguf_ratios)
    big_name = f"inspect, {size / 2**30:.2f} GiB torch zip"
    record("inspect", [
        Ratio(big_name, "torch.load(mmap=True)", "wall time", speed, 10.0),
        Ratio(big_name, "torch.load(mmap=True)", "peak RSS", lean, 5.0),
        # "faster" is the target: anything above 1x.
        Ratio("inspect, SavedModel", "saved_model_cli show --all", "wall time",
              cli.wall_s / ours_sm.wall_s, 1.0),
        Ratio("inspect, SavedModel", "saved_model_cli show --all", "peak RSS",
              cli.peak_rss_mib / ours_sm.peak_rss_mib),
    ], [
        Check(f"ckpt inspect wall, {size / 2**30:.2f} GiB", f"{ours.wall_s:.3f} s",
              f"≤ {TARGET_WALL} s", ours.wall_s <= TARGET_WALL),
        Check("ckpt inspect peak RSS", f"{ours.peak_rss_mib:.0f} MiB", f"≤ {TARGET_RSS:.0f} MiB",
              ours.peak_rss_mib <= TARGET_RSS),
        Check("ckpt --help wall", f"{helps.wall_s:.3f} s", f"≤ {TARGET_HELP} s",
              helps.wall_s <= TARGET_HELP),
    ])
    print(body)


if __name__ == "__main__":
    main()
