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

from ckptkit.errors import IntegrityError

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


class ZstdError(IntegrityError):
    """The zstd data is malformed or truncated."""


def _bad(why: str) -> ZstdError:
    return ZstdError(f"malformed zstd data: {why}", hint="The file is truncated or corrupt")


class _Backward:
    """A bitstream read from its end towards its start (FSE and Huffman streams)."""

    def __init__(self, data: bytes | memoryview):
        if not data or data[-1] == 0:
            raise _bad("bitstream without its end marker")
        self.data = bytes(data)
        self.pos = (len(data) - 1) * 8 + data[-1].bit_length() - 1  # bits left to read

    def peek(self, n: int) -> int:
        pos = self.pos - n
        if n == 0:
            return 0
        if pos >= 0:
            chunk = int.from_bytes(self.data[pos >> 3:((pos + n - 1) >> 3) + 1], "little")
            return (chunk >> (pos & 7)) & ((1 << n) - 1)
        have = self.pos  # fewer bits than asked: the missing low bits read as zeros
        if have <= 0:
            return 0
        low = int.from_bytes(self.data[:((have - 1) >> 3) + 1], "little") & ((1 << have) - 1)
        return low << (n - have)

    def read(self, n: int) -> int:
        value = self.peek(n)
        self.pos -= n
        return value


def _read_ncount(data: bytes | memoryview, start: int, max_log: int,
                 max_symbol: int) -> tuple[int, list[int], int]:
    """An FSE table description at ``data[start:]``: (accuracy log, counts, bytes used)."""
    end = len(data)
    bit = start * 8

    def bits(n: int) -> int:
        byte = bit >> 3
        chunk = int.from_bytes(data[byte:min(end, byte + 5)], "little")
        return (chunk >> (bit & 7)) & ((1 << n) - 1)

    log = bits(4) + 5
    bit += 4
    if log > max_log:
        raise _bad(f"FSE accuracy log {log} above {max_log}")
    remaining = (1 << log) + 1
    threshold = 1 << log
    nbits = log + 1
    counts: list[int] = []
    previous_zero = False
    while remaining > 1 and len(counts) <= max_symbol:
        if previous_zero:
            skip = 0
            while True:
                rep = bits(2)
                bit += 2
                skip += rep
                if rep != 3:
                    break
            counts.extend([0] * skip)
            if len(counts) > max_symbol:
                break
        top = 2 * threshold - 1 - remaining
        small = bits(nbits - 1)
        if small < top:
            value = small
            bit += nbits - 1
        else:
            value = bits(nbits)
            if value >= threshold:
                value -= top
            bit += nbits
        count = value - 1
        remaining -= abs(count)
        counts.append(count)
        previous_zero = count == 0
        while remaining < threshold:
            nbits -= 1
            threshold >>= 1
        if bit > end * 8:
            raise _bad("FSE table description runs past its data")
    if remaining != 1 or len(counts) > max_symbol + 1:
        raise _bad("FSE table description does not add up")
    return log, counts, (bit + 7) // 8 - start


def _fse_table(log: int, counts: list[int]) -> list[tuple[int, int, int]]:
    """The decoding table of (symbol, bits to read, baseline) per state."""
    size = 1 << log
    symbols = [0] * size
    high = size - 1
    following = [0] * len(counts)
    for symbol, count in enumerate(counts):
        if count == -1:
            symbols[high] = symbol
            high -= 1
            following[symbol] = 1
        else:
            following[symbol] = count
    step = (size >> 1) + (size >> 3) + 3
    position = 0
    for symbol, count in enumerate(counts):
        for _ in range(max(count, 0)):
            symbols[position] = symbol
            position = (position + step) & (size - 1)
            while position > high:
                position = (position + step) & (size - 1)
    if position != 0:
        raise _bad("FSE distribution does not fill its table")
    table = []
    for state in range(size):
        symbol = symbols[state]
        nxt = following[symbol]
        following[symbol] += 1
        nbits = log - (nxt.bit_length() - 1)
        table.append((symbol, nbits, (nxt << nbits) - size))
    return table


_LL_TABLE = _fse_table(*_LL_DEFAULT)
_ML_TABLE = _fse_table(*_ML_DEFAULT)
_OF_TABLE = _fse_table(*_OF_DEFAULT)


