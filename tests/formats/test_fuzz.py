"""Fuzzing: damaged checkpoints of every format end in a correct result or a clean error.

Each bundled sample (:mod:`tests.mutations`) is truncated, bit-flipped and spliced, and the
result is fed to every reader's ``read_info`` (not only the one detection picks), to
``ckptkit.inspect``, to ``read_tensor`` for every tensor, to ``ckptkit.load(framework="numpy")``
and to the CLI commands in-process.  The only outcomes allowed: success with self-consistent
output, or a :class:`~ckptkit.errors.CkptkitError` exiting 1 or 3 (5 only when it lists unsafe
names) with one line on stderr.  Any other exception, a hang, or memory beyond
``64 MiB + 4 x the input`` fails the example.

Adversarial shapes (deep nesting, huge repetition counts, broadcast views, nested archives,
giant headers) are fuzzed the same way in ``tests/formats/test_fuzz_shapes.py``.

Profiles: CI runs a fixed, derandomized number of examples per seed; ``CKPTKIT_FUZZ_EXAMPLES=N``
(read at import, as ``scripts/fuzz`` sets it) spreads about N random inputs over the tests.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import struct
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

import ckptkit
from ckptkit import formats
from ckptkit.errors import CkptkitError, ExitCode, IntegrityError
from ckptkit.formats.tensor_io import read_tensor
from tests import figures
from tests.conftest import run_ckpt, run_main
from tests.mutations import SEED_BY_NAME, SEEDS, Mutation, Seed, apply, mutations

# --- profiles ------------------------------------------------------------------------------

#: Examples per seed in CI, for the library checks and for the (slower) CLI checks.
CI_LIBRARY, CI_CLI = 80, 20
#: The same for seeds whose reading starts a child process (HDF5), each read ~0.5 s.
CI_LIBRARY_SLOW, CI_CLI_SLOW = 8, 3
LONG_TOTAL = int(os.environ.get("CKPTKIT_FUZZ_EXAMPLES", "0") or 0)
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
           HealthCheck.data_too_large]
# No deadline: how long an example takes depends on the machine's load; work is bounded by
# the reading budget instead, and a real hang by HARD_TIMEOUT_S.
settings.register_profile("ckptkit-fuzz-ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("ckptkit-fuzz-long", derandomize=False, database=None, deadline=None,
                          suppress_health_check=_HEALTH, print_blob=True)


def fuzz_settings(ci_examples: int, share: float, *, per_seed: bool = True) -> settings:
    """CI: ``ci_examples`` (per seed); long run: ``share`` of CKPTKIT_FUZZ_EXAMPLES, spread over
    the seeds unless ``per_seed`` is False."""
    if LONG_TOTAL:
        spread = len(SEEDS) if per_seed else 1
        return settings(settings.get_profile("ckptkit-fuzz-long"),
                        max_examples=max(1, round(LONG_TOTAL * share / spread)))
    return settings(settings.get_profile("ckptkit-fuzz-ci"), max_examples=ci_examples)


# --- bounds: hangs and memory ----------------------------------------------------------------

#: Only a loop that never ends comes near this; speed itself is never asserted.
HARD_TIMEOUT_S = 300
MEMORY_BASE = 64 << 20


class Hang(Exception):
    """An example ran past HARD_TIMEOUT_S (deliberately not a CkptkitError)."""


@contextlib.contextmanager
def bounded(input_bytes: int) -> Iterator[None]:
    """Fail on a hang (SIGALRM interrupts pure-Python loops) or a peak of traced allocations
    above ``MEMORY_BASE + 4 * input_bytes``: a header may not make a reader allocate what the
    file does not hold."""
    def alarm(_signum: int, _frame: Any) -> None:
        raise Hang(f"example ran longer than {HARD_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HARD_TIMEOUT_S)
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    limit = MEMORY_BASE + 4 * input_bytes
    assert peak < limit, f"peak of {peak >> 20} MiB for a {input_bytes}-byte input"


# --- allowed outcomes ----------------------------------------------------------------------

CLEAN = {ExitCode.ERROR, ExitCode.INTEGRITY}


def clean(seed: Seed) -> set[int]:
    """The error exit codes allowed for damage to ``seed``."""
    return CLEAN | {ExitCode.NOT_FOUND} if seed.names_files else CLEAN


def check_error(exc: CkptkitError, allowed: set[int], names: str | None) -> None:
    if exc.exit_code == ExitCode.UNSAFE:
        assert getattr(exc, "unsafe", None), f"exit 5 without unsafe names: {exc}"
    else:
        assert exc.exit_code in allowed, f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"
    assert names is None or names in str(exc), f"{exc!s} does not name {names}"


def survive(call: Callable[[], Any], allowed: set[int] = CLEAN, names: Path | None = None) -> Any:
    """``call()``'s result, or None if it raised an allowed CkptkitError (whose message names
    a file under ``names``, if given); anything else propagates and fails the example."""
    try:
        return call()
    except CkptkitError as exc:
        check_error(exc, allowed, None if names is None else str(names))
        return None


def check_cli(code: int, out: str, err: str, allowed: set[int] = CLEAN,
              names: tuple[str, ...] = ()) -> None:
    """A command either worked or said why in one line (naming one of ``names``, the files
    involved), without a traceback."""
    assert "Traceback" not in err and "internal error" not in err, err
    assert not any(ch in err for ch in "\x1b\r\x00"), f"control characters on stderr: {err!r}"
    if code == ExitCode.OK:
        return
    # 5: what was read names dangerous callables (inspect still prints it), else allowed codes.
    assert code in allowed | {ExitCode.UNSAFE}, f"exit {code}: {err}"
    errors = [line for line in err.splitlines() if line.startswith("ckpt: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0].rstrip()), err
    assert not names or any(n in errors[0] for n in names), f"{errors[0]} names none of {names}"


# --- the checks ----------------------------------------------------------------------------

#: Readers of formats that are directories (or name one); the others only take files.
DIRECTORY_FORMATS = ("savedmodel", "tf-checkpoint", "orbax")


def reader_inputs(seed: Seed, path: Path, fmt: str) -> list[Path]:
    """Paths reader ``fmt`` is given: the damaged file, and for a directory format's reader
    also the damaged directory."""
    if seed.member is None:
        return [path]
    return [path / seed.member, path] if fmt in DIRECTORY_FORMATS else [path / seed.member]


def check_library(seed: Seed, path: Path) -> None:
    for fmt, module in formats.FORMAT_MODULES:
        reader = importlib.import_module(module)
        for target in reader_inputs(seed, path, fmt):
            # Another format's reader may answer "not this kind of path", and the directory
            # readers follow names (a state file's prefix) to files that may not exist (4).
            allowed = (CLEAN | {ExitCode.NOT_FOUND}
                       if fmt != seed.fmt or fmt in DIRECTORY_FORMATS else clean(seed))
            # The error may be about a file the damaged one names (a TF shard): any file in
            # the sample's own directory will do.
            raw = survive(lambda: reader.read_info(target), allowed, path.parent)
            if raw is not None:
                assert raw.format == fmt
    info = survive(lambda: ckptkit.inspect(path), clean(seed), path.parent)
    if info is not None:
        json.dumps(info.to_dict(), default=str)
        assert info.tensor_count == len(info.tensors)
        raw = formats.detect(path).read_info(path)
        big = raw.details.get("byteorder") == "big"
        for _name, ref in raw.tensors:
            array = survive(lambda: read_tensor(ref, big_endian=big))
            if array is not None:
                assert array.shape == ref.shape
    survive(lambda: ckptkit.load(path, framework="numpy"), clean(seed), path.parent)


def check_commands(seed: Seed, path: Path, original: Path, out: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str, refusal: str | None = None, output: Path | None = None
            ) -> tuple[int, str]:
        """Run ``ckpt args``; ``refusal`` is the message of a usage error (exit 2) that damage
        can legitimately cause for this command.  An error names a file beside the input (it
        may be about a shard the input names) or the ``output``."""
        code, stdout, err = run_main(capsys, *args)
        usage = {ExitCode.USAGE} if refusal and refusal in err else set()
        names = (str(path.parent),) + ((output.name,) if output else ())
        check_cli(code, stdout, err, clean(seed) | usage, names)
        return code, stdout

    run("inspect", str(path))
    code, stdout = run("inspect", "--json", str(path))
    if code == ExitCode.OK or stdout:  # exit 5 prints what it read, unless reading failed
        assert json.loads(stdout)["format"]
    code, stdout = run("diff", "--json", str(path), str(original))
    if code == ExitCode.OK:
        assert "summary" in json.loads(stdout)
    if seed.torch:
        stripped = out / "stripped.pt"
        # Damage can make a torch file read as another format, which strip refuses.
        code, _ = run("strip", str(path), "-o", str(stripped), refusal="no optimizer state")
        if code == ExitCode.OK and stripped.exists():
            ckptkit.inspect(stripped)
    for to, suffix in (("safetensors", ".safetensors"), ("npz", ".npz")):
        converted = out / f"converted{suffix}"
        # Damage can leave a readable file without tensors, which convert refuses.
        code, _ = run("convert", str(path), "--to", to, "-o", str(converted), "--quiet",
                      refusal="no tensors to convert", output=converted)
        if code == ExitCode.OK:
            assert ckptkit.inspect(converted).format == to
    # A directory that no longer holds anything recognisable is "no checkpoint files".
    code, stdout = run("compare", "--json", str(path), refusal="no checkpoint files")
    if code in (ExitCode.OK, ExitCode.INTEGRITY):
        # A damaged directory that no longer reads as one checkpoint is a folder of them.
        rows = len(json.loads(stdout)["rows"])
        assert rows == 1 if seed.member is None else rows >= 1
    # scan reports per file in its output (an unreadable file is a verdict, not an error).
    code, stdout, err = run_main(capsys, "scan", "--json", str(path))
    assert "Traceback" not in err and "internal error" not in err, err
    verdicts = {f["verdict"] for f in json.loads(stdout)["files"]}
    if "unsafe" in verdicts:
        assert code == ExitCode.UNSAFE, stdout
    elif "unreadable" in verdicts:
        assert code in CLEAN, stdout
    else:
        assert code == ExitCode.OK, stdout


@contextlib.contextmanager
def damaged(seed: Seed, data: bytes, root: Path) -> Iterator[Path]:
    """The seed with its member replaced by ``data``, in a fresh directory removed after."""
    with tempfile.TemporaryDirectory(dir=root) as where:
        yield seed.materialise(data, Path(where))


def _run_library(seed: Seed, data: bytes, root: Path) -> None:
    with damaged(seed, data, root) as path, bounded(len(data)):
        check_library(seed, path)


def _run_commands(seed: Seed, data: bytes, root: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    with damaged(seed, data, root) as path, bounded(len(data)):
        out = path.parent / "out"
        out.mkdir()
        original = path.parent / "original"
        original.mkdir()
        check_commands(seed, path, seed.materialise(seed.original, original), out, capsys)


# --- the property tests --------------------------------------------------------------------

SEED_IDS = [s.name for s in SEEDS]


@pytest.mark.parametrize("seed", SEEDS, ids=SEED_IDS)
def test_readers_survive_damage(seed: Seed, tmp_path: Path) -> None:
    @fuzz_settings(CI_LIBRARY_SLOW if seed.slow else CI_LIBRARY, 0.7)
    @given(mutation=mutations(seed.original))
    def run(mutation: Mutation) -> None:
        _run_library(seed, mutation.data, tmp_path)
        figures.count("fuzz-inputs")

    run()


@pytest.mark.parametrize("seed", SEEDS, ids=SEED_IDS)
def test_commands_survive_damage(seed: Seed, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    @fuzz_settings(CI_CLI_SLOW if seed.slow else CI_CLI, 0.3)
    @given(mutation=mutations(seed.original))
    def run(mutation: Mutation) -> None:
        _run_commands(seed, mutation.data, tmp_path, capsys)
        figures.count("fuzz-inputs")

    run()


# --- regressions: inputs that once escaped as something other than a clean error -------------

#: (seed name, operations, what went wrong before the fix), replayed through every check.
REGRESSIONS: list[tuple[str, tuple[tuple[Any, ...], ...], str]] = [
    ("torch-zip", (("truncate", 4),), "safetensors reader: struct.error on a short file"),
    ("torch-zip", (("truncate", 8),),
     "static pickle scan: a 64 MiB buffered read for every broken pickle in a file"),
    ("torch-legacy", (("insert", 1237, "safetensors", 409, 2269), ("delete", 1194, 455),
                      ("overwrite", 154, "savedmodel-index", 116, 5)),
     "a BINUNICODE length read from a file allocated 1.3 GiB before reading"),
    ("npz", (("flip", ((13034, 6), (12940, 7), (537, 0))),),
     "zipfile NotImplementedError (zip version 10.9) from every zip sniff and open"),
    ("torchscript", (("overwrite", 4918, "safetensors", 71, 1531), ("delete", 154, 13)),
     "negative local-header offset: OSError EINVAL from seek"),
    ("torchscript", (("flip", ((6270, 0),)), ("flip", ((5141, 5), (2322, 4)))),
     "BadZipFile reading a small record (byteorder, version)"),
    ("npz", (("overwrite", 13575, "torch-legacy", 1601, 317),),
     "NotImplementedError (unknown compression method) reading a .npy header"),
    ("npz", (("flip", ((13393, 0),)),), "RuntimeError (encryption flag) reading a .npy header"),
    ("torch-zip", (("overwrite", 5507, "savedmodel-pb", 12001, 12),),
     "NotImplementedError from read_tensor on a compressed storage"),
    ("torch-zip", (("overwrite", 5571, "tf-index", 414, 1578),),
     "NotImplementedError from diff's chunked reads: 'internal error'"),
    ("torch-zip-training", (("overwrite", 110385, "torch-zip-training", 104617, 16),
                            ("duplicate", 383, 7)),
     "NotImplementedError from the torch-zip sniff"),
    ("torch-zip", (("flip", ((5783, 0), (34, 7), (5862, 7), (6059, 5), (5560, 4), (285, 1))),),
     "UnicodeDecodeError: a local header name that is not the UTF-8 its flag claims"),
    ("torchscript", (("overwrite", 16, "torch-zip", 3936, 1988),),
     "UnicodeDecodeError reading a .npy header of a damaged zip"),
    ("torch-legacy-objects", (("truncate", 441), ("duplicate", 147, 294)),
     "control characters of a damaged global name printed raw on stderr"),
    ("flax-msgpack", (("overwrite", 405, "self", 381, 8),),
     "ckpt diff: 'tensor has no bytes in the file' (no file named): arrays had no spans"),
    ("torchscript", (("overwrite", 256, "npz", 315, 65),),
     "ckpt scan: UnicodeDecodeError from a record's local header: 'internal error'"),
    ("torch-legacy", (("overwrite", 288, "self", 507, 7), ("duplicate", 301, 7),
                      ("flip", ((953, 3), (619, 5), (767, 6), (570, 4), (1282, 0), (1111, 6),
                                (1453, 1), (622, 0)))),
     "ckpt scan: a length prefix read in one piece allocated 1.7 GB"),
    ("torch-zip-training", (("flip", ((0, 0), (110780, 7))),),
     "ckpt scan: UnicodeDecodeError listing a damaged zip as an archive: 'internal error'"),
    ("torchscript", (("overwrite", 6622, "self", 16, 11),),
     "a compressed size of 368 MiB declared in a 7 KB file was allocated by zipfile"),
    ("torch-zip", (("overwrite", 6191, "flax-msgpack", 0, 2),),
     "ValueError from zipfile seeking to a header offset below zero"),
    ("torch-legacy", (("overwrite", 218, "savedmodel-index", 0, 2),),
     "convert --to npz wrote a tensor named with a NUL as member 'model.': unreadable output"),
    ("torchscript", (("flip", ((6972, 0),)),),
     "ckpt scan: BadZipFile out of zipfile.is_zipfile (multi-disk end record)"),
    ("torch-legacy", (("truncate", 0), ("insert", 0, "savedmodel-index", 0, 245)), "none: "
     "a TF index under another name is read as one; its missing shard is named (kept as the "
     "case that showed errors may name a file beside the damaged one)"),
    ("pickle", (("delete", 162, 1),),
     "frames that loaders read differently: the re-read asked a buffered file for 64 MiB"),
    ("pickle", (("duplicate", 236, 3),),
     "the same re-read in the torch-legacy reader given a plain pickle: 64 MiB"),
    ("pickle", (("duplicate", 160, 2),),
     "an array of a dtype no reader names: 'dtype unknown cannot be read', no file named"),
    ("joblib", (("duplicate", 0, 2),),
     "a zlib error between two pickles escaped as UnpicklingError: 'internal error'"),
]


@pytest.mark.parametrize("seed_name, ops, before", REGRESSIONS,
                         ids=[f"{s}-{i}" for i, (s, _o, _b) in enumerate(REGRESSIONS)])
def test_regressions(seed_name: str, ops: tuple[tuple[Any, ...], ...], before: str,
                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed = SEED_BY_NAME[seed_name]
    data = apply(seed.original, ops)
    _run_library(seed, data, tmp_path)
    _run_commands(seed, data, tmp_path, capsys)


def test_safetensors_with_a_640_byte_header_is_not_a_pickle(tmp_path: Path) -> None:
    """A header length of 0x280 starts the file 0x80 0x02, which the legacy torch sniff took
    for a pickle (``ckpt convert --to safetensors`` wrote such files, unreadable after)."""
    body = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header = body.ljust(0x280)  # the format pads headers with spaces
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.5, -2.0))
    assert path.read_bytes()[:2] == b"\x80\x02"
    info = ckptkit.inspect(path)
    assert info.format == "safetensors" and [t.name for t in info.tensors] == ["w"]
    assert ckptkit.load(path)["w"].tolist() == [1.5, -2.0]


def test_a_pickle_starting_like_safetensors_is_still_read_as_one(tmp_path: Path) -> None:
    """Only a file that reads completely as safetensors is taken from the pickle reader."""
    path = tmp_path / "fake.safetensors"
    path.write_bytes(struct.pack("<Q", 0x280) + b"{" + b"x" * 0x27F)
    with pytest.raises(CkptkitError) as exc:
        ckptkit.inspect(path)
    assert "pickle" in str(exc.value) or "legacy torch" in str(exc.value)


@pytest.mark.parametrize("header, problem", [
    ({"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}, "malformed"),
    ({"__metadata__": [1, 2], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
     "__metadata__"),
])
def test_safetensors_header_values_of_the_wrong_kind(header: dict[str, Any], problem: str,
                                                     tmp_path: Path) -> None:
    """int(1e400) raised OverflowError, dict([1, 2]) TypeError: both escaped the reader."""
    body = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(4))
    with pytest.raises(IntegrityError, match=problem) as exc:
        ckptkit.inspect(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("chunked", [
    {"__msgpack_chunked_array__": True},
    {"__msgpack_chunked_array__": True, "shape": {"0": 2}, "chunks": 7},
])
def test_malformed_flax_chunked_array(chunked: dict[str, Any], tmp_path: Path) -> None:
    """A chunked-array marker without its parts raised KeyError/TypeError from the reader."""
    import msgpack

    path = tmp_path / "chunked.msgpack"
    path.write_bytes(msgpack.packb({"params": {"w": chunked}}))
    with pytest.raises(IntegrityError, match="chunked array") as exc:
        ckptkit.inspect(path)
    assert str(path) in str(exc.value)


def test_npz_output_refuses_a_tensor_name_with_nul(tmp_path: Path) -> None:
    """zipfile cuts member names at NUL, so 'a\\x00b' was written as member 'a' (no .npy):
    an archive no reader recognised.  Now nothing is written."""
    import numpy as np

    from ckptkit.formats.writers import write

    out = tmp_path / "out.npz"
    with pytest.raises(CkptkitError, match="NUL") as exc:
        write(out, "npz", [("ok", np.zeros(2)), ("a\x00b", np.ones(2))])
    assert str(out) in str(exc.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_flax_arrays_are_read_from_where_the_file_keeps_them() -> None:
    """Flax msgpack arrays carry byte spans, so read_tensor and diff read them like any
    other format's tensors (they raised "tensor has no bytes in the file")."""
    path = SEED_BY_NAME["flax-msgpack"].source
    loaded = ckptkit.load(path, framework="numpy")
    raw = formats.detect(path).read_info(path)
    assert raw.tensors
    for name, ref in raw.tensors:
        node = loaded
        for part in name:
            node = node[part]
        assert read_tensor(ref).tobytes() == node.tobytes()


