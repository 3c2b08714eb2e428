"""Every reader, and `ckpt inspect`, `scan`, `diff`, `convert` and `ckptkit.load(framework=
"numpy")`, on the adversarial inputs of issue 11 (:mod:`ckptkit.testing.adversarial`): small
files that ask for gigabytes.  Each run's exit code, peak RSS and wall time are set against
the reading budget's targets: a result or one line on stderr (exit 3 over budget), peak RSS
at most max(256 MiB, 64 x N) for an input of N bytes; and time growing with N, not with what
the file asks for (the scaling table: the same shape at growing sizes).  Results go to
docs/performance.md."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import Check, record, update_section

MiB = 1 << 20
READERS = ("torch_zip", "torchscript", "npz", "torch_legacy", "safetensors", "savedmodel",
           "tf_checkpoint", "flax_msgpack")
#: Runs a library call the way the CLI would report it: one line and the error's exit code.
_LIBRARY = """
import sys
from pathlib import Path
from ckptkit.errors import CkptkitError
path = Path(sys.argv[1])
try:
    {call}
except CkptkitError as exc:
    print(f"error: {{exc}}", file=sys.stderr)
    sys.exit(int(exc.exit_code))
"""


@dataclass(frozen=True)
class Outcome:
    code: int
    lines: int
    peak_rss: int
    wall: float
    note: str

    @property
    def clean(self) -> bool:
        """A result or one line: exit 0, or a documented error code (1 not a format, 2 a
        usage error such as nothing to convert, 3 damaged or over budget, 4 not found: a
        reader given another format's file) with at most one line on stderr (scan prints its
        verdicts on stdout)."""
        return self.code in (0, 1, 2, 3, 4) and self.lines <= 1 \
            and "internal error" not in self.note and "Traceback" not in self.note


def run(cmd: list[str]) -> Outcome:
    """One process: exit code, stderr lines, peak RSS (wait4) and wall time."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        text = err.read().decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    return Outcome(os.waitstatus_to_exitcode(status), len(lines), usage.ru_maxrss * 1024, wall,
                   lines[-1][:160] if lines else "")


def operations(path: Path, out: Path) -> dict[str, list[list[str]]]:
    """What runs on ``path``: each entry is one or more commands reported as one row."""
    py = sys.executable
    library = lambda call: [py, "-c", _LIBRARY.format(call=call), str(path)]  # noqa: E731
    return {
        "`ckpt inspect`": [[py, "-m", "ckptkit", "inspect", str(path)]],
        "`ckpt scan`": [[py, "-m", "ckptkit", "scan", str(path)]],
        "`ckpt diff` (itself)": [[py, "-m", "ckptkit", "diff", str(path), str(path)]],
        "`ckpt convert --to safetensors`": [[py, "-m", "ckptkit", "convert", str(path), "--to",
                                             "safetensors", "-o", str(out), "--quiet"]],
        "`load(framework=\"numpy\")`": [library("import ckptkit; "
                                               "ckptkit.load(path, framework='numpy')")],
        "every reader's `read_info`": [
            library(f"from ckptkit.formats import {reader}; {reader}.read_info(path)")
            for reader in READERS],
    }


