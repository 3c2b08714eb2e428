"""The restricted reader reads what CPython's unpicklers read, and calls on what it cannot
know are unsafe.

- Frames: the C unpickler's buffer (pickle_input.FileInput) against the real ``pickle.load``
  over the same file objects (no peek, small and large buffers), on random framed pickles
  whose frames lie about their length; and ``pickle.loads`` against the contiguous reading.
- Computed callables: a REDUCE, NEWOBJ or OBJ whose callable is a call's result, and
  arguments an allowlisted stand-in would call.
- Module state: BUILD on a global, and STACK_GLOBAL of values only known at load time.
"""

from __future__ import annotations

import io
import pickle
import random
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from ckptkit.errors import IntegrityError
from ckptkit.pickles.pickle_input import FileInput, RawBytes
from ckptkit.pickles.unpickler import DIVERGENT_FRAMES, Findings, InertUnpickler, read_pickle

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from corpus.opcodes import call, glob, ustr, whole  # noqa: E402

VIEWS: dict[str, Callable[[bytes], Any]] = {
    "BytesIO (no peek)": io.BytesIO,
    "7-byte buffer": lambda d: io.BufferedReader(RawBytes(d), 7),
    "16-byte buffer": lambda d: io.BufferedReader(RawBytes(d), 16),
    "4 KiB buffer": lambda d: io.BufferedReader(RawBytes(d), 4096),
}


def _opcode(rnd: random.Random) -> bytes:
    kind = rnd.randrange(7)
    if kind == 0:
        text = "".join(rnd.choice("abc") for _ in range(rnd.randrange(12))).encode()
        return pickle.SHORT_BINUNICODE + bytes([len(text)]) + text
    if kind == 1:
        return pickle.BININT1 + bytes([rnd.randrange(256)])
    if kind == 2:
        return pickle.INT + str(rnd.randrange(1000)).encode() + b"\n"
    if kind == 3:
        data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(10)))
        return pickle.SHORT_BINBYTES + bytes([len(data)]) + data
    if kind == 4:
        data = bytes(rnd.randrange(65, 70) for _ in range(rnd.randrange(20)))
        return pickle.BINBYTES + struct.pack("<I", len(data)) + data
    return pickle.NONE if kind == 5 else pickle.NEWTRUE


def _framed(rnd: random.Random) -> bytes:
    """A tuple of random values, some runs of them in frames that declare a wrong length."""
    ops = [_opcode(rnd) for _ in range(rnd.randrange(1, 12))]
    out, i = pickle.PROTO + b"\x04" + pickle.MARK, 0
    while i < len(ops):
        if rnd.random() < 0.4:
            count = rnd.randrange(1, 4)
            chunk = b"".join(ops[i:i + count])
            i += count
            declared = max(0, len(chunk) + rnd.randrange(-6, 3))
            out += pickle.FRAME + struct.pack("<Q", declared) + chunk
        else:
            out += ops[i]
            i += 1
    return out + pickle.TUPLE + pickle.STOP


def _loads(load: Callable[[], Any]) -> str:
    try:
        return repr(load())
    except Exception:  # noqa: BLE001 - any failure ends a loader alike
        return "error"


def _sequence(view: Any, load: Callable[[Any], Any]) -> list[str]:
    """Up to three pickles read one after another from one file, as torch's legacy format
    and multi-pickle files are."""
    results = []
    for _ in range(3):
        results.append(_loads(lambda: load(view)))
        if results[-1] == "error":
            break
    return results


@pytest.mark.parametrize("view", list(VIEWS))
def test_file_reading_matches_the_c_unpickler(view: str) -> None:
    rnd = random.Random(view)
    for _ in range(300):
        data = _framed(rnd) + _framed(rnd) + _framed(rnd)
        expected = _sequence(VIEWS[view](data), pickle.load)
        ours = _sequence(VIEWS[view](data), lambda f: InertUnpickler(
            FileInput(f, 0, len(data)), Findings()).load())
        assert ours == expected, data


def test_bytes_reading_matches_pickle_loads() -> None:
    rnd = random.Random(3)
    for _ in range(1000):
        data = _framed(rnd)
        assert _loads(lambda: read_pickle(data, Findings())) == _loads(
            lambda: pickle.loads(data)), data


def test_a_frame_that_loaders_read_differently_is_read_as_each_does() -> None:
    """pickle.loads reads on through a short frame; a file without peek drops the frame's
    last byte: the payload runs under one of them only, and is found either way."""
    findings = Findings()
    payload = call(glob("os", "system"), ustr("true")) + pickle.POP
    frame = pickle.NONE + pickle.BINBYTES + bytes([1 + len(payload)])
    data = (pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", len(frame)) + frame
            + bytes(4) + payload + pickle.POP + pickle.POP + pickle.EMPTY_DICT + pickle.STOP)
    assert read_pickle(data, findings) == {}
    assert set(findings.unsafe) == {"os.system"} and DIVERGENT_FRAMES in findings.objects
    assert "without peek" in findings.where["os.system"]
    honest = Findings()
    read_pickle(pickle.dumps({"a": list(range(1000)), "b": b"x" * 100_000}, protocol=5), honest)
    assert honest.objects == set() and honest.unsafe == {}


