"""A restricted pickle reader: interprets pickle data without importing or calling anything.

Every global a pickle names (GLOBAL, STACK_GLOBAL, INST, EXT*) reaches Python through exactly one
gate, :meth:`InertUnpickler.find_class`.  It never imports: known tensor and storage rebuild
functions become lazy-tensor builders, a short list of harmless builtins keeps its meaning, and
every other name becomes an inert recorder, a type whose "construction" or "call" only returns an
:class:`~ckptkit.model.Opaque` holding its arguments.  Dangerous names are additionally reported
as unsafe.  The pure-Python unpickler is used on purpose: its memo is a dict, so a hostile
``LONG_BINPUT 0xFFFFFFFF`` cannot make it allocate a 32 GiB memo array as the C one would.

The stand-ins live in :mod:`ckptkit.pickle_globals`; :mod:`ckptkit.pickle_tree` turns what this
module returns into the public model.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from ckptkit import danger
from ckptkit.errors import CkptkitError, ExitCode, IntegrityError
from ckptkit.model import Opaque
from ckptkit.pickle_globals import ALLOWED, NUMPY_BENIGN, AttrDict, check_keys, inert_type

def is_binary_pickle(head: bytes) -> bool:
    """True when ``head`` starts like a protocol 2-5 pickle (``PROTO`` then 2..5)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


#: Upper bounds that keep a hostile pickle from exhausting time or memory.
MAX_OPCODES = 50_000_000
MAX_STATIC_SCAN = 64 << 20


@dataclass
class Findings:
    """What one or more pickles asked for, by how they asked for it."""

    objects: set[str] = field(default_factory=set)
    unsafe: dict[str, str] = field(default_factory=dict)  # qualname -> how it was reached
    pickles: int = 0
    where: dict[str, str] = field(default_factory=dict)  # qualname -> which pickle named it
    location: str = "pickle"  # the pickle being read now

    def flag(self, qualname: str, via: str) -> None:
        """Record a dangerous callable, with the opcode and the pickle that first named it."""
        if qualname not in self.unsafe:
            self.unsafe[qualname] = via
            self.where[qualname] = self.location

    def details(self) -> dict[str, dict[str, str]]:
        """The per-name facts readers put into ``RawCheckpoint.details``."""
        return {"unsafe_via": dict(self.unsafe), "unsafe_where": dict(self.where)}


class InertUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Interprets one pickle stream into plain values, pending tensors and Opaque records."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: BinaryIO, findings: Findings,
                 persistent: Callable[[Any], Any] | None = None,
                 context: PickleContext | None = None):
        super().__init__(file, encoding="latin1")
        self._file_read = _capped_read(file)
        self.findings = findings
        self._persistent = persistent
        self._context = context or PickleContext()
        self._via = "GLOBAL"
        self._types: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:  # the one gate to every global
        module, name = str(module), str(name)
        qualname = f"{module}.{name}"
        if (module, name) in self._context.allowed:
            return self._context.allowed[(module, name)]
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module.startswith(self._context.known_prefixes):
            pass  # classes the format itself defines (TorchScript's __torch__.*): not findings
        elif danger.is_dangerous(module, name):
            self.findings.flag(qualname, self._via)
        elif (module, name) not in NUMPY_BENIGN:
            self.findings.objects.add(qualname)
        if qualname not in self._types:
            self._types[qualname] = inert_type(qualname)
        return self._types[qualname]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            return Opaque("<persistent id>", (pid,))
        if not _plain_pid(pid):
            # Format readers str() the key and location; a nested or memo-shared container
            # there would make that exponential.  Torch ids are flat tuples of scalars.
            self.findings.objects.add("<unknown persistent id>")
            return Opaque("<persistent id>")
        return self._persistent(pid)

    def load(self) -> Any:
        # The stdlib loop, plus an opcode budget; pickle errors become IntegrityError upstream.
        # No _Unframer: like the C unpickler that pickle.load and torch.load use, FRAME is only
        # a prefetch hint (see _load_frame), so an opcode may straddle a declared frame end.
        # The pure-Python _Unframer rejects that ("pickle exhausted before end of frame"), a
        # parser differential that let a payload run under torch.load while this reader
        # stopped early and reported the file as merely corrupt.
        self.read = self._file_read
        self.readline = self._file_readline
        self.readinto = self._readinto
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        budget = MAX_OPCODES
        try:
            while budget:
                budget -= 1
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value
        raise pickle.UnpicklingError(f"more than {MAX_OPCODES} opcodes")

    def _readinto(self, buf: Any) -> int:
        data = self._file_read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def _load_frame(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > MAX_STATIC_SCAN << 4:
            raise pickle.UnpicklingError(f"frame of {size} bytes")

    def _load_bytearray8(self) -> None:
        # The stdlib allocates (and zeroes) bytearray(<declared length>) before reading, so a
        # 20-byte pickle could demand gigabytes.  Read what is there, then check the length.
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(min(size, MAX_STATIC_SCAN << 4))
        if len(data) != size:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {size} bytes is truncated")
        self.append(bytearray(data))

    # --- calls and mutations the stand-ins cannot mirror ------------------------------------
    # The real loader calls real objects where this reader has recorders and stand-ins, so
    # some operations that succeed there fail here: calling a call's result (getattr(...)(x)),
    # NEWOBJ on a stand-in function, BUILD or SETITEM on a tensor.  Stopping there would leave
    # the rest of the pickle unread (and the file merely "corrupt") while torch.load runs it,
    # so such an operation is recorded as an Opaque, or skipped, and interpretation goes on.

    def _record_call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        extra = (kwargs,) if isinstance(kwargs, dict) and kwargs else ()
        try:
            if isinstance(kwargs, dict) and kwargs:
                return func(*args, **kwargs)
            return func(*args)
        except _MISMATCH as exc:
            if isinstance(exc, CkptkitError):
                raise
            return _called(func, args + extra)

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._record_call(self.stack[-1], args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._record_call(lambda *a: cls.__new__(cls, *a), args)
                    if not isinstance(cls, Opaque) else _called(cls, args))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._record_call(lambda *a, **k: cls.__new__(cls, *a, **k), args, kwargs)
                    if not isinstance(cls, Opaque) else _called(cls, args))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:  # INST and OBJ
        if args or not isinstance(klass, type):
            self.append(self._record_call(klass, args))
        else:
            self.append(self._record_call(lambda: klass.__new__(klass), ()))

    def _load_build(self) -> None:
        # Only objects this read created take state.  The stand-ins are shared module-level
        # objects (torch.FloatStorage, torch.float32, the rebuild functions): a BUILD that set
        # attributes on them would poison every later read in the process.
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Opaque):
            Opaque.__setstate__(inst, state)
        elif isinstance(inst, AttrDict):
            self.stack.append(state)
            self._tolerant(pickle._Unpickler.load_build)  # type: ignore[attr-defined]

    def _tolerant(self, handler: Callable[[Any], None]) -> None:
        try:
            handler(self)  # these pop their operands before they can fail
        except _MISMATCH as exc:
            if isinstance(exc, CkptkitError):
                raise

    # Keys and set members are hashed; refuse tuples that expand to huge trees (see
    # MAX_KEY_NODES) before the stdlib handler hashes them.
    def _load_setitem(self) -> None:
        check_keys(self.stack[-2:-1])
        self._tolerant(pickle._Unpickler.load_setitem)  # type: ignore[attr-defined]

    def _load_setitems(self) -> None:
        check_keys(self.stack[0::2])
        self._tolerant(pickle._Unpickler.load_setitems)  # type: ignore[attr-defined]

    def _load_additems(self) -> None:
        check_keys(self.stack)
        self._tolerant(pickle._Unpickler.load_additems)  # type: ignore[attr-defined]

    def _load_append(self) -> None:
        self._tolerant(pickle._Unpickler.load_append)  # type: ignore[attr-defined]

    def _load_appends(self) -> None:
        self._tolerant(pickle._Unpickler.load_appends)  # type: ignore[attr-defined]

    def _load_dict(self) -> None:
        check_keys(self.stack[0::2])
        pickle._Unpickler.load_dict(self)  # type: ignore[attr-defined]

    def _load_frozenset(self) -> None:
        check_keys(self.stack)
        pickle._Unpickler.load_frozenset(self)  # type: ignore[attr-defined]

    def _load_stack_global(self) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        if isinstance(module, Opaque) or isinstance(name, Opaque):
            # Operands computed at load time (posixpath.basename('/x/os') is 'os'): where
            # this global leads cannot be known without running the file, so it is unsafe.
            qualname = f"{_describe(module)}.{_describe(name)}"
            self.findings.flag(qualname, "STACK_GLOBAL")
            self.append(inert_type(qualname))
            return
        if type(name) is not str or type(module) is not str:
            raise pickle.UnpicklingError("STACK_GLOBAL requires str")
        self._via = "STACK_GLOBAL"
        try:
            self.append(self.find_class(module, name))
        finally:
            self._via = "GLOBAL"

    for _op, _handler in ((pickle.FRAME, _load_frame), (pickle.BYTEARRAY8, _load_bytearray8),
                          (pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj),
                          (pickle.NEWOBJ_EX, _load_newobj_ex), (pickle.BUILD, _load_build),
                          (pickle.SETITEM, _load_setitem), (pickle.SETITEMS, _load_setitems),
                          (pickle.ADDITEMS, _load_additems), (pickle.APPEND, _load_append),
                          (pickle.APPENDS, _load_appends), (pickle.DICT, _load_dict),
                          (pickle.FROZENSET, _load_frozenset),
                          (pickle.STACK_GLOBAL, _load_stack_global)):
        dispatch[_op[0]] = _handler
    del _op, _handler

    def _tagged(opcode: bytes, via: str):  # noqa: N805 - builds dispatch wrappers
        original = pickle._Unpickler.dispatch[opcode[0]]  # type: ignore[attr-defined]

        def run(self):
            self._via = via
            try:
                original(self)
            finally:
                self._via = "GLOBAL"

        return run

    for _op, _via in ((pickle.INST, "INST"), (pickle.OBJ, "OBJ"), (pickle.EXT1, "EXT1"),
                      (pickle.EXT2, "EXT2"), (pickle.EXT4, "EXT4")):
        dispatch[_op[0]] = _tagged(_op, _via)
    del _op, _via, _tagged


