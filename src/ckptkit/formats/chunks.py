"""Reading a tensor's bytes in bounded chunks, straight from where the file keeps them.

``tensor_io.read_tensor`` materialises a whole tensor (and briefly holds its bytes twice);
``diff`` and ``strip`` only ever need a window at a time, so they stream through here and
their peak memory does not grow with the tensor.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Iterator

from ckptkit.storage import budget
from ckptkit.errors import IntegrityError
from ckptkit.formats.ziparchive import ZIP_ERRORS, zip_of
from ckptkit.storage.location import locate
from ckptkit.model import ByteSpan, TensorRef, itemsize

#: Bytes per read: big enough for sequential I/O at full speed, small next to a large tensor.
CHUNK = 8 << 20


def iter_bytes(span: ByteSpan, start: int = 0, length: int | None = None,
               chunk: int = CHUNK, account: budget.Budget | None = None) -> Iterator[bytes]:
    """Yield ``length`` bytes of ``span`` from ``start`` (relative to the span), in chunks.

    Bytes inflated from a compressed member are charged to ``account`` (the open budget if
    None).

    Raises:
        IntegrityError: the file ends before the span does (truncated).
    """
    remaining = span.length - start if length is None else length
    if start < 0 or remaining < 0 or start + remaining > span.length:
        raise IntegrityError(f"{span.path}: byte range {start}+{remaining} is outside its "
                             f"storage of {span.length} bytes")
    if span.compression is not None:
        # A compressed stream (joblib): inflated up to the range, charged to the budget.
        from ckptkit.pickles.pickle_streams import read_inflated

        with budget.using(account) if account is not None else nullcontext():
            data = read_inflated(span.path, span.offset + start, remaining)
        for at in range(0, len(data), chunk):
            yield data[at:at + chunk]
        return
    if span.member is None:
        with locate(span.path).open() as fh:
            fh.seek(span.offset + start)
            yield from _pump(fh, remaining, chunk, span)
        return
    # A compressed member: what is inflated to reach and read the range is charged.
    (account or budget.current()).charge("decompressed", span.offset + start + remaining,
                                         f"member {span.member!r}")
    try:
        with zip_of(span.path) as archive, archive.open(span.member) as member:
            skip = span.offset + start
            while skip:  # compressed members cannot seek; discard in bounded pieces
                got = member.read(min(skip, chunk))
                if not got:
                    break
                skip -= len(got)
            yield from _pump(member, remaining, chunk, span)
    except ZIP_ERRORS as exc:
        raise IntegrityError(f"{span.path}: cannot read zip member {span.member!r} ({exc})",
                             hint="The file is truncated or corrupt", path=span.path) from None


def _pump(fh, remaining: int, chunk: int, span: ByteSpan) -> Iterator[bytes]:
    # Every chunk but the last is exactly ``chunk`` bytes (short reads are topped up), so
    # callers that ask for whole elements get whole elements.
    while remaining:
        want = min(remaining, chunk)
        data = fh.read(want)
        while data and len(data) < want:
            more = fh.read(want - len(data))
            if not more:
                break
            data += more
        if len(data) < want:
            raise IntegrityError(f"{span.path}: file ends {remaining - len(data)} bytes before "
                                 "the tensor does (truncated?)", hint="Re-download or re-save it",
                                 path=span.path)
        remaining -= len(data)
        yield data


def is_contiguous(ref: TensorRef) -> bool:
    """Whether the tensor's elements are one C-ordered run of its storage."""
    if ref.span is None:
        return False
    if ref.fortran_order and sum(1 for s in ref.shape if s != 1) > 1:
        return False
    if ref.stride is None:
        return True
    expected, step = [], 1
    for size in reversed(ref.shape):
        expected.append(step)
        step *= max(size, 1)
    return all(st == ex for st, ex, size in zip(ref.stride, reversed(expected), ref.shape)
               if size != 1)


def tensor_range(ref: TensorRef) -> tuple[int, int]:
    """``(start, length)`` in bytes of a contiguous tensor inside its span."""
    size = itemsize(ref.dtype)
    return int(ref.element_offset * size), int(math.prod(ref.shape) * size)
