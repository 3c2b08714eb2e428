"""What the restricted reader does beyond the pure-Python unpickler it is built on.

Reading as ``pickle.load`` and ``torch.load`` read (CPython's C unpickler), not as the
pure-Python ``pickle._Unpickler`` does: ``FRAME`` is tracked (see :mod:`pickle_input`), counted
bytes are read in pieces, ``INT`` is parsed by ``strtol`` rules.  And calls on what only
loading would know are unsafe whatever they are: a call on a call's result or a constructed
object, a BUILD that sets special attributes, a global's state changed by BUILD, and
``STACK_GLOBAL`` operands that are not literal strings.  Torch files embedded in a pickle
(pickled tensors) are read the same restricted way.

:class:`LoaderSemantics` is mixed into :class:`~ckptkit.pickles.unpickler.InertUnpickler`.
"""

from __future__ import annotations

import contextvars
import pickle
import re
import struct
from typing import Any

from ckptkit.model import Opaque
from ckptkit.pickles import hooks
from ckptkit.pickles.pickle_globals import EmbeddedTorchFile

#: A FRAME, BINBYTES8 or BYTEARRAY8 longer than this is refused before it is read.
MAX_OPERAND = 1 << 30
#: "No frame is open": beyond any position.
NO_FRAME = 1 << 62
#: What C's strtol(s, &end, 0) accepts: blanks, a sign, then hex, octal or decimal digits.
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
#: Attribute names a BUILD may set without consequence (documentation, not behaviour).
_DOC_ATTRIBUTES = frozenset({"__doc__", "__module__", "__qualname__", "__name__"})
#: How deep files embedded in pickles (pickled tensors) are followed, and how deep we are.
MAX_EMBEDDED = 4
_EMBEDDING: contextvars.ContextVar[int] = contextvars.ContextVar("ckpt_embedding", default=0)