def limit(size: int) -> int:
    return max(256 * MiB, 64 * size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scaling-mib", type=int, nargs="+", default=[8, 16, 32],
                        help="sizes of the scaling rows (MiB of EMPTY_SET opcodes, stored)")
    parser.add_argument("--write-fixtures", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_fixtures:
        write_fixtures(Path(args.write_fixtures), args.scaling_mib)
        return
    rows, scaling, worst = [], [], 0.0
    clean = total = 0
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-adversarial-") as tmp:
        where = Path(tmp)
        print("writing the adversarial files ...", file=sys.stderr)
        # In a child: the parent must stay small, or forked children would inherit its pages.
        subprocess.run([sys.executable, __file__, "--write-fixtures", tmp, "--scaling-mib",
                        *map(str, args.scaling_mib)], check=True)
        for path in sorted(where.glob("case-*/*")):
            size = path.stat().st_size
            for name, commands in operations(path, where / "out.safetensors").items():
                print(f"{path.name}: {name}", file=sys.stderr)
                outcomes = [run(cmd) for cmd in commands]
                (where / "out.safetensors").unlink(missing_ok=True)
                total += len(outcomes)
                clean += sum(o.clean for o in outcomes)
                peak = max(o.peak_rss for o in outcomes)
                worst = max(worst, peak / limit(size))
                codes = ", ".join(sorted({str(o.code) for o in outcomes}))
                wall = sum(o.wall for o in outcomes)
                rows.append(f"| {path.name} ({size:,} B) | {name} | {codes} | "
                            f"{peak / MiB:.0f} MiB | {limit(size) / MiB:.0f} MiB | {wall:.1f} s |"
                            f" {'yes' if all(o.clean for o in outcomes) else '**no**'} |")
        for path in sorted(where.glob("scaling-*/*"), key=lambda p: p.stat().st_size):
            size = path.stat().st_size
            outcome = run([sys.executable, "-m", "ckptkit", "scan", str(path)])
            total += 1
            clean += outcome.clean
            worst = max(worst, outcome.peak_rss / limit(size))
            scaling.append(f"| {size / MiB:.0f} MiB | {outcome.code} | "
                           f"{outcome.peak_rss / MiB:.0f} MiB | {limit(size) / MiB:.0f} MiB | "
                           f"{outcome.wall:.1f} s | {outcome.wall / (size / MiB):.2f} s |")
    body = f"""## Adversarial inputs (bounded work)

The files of `ckptkit.testing.adversarial` (issue 11): each asked an unbounded reader for
gigabytes of memory or minutes of CPU.  Every reader (`read_info` of each of the 8 format
modules, one process each, reported as one row), `ckpt inspect`, `scan`, `diff` (the file
against itself), `convert --to safetensors` and `ckptkit.load(framework="numpy")` ran on each,
with the default budget (docs/security.md).  Targets: a result, or exit 1–4 with one line on
stderr (3 for a file over budget; a reader given another format's file says so with 1 or 4),
and peak RSS (whole process, interpreter included) at most max(256 MiB, 64 × N) for an N-byte
input.  Wall time is the sum over a row's processes, on a machine shared with other work (see
the load average in the summary).

| input | command | exit | peak RSS | limit | wall | clean |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Time grows with the input, not with what it asks for: `ckpt scan` on plain pickles of N bytes
of `EMPTY_SET` opcodes (stored, so every byte is an opcode), each stopped by the object budget,
which grows with N past 4 MiB (N / 4 objects; a set counts 3).

| N | exit | peak RSS | limit | wall | wall per MiB |
|---|---|---|---|---|---|
{chr(10).join(scaling)}

{clean} of {total} runs ended cleanly; the highest peak RSS was {worst:.0%} of its limit.
"""
    update_section("adversarial", body, "scripts/bench/adversarial")
    record("adversarial", [], [
        Check("adversarial inputs ending in a result or one line", f"{clean} of {total}",
              "all", clean == total),
        Check("adversarial inputs: highest peak RSS / max(256 MiB, 64 × N)", f"{worst:.0%}",
              "≤ 100%", worst <= 1.0),
    ])
    print(body)


def write_fixtures(where: Path, scaling_mib: list[int]) -> None:
    import pickle

    from ckptkit.testing import adversarial

    for name, write in adversarial.CASES.items():
        folder = where / f"case-{name}"
        folder.mkdir()
        write(folder)
    for mib in scaling_mib:
        folder = where / f"scaling-{mib}"
        folder.mkdir()
        body = pickle.EMPTY_SET * (mib * MiB - 4)
        (folder / f"sets-{mib}mib.pkl").write_bytes(pickle.PROTO + b"\x02" + body
                                                    + pickle.NONE + pickle.STOP)


if __name__ == "__main__":
    main()
