"""The reading budget (issue 11, "bounded work on any input"): each adversarial input of a few
KiB ends in one line and exit 3 naming the limit it ran over, within its work units (opcodes,
objects, bytes counted by :mod:`ckptkit.storage.budget`) and within ``max(256 MiB, 64 x N)`` of memory.

Bounds are stated in work units and bytes, never in seconds.  Memory is measured two ways: the
peak resident set of a real ``python -m ckptkit`` process (which also runs under an
address-space cap, so an unbounded reader fails with MemoryError instead of taking the
machine), and tracemalloc's peak in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import ckptkit
from ckptkit.storage import budget
from ckptkit import config
from ckptkit.errors import BudgetError, ExitCode, UsageError
from ckptkit.scan.scanning import scan
from ckptkit.testing import adversarial
from tests import figures
from tests.conftest import SRC, run_main

MiB = 1 << 20
#: What one settlement of the pickle machine's counts may overshoot a limit by: a batch of
#: 4096 opcodes, each worth at most 3 objects (and a class stand-in: 40).
SLACK = 4096 * 3 + 40


def memory_limit(size: int) -> int:
    """The issue's target: an input of N bytes may use max(256 MiB, 64 x N) of memory."""
    return max(256 * MiB, 64 * size)


@dataclass(frozen=True)
class Measured:
    code: int
    stdout: str
    stderr: str
    peak_rss: int


#: ``python -m ckptkit`` with an address-space cap set first, leaving its peak resident set
#: (VmHWM, which starts afresh at exec: wait4's maxrss would count this test process's pages,
#: copied by fork) in the file named by its second argument.
_CAPPED = """
import atexit, resource, runpy, sys
cap, report = int(sys.argv.pop(1)), sys.argv.pop(1)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

def peak():
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

atexit.register(peak)
sys.argv[0] = "ckpt"
runpy.run_module("ckptkit", run_name="__main__")
"""


def run_measured(*args: str, env: dict[str, str] | None = None,
                 address_space: int = 3 << 30) -> Measured:
    """``python -m ckptkit ARGS`` in a fresh process under an address-space cap; its exit
    code, output and peak RSS (interpreter start-up included)."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    full_env.pop("CKPTKIT_DEBUG", None)
    with tempfile.TemporaryDirectory() as where:
        report = Path(where) / "peak"
        result = subprocess.run([sys.executable, "-c", _CAPPED, str(address_space), str(report),
                                 *args], capture_output=True, text=True, env=full_env,
                                timeout=600)
        # No report (killed, or died before its exit handlers): as if it had used everything.
        peak = int(report.read_text()) * 1024 if report.exists() else 1 << 62
    return Measured(result.returncode, result.stdout, result.stderr, peak)


def assert_one_line(result: Measured, *fragments: str) -> None:
    assert result.code == ExitCode.INTEGRITY, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), result.stderr
    assert "internal error" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@contextmanager
def traced() -> Iterator[list[int]]:
    """Yields a list that holds tracemalloc's peak (bytes) once the block is over."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


# --- the limits: one dataclass, raised by CKPTKIT_MAX_* ---------------------------------------

def test_limits_come_from_one_place_and_each_variable_raises_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert budget.configured() == budget.Limits()
    monkeypatch.setenv("CKPTKIT_MAX_NODES", "5_000_000")
    monkeypatch.setenv("CKPTKIT_MAX_RATIO", "128")
    limits = budget.configured()
    assert (limits.nodes, limits.ratio, limits.opcodes) == (5_000_000, 128,
                                                            budget.Limits().opcodes)
    for name in budget.Limits.names():
        assert budget.Limits.variable(name) == f"CKPTKIT_MAX_{name.upper()}"


