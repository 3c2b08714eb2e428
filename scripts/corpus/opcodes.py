"""Pickle opcode helpers: small byte builders for hand-written pickles.

Each helper returns the bytes of a few opcodes; a "body" is a sequence that pushes exactly one
value, so it can stand alone (:func:`whole`) or run inside a real file's pickle (:func:`inject`).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Callable


def ustr(text: str) -> bytes:
    """Push ``text`` (SHORT_BINUNICODE or BINUNICODE)."""
    data = text.encode()
    if len(data) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def raw_bytes(data: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(data)) + data


def text_str(text: str) -> bytes:
    """Protocol 0 ``STRING``: a quoted Python literal on one line."""
    return pickle.STRING + repr(text).encode() + b"\n"


def glob(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def stack_glob(module: str, name: str) -> bytes:
    return ustr(module) + ustr(name) + pickle.STACK_GLOBAL


def tup(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)``: leaves the result on the stack."""
    return func + tup(*args) + pickle.REDUCE


def put(index: int) -> bytes:
    return pickle.BINPUT + bytes([index])


def get(index: int) -> bytes:
    return pickle.BINGET + bytes([index])


def small_int(value: int) -> bytes:
    return pickle.BININT1 + bytes([value]) if 0 <= value < 256 else \
        pickle.BININT + struct.pack("<i", value)


def str_list(*items: str) -> bytes:
    return pickle.EMPTY_LIST + pickle.MARK + b"".join(ustr(i) for i in items) + pickle.APPENDS


def str_dict(**items: bytes) -> bytes:
    """A dict of ``name -> pushed value``."""
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(
        ustr(k) + v for k, v in items.items()) + pickle.SETITEMS


def whole(body: bytes, proto: int = 2) -> bytes:
    """A complete pickle whose value is what ``body`` pushes."""
    return pickle.PROTO + bytes([proto]) + body + pickle.STOP


def inject(original: bytes, body: bytes) -> bytes:
    """Run ``body`` just before ``original`` stops, then drop its result: the file still
    loads to the original object, with the payload's side effect on the way."""
    assert original.endswith(pickle.STOP)
    return original[:-1] + body + pickle.POP + pickle.STOP


class Reduce:
    """Pickles as ``func(*args)`` with the stock pickler, like a real attack tool."""

    def __init__(self, func: Callable[..., Any], *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args