def _huffman(data: memoryview, pos: int) -> tuple[list[tuple[int, int]], int, int]:
    """A Huffman tree description: (table indexed by max_bits peeked bits, max_bits, end)."""
    if pos >= len(data):
        raise _bad("missing Huffman tree description")
    head = data[pos]
    pos += 1
    if head < 128:
        if pos + head > len(data):
            raise _bad("Huffman weights run past the block")
        log, counts, used = _read_ncount(data[pos:pos + head], 0, 6, 255)
        table = _fse_table(log, counts)
        stream = _Backward(data[pos + used:pos + head])
        s1, s2 = stream.read(log), stream.read(log)
        weights: list[int] = []
        while len(weights) < 255:
            weights.append(table[s1][0])
            s1 = table[s1][2] + stream.read(table[s1][1])
            if stream.pos < 0:
                weights.append(table[s2][0])
                break
            weights.append(table[s2][0])
            s2 = table[s2][2] + stream.read(table[s2][1])
            if stream.pos < 0:
                weights.append(table[s1][0])
                break
        pos += head
    else:
        count = head - 127
        raw = data[pos:pos + (count + 1) // 2]
        if len(raw) < (count + 1) // 2:
            raise _bad("Huffman weights run past the block")
        weights = [w for b in raw for w in (b >> 4, b & 15)][:count]
        pos += (count + 1) // 2
    total = sum(1 << (w - 1) for w in weights if w)
    if not total:
        raise _bad("Huffman tree without symbols")
    max_bits = total.bit_length()  # the implied last weight fills up to the next power of 2
    rest = (1 << max_bits) - total
    if rest & (rest - 1) or max_bits > 11:
        raise _bad("Huffman weights do not form a tree")
    weights.append(rest.bit_length())
    table: list[tuple[int, int]] = []
    for weight in range(1, max_bits + 1):
        for symbol, w in enumerate(weights):
            if w == weight:
                table.extend([(symbol, max_bits + 1 - w)] * (1 << (w - 1)))
    return table, max_bits, pos


def _decode_huffman(stream: memoryview, count: int, table: list[tuple[int, int]],
                    max_bits: int, out: bytearray) -> None:
    bits = _Backward(stream)
    for _ in range(count):
        symbol, nbits = table[bits.peek(max_bits)]
        out.append(symbol)
        bits.pos -= nbits
    if bits.pos != 0:
        raise _bad("Huffman stream does not end where its literals do")


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
                    raise _bad("RLE literals without their byte")
                return bytes([data[pos]]) * size, pos + 1
            if pos + size > len(data):
                raise _bad("raw literals run past the block")
            return bytes(data[pos:pos + size]), pos + size
        width = {0: 3, 1: 3, 2: 4, 3: 5}[form]
        head = int.from_bytes(data[:width], "little")
        field = {3: 10, 4: 14, 5: 18}[width]
        size = (head >> 4) & ((1 << field) - 1)
        packed = (head >> (4 + field)) & ((1 << field) - 1)
        end = width + packed
        if end > len(data) or size > _MAX_BLOCK:
            raise _bad("compressed literals run past the block")
        pos = width
        if kind == 2:
            table, max_bits, pos = _huffman(data[:end], pos)
            self.huffman = (table, max_bits)
        elif self.huffman is None:
            raise _bad("literals reuse a Huffman table that was never given")
        table, max_bits = self.huffman
        out = bytearray()
        if form == 0:
            _decode_huffman(data[pos:end], size, table, max_bits, out)
        else:
            if pos + 6 > end:
                raise _bad("missing jump table")
            s1, s2, s3 = (int.from_bytes(data[pos + i:pos + i + 2], "little") for i in (0, 2, 4))
            pos += 6
            bounds = [pos, pos + s1, pos + s1 + s2, pos + s1 + s2 + s3, end]
            if bounds[3] > end:
                raise _bad("jump table points past the literals")
            quarter = (size + 3) // 4
            for i in range(4):
                n = quarter if i < 3 else size - 3 * quarter
                _decode_huffman(data[bounds[i]:bounds[i + 1]], n, table, max_bits, out)
        return out, end

    def table(self, which: int, mode: int, data: memoryview, pos: int,
              default: tuple[int, list[int]], max_log: int,
              max_symbol: int) -> int:
        if mode == 0:
            self.tables[which] = _fse_table(*default)
        elif mode == 1:
            if pos >= len(data):
                raise _bad("RLE sequence table without its symbol")
            self.tables[which] = [(data[pos], 0, 0)]
            pos += 1
        elif mode == 2:
            log, counts, used = _read_ncount(data, pos, max_log, max_symbol)
            self.tables[which] = _fse_table(log, counts)
            pos += used
        elif self.tables[which] is None:
            raise _bad("sequences repeat a table that was never given")
        return pos

    def block(self, data: memoryview, out: bytearray) -> None:
        literals, pos = self.literals(data)
        if pos >= len(data):
            raise _bad("block without its sequences section")
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
        bits = _Backward(stream)
        ll = bits.read((len(ll_table) - 1).bit_length())
        of = bits.read((len(of_table) - 1).bit_length())
        ml = bits.read((len(ml_table) - 1).bit_length())
        reps = self.reps
        lit = 0
        for i in range(count):
            of_code, ml_code, ll_code = of_table[of][0], ml_table[ml][0], ll_table[ll][0]
            if of_code > 31 or ml_code >= len(_ML) or ll_code >= len(_LL):
                raise _bad("sequence code out of range")
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
                raise _bad("sequence uses more literals than the block has")
            out += literals[lit:lit + length]
            lit += length
            if offset < 1 or offset > len(out):
                raise _bad(f"match offset {offset} reaches before the start of the data")
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
            raise _bad("sequence stream does not end where its sequences do")
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
            raise _bad("truncated frame header")
        magic = int.from_bytes(view[pos:pos + 4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
            size = int.from_bytes(view[pos + 4:pos + 8], "little")
            pos += 8 + size
            continue
        if magic != _MAGIC:
            raise _bad(f"bad frame magic {magic:#010x}")
        pos = _frame(view, pos + 4, result, limit)
    return bytes(result)


def _frame(view: memoryview, pos: int, result: bytearray, limit: int) -> int:
    if pos >= len(view):
        raise _bad("truncated frame header")
    descriptor = view[pos]
    pos += 1
    single = descriptor >> 5 & 1
    if descriptor & 0x08:
        raise _bad("reserved bit set in frame header")
    if not single:
        pos += 1  # window descriptor: the whole output is kept, so any window works
    dict_size = (0, 1, 2, 4)[descriptor & 3]
    if dict_size and int.from_bytes(view[pos:pos + dict_size], "little"):
        raise _bad("frame needs a dictionary")
    pos += dict_size
    fcs_size = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
    pos += fcs_size
    out = bytearray()
    frame = _Frame()
    while True:
        if pos + 3 > len(view):
            raise _bad("truncated block header")
        header = int.from_bytes(view[pos:pos + 3], "little")
        pos += 3
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 1:
            if pos >= len(view):
                raise _bad("truncated RLE block")
            out += bytes([view[pos]]) * size
            pos += 1
        else:
            if size > _MAX_BLOCK or pos + size > len(view):
                raise _bad("block runs past the end of the data")
            if kind == 0:
                out += view[pos:pos + size]
            elif kind == 2:
                frame.block(view[pos:pos + size], out)
            else:
                raise _bad("reserved block type")
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
            raise _bad(f"frame header cut off at byte {pos:,}")
        magic = int.from_bytes(head[:4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        if magic != _MAGIC:
            raise _bad(f"bad frame magic {magic:#010x} at byte {pos:,}")
        descriptor = head[4]
        single = descriptor >> 5 & 1
        pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + \
            (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        while True:
            block = read(pos, 3)
            if len(block) < 3:
                raise _bad(f"block header cut off at byte {pos:,} of {size:,}")
            header = int.from_bytes(block, "little")
            pos += 3 + (1 if (header >> 1) & 3 == 1 else header >> 3)
            if pos > size:
                raise _bad(f"a block ends at byte {pos:,} but the data has {size:,} "
                           "(truncated)")
            if header & 1:
                break
        if descriptor & 0x04:
            pos += 4
    if pos != size:
        raise _bad(f"the last frame ends at byte {pos:,} but the data has {size:,} (truncated)")
    return pos