# --- a real process: nothing reaches the user's terminal as a traceback ----------------------

def test_real_processes_print_one_line(tmp_path: Path) -> None:
    """Every seed cut in half and flipped near its start, inspected by ``python -m ckptkit``
    in one fresh interpreter each (plus one ``compare`` over all of them)."""
    damaged_paths = []
    for seed in SEEDS:
        data = seed.original
        ops = (("flip", ((min(9, len(data) - 1), 2),)), ("truncate", len(data) // 2))
        where = tmp_path / seed.name
        where.mkdir()
        path = seed.materialise(apply(data, ops), where)
        damaged_paths.append(path)
        result = run_ckpt("inspect", str(path))
        check_cli(result.returncode, result.stdout, result.stderr, clean(seed),
                  (str(path.parent),))
    result = run_ckpt("compare", "--json", *map(str, damaged_paths))
    assert "Traceback" not in result.stderr and result.returncode in CLEAN, result.stderr
    # One stderr line per unreadable file, and nothing else.
    rows = json.loads(result.stdout)["rows"]
    assert len(result.stderr.splitlines()) == sum(1 for row in rows if row.get("error"))


# --- oversized declarations of the GGUF, ONNX and Keras readers ---------------------------------

def _gguf(*parts: bytes, tensors: int = 0, values: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, values) + b"".join(parts)


def _key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


def _keras_config(config: bytes) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", config)
        archive.writestr("metadata.json", b"{}")
    return buffer.getvalue()


OVERSIZED: dict[str, tuple[str, bytes]] = {
    "gguf-string-2**62": ("x.gguf", _gguf(_key(b"k"), struct.pack("<IQ", 8, 1 << 62))),
    "gguf-strings-2**40": ("x.gguf", _gguf(_key(b"k"), struct.pack("<IIQ", 9, 8, 1 << 40))),
    "gguf-bytes-2**61": ("x.gguf", _gguf(_key(b"k"), struct.pack("<IIQ", 9, 0, 1 << 61))),
    "gguf-dims-2**40": ("x.gguf", _gguf(_key(b"w"), struct.pack("<I4QIQ", 4, *[1 << 40] * 4,
                                                                  0, 0), tensors=1, values=0)),
    "gguf-1e9-tensors": ("x.gguf", _gguf(values=0, tensors=10**9)),
    "onnx-graph-2**40": ("x.onnx", b"\x08\x08\x3a" + bytes([0x80] * 5) + b"\x10" + bytes(64)),
    "keras-3M-brackets": ("x.keras", _keras_config(b"[" * 3_000_000)),
}


@pytest.mark.parametrize("case", OVERSIZED, ids=list(OVERSIZED))
def test_oversized_declarations_are_one_line_exit_3(case: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Counts and lengths far beyond the file: refused before anything that size is built,
    inside the reading budget and the memory bound."""
    name, data = OVERSIZED[case]
    path = tmp_path / name
    path.write_bytes(data)
    with bounded(len(data)):
        code, _out, err = run_main(capsys, "inspect", str(path))
    assert code == ExitCode.INTEGRITY, err
    assert len(err.strip().splitlines()) == 1 and str(path) in err
