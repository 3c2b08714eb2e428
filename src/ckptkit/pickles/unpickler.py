"""A restricted pickle reader: interprets pickle data without importing or calling anything.

Every global a pickle names (GLOBAL, STACK_GLOBAL, INST, EXT*) reaches Python through exactly one
gate, :meth:`InertUnpickler.find_class`.  It never imports: known tensor and storage rebuild
functions become lazy-tensor builders, a short list of harmless builtins keeps its meaning, and
every other name becomes an inert recorder, a type whose "construction" or "call" only returns an
:class:`~ckptkit.model.Opaque` holding its arguments.  Dangerous names are additionally reported
as unsafe.  The pure-Python unpickler is used on purpose: its memo is a dict, so a hostile
``LONG_BINPUT 0xFFFFFFFF`` cannot make it allocate a 32 GiB memo array as the C one would.

The stand-ins live in :mod:`ckptkit.pickles.pickle_globals`; :mod:`ckptkit.pickles.pickle_tree` turns what this
module returns into the public model.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from ckptkit.storage import budget
from ckptkit.pickles import danger
from ckptkit.errors import BudgetError, CkptkitError, IntegrityError
from ckptkit.model import Opaque
from ckptkit.pickles.pickle_globals import (ALLOWED, CALLS_ARGUMENTS, AttrDict, EmbeddedTorchFile,
                                    check_keys, inert_type)
from ckptkit.pickles.pickle_input import LOADER_VIEWS, FileInput, StreamInput
from ckptkit.pickles.pickle_semantics import HANDLERS, NO_FRAME, LoaderSemantics, called, describe
# Findings and the static scan live in their own modules; readers import them from here too.
from ckptkit.pickles.findings import MAX_STATIC_SCAN, Findings, UnsafePickleError, is_binary_pickle
from ckptkit.pickles.static_scan import scan_globals

__all__ = ["DIVERGENT_FRAMES", "MAX_STATIC_SCAN", "Findings", "InertUnpickler", "PickleContext",
           "UnsafePickleError", "is_binary_pickle", "read_pickle", "scan_globals"]


class InertUnpickler(LoaderSemantics, pickle._Unpickler):  # type: ignore[name-defined]
    """Interprets one pickle stream into plain values, pending tensors and Opaque records."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: BinaryIO | FileInput | StreamInput, findings: Findings,
                 persistent: Callable[[Any], Any] | None = None,
                 context: PickleContext | None = None, *, base: int = 0):
        own_input = isinstance(file, (FileInput, StreamInput))
        super().__init__(io.BytesIO() if own_input else file, encoding="latin1")
        self._input = file if own_input else StreamInput(file)  # type: ignore[arg-type]
        self._base = base
        self._frame_end = NO_FRAME
        self.diverged = False
        self.findings = findings
        self._persistent = persistent
        self._context = context or PickleContext()
        self._via = "GLOBAL"
        self._op_pos = 0  # where the opcode that may raise a finding starts
        self._previous = 0  # where the last opcode inside a frame started
        self._types: dict[str, type] = {}
        self._globals: dict[int, str] = {}  # id of what find_class handed out -> its name
        self._meter = budget.OpcodeMeter(budget.current(), findings.location)
        self._key_sizes: dict[int, tuple[Any, int]] = {}  # checked key tuples, kept alive

    def _flag(self, qualname: str, via: str) -> None:
        self.findings.flag(qualname, via, self._base + self._op_pos)

    def find_class(self, module: str, name: str) -> Any:  # the one gate to every global
        module, name = str(module), str(name)
        qualname = f"{module}.{name}"
        # What the loader imports: before protocol 3, Python 2 names are mapped (fix_imports).
        key = danger.py2_alias(module, name) if self.proto < 3 else (module, name)
        found = self._context.allowed.get(key, ALLOWED.get(key))
        if found is None:
            if module.startswith(self._context.known_prefixes):
                pass  # classes the format itself defines (TorchScript's __torch__.*)
            elif danger.is_dangerous(module, name):
                self._flag(qualname, self._via)
            else:
                self.findings.objects.add(qualname)
            if qualname not in self._types:
                self._meter.budget.charge("nodes", _TYPE_COST, self._meter.what)
                self._types[qualname] = inert_type(qualname)
            found = self._types[qualname]
        self._globals[id(found)] = qualname
        return found

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
        # The stdlib loop over this reader's input (see pickle_input: frames are read as the
        # C unpickler reads them, not as the pure-Python _Unframer does), metered
        # (ckptkit.storage.budget); pickle errors become IntegrityError upstream, an overrun stays a
        # BudgetError.
        source = self._input
        self.read, self.readline = source.read, source.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, tell, dispatch, meter = source.read, source.tell, self.dispatch, self._meter
        counts, left = meter.counts, meter.settle()
        try:
            while True:
                if self._frame_end != NO_FRAME:  # positions are only needed inside a frame
                    here = tell()
                    if here > self._frame_end:
                        if self._previous < self._frame_end:
                            # The frame ended inside the last opcode: a loader reading the
                            # frame on its own took that opcode's operand from after it.
                            self.diverged = True
                        self._frame_end = NO_FRAME
                    self._previous = here
                key = read(1)
                if not key:
                    raise EOFError
                op = key[0]
                counts[op] += 1
                dispatch[op](self)
                left -= 1
                if not left:
                    left = meter.settle()
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            meter.settle()
            if tell() < self._frame_end != NO_FRAME:
                self.diverged = True  # loaders reading frames start the next pickle elsewhere
            source.stop()
            return stop.value

    # --- calls and mutations the stand-ins cannot mirror ------------------------------------
    # The real loader calls real objects where this reader has recorders and stand-ins, so
    # some operations that succeed there fail here: calling a call's result (getattr(...)(x)),
    # NEWOBJ on a stand-in function, BUILD or SETITEM on a tensor.  Stopping there would leave
    # the rest of the pickle unread (and the file merely "corrupt") while torch.load runs it,
    # so such an operation is recorded as an Opaque, or skipped, and interpretation goes on.
    # A callable the reader only has as a record (the result of a call, a constructed object)
    # is something the file computes at load time: whatever it is, calling it is unsafe.

    def _record_call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        extra = (kwargs,) if isinstance(kwargs, dict) and kwargs else ()
        if isinstance(func, EmbeddedTorchFile):
            return self._embedded(func, args)
        for position in CALLS_ARGUMENTS.get(id(func), ()):
            if position < len(args) and isinstance(args[position], Opaque):
                self._flag(f"{describe(args[position])}()", self._via_call)
        try:
            if isinstance(kwargs, dict) and kwargs:
                return func(*args, **kwargs)
            return func(*args)
        except _MISMATCH as exc:
            if isinstance(exc, CkptkitError):
                raise
            return called(func, args + extra)

    _via_call = "REDUCE"

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        self.stack[-1] = self._call_computed(func, args, "REDUCE") if isinstance(
            func, Opaque) else self._record_call(func, args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call_computed(cls, args, "NEWOBJ") if isinstance(cls, Opaque)
                    else self._record_call(lambda *a: cls.__new__(cls, *a), args))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call_computed(cls, args, "NEWOBJ_EX") if isinstance(cls, Opaque)
                    else self._record_call(lambda *a, **k: cls.__new__(cls, *a, **k), args,
                                           kwargs))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:  # INST and OBJ
        if isinstance(klass, Opaque):
            self.append(self._call_computed(klass, tuple(args), self._via))
        elif args or not isinstance(klass, type):
            self.append(self._record_call(klass, args))
        else:
            self.append(self._record_call(lambda: klass.__new__(klass), ()))

    def _load_build(self) -> None:
        # Only objects this read created take state.  The stand-ins are shared module-level
        # objects (torch.FloatStorage, torch.float32, the rebuild functions): a BUILD that set
        # attributes on them would poison every later read in the process.  In the real
        # loader a BUILD on a global (a module, class or function) does exactly that to the
        # running process, so it is unsafe.
        state = self.stack.pop()
        inst = self.stack[-1]
        if id(inst) in self._globals:
            self._flag(f"{self._globals[id(inst)]} (BUILD on a global)", "BUILD")
        elif isinstance(inst, Opaque):
            self._check_state_names(inst, state)
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

    # Keys and set members are hashed, and a tuple's hash walks it every time: huge tuples
    # are refused, and each hashing is charged (see check_keys).
    def _check_keys(self, keys: Any) -> None:
        check_keys(keys, self._key_sizes, self._meter.budget, self._meter.what)

    def _load_setitem(self) -> None:
        self._check_keys(self.stack[-2:-1])
        self._tolerant(pickle._Unpickler.load_setitem)  # type: ignore[attr-defined]

    def _load_setitems(self) -> None:
        self._check_keys(self.stack[0::2])
        self._tolerant(pickle._Unpickler.load_setitems)  # type: ignore[attr-defined]

    def _load_additems(self) -> None:
        self._check_keys(self.stack)
        self._tolerant(pickle._Unpickler.load_additems)  # type: ignore[attr-defined]

    def _load_append(self) -> None:
        self._tolerant(pickle._Unpickler.load_append)  # type: ignore[attr-defined]

    def _load_appends(self) -> None:
        self._tolerant(pickle._Unpickler.load_appends)  # type: ignore[attr-defined]

    def _load_dict(self) -> None:
        self._check_keys(self.stack[0::2])
        pickle._Unpickler.load_dict(self)  # type: ignore[attr-defined]

    def _load_frozenset(self) -> None:
        self._check_keys(self.stack)
        pickle._Unpickler.load_frozenset(self)  # type: ignore[attr-defined]

    def _load_stack_global(self) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        if type(name) is not str or type(module) is not str:
            if not (self._computed(module) or self._computed(name)):
                raise pickle.UnpicklingError("STACK_GLOBAL requires str")
            # Operands computed at load time (posixpath.basename('/x/os') is 'os', or a
            # module attribute an earlier BUILD set): where this global leads cannot be
            # known without running the file, so it is unsafe.
            qualname = f"{self._name(module)}.{self._name(name)}"
            self._flag(qualname, "STACK_GLOBAL")
            self.append(inert_type(qualname))
            return
        self._via = "STACK_GLOBAL"
        try:
            self.append(self.find_class(module, name))
        finally:
            self._via = "GLOBAL"

    def _positioned(handler: Callable[[Any], None]):  # noqa: N805 - builds dispatch wrappers
        """A handler that may raise a finding: its opcode's offset is noted first (the
        opcode byte has just been read)."""
        def run(self):
            self._op_pos = self._input.tell() - 1
            handler(self)

        return run

    for _op, _handler in HANDLERS:
        dispatch[_op[0]] = _handler
    for _op, _handler in ((pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj),
                          (pickle.NEWOBJ_EX, _load_newobj_ex), (pickle.BUILD, _load_build),
                          (pickle.STACK_GLOBAL, _load_stack_global),
                          (pickle.GLOBAL, pickle._Unpickler.load_global)):  # type: ignore
        dispatch[_op[0]] = _positioned(_handler)
    for _op, _handler in ((pickle.SETITEM, _load_setitem), (pickle.SETITEMS, _load_setitems),
                          (pickle.ADDITEMS, _load_additems), (pickle.APPEND, _load_append),
                          (pickle.APPENDS, _load_appends), (pickle.DICT, _load_dict),
                          (pickle.FROZENSET, _load_frozenset)):
        dispatch[_op[0]] = _handler
    del _op, _handler

    def _tagged(opcode: bytes, via: str):  # noqa: N805 - builds dispatch wrappers
        original = pickle._Unpickler.dispatch[opcode[0]]  # type: ignore[attr-defined]

        def run(self):
            self._op_pos = self._input.tell() - 1
            self._via = self._via_call = via
            try:
                original(self)
            finally:
                self._via, self._via_call = "GLOBAL", "REDUCE"

        return run

    for _op, _via in ((pickle.INST, "INST"), (pickle.OBJ, "OBJ"), (pickle.EXT1, "EXT1"),
                      (pickle.EXT2, "EXT2"), (pickle.EXT4, "EXT4")):
        dispatch[_op[0]] = _tagged(_op, _via)
    del _op, _via, _tagged, _positioned