#: What a stand-in raises where the real object would have done something.
_MISMATCH = (TypeError, AttributeError, ValueError, KeyError, IndexError)


def _describe(value: Any) -> str:
    """A short, bounded name for a value used as a callable or a global's operand (bounded:
    a chain of a million calls on call results must not build ever longer names)."""
    if isinstance(value, Opaque):
        text = value.qualname if value.qualname.endswith(")") else f"{value.qualname}(...)"
        return f"<{text[:200]}>"
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    return name[:200] if isinstance(name, str) else f"<{type(value).__name__}>"


def _called(func: Any, args: Any) -> Opaque:
    """The record of a call this reader cannot make."""
    return Opaque(f"{_describe(func)}()", args if isinstance(args, tuple) else (args,))


#: Reads up to this size go straight to the stream; larger ones are capped by what is left.
_BIG_READ = 1 << 16


def _capped_read(file: BinaryIO) -> Callable[..., bytes]:
    """``file.read``, except that a large request is cut to what the file has left.

    Length prefixes (BINUNICODE, BINBYTES8, ...) become single reads, and a buffered file
    allocates the whole request before it finds out how much is there: four bytes of a
    damaged pickle could cost gigabytes.  Streams that are not plain files pass through.
    """
    if isinstance(file, io.BytesIO):
        return file.read  # returns only what it holds
    try:
        end = os.fstat(file.fileno()).st_size
        file.tell()
    except (AttributeError, OSError, ValueError):
        return file.read
    raw_read, tell = file.read, file.tell

    def read(n: int = -1) -> bytes:
        if n > _BIG_READ:
            n = min(n, max(0, end - tell()))
        return raw_read(n)

    return read


