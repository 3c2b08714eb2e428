"""GGUF: read without the gguf package, checked against files the gguf package writes and
against its own reader (GGUFReader)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import IntegrityError
from ckptkit.formats import gguf as reader
from ckptkit.model import packed_types
from tests.conftest import SRC, run_main

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

SAMPLE = SRC / "ckptkit" / "samples" / "tiny_llama.gguf"


def write(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]], *,
          template: str | None = None, big: bool = False) -> Path:
    endian = gguf.GGUFEndian.BIG if big else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_name("test")
    if template is not None:
        writer.add_chat_template(template)
    for name, (array, qtype) in tensors.items():
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sample_matches_gguf_reader() -> None:
    theirs = gguf.GGUFReader(str(SAMPLE))
    header = reader.read_header(SAMPLE)
    assert header.architecture == "llama"
    assert header.data_offset == theirs.data_offset
    assert [t.name for t in header.tensors] == [t.name for t in theirs.tensors]
    for ours, ref in zip(header.tensors, theirs.tensors, strict=True):
        assert ours.type.id == int(ref.tensor_type)
        assert ours.dims == tuple(int(d) for d in ref.shape)
        assert ours.numel == int(ref.n_elements)
        assert ours.nbytes == int(ref.n_bytes)
        assert header.data_offset + ours.offset == int(ref.data_offset)
    assert header.metadata["tokenizer.chat_template"].startswith("{% for message in")
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 32
    assert reader.verify(SAMPLE) == []


def test_inspect_counts_elements_not_packed_bytes() -> None:
    info = ckptkit.inspect(SAMPLE)
    by_name = {t.name: t for t in info.tensors}
    q8, q4 = by_name["blk.0.attn_q.weight"], by_name["blk.0.attn_k.weight"]
    assert (q8.dtype, q8.shape, q8.nbytes) == ("q8_0", (64, 64), 64 * 64 // 32 * 34)
    assert (q4.dtype, q4.shape, q4.nbytes) == ("q4_0", (64, 64), 64 * 64 // 32 * 18)
    assert info.param_count == 32 * 64 + 64 + 64 * 64 * 2 + 64
    assert info.kind == "model"
    assert info.details["tensor_types"] == {"F16": 1, "F32": 2, "Q8_0": 1, "Q4_0": 1}


@pytest.mark.parametrize("qtype", [t for t in Q if GGML_QUANT_SIZES[t][0] > 1],
                         ids=lambda t: t.name)
def test_every_quantized_type(qtype: Q, tmp_path: Path) -> None:
    """Counts and bytes of each packed type, against GGUFReader on the same file."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows, blocks = 3, 2
    packed = np.random.default_rng(0).integers(0, 255, (rows, blocks * size), dtype=np.uint8)
    path = write(tmp_path / "q.gguf", {"w": (packed, qtype)})
    [ref] = gguf.GGUFReader(str(path)).tensors
    [(name, ours)] = reader.read_info(path).tensors
    assert ours.dtype in packed_types() and ours.dtype == qtype.name.lower()
    assert ours.shape == (rows, blocks * block) == tuple(reversed([int(d) for d in ref.shape]))
    assert ours.numel == int(ref.n_elements) and ours.nbytes == int(ref.n_bytes)


def test_q8_0_dequantized_as_gguf_does(tmp_path: Path) -> None:
    values = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    path = write(tmp_path / "q8.gguf", {"q": (gguf.quants.quantize(values, Q.Q8_0), Q.Q8_0),
                                         "f": (values, None)})
    theirs = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    loaded = ckptkit.load(path, framework="numpy")
    expected = gguf.quants.dequantize(theirs["q"].data, Q.Q8_0)
    assert loaded["q"].dtype == np.float32 and np.array_equal(loaded["q"], expected)
    assert np.array_equal(loaded["f"], values)


