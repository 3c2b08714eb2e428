"""The pure-Python zstd decoder against frames TensorStore (libzstd) writes: every block and
literal kind its levels produce, decoded byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ckptkit.formats.zstd import ZstdError, decompress, frames_end

ts = pytest.importorskip("tensorstore")

_RNG = np.random.default_rng(0)
CASES = {
    "text": np.frombuffer(b"".join(b"layer %d weight block " % i for i in range(4000)),
                          np.uint8),
    "random": _RNG.integers(0, 256, 200_000, dtype=np.uint8),
    "few-symbols": _RNG.integers(0, 4, 300_000, dtype=np.uint8),
    "float32": _RNG.standard_normal(60_000).astype(np.float32).view(np.uint8),
    "counting": np.arange(100_000, dtype=np.int32).view(np.uint8),
    "zeros": np.zeros(70_000, np.uint8),
    "tiny": np.array([7, 1, 7], np.uint8),
    "skewed": _RNG.geometric(0.3, 200_000).clip(0, 255).astype(np.uint8),
}


def _compressed(directory: Path, data: np.ndarray, level: int) -> bytes:
    """``data`` compressed by libzstd through TensorStore: a one-chunk zarr array's chunk."""
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(directory)},
                     "metadata": {"compressor": {"id": "zstd", "level": level}, "dtype": "|u1",
                                  "shape": [data.size], "chunks": [data.size]}},
                    create=True).result()
    store.write(data).result()
    return (directory / "0").read_bytes()


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], bytes]:
    root = tmp_path_factory.mktemp("zstd")
    return {(name, level): _compressed(root / f"{name}_{level}", data, level)
            for name, data in CASES.items() for level in (-5, 1, 3, 19)}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("level", (-5, 1, 3, 19))
def test_decodes_what_libzstd_wrote(frames: dict, name: str, level: int) -> None:
    raw = frames[(name, level)]
    assert decompress(raw, 1 << 24) == CASES[name].tobytes()
    assert frames_end(lambda offset, length: raw[offset:offset + length], len(raw)) == len(raw)


def test_truncated_frames_are_errors(frames: dict) -> None:
    raw = frames[("text", 3)]
    for cut in (3, 10, len(raw) // 2, len(raw) - 1):
        short = raw[:cut]
        with pytest.raises(ZstdError):
            decompress(short, 1 << 24)
        with pytest.raises(ZstdError):
            frames_end(lambda offset, length, s=short: s[offset:offset + length], len(short))


def test_output_is_capped(frames: dict) -> None:
    with pytest.raises(ZstdError, match="more than 1,000 bytes"):
        decompress(frames[("zeros", 1)], 1000)


def test_garbage_is_an_error_not_a_crash() -> None:
    rng = np.random.default_rng(1)
    header = bytes.fromhex("28b52ffd")
    for _ in range(300):
        blob = header + rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        try:
            decompress(blob, 1 << 16)
        except ZstdError:
            pass