#: A class stand-in in the budget's units of objects built (a type is 2.7 KB, a dict 72 B).
_TYPE_COST = 40
#: What a stand-in raises where the real object would have done something.
_MISMATCH = (TypeError, AttributeError, ValueError, KeyError, IndexError)


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
                machine: type[InertUnpickler] | None = None, base: int = 0) -> Any:
    """Interpret one pickle from ``data`` (bytes or a file positioned at its start).

    ``location`` names the pickle inside its file for findings (``archive/data.pkl``);
    ``machine`` is an :class:`InertUnpickler` subclass for container-specific opcodes;
    ``base`` is where ``data`` starts in its container (finding offsets count from there).
    When the pickle's frames make loaders read it differently (see :mod:`pickle_input`), it
    is read again as each of them would, and everything any of them would run is reported.
    On malformed input the remaining opcodes are still scanned statically so that globals
    after the break are reported, then :class:`IntegrityError` is raised.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    start = stream.tell()
    findings.pickles += 1
    findings.location = location or what
    reader = (machine or InertUnpickler)(stream, findings, persistent, context, base=base)
    try:
        value = reader.load()
    except BudgetError as exc:
        if findings.unsafe:  # what ran before the overrun names dangerous callables
            raise UnsafePickleError(f"{exc.message}; it names dangerous callables: "
                                    f"{', '.join(sorted(findings.unsafe))}",
                                    findings=findings) from exc
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, struct.error, UnicodeDecodeError, OverflowError, MemoryError,
            RecursionError) as exc:
        try:
            # Only what is there: a buffered file read allocates all it is asked for up
            # front, so MAX_STATIC_SCAN would cost 64 MiB for every broken pickle.
            left = stream.seek(0, io.SEEK_END) - start
            stream.seek(start)
            rest = stream.read(min(MAX_STATIC_SCAN, left))
            scan_globals(rest, findings, context, base=base + start)
        except (AttributeError, OSError, ValueError):
            pass  # a stream that cannot go back (raw zlib), or a budget spent: what was read
        if reader.diverged:
            _read_as_loaders_do(_reread(stream, start), findings, context, findings.location,
                                base + start)
        detail = str(exc) or ("the data ends early" if isinstance(exc, EOFError) else "")
        message = f"corrupt {what}: {type(exc).__name__}{': ' + detail if detail else ''}"[:300]
        if findings.unsafe:
            # pickle.load runs every opcode before the break, so a truncated or broken file
            # that names dangerous callables is unsafe first and corrupt second.
            raise UnsafePickleError(f"{message}; it names dangerous callables: "
                                    f"{', '.join(sorted(findings.unsafe))}",
                                    findings=findings) from exc
        raise IntegrityError(message) from exc
    if reader.diverged:
        _read_as_loaders_do(_reread(stream, start), findings, context, findings.location,
                            base + start)
    return value


def _reread(stream: Any, start: int) -> bytes:
    """The bytes from ``start`` on (at most MAX_STATIC_SCAN), leaving the stream where it is:
    a budgeted stream re-reads its file outside the budget (``reread``); one that cannot go
    back (decompression) gives nothing, and only the contiguous reading is analysed."""
    if hasattr(stream, "reread"):
        return stream.reread(start, MAX_STATIC_SCAN)
    try:
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)  # a buffered read allocates all it is asked for
        stream.seek(start)
        rest = stream.read(min(MAX_STATIC_SCAN, max(0, end - start)))
        stream.seek(here)
    except (AttributeError, OSError, ValueError):
        return b""
    return rest


#: A pickle whose frames make loaders read different opcodes (reported as an object: no
#: writer produces one, so such a file is at least not proven safe).
DIVERGENT_FRAMES = "<pickle frames that loaders read differently>"
#: Pickles read one after another from a file in each loader's view of it.
_MAX_VIEW_PICKLES = 16


def _read_as_loaders_do(rest: bytes, findings: Findings, context: PickleContext | None,
                        location: str, base: int) -> None:
    """Read ``rest`` (a pickle, and what follows it in its file) the way each loader of
    :data:`pickle_input.LOADER_VIEWS` reads it, pickle after pickle as ``pickle.load`` on the
    same file would; what any of them would call is added to ``findings``."""
    findings.objects.add(DIVERGENT_FRAMES)
    for who, view in LOADER_VIEWS:
        file = view(rest)
        for number in range(_MAX_VIEW_PICKLES):
            findings.location = f"{location} as {who} reads it" + (
                f", pickle {number + 1} from there" if number else "")
            if file.tell() >= len(rest):
                break
            try:
                InertUnpickler(FileInput(file, base, len(rest)), findings, None, context).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                    KeyError, IndexError, struct.error, UnicodeDecodeError, OverflowError,
                    MemoryError, RecursionError, CkptkitError):
                break
    findings.location = location