def test_convert_to_safetensors_q8_0_and_plain(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file

    values = np.random.default_rng(2).standard_normal((2, 32)).astype(np.float32)
    path = write(tmp_path / "m.gguf", {"q": (gguf.quants.quantize(values, Q.Q8_0), Q.Q8_0),
                                        "h": (values.astype(np.float16), None)})
    out = tmp_path / "m.safetensors"
    code, _out, err = run_main(capsys, "convert", str(path), "--to", "safetensors", "-o",
                               str(out), "--quiet")
    assert code == 0, err
    written = load_file(out)
    assert np.array_equal(written["q"], gguf.quants.dequantize(
        gguf.quants.quantize(values, Q.Q8_0), Q.Q8_0))
    assert written["h"].dtype == np.float16 and np.array_equal(written["h"], values.astype(np.float16))


def test_convert_refuses_q4_0_before_writing(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llama.safetensors"
    code, _out, err = run_main(capsys, "convert", str(SAMPLE), "--to", "safetensors", "-o",
                               str(out))
    assert code == 1
    assert "'blk.0.attn_k.weight' is quantized as Q4_0" in err and str(SAMPLE) in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_chat_template_escaped_in_text_and_whole_in_json(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    template = "{{ bos }}\x1b]0;owned\x07\n{% for m in messages %}{{ m }}{% endfor %}\u202e"
    path = write(tmp_path / "t.gguf", {"w": (np.zeros(4, np.float32), None)},
                 template=template)
    code, out, _err = run_main(capsys, "inspect", str(path))
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b]0;owned\\x07" in out and "Chat template" in out
    code, out, _err = run_main(capsys, "inspect", "--json", str(path))
    assert json.loads(out)["details"]["metadata"]["tokenizer.chat_template"] == template


def test_big_endian_file(tmp_path: Path) -> None:
    values = np.arange(8, dtype=np.float32)
    path = write(tmp_path / "be.gguf", {"w": (values, None)}, big=True)
    raw = reader.read_info(path)
    assert raw.details["byteorder"] == "big" and raw.details["architecture"] == "llama"
    assert np.array_equal(ckptkit.load(path, framework="numpy")["w"], values)


def _offset_field(path: Path, name: str) -> int:
    """Byte position of tensor ``name``'s data offset in the header (found by its name)."""
    data = path.read_bytes()
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at + 4 + 8 * n_dims + 4


def test_verify_reports_truncation_misalignment_and_overlap(tmp_path: Path) -> None:
    path = write(tmp_path / "v.gguf", {"a": (np.ones(64, np.float32), None),
                                        "b": (np.ones(64, np.float32), None)})
    assert reader.verify(path) == [] and reader.verify(path, hashes=True) == []
    broken = tmp_path / "broken.gguf"
    data = bytearray(path.read_bytes())
    at = _offset_field(path, "b")
    struct.pack_into("<Q", data, at, 4)  # inside "a", off the 32-byte alignment
    broken.write_bytes(bytes(data[:-300]))
    kinds = {p.kind for p in reader.verify(broken)}
    assert kinds == {"misaligned", "overlap", "truncated"}
    with pytest.raises(IntegrityError, match="more problems"):
        ckptkit.inspect(broken)


def test_verify_names_an_unreadable_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1 << 40))
    [problem] = reader.verify(path)
    assert problem.kind == "corrupt" and str(path) in problem.message


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:1000], "needs"),
    (lambda d: d[:4] + struct.pack("<I", 9) + d[8:], "version 9"),
    (lambda d: d[:8] + struct.pack("<Q", 1 << 60) + d[16:], "more than"),
])
def test_damaged_headers_are_one_line_exit_3(damage, message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "damaged.gguf"
    path.write_bytes(damage(SAMPLE.read_bytes()))
    code, _out, err = run_main(capsys, "inspect", str(path))
    assert code == 3 and message in err and len(err.strip().splitlines()) == 1


def test_unknown_ggml_type_is_named(tmp_path: Path) -> None:
    data = bytearray(SAMPLE.read_bytes())
    at = _offset_field(SAMPLE, "output_norm.weight") - 4
    struct.pack_into("<I", data, at, 5)  # Q4_2: removed from ggml long ago
    path = tmp_path / "old.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="ggml type 5"):
        ckptkit.inspect(path)


def test_diff_compares_packed_tensors_by_bytes(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(SAMPLE.read_bytes())
    header = reader.read_header(SAMPLE)
    q4 = next(t for t in header.tensors if t.name == "blk.0.attn_k.weight")
    data[header.data_offset + q4.offset + 5] ^= 0xFF
    other = tmp_path / "other.gguf"
    other.write_bytes(bytes(data))
    code, out, err = run_main(capsys, "diff", "--json", str(SAMPLE), str(other))
    assert code in (0, 1), err
    rows = {t["name"]: t for t in json.loads(out)["tensors"]}
    assert rows["blk.0.attn_k.weight"]["status"] == "changed"
    assert rows["blk.0.attn_q.weight"]["status"] == "unchanged"
    assert math.isnan(float(rows["blk.0.attn_k.weight"]["max_abs"] or "nan"))