def test_diverging_frames_in_a_plain_file_are_read_again(tmp_path: Path) -> None:
    """Plain pickle files are read through a byte budget; the second reading of a pickle
    whose frames diverge goes around it, and the next pickle is still read where it starts."""
    from ckptkit.pickles import plain_pickle

    payload = call(glob("os", "system"), ustr("true")) + pickle.POP
    frame = pickle.NONE + pickle.BINBYTES + bytes([1 + len(payload)])
    hiding = (pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", len(frame)) + frame
              + bytes(4) + payload + pickle.POP + pickle.POP + pickle.EMPTY_DICT + pickle.STOP)
    path = tmp_path / "two.joblib"
    path.write_bytes(hiding + pickle.dumps({"next": 1}, protocol=4))
    findings, _kind = plain_pickle.analyse(path)
    assert set(findings.unsafe) == {"os.system"} and findings.pickles >= 2


def test_int_is_parsed_as_the_c_unpickler_does() -> None:
    """'010' is 8 to strtol(s, &end, 0), an error to the pure-Python int(s, 0)."""
    for text, value in ((b"010", 8), (b"0x1f", 31), (b" 7", 7), (b"01", True), (b"1_000", 1000)):
        data = pickle.PROTO + b"\x02" + pickle.INT + text + b"\n" + pickle.STOP
        assert read_pickle(data, Findings()) == pickle.loads(data) == value
    with pytest.raises(IntegrityError):
        read_pickle(pickle.INT + b"08\n" + pickle.STOP, Findings())


def _unsafe(body: bytes, proto: int = 4) -> dict[str, str]:
    findings = Findings()
    read_pickle(whole(body, proto), findings)
    return findings.unsafe


def test_calling_a_call_result_is_unsafe() -> None:
    newtype = call(glob("typing", "NewType"), ustr("Id"), glob("builtins", "int"))
    assert _unsafe(call(newtype, ustr("x"))) == {"<typing.NewType('Id', ...)>()": "REDUCE"}
    namespace = glob("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
    assert _unsafe(namespace + pickle.EMPTY_TUPLE + pickle.NEWOBJ) == {
        "<argparse.Namespace()>()": "NEWOBJ"}
    assert _unsafe(pickle.MARK + namespace + pickle.OBJ) == {
        "<argparse.Namespace()>()": "OBJ"}
    # Allowlisted stand-ins that call an argument: the argument must not be computed.
    rebuild = call(glob("torch._tensor", "_rebuild_from_type_v2"), newtype,
                   glob("torch", "Tensor"), pickle.EMPTY_TUPLE, pickle.NONE)
    assert set(_unsafe(rebuild)) == {"<typing.NewType('Id', ...)>()"}
    assert _unsafe(call(glob("collections", "OrderedDict"), pickle.EMPTY_LIST)) == {}


def test_build_on_a_global_and_dunder_state_are_unsafe() -> None:
    module = glob("json", "decoder") + ustr("ckpt") + pickle.BUILD
    assert _unsafe(module) == {"json.decoder (BUILD on a global)": "BUILD"}
    namespace = glob("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
    state = pickle.EMPTY_DICT + ustr("__class__") + pickle.NONE + pickle.SETITEM
    assert _unsafe(namespace + state + pickle.BUILD) == {
        "argparse.Namespace.__class__ (set by BUILD)": "BUILD"}
    doc = pickle.EMPTY_DICT + ustr("__doc__") + ustr("fine") + pickle.SETITEM
    assert _unsafe(namespace + doc + pickle.BUILD) == {}


def test_stack_global_of_computed_values_is_unsafe_not_corrupt() -> None:
    operands = glob("json.decoder", "a") + glob("json.decoder", "b")
    assert _unsafe(operands + pickle.STACK_GLOBAL) == {
        "<json.decoder.a>.<json.decoder.b>": "STACK_GLOBAL"}
    with pytest.raises(IntegrityError, match="STACK_GLOBAL requires str"):
        read_pickle(whole(pickle.BININT1 + b"\x01" + ustr("x") + pickle.STACK_GLOBAL),
                    Findings())


def test_python_2_names_are_mapped_as_the_loader_maps_them() -> None:
    """Before protocol 3 pickle maps __builtin__.xrange to builtins.range (allowlisted); from
    protocol 3 the name is imported as written (and ``__builtin__`` is refused)."""
    xrange = call(glob("__builtin__", "xrange"), pickle.BININT1 + b"\x03")
    assert _unsafe(xrange, proto=2) == {}
    assert _unsafe(xrange, proto=3) == {"__builtin__.xrange": "GLOBAL"}
    reconstruct = call(glob("copy_reg", "_reconstructor"), glob("argparse", "Namespace"),
                       glob("__builtin__", "object"), pickle.NONE)
    assert _unsafe(reconstruct, proto=2) == {}
