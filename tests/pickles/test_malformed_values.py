"""Values no array can have, read from a file's header, end in one line naming the file and the
entry (exit 3), never in an internal error (issue 11, "errors, not internal errors": readers).

A 5000-digit shape in safetensors, a TensorFlow shape of 17 x 2**62 elements, ``inf`` in a
Flax msgpack shape, hexadecimal ``.npy`` dimensions and a MemoryError in ``diff``.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest

import ckptkit
from ckptkit.errors import ExitCode, IntegrityError
from ckptkit.model import checked_shape
from tests.conftest import run_main
from tests.formats.test_tf_checkpoint import HEADER, block, table, varint, write_bundle


def assert_refused(capsys: pytest.CaptureFixture[str], path: Path, entry: str,
                   *commands: tuple[str, ...]) -> None:
    """Every command exits 3 with one line naming ``path`` and ``entry``."""
    for command in commands or (("inspect",),):
        code, _out, err = run_main(capsys, *command, str(path))
        lines = err.strip().splitlines()
        assert code == ExitCode.INTEGRITY, (command, err)
        assert len(lines) == 1 and "internal error" not in err and "Traceback" not in err, err
        assert str(path) in lines[0] and entry in lines[0], (command, lines[0])


def test_a_5000_digit_safetensors_dimension(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    header = ('{"w": {"dtype": "F32", "shape": [' + "1" * 5000
              + '], "data_offsets": [0, 4]}}').encode()
    path = tmp_path / "digits.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    assert_refused(capsys, path, "tensor 'w'")
    with pytest.raises(IntegrityError, match="5000-digit"):
        ckptkit.inspect(path)


@pytest.mark.parametrize("dims, dtype, size", [
    ([17, 1 << 62], 7, 8),      # a string tensor of 17 x 2**62 elements
    ([17, 1 << 62, 0], 1, 0),   # no elements, but numpy cannot shape 17 x 2**62 rows
], ids=["string", "empty-float"])
def test_a_tensorflow_shape_of_17_times_2_to_the_62(dims: list[int], dtype: int, size: int,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    shape = b"".join(b"\x12" + varint(len(d)) + d for d in (b"\x08" + varint(n) for n in dims))
    entry = b"\x08" + varint(dtype) + b"\x12" + varint(len(shape)) + shape + b"\x28" + varint(size)
    path = write_bundle(tmp_path, table([block([HEADER, (b"s", entry)])]), b"\1" * 8)
    out = tmp_path / "out.npz"
    assert_refused(capsys, path, "entry 's'", ("inspect",), ("convert", "--to", "npz", "-o",
                                                             str(out)))
    assert not out.exists()


def test_inf_in_a_flax_msgpack_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import msgpack

    array = msgpack.ExtType(1, msgpack.packb(([float("inf")], "float32", bytes(4))))
    path = tmp_path / "inf.msgpack"
    path.write_bytes(msgpack.packb({"params": {"dense": {"kernel": array}}}))
    assert_refused(capsys, path, "'params/dense/kernel'", ("inspect",), ("diff", str(path)))


@pytest.mark.parametrize("descr, shape", [
    ("'<f4'", "'0x10'"), ("'<f4'", "('0x10',)"), ("'<f4'", "(16.0,)"), ("'<f4'", "(-1,)"),
    ("[('a', '<f4', (1e999,))]", "(1,)"),  # a record field of infinite length
])
def test_hexadecimal_npy_dimensions(descr: str, shape: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    text = (f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".ljust(118)
            + "\n")
    path = tmp_path / "hex.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text))
                         + text.encode() + bytes(64))
    assert_refused(capsys, path, "'w.npy'")


def test_a_memory_error_in_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What a tensor too large for this machine's memory does to the comparison."""
    from ckptkit.runs import diff

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))

    def out_of_memory(self: object, a: object, b: object) -> None:
        raise MemoryError

    monkeypatch.setattr(diff._Stats, "add", out_of_memory)
    assert_refused(capsys, path, "tensor 'w'", ("diff", str(path)))


@pytest.mark.parametrize("dims, why", [
    ([float("inf")], "whole number"), (["3"], "whole number"), ([True], "whole number"),
    ("16", "not a list"), ([-1], "negative"), ([1 << 40, 1 << 40], "that large"),
    ([1] * 65, "65 dimensions"),
])
def test_checked_shape(dims: object, why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        checked_shape(dims, "tensor 'x'", "float32")


def test_checked_shape_takes_numpy_integers() -> None:
    import numpy as np

    assert checked_shape([np.int64(3), 0, 2], "x") == (3, 0, 2)
    assert checked_shape((1 << 59, 0), "x", "float64") == (1 << 59, 0)