def _plain_pid(pid: Any) -> bool:
    """True for a persistent id made of scalars (and flat tuples of them), as torch writes."""
    if not isinstance(pid, tuple):
        return True  # the format reader rejects it cheaply
    for part in pid:
        if isinstance(part, tuple):
            if not all(p is None or isinstance(p, (str, bytes, int, float)) for p in part):
                return False
        elif isinstance(part, (list, dict, set, frozenset, bytearray, Opaque)):
            return False
    return True


@dataclass(frozen=True)
class PickleContext:
    """Format-specific knowledge: extra allowlisted globals, and module prefixes that name the
    format's own classes (recorded as opaque state, not reported)."""

    allowed: dict[tuple[str, str], Any] = field(default_factory=dict)
    known_prefixes: tuple[str, ...] = ()


def read_pickle(data: bytes | BinaryIO, findings: Findings,
                persistent: Callable[[Any], Any] | None = None, *, what: str = "pickle",
                context: PickleContext | None = None, location: str | None = None,
                machine: type[InertUnpickler] | None = None) -> Any:
    """Interpret one pickle from ``data`` (bytes or a file positioned at its start).

    ``location`` names the pickle inside its file for findings (``archive/data.pkl``);
    ``machine`` is an :class:`InertUnpickler` subclass for container-specific opcodes.
    On malformed input the remaining opcodes are still scanned statically so that globals
    after the break are reported, then :class:`IntegrityError` is raised.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    start = stream.tell()
    findings.pickles += 1
    findings.location = location or what
    try:
        return (machine or InertUnpickler)(stream, findings, persistent, context).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, struct.error, UnicodeDecodeError, OverflowError, MemoryError,
            RecursionError) as exc:
        try:
            # Only what is there: a buffered file read allocates all it is asked for up
            # front, so MAX_STATIC_SCAN would cost 64 MiB for every broken pickle.
            left = stream.seek(0, io.SEEK_END) - start
            stream.seek(start)
            scan_globals(stream.read(min(MAX_STATIC_SCAN, left)), findings, context)
        except (AttributeError, OSError, ValueError):
            pass  # a stream that cannot go back (raw zlib): the interpreted part is reported
        detail = str(exc) or ("the data ends early" if isinstance(exc, EOFError) else "")
        message = f"corrupt {what}: {type(exc).__name__}{': ' + detail if detail else ''}"[:300]
        if findings.unsafe:
            # pickle.load runs every opcode before the break, so a truncated or broken file
            # that names dangerous callables is unsafe first and corrupt second.
            raise UnsafePickleError(f"{message}; it names dangerous callables: "
                                    f"{', '.join(sorted(findings.unsafe))}",
                                    findings=findings) from exc
        raise IntegrityError(message) from exc


class UnsafePickleError(IntegrityError):
    """A corrupt pickle that also names dangerous callables: exits like unsafe content (5).

    An :class:`IntegrityError`, so readers that skip broken pickles (npz object arrays) still
    do, and report the names through their findings."""

    exit_code = ExitCode.UNSAFE

    def __init__(self, message: str, *, findings: Findings):
        super().__init__(message, hint="Do not load it with pickle or torch.load")
        self.findings = findings
        self.unsafe = sorted(findings.unsafe)


def scan_globals(data: bytes, findings: Findings, context: PickleContext | None = None) -> None:
    """Statically list the globals a (possibly broken) pickle names, without interpreting it.

    Tracks string pushes and the memo so that ``STACK_GLOBAL`` operands fetched with
    ``BINGET`` are resolved too.
    """
    allowed = context.allowed if context else {}
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                if (module, attr) not in allowed:
                    _note(findings, module, attr, name)
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                if (str(strings[-2]), str(strings[-1])) not in allowed:
                    _note(findings, str(strings[-2]), str(strings[-1]), name)
            if isinstance(arg, str) and ("UNICODE" in name or name.endswith("STRING")):
                strings.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                strings.append(memo[int(arg)])
            if name == "STOP":
                strings.clear()
    except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError):
        return


def _note(findings: Findings, module: str, name: str, via: str) -> None:
    if (module, name) in ALLOWED or (module, name) in NUMPY_BENIGN:
        return
    if danger.is_dangerous(module, name):
        findings.flag(f"{module}.{name}", via)
    else:
        findings.objects.add(f"{module}.{name}")

