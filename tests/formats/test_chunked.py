"""ckptkit.formats.chunked: global tensors gathered from chunks stored in real files."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptkit.errors import IntegrityError
from ckptkit.formats import chunked, safetensors
from ckptkit.formats.chunked import ChunkedTensor, Piece, assemble, check_tiling


def blocks(array: np.ndarray, cuts: list[list[int]]) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Split ``array`` at ``cuts`` (per dimension) into boxes: ``(offsets, block)``."""
    edges = [[0, *c, n] for c, n in zip(cuts, array.shape)]
    out: list[tuple[tuple[int, ...], np.ndarray]] = [((), array)]
    for dim, edge in enumerate(edges):
        out = [(off + (a,), block[(slice(None),) * dim + (slice(a, b),)])
               for off, block in out for a, b in zip(edge, edge[1:])]
    return out


def stored(tmp_path: Path, name: str, array: np.ndarray,
           cuts: list[list[int]]) -> ChunkedTensor:
    """Write each box of ``array`` as its own tensor of a safetensors file (as a tensor-parallel
    save would), and describe the global tensor by the byte ranges safetensors recorded."""
    pieces = blocks(array, cuts)
    path = tmp_path / f"{name}.safetensors"
    save_file({f"part{i}": np.ascontiguousarray(b) for i, (_o, b) in enumerate(pieces)}, path)
    refs = {"".join(where): ref for where, ref in safetensors.read_info(path).tensors}
    chunks = tuple(Piece(off, tuple(b.shape), span=refs[f"part{i}"].span, file=path.name)
                   for i, (off, b) in enumerate(pieces))
    return ChunkedTensor(name, array.dtype.name, tuple(array.shape), chunks)


@pytest.mark.parametrize("cuts", [[[3], []], [[], [5]], [[2, 5], [1, 4]], [[], []]])
def test_chunks_from_byte_ranges_gather_bit_for_bit(tmp_path: Path, cuts) -> None:
    array = np.random.default_rng(0).standard_normal((7, 6)).astype(ml_dtypes.bfloat16)
    got = assemble(stored(tmp_path, "w", array, cuts))
    assert got.dtype == array.dtype and got.tobytes() == array.tobytes()


def test_rows_longer_than_the_read_buffer_are_placed_one_by_one(tmp_path: Path,
                                                                 monkeypatch) -> None:
    # A chunk split on dimension 1 is not contiguous in the global tensor: it is read in pieces
    # of at most CHUNK bytes; with rows longer than that, row by row, then within a row.
    monkeypatch.setattr(chunked, "CHUNK", 16)
    array = np.arange(4 * 3 * 10, dtype=np.float32).reshape(4, 3, 10)
    got = assemble(stored(tmp_path, "w", array, [[1], [2], [4]]))
    assert np.array_equal(got, array)


def test_float8_and_zero_dimensional_tensors(tmp_path: Path) -> None:
    array = np.linspace(-2, 2, 12).astype(ml_dtypes.float8_e4m3fn).reshape(3, 4)
    assert assemble(stored(tmp_path, "f8", array, [[1], [2]])).tobytes() == array.tobytes()
    scalar = np.array(7, np.int64)
    assert assemble(stored(tmp_path, "s", scalar, [])) == 7


def test_decoded_chunks_and_a_whole_tensor() -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    parts = tuple(Piece((0, c), (3, 2), read=lambda c=c: array[:, c:c + 2].copy())
                  for c in (0, 2))
    assert np.array_equal(assemble(ChunkedTensor("x", "int32", (3, 4), parts)), array)
    one = chunked.whole("x", "int32", (3, 4), lambda: array)
    assert assemble(one) is array  # already whole: not copied again


def test_a_chunk_decoded_with_another_shape_is_refused() -> None:
    bad = chunked.whole("x", "int32", (3, 4), lambda: np.zeros((4, 3), np.int32))
    with pytest.raises(IntegrityError, match="x: a chunk read as int32\\[4, 3\\]"):
        assemble(bad)


@pytest.mark.parametrize("chunks, why", [
    ([Piece((0,), (6,)), Piece((6,), (4,))], "outside"),
    ([Piece((0,), (4,)), Piece((2,), (4,))], "overlapping"),
    ([Piece((0,), (4,)), Piece((5,), (3,))], "7 of 8 elements"),
    ([Piece((0,), (4,)), Piece((4,), (3,)), Piece((3,), (1,))], "overlapping"),
    ([Piece((0, 0), (8, 1))], "outside"),
])
def test_chunks_that_do_not_tile_the_tensor_are_refused(chunks, why) -> None:
    tensor = ChunkedTensor("layer.weight", "float32", (8,), tuple(chunks))
    with pytest.raises(IntegrityError, match=why) as exc:
        check_tiling(tensor)
    assert "layer.weight" in exc.value.message


def test_a_truncated_file_names_the_file(tmp_path: Path) -> None:
    array = np.arange(64, dtype=np.float32).reshape(8, 8)
    tensor = stored(tmp_path, "w", array, [[4], []])
    path = tmp_path / "w.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(IntegrityError, match="w.safetensors: file ends") as exc:
        assemble(tensor)
    assert "truncated" in exc.value.message
