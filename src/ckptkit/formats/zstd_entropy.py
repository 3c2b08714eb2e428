"""The entropy coding of Zstandard (RFC 8878 section 4): FSE tables and Huffman literals.

Split from :mod:`ckptkit.formats.zstd` (frames, blocks and sequences), which is the only user.
Bitstreams here are read backwards, from the end marker in their last byte.
"""

from __future__ import annotations

from ckptkit.errors import IntegrityError


class ZstdError(IntegrityError):
    """The zstd data is malformed or truncated."""


def bad(why: str) -> ZstdError:
    return ZstdError(f"malformed zstd data: {why}", hint="The file is truncated or corrupt")


class Backward:
    """A bitstream read from its end towards its start (FSE and Huffman streams)."""

    def __init__(self, data: bytes | memoryview):
        if not data or data[-1] == 0:
            raise bad("bitstream without its end marker")
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


def read_ncount(data: bytes | memoryview, start: int, max_log: int,
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
        raise bad(f"FSE accuracy log {log} above {max_log}")
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
            raise bad("FSE table description runs past its data")
    if remaining != 1 or len(counts) > max_symbol + 1:
        raise bad("FSE table description does not add up")
    return log, counts, (bit + 7) // 8 - start


def fse_table(log: int, counts: list[int]) -> list[tuple[int, int, int]]:
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
        raise bad("FSE distribution does not fill its table")
    table = []
    for state in range(size):
        symbol = symbols[state]
        nxt = following[symbol]
        following[symbol] += 1
        nbits = log - (nxt.bit_length() - 1)
        table.append((symbol, nbits, (nxt << nbits) - size))
    return table


def huffman_table(data: memoryview, pos: int) -> tuple[list[tuple[int, int]], int, int]:
    """A Huffman tree description: (table indexed by max_bits peeked bits, max_bits, end)."""
    if pos >= len(data):
        raise bad("missing Huffman tree description")
    head = data[pos]
    pos += 1
    if head < 128:
        if pos + head > len(data):
            raise bad("Huffman weights run past the block")
        log, counts, used = read_ncount(data[pos:pos + head], 0, 6, 255)
        table = fse_table(log, counts)
        stream = Backward(data[pos + used:pos + head])
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
            raise bad("Huffman weights run past the block")
        weights = [w for b in raw for w in (b >> 4, b & 15)][:count]
        pos += (count + 1) // 2
    total = sum(1 << (w - 1) for w in weights if w)
    if not total:
        raise bad("Huffman tree without symbols")
    max_bits = total.bit_length()  # the implied last weight fills up to the next power of 2
    rest = (1 << max_bits) - total
    if rest & (rest - 1) or max_bits > 11:
        raise bad("Huffman weights do not form a tree")
    weights.append(rest.bit_length())
    table: list[tuple[int, int]] = []
    for weight in range(1, max_bits + 1):
        for symbol, w in enumerate(weights):
            if w == weight:
                table.extend([(symbol, max_bits + 1 - w)] * (1 << (w - 1)))
    return table, max_bits, pos


def decode_huffman(stream: memoryview, count: int, table: list[tuple[int, int]],
                    max_bits: int, out: bytearray) -> None:
    bits = Backward(stream)
    for _ in range(count):
        symbol, nbits = table[bits.peek(max_bits)]
        out.append(symbol)
        bits.pos -= nbits
    if bits.pos != 0:
        raise bad("Huffman stream does not end where its literals do")
