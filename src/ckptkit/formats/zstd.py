"""A Zstandard decoder (RFC 8878) in pure Python, for the small compressed records of OCDBT.

Orbax's OCDBT databases compress their manifest, version-tree and B+tree nodes with zstd.
Reading a checkpoint's structure must work without TensorStore (and Python 3.11 has no zstd
module), so the node records are decoded here.  They are small (a few KiB; at most the
database's ``max_decoded_node_bytes``), so speed matters less than being exact and bounded:
every length is checked against the input, and the output is capped by ``limit``.

Tensor data is never decoded here: TensorStore reads it.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptkit.formats.zstd_entropy import (Backward, ZstdError, bad, decode_huffman, fse_table,
                                          huffman_table, read_ncount)

__all__ = ["ZstdError", "decompress", "frames_end"]

_MAGIC = 0xFD2FB528
_MAX_BLOCK = 128 << 10

# Literal-length and match-length codes: (baseline, extra bits), RFC 8878 3.1.1.3.2.1.1.
_LL = [(i, 0) for i in range(16)] + [
    (16, 1), (18, 1), (20, 1), (22, 1), (24, 2), (28, 2), (32, 3), (40, 3), (48, 4), (64, 6),
    (128, 7), (256, 8), (512, 9), (1024, 10), (2048, 11), (4096, 12), (8192, 13), (16384, 14),
    (32768, 15), (65536, 16)]
_ML = [(i + 3, 0) for i in range(32)] + [
    (35, 1), (37, 1), (39, 1), (41, 1), (43, 2), (47, 2), (51, 3), (59, 3), (67, 4), (83, 4),
    (99, 5), (131, 7), (259, 8), (515, 9), (1027, 10), (2051, 11), (4099, 12), (8195, 13),
    (16387, 14), (32771, 15), (65539, 16)]
# The predefined distributions (accuracy log, normalised counts), RFC 8878 3.1.1.3.2.2.
_LL_DEFAULT = (6, [4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                   2, 1, 1, 1, 1, 1, -1, -1, -1, -1])
_ML_DEFAULT = (6, [1, 4, 3, 2, 2, 2, 2, 2, 2] + [1] * 37 + [-1] * 7)
_OF_DEFAULT = (5, [1, 1, 1, 1, 1, 1, 2, 2, 2] + [1] * 15 + [-1] * 5)


class _Frame:
    """Decoding state shared by the blocks of one frame."""

    def __init__(self) -> None:
        self.huffman: tuple[list[tuple[int, int]], int] | None = None
        self.tables: list[list[tuple[int, int, int]] | None] = [None, None, None]
        self.reps = [1, 4, 8]

    def literals(self, data: memoryview) -> tuple[bytes | bytearray, int]:
        kind, form = data[0] & 3, (data[0] >> 2) & 3
        if kind in (0, 1):
            if form in (0, 2):
                size, pos = data[0] >> 3, 1
            elif form == 1:
                size, pos = (data[0] >> 4) + (data[1] << 4), 2
            else:
                size, pos = (data[0] >> 4) + (data[1] << 4) + (data[2] << 12), 3
            if kind == 1:
                if pos >= len(data):
                    raise bad("RLE literals without their byte")
                return bytes([data[pos]]) * size, pos + 1
            if pos + size > len(data):
                raise bad("raw literals run past the block")
            return bytes(data[pos:pos + size]), pos + size
        width = {0: 3, 1: 3, 2: 4, 3: 5}[form]
        head = int.from_bytes(data[:width], "little")
        field = {3: 10, 4: 14, 5: 18}[width]
        size = (head >> 4) & ((1 << field) - 1)
        packed = (head >> (4 + field)) & ((1 << field) - 1)
        end = width + packed
        if end > len(data) or size > _MAX_BLOCK:
            raise bad("compressed literals run past the block")
        pos = width
        if kind == 2:
            table, max_bits, pos = huffman_table(data[:end], pos)
            self.huffman = (table, max_bits)
        elif self.huffman is None:
            raise bad("literals reuse a Huffman table that was never given")
        table, max_bits = self.huffman
        out = bytearray()
        if form == 0:
            decode_huffman(data[pos:end], size, table, max_bits, out)
        else:
            if pos + 6 > end:
                raise bad("missing jump table")
            s1, s2, s3 = (int.from_bytes(data[pos + i:pos + i + 2], "little") for i in (0, 2, 4))
            pos += 6
            bounds = [pos, pos + s1, pos + s1 + s2, pos + s1 + s2 + s3, end]
            if bounds[3] > end:
                raise bad("jump table points past the literals")
            quarter = (size + 3) // 4
            for i in range(4):
                n = quarter if i < 3 else size - 3 * quarter
                decode_huffman(data[bounds[i]:bounds[i + 1]], n, table, max_bits, out)
        return out, end

    def table(self, which: int, mode: int, data: memoryview, pos: int,
              default: tuple[int, list[int]], max_log: int,
              max_symbol: int) -> int:
        if mode == 0:
            self.tables[which] = fse_table(*default)
        elif mode == 1:
            if pos >= len(data):
                raise bad("RLE sequence table without its symbol")
            self.tables[which] = [(data[pos], 0, 0)]
            pos += 1
        elif mode == 2:
            log, counts, used = read_ncount(data, pos, max_log, max_symbol)
            self.tables[which] = fse_table(log, counts)
            pos += used
        elif self.tables[which] is None:
            raise bad("sequences repeat a table that was never given")
        return pos

    def block(self, data: memoryview, out: bytearray) -> None:
        literals, pos = self.literals(data)
        if pos >= len(data):
            raise bad("block without its sequences section")
        head = data[pos]
        if head == 0:
            count, pos = 0, pos + 1
        elif head < 128:
            count, pos = head, pos + 1
        elif head < 255:
            count, pos = ((head - 128) << 8) + data[pos + 1], pos + 2
        else:
            count, pos = data[pos + 1] + (data[pos + 2] << 8) + 0x7F00, pos + 3
        if count == 0:
            out += literals
            return
        modes = data[pos]
        pos += 1
        pos = self.table(0, modes >> 6, data, pos, _LL_DEFAULT, 9, 35)
        pos = self.table(1, (modes >> 4) & 3, data, pos, _OF_DEFAULT, 8, 31)
        pos = self.table(2, (modes >> 2) & 3, data, pos, _ML_DEFAULT, 9, 52)
        self.sequences(data[pos:], count, literals, out)

    def sequences(self, stream: memoryview, count: int, literals: bytes | bytearray,
                  out: bytearray) -> None:
        ll_table, of_table, ml_table = self.tables
        assert ll_table and of_table and ml_table
        bits = Backward(stream)
        ll = bits.read((len(ll_table) - 1).bit_length())
        of = bits.read((len(of_table) - 1).bit_length())
        ml = bits.read((len(ml_table) - 1).bit_length())
        reps = self.reps
        lit = 0
        for i in range(count):
            of_code, ml_code, ll_code = of_table[of][0], ml_table[ml][0], ll_table[ll][0]
            if of_code > 31 or ml_code >= len(_ML) or ll_code >= len(_LL):
                raise bad("sequence code out of range")
            offset_value = (1 << of_code) + bits.read(of_code)
            base, extra = _ML[ml_code]
            match = base + bits.read(extra)
            base, extra = _LL[ll_code]
            length = base + bits.read(extra)
            if offset_value > 3:
                offset = offset_value - 3
                reps[:] = [offset, reps[0], reps[1]]
            else:
                index = offset_value - (1 if length else 0)
                if index == 0:
                    offset = reps[0]
                elif index == 1:
                    offset = reps[1]
                    reps[:] = [offset, reps[0], reps[2]]
                else:
                    offset = reps[2] if index == 2 else reps[0] - 1
                    reps[:] = [offset, reps[0], reps[1]]
            if lit + length > len(literals):
                raise bad("sequence uses more literals than the block has")
            out += literals[lit:lit + length]
            lit += length
            if offset < 1 or offset > len(out):
                raise bad(f"match offset {offset} reaches before the start of the data")
            start = len(out) - offset
            if offset >= match:
                out += out[start:start + match]
            else:  # an overlapping match repeats the last `offset` bytes
                pattern = out[start:]
                out += (pattern * (match // offset + 1))[:match]
            if i + 1 < count:
                ll = ll_table[ll][2] + bits.read(ll_table[ll][1])
                ml = ml_table[ml][2] + bits.read(ml_table[ml][1])
                of = of_table[of][2] + bits.read(of_table[of][1])
        if bits.pos != 0:
            raise bad("sequence stream does not end where its sequences do")
        out += literals[lit:]


def decompress(data: bytes | memoryview, limit: int) -> bytes:
    """The bytes of the zstd frames in ``data`` (skippable frames skipped).

    Raises:
        ZstdError: malformed or truncated data, or more than ``limit`` bytes of output.
    """
    view = memoryview(bytes(data))
    pos = 0
    result = bytearray()
    while pos < len(view):
        if pos + 4 > len(view):
            raise bad("truncated frame header")
        magic = int.from_bytes(view[pos:pos + 4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
            size = int.from_bytes(view[pos + 4:pos + 8], "little")
            pos += 8 + size
            continue
        if magic != _MAGIC:
            raise bad(f"bad frame magic {magic:#010x}")
        pos = _frame(view, pos + 4, result, limit)
    return bytes(result)


def _frame(view: memoryview, pos: int, result: bytearray, limit: int) -> int:
    if pos >= len(view):
        raise bad("truncated frame header")
    descriptor = view[pos]
    pos += 1
    single = descriptor >> 5 & 1
    if descriptor & 0x08:
        raise bad("reserved bit set in frame header")
    if not single:
        pos += 1  # window descriptor: the whole output is kept, so any window works
    dict_size = (0, 1, 2, 4)[descriptor & 3]
    if dict_size and int.from_bytes(view[pos:pos + dict_size], "little"):
        raise bad("frame needs a dictionary")
    pos += dict_size
    fcs_size = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
    pos += fcs_size
    out = bytearray()
    frame = _Frame()
    while True:
        if pos + 3 > len(view):
            raise bad("truncated block header")
        header = int.from_bytes(view[pos:pos + 3], "little")
        pos += 3
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 1:
            if pos >= len(view):
                raise bad("truncated RLE block")
            out += bytes([view[pos]]) * size
            pos += 1
        else:
            if size > _MAX_BLOCK or pos + size > len(view):
                raise bad("block runs past the end of the data")
            if kind == 0:
                out += view[pos:pos + size]
            elif kind == 2:
                frame.block(view[pos:pos + size], out)
            else:
                raise bad("reserved block type")
            pos += size
        if len(result) + len(out) > limit:
            raise ZstdError(f"zstd data decodes to more than {limit:,} bytes",
                            hint="The file is corrupt or crafted")
        if last:
            break
    if descriptor & 0x04:
        pos += 4  # content checksum (XXH64); OCDBT records carry their own CRC-32C
    result += out
    return pos


def frames_end(read: Callable[[int, int], bytes], size: int) -> int:
    """Where the zstd frames of a ``size``-byte file end, from frame and block headers only
    (``read(offset, length)`` reads the file): equal to ``size`` for a whole file.

    Raises:
        ZstdError: a header is malformed, or a block runs past ``size`` (truncated).
    """
    pos = 0
    while pos < size:
        head = read(pos, 14)
        if len(head) < 5:
            raise bad(f"frame header cut off at byte {pos:,}")
        magic = int.from_bytes(head[:4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        if magic != _MAGIC:
            raise bad(f"bad frame magic {magic:#010x} at byte {pos:,}")
        descriptor = head[4]
        single = descriptor >> 5 & 1
        pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + \
            (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        while True:
            block = read(pos, 3)
            if len(block) < 3:
                raise bad(f"block header cut off at byte {pos:,} of {size:,}")
            header = int.from_bytes(block, "little")
            pos += 3 + (1 if (header >> 1) & 3 == 1 else header >> 3)
            if pos > size:
                raise bad(f"a block ends at byte {pos:,} but the data has {size:,} "
                           "(truncated)")
            if header & 1:
                break
        if descriptor & 0x04:
            pos += 4
    if pos != size:
        raise bad(f"the last frame ends at byte {pos:,} but the data has {size:,} (truncated)")
    return pos