class LoaderSemantics:
    """Opcode handlers and checks the machine adds (see the module doc).  Expects the
    machine's ``_input``, ``_frame_end``, ``_globals``, ``findings``, ``_flag`` and
    ``_via_call``."""

    _input: Any
    _frame_end: int
    _globals: dict[int, str]
    _op_pos: int
    _previous: int
    _base: int
    _via_call: str
    findings: Any
    diverged: bool
    _flag: Any  # the machine's: record a finding at the current opcode
    read: Any
    readline: Any
    append: Any

    def _load_frame(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > MAX_OPERAND:
            raise pickle.UnpicklingError(f"frame of {size} bytes")
        left = self._input.remaining()
        if left is not None and size > left:
            raise pickle.UnpicklingError("pickle data was truncated")  # as pickle.loads says
        here = self._input.tell()
        if here < self._frame_end != NO_FRAME:
            if here + size > self._frame_end:
                self.diverged = True  # a frame opening inside another and ending past it
                self._frame_end = here + size
        else:
            self._frame_end = here + size
        self._previous = here
        self._input.frame(size)

    def leave_frame(self) -> None:
        """Bytes that follow are taken outside the pickle machine (joblib's array data): a
        frame that ends here is closed, so skipping them is not reading across its end."""
        if self._input.tell() >= self._frame_end:
            self._frame_end = NO_FRAME

    def _counted(self, size: int) -> bytes:
        # The stdlib allocates (and zeroes) bytearray(<declared length>) before reading, so a
        # 20-byte pickle could demand gigabytes: read what is there, in pieces.
        if size > MAX_OPERAND:
            raise pickle.UnpicklingError(f"a bytes value of {size} bytes")
        return self._input.read_counted(size)

    def _load_short_binbytes(self) -> None:
        self.append(self._counted(self.read(1)[0]))

    def _load_binbytes(self) -> None:
        self.append(self._counted(struct.unpack("<I", self.read(4))[0]))

    def _load_binbytes8(self) -> None:
        self.append(self._counted(struct.unpack("<Q", self.read(8))[0]))

    def _load_bytearray8(self) -> None:
        self.append(bytearray(self._counted(struct.unpack("<Q", self.read(8))[0])))

    def _load_int(self) -> None:
        # The C unpickler parses INT with strtol(s, &end, 0): "010" is 8 there, while the
        # pure-Python int(s, 0) refuses it, which would end this reading where torch.load
        # reads on.
        line = self.readline()
        if len(line) < 2:
            raise pickle.UnpicklingError("pickle data was truncated")
        match = _STRTOL.match(line)
        if match and line[match.end():] in (b"\n", b""):
            sign, digits = match.group(1), match.group(2)
            base = 16 if digits[:2].lower() == b"0x" else 8 if digits[:1] == b"0" else 10
            value = int(digits[2:] if base == 16 else digits, base) * (-1 if sign == b"-" else 1)
            if -(1 << 63) <= value < 1 << 63:
                self.append(bool(value) if len(line) == 3 and value in (0, 1) else value)
                return
        try:
            self.append(int(line, 0))
        except ValueError:
            raise ValueError("could not convert string to int") from None

    def _call_computed(self, func: Opaque, args: Any, via: str) -> Opaque:
        """A call on a value the file computes at load time: unsafe, whatever it is.  Calling
        such a result again is the same finding (a chain of a million calls is one name)."""
        called = func.qualname if func.qualname.endswith(">()") else f"{describe(func)}()"
        self._flag(called, via)
        return Opaque(called, args if isinstance(args, tuple) else (args,))

    def _embedded(self, reader: EmbeddedTorchFile, args: tuple[Any, ...]) -> Any:
        """``torch.storage._load_from_bytes(data)`` runs ``torch.load`` on ``data``: the
        embedded file is read the same restricted way and its findings become this file's."""
        data = args[0] if args else None
        if not isinstance(data, (bytes, bytearray)):
            # Bytes computed at load time cannot be read before loading: unsafe.
            self._flag(f"{reader.qualname}({describe(data)})", self._via_call)
            return Opaque(reader.qualname)
        
        where = f"{self.findings.location} at byte {self._base + self._op_pos}"
        depth = _EMBEDDING.get()
        if depth >= MAX_EMBEDDED:
            # torch would load it all the same: what is not read here cannot pass as safe.
            self._flag(f"{reader.qualname} (nested deeper than {MAX_EMBEDDED})",
                       self._via_call)
            return Opaque(reader.qualname)
        token = _EMBEDDING.set(depth + 1)
        try:
            problem = (hooks.embedded_reader(bytes(data), self.findings, where)
                       if hooks.embedded_reader
                       else "no reader for embedded torch files is loaded")
        finally:
            _EMBEDDING.reset(token)
        if problem:
            location = self.findings.location
            self.findings.location = f"{where} (an embedded file ckptkit cannot read: {problem})"
            self._flag(reader.qualname, self._via_call)
            self.findings.location = location
        return Opaque("torch.Storage")

    def _check_state_names(self, inst: Opaque, state: Any) -> None:
        """BUILD sets attributes from a dict (and a slot dict); one named ``__setstate__``
        is what the next BUILD on the object calls, ``__class__`` changes its type."""
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:
            if not isinstance(part, dict):
                continue
            for key in part:
                if (isinstance(key, str) and key.startswith("__") and key.endswith("__")
                        and key not in _DOC_ATTRIBUTES):
                    self._flag(f"{inst.qualname}.{key[:100]} (set by BUILD)", "BUILD")

    def _name(self, value: Any) -> str:
        if id(value) in self._globals:
            return f"<{self._globals[id(value)]}>"
        return describe(value)

    def _computed(self, value: Any) -> bool:
        """A value the real loader may well have as a str where this reader has a record or
        a stand-in (a call's result, or a global's value)."""
        return isinstance(value, Opaque) or id(value) in self._globals



#: (opcode, handler) pairs the machine registers.
HANDLERS = ((pickle.FRAME, LoaderSemantics._load_frame),
            (pickle.SHORT_BINBYTES, LoaderSemantics._load_short_binbytes),
            (pickle.BINBYTES, LoaderSemantics._load_binbytes),
            (pickle.BINBYTES8, LoaderSemantics._load_binbytes8),
            (pickle.BYTEARRAY8, LoaderSemantics._load_bytearray8),
            (pickle.INT, LoaderSemantics._load_int))


def describe(value: Any) -> str:
    """A short, bounded name for a value used as a callable or a global's operand (bounded:
    a chain of a million calls on call results must not build ever longer names).  Plain
    arguments are shown: ``<pkgutil.resolve_name('os:system')>``."""
    if isinstance(value, Opaque):
        if value.qualname.endswith(")"):
            text = value.qualname
        else:
            shown = [repr(a)[:60] for a in value.args[:3]
                     if a is None or isinstance(a, (str, bytes, int, float, bool))]
            more = ", ..." if len(shown) < len(value.args) else ""
            text = f"{value.qualname}({', '.join(shown)}{more})"
        return f"<{text[:200]}>"
    if isinstance(value, (str, int, float, bytes)) or value is None:
        return repr(value)[:60]
    name = getattr(value, "qualname", None) or getattr(value, "__qualname__", None) or \
        getattr(value, "__name__", None)
    return name[:200] if isinstance(name, str) else f"<{type(value).__name__}>"


def called(func: Any, args: Any) -> Opaque:
    """The record of a call this reader cannot make."""
    return Opaque(f"{describe(func)}()", args if isinstance(args, tuple) else (args,))
