"""CRC-32C (Castagnoli), the checksum of LevelDB table blocks and of tensor-bundle entries.

``crc32c`` is pure Python, fast enough for index blocks and the odd string tensor.  Tensor bytes
can run to gigabytes, so ``crc32c_fast`` vectorises with numpy, imported only when it is called:
reading a checkpoint's structure must never pull numpy in.
"""

from __future__ import annotations


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``; pure Python (about 7 MB/s), so callers keep inputs small."""
    table = _CRC_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """Undo LevelDB's CRC masking (stored CRCs are rotated and offset so CRCs of CRCs differ)."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# Below this size the numpy set-up (table, shift matrix, per-lane combine) costs more than it saves.
_NUMPY_CRC_MIN = 1 << 16
# Lanes run in parallel in numpy but are combined one by one in Python; this balances the two.
_CRC_LANES = 4096


def _zero_shift(length: int) -> list[int]:
    """Columns of the GF(2) matrix that advances a raw CRC register over ``length`` zero bytes."""
    one = [_CRC_TABLE[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32)]
    result = [1 << i for i in range(32)]
    power = one
    while length:
        if length & 1:
            result = [_apply(power, col) for col in result]
        power = [_apply(power, col) for col in power]
        length >>= 1
    return result


def _apply(matrix: list[int], vector: int) -> int:
    out = 0
    for bit in range(32):
        if vector >> bit & 1:
            out ^= matrix[bit]
    return out


def crc32c_fast(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``, vectorised with numpy for large buffers (hundreds of MB/s).

    The buffer is cut into equal lanes whose raw CRC registers advance together; the CRC is
    linear, so lane results combine by shifting the running value over each lane's length.
    """
    if len(data) < _NUMPY_CRC_MIN:
        return crc32c(data, crc)
    import numpy as np

    table = np.array(_CRC_TABLE, dtype=np.uint32)
    lane_len = len(data) // _CRC_LANES
    body = lane_len * _CRC_LANES
    lanes = np.frombuffer(data, dtype=np.uint8, count=body).reshape(_CRC_LANES, lane_len)
    columns = np.ascontiguousarray(lanes.T)
    regs = np.zeros(_CRC_LANES, dtype=np.uint32)
    for row in columns:
        regs = table[(regs ^ row) & 0xFF] ^ (regs >> 8)
    shift = _zero_shift(lane_len)
    acc = crc ^ 0xFFFFFFFF
    for reg in regs.tolist():
        acc = _apply(shift, acc) ^ reg
    tail = bytes(memoryview(data)[body:])
    for byte in tail:
        acc = _CRC_TABLE[(acc ^ byte) & 0xFF] ^ (acc >> 8)
    return acc ^ 0xFFFFFFFF