@pytest.mark.parametrize("value", ["lots", "0", "-3", "1e9", "²"])
def test_a_bad_limit_is_a_usage_error_naming_the_variable(value: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    monkeypatch.setenv("CKPTKIT_MAX_OPCODES", value)
    with pytest.raises(UsageError, match="CKPTKIT_MAX_OPCODES"):
        budget.configured()
    path = adversarial.broadcast_view(tmp_path, side=2)
    code, _out, err = run_main(capsys, "inspect", str(path))
    assert code == ExitCode.USAGE and "CKPTKIT_MAX_OPCODES" in err


def test_the_budget_grows_with_the_input() -> None:
    small, large = budget.Budget("a", 1000), budget.Budget("b", 1 << 30)
    floors = budget.Limits()
    assert small.limit("opcodes") == floors.opcodes
    assert small.limit("decompressed") == floors.bytes == 256 * MiB
    assert large.limit("decompressed") == 64 << 30
    assert large.limit("nodes") == (1 << 30) // 4
    assert large.limit("key") == floors.key and large.limit("depth") == floors.depth
    with pytest.raises(BudgetError, match="CKPTKIT_MAX_RATIO") as exc:
        small.charge("decompressed", 256 * MiB + 1, "member 'x'")
    assert exc.value.exit_code == ExitCode.INTEGRITY and "member 'x'" in str(exc.value)


def test_nested_reads_share_the_open_account(tmp_path: Path) -> None:
    outer = tmp_path / "outer.zip"
    outer.write_bytes(b"x" * 1000)
    with budget.reading(outer) as account:
        with budget.reading(tmp_path / "member") as inner:
            assert inner is account
        assert budget.current() is account
    assert budget.current() is not account


# --- the cases of the issue ------------------------------------------------------------------

def test_ten_million_empty_sets_stop_at_the_object_budget(tmp_path: Path) -> None:
    """10 M EMPTY_SET in a deflated data.pkl (10 KiB) cost 2.3 GiB."""
    path = adversarial.empty_sets(tmp_path)
    with budget.reading(path) as account, traced() as peak:
        with pytest.raises(BudgetError, match="CKPTKIT_MAX_NODES"):
            ckptkit.inspect(path)
    assert account.used["nodes"] <= account.limit("nodes") + SLACK
    assert account.used["opcodes"] <= account.limit("nodes") + SLACK  # it stopped there
    assert peak[0] < memory_limit(path.stat().st_size)
    result = run_measured("inspect", str(path))
    assert_one_line(result, str(path), "CKPTKIT_MAX_NODES")
    assert result.peak_rss < memory_limit(path.stat().st_size)
    figures.count("budget-inputs")


def test_a_deep_list_of_millions_of_items_stops_within_its_budget(tmp_path: Path) -> None:
    """A list nested 399 deep holding 4 M items (8 KiB) cost more than 3 GiB."""
    path = adversarial.deep_list(tmp_path)
    result = run_measured("inspect", str(path))
    assert_one_line(result, str(path), "CKPTKIT_MAX_")
    assert result.peak_rss < memory_limit(path.stat().st_size)
    figures.count("budget-inputs")


def test_tensor_paths_are_charged_depth_times_width(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of 20,000 references to one tensor 399 levels down is a 400-long path: 8 M path
    entries, past a tree budget of 1 M (a path tuple was built for every node)."""
    path = adversarial.deep_list(tmp_path, items=20_000)
    monkeypatch.setenv("CKPTKIT_MAX_TREE", "1_000_000")
    with budget.reading(path) as account, traced() as peak:
        with pytest.raises(BudgetError, match="CKPTKIT_MAX_TREE"):
            ckptkit.inspect(path)
    assert account.used["tree"] <= account.limit("tree") + 400
    assert peak[0] < 64 * MiB
    monkeypatch.setenv("CKPTKIT_MAX_TREE", "10_000_000")
    info = ckptkit.inspect(path)
    assert info.tensor_count == 20_000 and len(info.tensors[0].name.split(".")) == 399


def test_a_tuple_key_hashed_on_every_setitem_is_charged_each_time(tmp_path: Path) -> None:
    """A 999-object tuple key re-checked on every SETITEM: 30 s for 1.4 KiB."""
    path = adversarial.rechecked_key(tmp_path)
    with budget.reading(path) as account, pytest.raises(BudgetError, match="OPCODES"):
        ckptkit.inspect(path)
    assert account.limit("opcodes") - SLACK - 999 <= account.used["opcodes"] <= (
        account.limit("opcodes"))
    # Stopped after a few thousand of the 500,000 SETITEMs, each charged for 999 objects.
    assert account.used["opcodes"] // 999 < 3_000
    figures.count("budget-inputs")


def test_a_tuple_key_used_again_is_checked_once(tmp_path: Path) -> None:
    path = adversarial.rechecked_key(tmp_path, width=50, setitems=100)
    with budget.reading(path) as account:
        info = ckptkit.inspect(path)
    assert info.format == "torch-zip"
    assert 100 * 51 <= account.used["opcodes"] <= 100 * 51 + 500


def test_scan_of_pickle_looking_records_stops_at_the_opcode_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record holding a pickle was scanned statically up to 64 MiB: 200 s for 1 MB."""
    path = adversarial.pickle_records(tmp_path, records=4, record_mib=4)
    monkeypatch.setenv("CKPTKIT_MAX_OPCODES", "1_000_000")
    with budget.reading(path) as account:
        (result,) = scan([path]).results
    assert result.verdict == "unreadable" and result.exit_code == ExitCode.INTEGRITY
    assert "CKPTKIT_MAX_OPCODES" in result.note and "data/0" in result.note
    assert account.used["opcodes"] <= account.limit("opcodes") + SLACK
    assert account.used["decompressed"] <= 4 * (4 * MiB + 16)
    figures.count("budget-inputs")


def test_nested_zips_share_one_decompression_budget(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each nesting level got a fresh 64x budget: more than 4 GB to TMPDIR from 70 KB."""
    path = adversarial.nested_zips(tmp_path, levels=3, fanout=2, member_mib=4)
    monkeypatch.setenv("CKPTKIT_MAX_BYTES", str(8 * MiB))
    with budget.reading(path) as account:
        (result,) = scan([path]).results
    assert result.verdict == "unreadable" and "CKPTKIT_MAX_RATIO" in result.note
    # One account for every level: 8 innermost members of 4 MiB were not all unpacked.
    assert account.used["decompressed"] <= 8 * MiB + 4 * MiB
    figures.count("budget-inputs")


def test_a_safetensors_header_flood_is_refused_before_parsing(tmp_path: Path) -> None:
    """30 M ``{}`` in an unknown header field cost 2.2 GiB when parsed."""
    path = adversarial.header_flood(tmp_path, count=3_000_000)
    size = path.stat().st_size
    with budget.reading(path) as account, traced() as peak:
        with pytest.raises(BudgetError, match="CKPTKIT_MAX_NODES"):
            ckptkit.inspect(path)
    assert account.used["nodes"] == 0  # 3,000,005 objects and lists refused unparsed
    assert peak[0] < 4 * size  # the header and copies of it, not 3 M dicts (216 MB)
    figures.count("budget-inputs")


def test_a_header_past_the_header_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = adversarial.header_flood(tmp_path, count=10)
    monkeypatch.setenv("CKPTKIT_MAX_HEADER", "20")
    with pytest.raises(BudgetError, match="CKPTKIT_MAX_HEADER"):
        ckptkit.inspect(path)


# --- broadcast views: views stay views, materialising them is charged -------------------------

@pytest.fixture(scope="module")
def broadcast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What torch.save writes for a 4-byte storage viewed as 40000 x 40000 (stride 0)."""
    torch = pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("broadcast") / "broadcast.pt"
    torch.save({"w": torch.full((1,), 1.5).expand(40_000, 40_000)}, path)
    return path


def test_the_hand_built_broadcast_view_is_what_torch_writes(broadcast: Path,
                                                            tmp_path: Path) -> None:
    ours = ckptkit.inspect(adversarial.broadcast_view(tmp_path))
    theirs = ckptkit.inspect(broadcast)
    assert [(t.name, t.shape, t.dtype) for t in ours.tensors] == [
        (t.name, t.shape, t.dtype) for t in theirs.tensors]


def test_load_numpy_keeps_a_broadcast_view_a_view(broadcast: Path) -> None:
    with traced() as peak:
        array = ckptkit.load(broadcast, framework="numpy")["w"]
    assert array.shape == (40_000, 40_000) and array.strides == (0, 0)
    assert not array.flags.writeable and float(array[39_999, 123]) == 1.5
    assert peak[0] < 16 * MiB


@pytest.mark.parametrize("command", ["diff", "convert"])
def test_diff_and_convert_refuse_a_broadcast_past_the_budget(command: str, broadcast: Path,
                                                             tmp_path: Path) -> None:
    """Each tried to allocate 6.4 GB."""
    out = tmp_path / "out.safetensors"
    args = (["diff", str(broadcast), str(broadcast)] if command == "diff"
            else ["convert", str(broadcast), "--to", "safetensors", "-o", str(out)])
    result = run_measured(*args)
    assert_one_line(result, str(broadcast), "'w'", "40000, 40000", "CKPTKIT_MAX_RATIO")
    assert result.peak_rss < memory_limit(broadcast.stat().st_size)
    assert not out.exists()
    figures.count("budget-inputs")


def test_a_broadcast_within_the_budget_is_compared_and_written(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "small.pt"
    torch.save({"w": torch.arange(3.0).expand(500, 3), "b": torch.ones(2)}, path)
    other = tmp_path / "other.pt"
    torch.save({"w": torch.arange(3.0).expand(500, 3).clone(), "b": torch.ones(2)}, other)
    report = ckptkit_diff(path, other)
    assert {t.name: t.status for t in report.tensors} == {"w": "unchanged", "b": "unchanged"}
    from ckptkit.convert.passthrough import convert_format

    out = tmp_path / "small.safetensors"
    convert_format(path, "safetensors", out)
    loaded = ckptkit.load(out, framework="numpy")
    assert loaded["w"].shape == (500, 3) and loaded["w"][499].tolist() == [0.0, 1.0, 2.0]


def ckptkit_diff(a: Path, b: Path):  # noqa: ANN201 - the report
    from ckptkit.runs.diff import diff

    return diff(a, b)


# --- bytes inflated when tensors are read count too ------------------------------------------

def test_a_compressed_npz_inflates_within_the_budget(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, w=np.zeros(4 * MiB, np.float32))  # 16 MiB in about 16 KiB
    monkeypatch.setenv("CKPTKIT_MAX_BYTES", str(8 * MiB))
    assert ckptkit.inspect(path).tensors[0].shape == (4 * MiB,)  # headers only
    with pytest.raises(BudgetError, match="CKPTKIT_MAX_RATIO"):
        ckptkit.load(path, framework="numpy")
    monkeypatch.setenv("CKPTKIT_MAX_BYTES", str(32 * MiB))
    assert ckptkit.load(path, framework="numpy")["w"].shape == (4 * MiB,)


@pytest.mark.parametrize("command", ["load", "diff", "strip"])
def test_a_deflated_storage_inflates_within_the_budget(command: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = adversarial.state_dict({"w": adversarial.tensor_pickle((4 * MiB,), (1,), 4 * MiB)})
    path = adversarial.torch_zip(tmp_path / "deflated.pt", data, {"0": bytes(16 * MiB)})
    monkeypatch.setenv("CKPTKIT_MAX_BYTES", str(8 * MiB))
    with pytest.raises(BudgetError, match="'archive/data/0'"):
        if command == "load":
            ckptkit.load(path, framework="numpy")
        elif command == "diff":
            ckptkit_diff(path, path)
        else:
            from ckptkit.runs.strip import plan_strip

            plan_strip(path, tmp_path / "stripped.pt").execute()
    assert not (tmp_path / "stripped.pt").exists()
