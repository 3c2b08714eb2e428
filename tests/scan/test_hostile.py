"""A hostile-file corpus, generated inside the tests: nothing runs, everything is reported.

Every payload only tries to create a sentinel file (or delete a canary directory) under
``tmp_path``.  For each one the test checks that neither :func:`ckptkit.inspect` nor
``python -m ckptkit inspect`` (in a fresh interpreter) let it fire, that the dangerous callable
is in ``info.unsafe``, and that the CLI exits 5 without a traceback.  ``test_payloads_fire``
proves the corpus is live: the same bytes loaded by the real ``pickle`` / ``torch.load`` /
``np.load`` do create their sentinels.

Layout: pickle opcode helpers; the payload table (one body per technique); one writer per
container format (torch zip, legacy torch, TorchScript, npz); then the tests: techniques,
containers, benign look-alikes, and denial-of-service inputs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import ckptkit
from ckptkit import CkptkitError, ExitCode, IntegrityError
from ckptkit.storage import budget
from ckptkit.scan.scanning import scan
from tests import figures

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
sys.path.insert(0, str(ROOT / "scripts"))
from corpus import containers  # noqa: E402
from corpus.opcodes import (Reduce, call, get, glob, inject, put, raw_bytes, stack_glob,  # noqa: E402
                            tup, ustr, whole)
from corpus.techniques import TECHNIQUES as CORPUS  # noqa: E402
from corpus.techniques import Target as Aim  # noqa: E402
from corpus.bodies import hidden_system  # noqa: E402
#: Where ``pickle.dumps`` says ``os.system`` lives (``posix`` here, ``nt`` on Windows).
SYSTEM = f"{os.system.__module__}.system"


# --- what a payload tries to do ---------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """The harm a payload aims for: create ``sentinel``, or delete ``canary``."""

    root: Path

    @property
    def sentinel(self) -> Path:
        return self.root / "PWNED"

    @property
    def canary(self) -> Path:
        return self.root / "canary"

    @property
    def cmd(self) -> str:
        return f"touch {shlex.quote(str(self.sentinel))}"

    @property
    def src(self) -> str:
        return f"open({str(self.sentinel)!r}, 'w').close()"

    def arm(self) -> Target:
        self.root.mkdir(parents=True, exist_ok=True)
        self.canary.mkdir(exist_ok=True)
        return self

    def harmed(self) -> bool:
        return self.sentinel.exists() or not self.canary.is_dir()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths in payloads resolve under tmp_path, in-process and in the CLI alike."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def target(tmp_path: Path) -> Target:
    return Target(tmp_path).arm()


# --- the technique table ----------------------------------------------------------------------
# Each body pushes exactly one value (the payload's result) so it can stand alone (`whole`) or
# be injected into a real file's pickle (`inject`).

Part = Callable[[Target], bytes]


def simple(module: str, name: str, *args: Part) -> Part:
    """``module.name(*args)``, each argument built for the target."""
    return lambda t: call(glob(module, name), *(a(t) for a in args))


def text_arg(value: Callable[[Target], str]) -> Part:
    return lambda t: ustr(value(t))


def list_arg(*parts: Callable[[Target], str]) -> Part:
    return lambda t: (pickle.EMPTY_LIST + pickle.MARK + b"".join(ustr(p(t)) for p in parts)
                      + pickle.APPENDS)


CMD, SRC_TEXT, SENTINEL = (lambda t: t.cmd), (lambda t: t.src), (lambda t: str(t.sentinel))
TOUCH = lambda t: "touch"  # noqa: E731


def _newobj_popen(t: Target) -> bytes:
    return glob("subprocess", "Popen") + tup(list_arg(TOUCH, SENTINEL)(t)) + pickle.NEWOBJ


def _newobj_ex_popen(t: Target) -> bytes:
    kwargs = pickle.EMPTY_DICT + ustr("shell") + pickle.NEWTRUE + pickle.SETITEM
    return stack_glob("subprocess", "Popen") + tup(ustr(t.cmd)) + kwargs + pickle.NEWOBJ_EX


def _frames_straddled(t: Target) -> bytes:
    # FRAME is a prefetch hint to the C unpickler (pickle.load, torch.load): an opcode may
    # cross the declared frame end.  The pure-Python unpickler refuses that.
    rest = stack_glob("builtins", "exec") + tup(ustr(t.src)) + pickle.REDUCE
    return pickle.FRAME + struct.pack("<Q", 3) + rest


def _after(prefix: bytes) -> Callable[[Target], bytes]:
    """``prefix`` (an operation the reader's stand-ins cannot mirror), then a hidden
    os.system: the reader must interpret on past it, as the real unpickler does."""
    return lambda t: prefix + pickle.POP + hidden_system(Aim(t.sentinel))


_BY_ID = {tech.id: tech for tech in CORPUS}


def corpus(tech_id: str) -> Part:
    """The body of a technique of the scan corpus (scripts/corpus), aimed at the sentinel."""
    body = _BY_ID[tech_id].body
    return lambda t: body(Aim(t.sentinel))


CALL_A_CALL_RESULT = call(call(glob("typing", "NewType"), ustr("Id"), glob("builtins", "int")),
                          pickle.BININT1 + b"\x05")
NEWOBJ_ON_STAND_IN = glob("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
PARAMETER_NO_ARGS = glob("torch.nn.parameter", "Parameter") + pickle.EMPTY_TUPLE + pickle.REDUCE
DTYPE_AS_KEY = (pickle.EMPTY_DICT + glob("torch", "float32") + pickle.BININT1 + b"\x01"
                + pickle.SETITEM)




def _rmtree(t: Target) -> bytes:
    return call(glob("shutil", "rmtree"), ustr(str(t.canary)))


def _connect(t: Target) -> bytes:
    address = tup(ustr("127.0.0.1"), pickle.BININT2 + struct.pack("<H", 9))
    return call(glob("socket", "create_connection"), address)


@dataclass(frozen=True)
class Technique:
    id: str
    body: Part
    unsafe: tuple[str, ...]  # must all be in info.unsafe
    via: str | None = None  # expected details["unsafe_via"][unsafe[0]]
    #: The real pickle.loads fires it (test_payloads_fire).  False: it needs a network, a
    #: browser, a terminal, Windows or torch, or only constructs an object.
    live: bool = True


T = Technique
TECHNIQUES: list[Technique] = [
    # How a global is named
    T("global-os-system", simple("os", "system", text_arg(CMD)), ("os.system",), "GLOBAL"),
    T("global-nt-system", simple("nt", "system", text_arg(CMD)), ("nt.system",), live=False),
    T("stack-global-memo-binget", corpus("stack-global-memo-binget"), ("builtins.exec",), "STACK_GLOBAL"),
    T("inst-opcode", corpus("inst-opcode"), ("os.system",), "INST"),
    T("obj-opcode", corpus("obj-opcode"), ("os.system",)),
    T("newobj-popen", _newobj_popen, ("subprocess.Popen",), live=False),
    T("newobj-ex-popen", _newobj_ex_popen, ("subprocess.Popen",), "STACK_GLOBAL", live=False),
    T("protocol4-dotted-name", corpus("protocol4-dotted-name"), ("argparse._os.system",), "STACK_GLOBAL"),
    T("py2-alias-cpickle-loads", corpus("py2-alias-cpickle-loads"), ("cPickle.loads",)),
    T("computed-stack-global-operands", corpus("computed-stack-global-operands"),
      ("<posixpath.basename('/x/os')>.<posixpath.basename('/x/system')>",), "STACK_GLOBAL"),
    T("frame-straddling-opcode", _frames_straddled, ("builtins.exec",), "STACK_GLOBAL"),
    # Code execution through builtins and gadgets
    T("builtins-eval", simple("builtins", "eval", text_arg(SRC_TEXT)), ("builtins.eval",)),
    T("builtins-exec-compile", corpus("builtins-exec-compile"), ("builtins.compile", "builtins.exec")),
    T("getattr-import-chain", corpus("getattr-import-chain"), ("builtins.__import__", "builtins.getattr")),
    T("build-setstate-gadget", corpus("build-setstate-gadget"), ("os.system",)),
    T("operator-attrgetter", corpus("operator-attrgetter"), ("operator.attrgetter", "builtins.__import__")),
    T("operator-methodcaller", corpus("operator-methodcaller"), ("operator.methodcaller", "builtins.__import__")),
    T("functools-partial", corpus("functools-partial"), ("functools.partial", "os.system")),
    T("marshal-code-function", corpus("marshal-code-function"), ("marshal.loads", "types.FunctionType")),
    T("runpy-run-code", corpus("runpy-run-code"), ("runpy._run_code",)),
    T("importlib-import-module", corpus("importlib-import-module"), ("importlib.import_module",)),
    T("osx-support-read-output", simple("_osx_support", "_read_output", text_arg(CMD)),
      ("_osx_support._read_output",)),
    # Side effects: files, processes, network
    T("shutil-rmtree", _rmtree, ("shutil.rmtree",)),
    T("numpy-memmap-creates-file", corpus("numpy-memmap-creates-file"), ("numpy.memmap",)),
    T("subprocess-check-output", simple("subprocess", "check_output", list_arg(TOUCH, SENTINEL)),
      ("subprocess.check_output",)),
    T("pty-spawn", simple("pty", "spawn", list_arg(TOUCH, SENTINEL)), ("pty.spawn",),
      live=False),
    T("socket-create-connection", _connect, ("socket.create_connection",), live=False),
    T("webbrowser-open", simple("webbrowser", "open", text_arg(SENTINEL)), ("webbrowser.open",),
      live=False),
    T("pip-main", simple("pip", "main", list_arg(lambda _: "--version")), ("pip.main",),
      live=False),
    # torch look-alikes (torch._utils._rebuild_tensor_v2 is fine: every real file has it)
    T("torch-serialization-load", simple("torch.serialization", "load", text_arg(SENTINEL)),
      ("torch.serialization.load",), live=False),
    T("torch-hub-load", simple("torch.hub", "load", text_arg(SENTINEL), text_arg(SENTINEL)),
      ("torch.hub.load",), live=False),
    T("torch-load", simple("torch", "load", text_arg(SENTINEL)), ("torch.load",), live=False),
    T("torch-storage-load-from-bytes",
      simple("torch.storage", "_load_from_bytes", lambda t: raw_bytes(b"x")),
      ("torch.storage._load_from_bytes",), live=False),
    # Past an operation the reader's stand-ins cannot mirror, a payload a static scan misses
    T("after-calling-a-call-result", _after(CALL_A_CALL_RESULT), ("os.system",), "STACK_GLOBAL"),
    T("after-newobj-on-stand-in", _after(NEWOBJ_ON_STAND_IN), ("os.system",), "STACK_GLOBAL"),
    T("after-parameter-without-args", _after(PARAMETER_NO_ARGS), ("os.system",), "STACK_GLOBAL",
      live=False),
    T("after-dtype-as-dict-key", _after(DTYPE_AS_KEY), ("os.system",), "STACK_GLOBAL",
      live=False),
]


# --- container writers ------------------------------------------------------------------------

def _torch() -> Any:
    return pytest.importorskip("torch")


def rewrite_zip(src: Path, dst: Path, edit: dict[str, Callable[[bytes], bytes]]) -> Path:
    """Copy a zip record by record (ZIP_STORED), passing the records whose name ends with a
    key of ``edit`` through its function."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, change in edit.items():
                if info.filename.endswith(suffix):
                    data = change(data)
            zout.writestr(zipfile.ZipInfo(info.filename, info.date_time), data)
    return dst


@pytest.fixture(scope="session")
def torch_zip_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``torch.save`` zip of a small state dict: w [2, 3], b [3]."""
    torch = _torch()
    path = tmp_path_factory.mktemp("base") / "model.pt"
    torch.save({"w": torch.ones(2, 3), "b": torch.zeros(3), "step": 7}, path)
    return path


def torch_zip_with(base: Path, dst: Path, change: Callable[[bytes], bytes]) -> Path:
    """``base`` with its ``<prefix>/data.pkl`` rewritten by ``change``."""
    return rewrite_zip(base, dst, {"/data.pkl": change})


@pytest.fixture(scope="session")
def legacy_parts() -> tuple[list[bytes], bytes]:
    """A real legacy ``torch.save`` file split into its five pickles and the storage table."""
    _torch()
    return containers.legacy_parts()


LEGACY_PICKLES = containers.LEGACY_PICKLES


def legacy_with(parts: tuple[list[bytes], bytes], dst: Path, index: int, body: bytes) -> Path:
    pickles, storages = parts
    edited = [inject(p, body) if i == index else p for i, p in enumerate(pickles)]
    dst.write_bytes(b"".join(edited) + storages)
    return dst


def hand_legacy(dst: Path, obj_pickle: bytes, keys_pickle: bytes | None = None) -> Path:
    """A legacy stream built by hand (no storages): magic, 1001, sys_info, object, keys."""
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    dst.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
                    + pickle.dumps(1001, protocol=2) + pickle.dumps(sys_info, protocol=2)
                    + obj_pickle + (keys_pickle or pickle.dumps([], protocol=2)))
    return dst


@pytest.fixture(scope="session")
def torchscript_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = _torch()
    path = tmp_path_factory.mktemp("jit") / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(path))
    return path


def npz_with_object_array(dst: Path, cmd: str, compressed: bool = False) -> Path:
    return containers.npz(dst, cmd, compressed)


# --- running ckptkit --------------------------------------------------------------------------

def run_cli(path: Path, *extra: str, timeout: float = 60,
            command: str = "inspect") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    env.pop("CKPTKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ckptkit", command, str(path), *extra],
                          capture_output=True, text=True, cwd=path.parent, env=env,
                          timeout=timeout)


def assert_caught(path: Path, target: Target, unsafe: tuple[str, ...],
                  via: str | None = None, as_json: bool = False) -> Any:
    """The full contract for a hostile file; returns the in-process CheckpointInfo."""
    info = ckptkit.inspect(path)
    assert not target.harmed(), "payload fired during ckptkit.inspect"
    for name in unsafe:
        assert name in info.unsafe, (name, info.unsafe)
    assert set(info.unsafe) <= set(info.details["unsafe_via"])
    if via is not None:
        assert info.details["unsafe_via"][unsafe[0]] == via
    result = run_cli(path, *(("--json",) if as_json else ()))
    assert not target.harmed(), "payload fired during `ckpt inspect`"
    assert result.returncode == ExitCode.UNSAFE, result.stderr
    assert "Traceback" not in result.stderr
    assert "unsafe content" in result.stderr and unsafe[0] in result.stderr
    if as_json:
        assert set(unsafe) <= set(json.loads(result.stdout)["unsafe"])
    else:
        assert "UNSAFE" in result.stdout
    assert_scanned_unsafe(path, target, unsafe, via)
    figures.count("hostile-files")
    return info


def assert_scanned_unsafe(path: Path, target: Target, unsafe: tuple[str, ...],
                          via: str | None = None) -> None:
    """`ckpt scan` (library and CLI) calls the file unsafe and says how each name is reached."""
    (result,) = scan([path]).results
    assert not target.harmed(), "payload fired during scan"
    assert result.verdict == "unsafe", result
    found = {d.name: d for d in result.unsafe}
    assert set(unsafe) <= set(found), (unsafe, found)
    assert all(d.via and d.where for d in result.unsafe), result.unsafe
    if via is not None:
        assert found[unsafe[0]].via == via
    cli = run_cli(path, "--json", command="scan")
    assert not target.harmed(), "payload fired during `ckpt scan`"
    assert cli.returncode == ExitCode.UNSAFE, cli.stderr
    (data,) = json.loads(cli.stdout)["files"]
    assert data["verdict"] == "unsafe" and set(unsafe) <= {d["callable"] for d in data["unsafe"]}


def shapes(info: Any) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.shape) for t in info.tensors}


# --- techniques, each injected into a real torch.save zip -------------------------------------

@pytest.mark.parametrize("tech", TECHNIQUES, ids=[t.id for t in TECHNIQUES])
def test_technique_in_torch_zip(tech: Technique, torch_zip_base: Path, target: Target,
                                tmp_path: Path) -> None:
    body = tech.body(target)
    path = torch_zip_with(torch_zip_base, tmp_path / "model.pt", lambda old: inject(old, body))
    info = assert_caught(path, target, tech.unsafe, tech.via)
    # It still printed what it could read: the real tensors around the payload.
    assert info.format == "torch-zip"
    assert shapes(info) == {"w": (2, 3), "b": (3,)}


@pytest.mark.parametrize("proto", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reduce_os_system_every_protocol(proto: int, torch_zip_base: Path, target: Target,
                                         tmp_path: Path) -> None:
    """``pickle.dumps`` of an object whose __reduce__ is (os.system, cmd): data.pkl replaced."""
    payload = pickle.dumps({"w": Reduce(os.system, target.cmd)}, protocol=proto)
    if proto >= 4:
        assert pickle.FRAME in payload  # protocol 4-5 output is framed
    path = torch_zip_with(torch_zip_base, tmp_path / "model.pt", lambda _old: payload)
    assert_caught(path, target, (SYSTEM,), "STACK_GLOBAL" if proto >= 4 else "GLOBAL")


def test_protocol5_frames_hand_built(torch_zip_base: Path, target: Target,
                                     tmp_path: Path) -> None:
    """Several FRAMEs, the payload in the second, each frame exactly sized."""
    first = ustr("builtins") + put(0) + ustr("eval") + put(1) + pickle.POP + pickle.POP
    second = get(0) + get(1) + pickle.STACK_GLOBAL + tup(ustr(target.src)) + pickle.REDUCE
    payload = (pickle.PROTO + b"\x05" + pickle.FRAME + struct.pack("<Q", len(first)) + first
               + pickle.FRAME + struct.pack("<Q", len(second) + 1) + second + pickle.STOP)
    path = torch_zip_with(torch_zip_base, tmp_path / "model.pt", lambda _old: payload)
    assert_caught(path, target, ("builtins.eval",), "STACK_GLOBAL")


def test_benign_torch_globals_are_not_unsafe(torch_zip_base: Path) -> None:
    """'torch._utils _rebuild_tensor_v2' is how every tensor is written: fine."""
    data = zipfile.ZipFile(torch_zip_base).read("model/data.pkl")
    assert b"torch._utils\n_rebuild_tensor_v2" in data
    info = ckptkit.inspect(torch_zip_base)
    assert info.unsafe == () and info.objects == ()
    assert run_cli(torch_zip_base).returncode == ExitCode.OK


# --- containers -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.bin", "last.ckpt", "checkpoint", "weights.safetensors"])
def test_torch_zip_detected_by_content_not_suffix(name: str, torch_zip_base: Path,
                                                  target: Target, tmp_path: Path) -> None:
    payload = pickle.dumps(Reduce(os.system, target.cmd), protocol=2)
    path = torch_zip_with(torch_zip_base, tmp_path / name, lambda _old: payload)
    info = assert_caught(path, target, (SYSTEM,), as_json=True)
    assert info.format == "torch-zip"


@pytest.mark.parametrize("index", range(5), ids=LEGACY_PICKLES)
def test_legacy_payload_in_each_pickle(index: int, legacy_parts: tuple[list[bytes], bytes],
                                       target: Target, tmp_path: Path) -> None:
    """Scanners that read only the first pickle miss payloads in the 4th or 5th one."""
    body = call(glob("os", "system"), ustr("touch PWNED"))
    path = legacy_with(legacy_parts, tmp_path / "old.pt", index, body)
    info = assert_caught(path, target, ("os.system",), "GLOBAL", as_json=True)
    assert info.format == "torch-legacy"
    assert shapes(info) == {"w": (2, 3)}


def test_legacy_long_payload_in_magic_pickle(legacy_parts: tuple[list[bytes], bytes],
                                             target: Target, tmp_path: Path) -> None:
    path = legacy_with(legacy_parts, tmp_path / "old.pt", 0,
                       call(glob("os", "system"), ustr(target.cmd)))
    assert run_cli(path).returncode == ExitCode.UNSAFE


@pytest.mark.parametrize("where", ["object", "storage_keys"])
def test_legacy_stream_built_by_hand(where: str, target: Target, tmp_path: Path) -> None:
    payload = whole(call(glob("posix", "system"), ustr(target.cmd)))
    if where == "object":
        path = hand_legacy(tmp_path / "hand.pt", payload)
    else:  # the key list must still be a list after the payload ran
        keys = whole(call(glob("posix", "system"), ustr(target.cmd)) + pickle.POP
                     + pickle.EMPTY_LIST)
        path = hand_legacy(tmp_path / "hand.pt", pickle.dumps({"step": 1}, protocol=2), keys)
    info = assert_caught(path, target, ("posix.system",))
    assert info.format == "torch-legacy"


@pytest.mark.parametrize("record", ["data.pkl", "constants.pkl"])
def test_torchscript_payload(record: str, torchscript_base: Path, target: Target,
                             tmp_path: Path) -> None:
    body = call(glob("os", "system"), ustr(target.cmd))
    path = rewrite_zip(torchscript_base, tmp_path / "scripted.pt",
                       {f"/{record}": lambda old: inject(old, body)})
    info = assert_caught(path, target, ("os.system",), as_json=True)
    assert info.format == "torchscript"
    assert shapes(info) == {"weight": (2, 3), "bias": (2,)}


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_npz_object_array(compressed: bool, target: Target, tmp_path: Path) -> None:
    path = npz_with_object_array(tmp_path / "arrays.npz", target.cmd, compressed)
    info = assert_caught(path, target, (SYSTEM,), as_json=True)
    assert info.format == "npz"
    assert shapes(info) == {"weights": (2, 3)}


def test_build_cannot_poison_shared_stand_ins(torch_zip_base: Path, tmp_path: Path) -> None:
    """BUILD on torch.FloatStorage must not change how the next file in the process reads."""
    slots = pickle.EMPTY_DICT + ustr("dtype") + ustr("int8") + pickle.SETITEM
    poison = whole(glob("torch", "FloatStorage") + tup(pickle.NONE, slots) + pickle.BUILD)
    path = torch_zip_with(torch_zip_base, tmp_path / "poison.pt", lambda _old: poison)
    ckptkit.inspect(path)
    assert {t.dtype for t in ckptkit.inspect(torch_zip_base).tensors} == {"float32"}


def test_corrupt_pickle_that_already_called_something(torch_zip_base: Path, target: Target,
                                                      tmp_path: Path) -> None:
    """pickle.load runs the payload before it meets the cut: unsafe first, corrupt second."""
    payload = whole(call(glob("os", "system"), ustr(target.cmd)) + pickle.POP
                    + pickle.EMPTY_DICT + pickle.MARK + ustr("w"))[:-1]
    path = torch_zip_with(torch_zip_base, tmp_path / "cut.pt", lambda _old: payload)
    with pytest.raises(IntegrityError, match="os.system"):
        ckptkit.inspect(path)
    result = run_cli(path)
    assert not target.harmed()
    assert result.returncode == ExitCode.UNSAFE
    assert "os.system" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- the corpus is live: the real loaders do fire every payload marked live -------------------

_FIRE = """
import pickle, sys
for path in sys.argv[1:]:
    try:
        pickle.loads(open(path, "rb").read())
    except Exception:
        pass
"""

_FIRE_CONTAINERS = """
import sys, numpy, torch
torch.load(sys.argv[1], weights_only=False)
torch.load(sys.argv[2], weights_only=False)
numpy.load(sys.argv[3], allow_pickle=True)["evil"]
"""


def test_payloads_fire(tmp_path: Path, torch_zip_base: Path,
                       legacy_parts: tuple[list[bytes], bytes]) -> None:
    """Without this, 'no sentinel' could just mean a broken payload."""
    cases: list[tuple[str, Target, Path]] = []
    for tech in [t for t in TECHNIQUES if t.live]:
        target = Target(tmp_path / tech.id).arm()
        path = target.root / "payload.pkl"
        path.write_bytes(whole(tech.body(target)))
        cases.append((tech.id, target, path))
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        target = Target(tmp_path / f"proto{proto}").arm()
        path = target.root / "payload.pkl"
        path.write_bytes(pickle.dumps(Reduce(os.system, target.cmd), protocol=proto))
        cases.append((f"protocol-{proto}", target, path))
    subprocess.run([sys.executable, "-c", _FIRE, *(str(p) for _, _, p in cases)],
                   cwd=tmp_path, capture_output=True, timeout=120, check=True)
    assert [name for name, target, _ in cases if not target.harmed()] == []

    zipped = Target(tmp_path / "zip").arm()
    legacy = Target(tmp_path / "legacy").arm()
    npz = Target(tmp_path / "npz").arm()
    body = call(glob("os", "system"), ustr(zipped.cmd))
    files = [torch_zip_with(torch_zip_base, zipped.root / "model.pt", lambda o: inject(o, body)),
             legacy_with(legacy_parts, legacy.root / "old.pt", 4,
                         call(glob("os", "system"), ustr(legacy.cmd))),
             npz_with_object_array(npz.root / "a.npz", npz.cmd)]
    subprocess.run([sys.executable, "-c", _FIRE_CONTAINERS, *map(str, files)], cwd=tmp_path,
                   capture_output=True, timeout=120, check=True)
    assert zipped.harmed() and legacy.harmed() and npz.harmed()


# --- benign look-alikes: custom classes and numpy values are objects, not unsafe --------------

class Custom:
    def __init__(self, depth: int):
        self.depth = depth


class Hyperparams(dict):
    """Jukebox's hparams: a dict subclass with attribute access."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _benign_checkpoint() -> dict[str, Any]:
    torch = _torch()
    return {
        "model": collections.OrderedDict([("proj.weight", torch.ones(4, 2)),
                                          ("proj.bias", torch.zeros(4))]),
        "args": argparse.Namespace(lr=0.1, dims=[64, 128]),
        "custom": Custom(3),
        "hps": Hyperparams(sr=44100, levels=3),
        "best": np.float64(1.25),
        "mean": np.arange(6, dtype=np.float32).reshape(2, 3),
        "step": 10,
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_benign_objects_are_not_unsafe(legacy: bool, tmp_path: Path) -> None:
    torch = _torch()
    path = tmp_path / "benign.pt"
    torch.save(_benign_checkpoint(), path, _use_new_zipfile_serialization=not legacy)
    info = ckptkit.inspect(path)
    assert info.unsafe == ()
    for cls in (argparse.Namespace, Custom, Hyperparams):
        assert _qualname(cls) in info.objects
    # The numpy array inside the pickle is listed with the tensors; the scalar is metadata.
    assert shapes(info) == {"model.proj.weight": (4, 2), "model.proj.bias": (4,),
                            "mean": (2, 3)}
    assert info.metadata["step"] == 10 and info.metadata["best"] == 1.25
    result = run_cli(path, "--json")
    assert result.returncode == ExitCode.OK, result.stderr
    data = json.loads(result.stdout)
    assert data["unsafe"] == [] and _qualname(Custom) in data["objects"]
    (scanned,) = scan([path]).results
    assert scanned.verdict == "unknown-objects" and scanned.unsafe == ()
    assert {_qualname(c) for c in (argparse.Namespace, Custom, Hyperparams)} <= set(
        scanned.objects)
    cli = run_cli(path, command="scan")
    assert cli.returncode == ExitCode.OK and "unknown-objects" in cli.stdout, cli.stderr
    figures.count("benign-objects")


# --- denial of service: quick, clean, bounded ------------------------------------------------

def _laughs_list(levels: int, width: int = 10) -> bytes:
    """Memo index n holds a list of `width` references to list n-1; pushes the top one."""
    body = pickle.EMPTY_LIST + put(0) + pickle.BININT1 + b"\x01" + pickle.APPEND + pickle.POP
    for level in range(1, levels + 1):
        body += (pickle.EMPTY_LIST + put(level) + pickle.MARK + get(level - 1) * width
                 + pickle.APPENDS + pickle.POP)
    return body + get(levels)


def _laughs_tuple(levels: int, width: int = 10) -> bytes:
    body = pickle.BININT1 + b"\x01" + pickle.TUPLE1 + put(0) + pickle.POP
    for level in range(1, levels + 1):
        body += pickle.MARK + get(level - 1) * width + pickle.TUPLE + put(level) + pickle.POP
    return body + get(levels)


def _in_namespace(value: bytes) -> bytes:
    """{'args': Namespace(a=value)}: summaries print a custom object's state."""
    state = pickle.EMPTY_DICT + ustr("a") + value + pickle.SETITEM
    ns = glob("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + state + pickle.BUILD
    return pickle.EMPTY_DICT + ustr("args") + ns + pickle.SETITEM


DOS_CASES: dict[str, bytes] = {
    "long-binput-0xffffffff": whole(pickle.EMPTY_DICT + pickle.LONG_BINPUT + b"\xff" * 4
                                    + pickle.LONG_BINGET + b"\xff" * 4 + pickle.POP),
    "laughs-list": whole(_laughs_list(9)),
    "laughs-in-object-state": whole(_in_namespace(_laughs_list(9))),
    "laughs-tuple-as-dict-key": whole(pickle.EMPTY_DICT + _laughs_tuple(9) + pickle.NONE
                                      + pickle.SETITEM),
    "laughs-stringified-by-torch-device": whole(call(glob("torch", "device"), _laughs_list(9))),
    "laughs-in-persistent-id": whole(tup(ustr("storage"), glob("torch", "FloatStorage"),
                                         _laughs_list(9), ustr("cpu"), pickle.BININT1 + b"\x01")
                                     + pickle.BINPERSID),
    "nested-lists-10000": whole(pickle.EMPTY_LIST * 10_000 + pickle.APPEND * 9_999),
    "nested-dicts-10000": whole((pickle.EMPTY_DICT + pickle.BININT1 + b"\x01") * 10_000
                                + pickle.EMPTY_DICT + pickle.SETITEM * 10_000),
    "nested-tuples-10000": whole(pickle.MARK * 10_000 + pickle.EMPTY_TUPLE
                                 + pickle.TUPLE * 10_000),
    "bytearray8-claims-512MiB": whole(pickle.BYTEARRAY8 + struct.pack("<Q", 512 << 20) + b"x",
                                      proto=5),
    "binbytes8-claims-4EiB": whole(pickle.BINBYTES8 + struct.pack("<Q", 1 << 62) + b"x", proto=4),
    "frame-claims-4EiB": whole(pickle.FRAME + struct.pack("<Q", 1 << 62) + pickle.NONE, proto=4),
    "100k-calls-on-call-results": whole(glob("typing", "NewType")
                                        + (pickle.EMPTY_TUPLE + pickle.REDUCE) * 100_000),
    "truncated-midway": pickle.dumps({"w": list(range(50)), "step": 3}, protocol=2)[:40],
}


def within_budget(account: budget.Budget, name: str) -> None:
    """Work bounded in work units: no kind of the budget (opcodes, objects, stack and memo,
    tree nodes) went past its limit by more than one batch of counted opcodes."""
    for kind in ("opcodes", "nodes", "stack", "tree", "decompressed"):
        assert account.used[kind] <= account.limit(kind) + 4096 * 3 + 40, (name, kind)


@pytest.mark.parametrize("name", list(DOS_CASES))
def test_dos_inputs_end_quickly_and_cleanly(name: str, torch_zip_base: Path,
                                            tmp_path: Path) -> None:
    payload = DOS_CASES[name]
    path = torch_zip_with(torch_zip_base, tmp_path / "dos.pt", lambda _old: payload)
    tracemalloc.start()
    try:
        with budget.reading(path) as account:
            outcome: int = ExitCode.UNSAFE if ckptkit.inspect(path).unsafe else ExitCode.OK
    except CkptkitError as exc:
        outcome = exc.exit_code
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    within_budget(account, name)
    # No more opcodes than the payload has bytes: a billion laughs stops at the tree budget.
    assert account.used["opcodes"] <= len(payload) + 4096, (name, account.used)
    assert peak < 64 << 20, f"{name} peaked at {peak >> 20} MiB"
    # Calling the result of a call is unsafe whatever it returns; the rest read or fail.
    unsafe = name == "100k-calls-on-call-results"
    assert outcome == ExitCode.UNSAFE if unsafe else outcome in (ExitCode.OK, ExitCode.INTEGRITY)
    if name == "truncated-midway":
        assert outcome == ExitCode.INTEGRITY
    result = run_cli(path, timeout=30)
    assert result.returncode == outcome, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr) < 1000
    if outcome == ExitCode.INTEGRITY:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckpt: error:")
    with budget.reading(path) as account:
        (scanned,) = scan([path]).results
    within_budget(account, name)
    assert scanned.verdict == ("unsafe" if unsafe else "unreadable" if outcome else
                               scanned.verdict)
    assert unsafe or scanned.verdict != "unsafe"
    figures.count("dos-inputs")


def test_dos_in_legacy_object_pickle(tmp_path: Path) -> None:
    """The same memo expansion through the legacy reader (its own persistent-id handler)."""
    payload = whole(_in_namespace(_laughs_list(9)))
    path = hand_legacy(tmp_path / "laughs.pt", payload)
    with budget.reading(path) as account, pytest.raises(IntegrityError, match="expands"):
        ckptkit.inspect(path)
    within_budget(account, "laughs")
    assert account.used["tree"] == account.limit("tree")  # stopped by it, not by luck
    assert run_cli(path, timeout=30).returncode == ExitCode.INTEGRITY


def test_nesting_just_under_the_limit_is_read(torch_zip_base: Path, tmp_path: Path) -> None:
    """390 levels is deep but legal: a result, not a RecursionError."""
    payload = whole(_in_namespace(pickle.EMPTY_LIST * 390 + pickle.APPEND * 389))
    path = torch_zip_with(torch_zip_base, tmp_path / "deep.pt", lambda _old: payload)
    info = ckptkit.inspect(path)
    assert info.unsafe == () and "argparse.Namespace" in info.objects
    for extra in ((), ("--json",)):
        result = run_cli(path, *extra)
        assert result.returncode == ExitCode.OK, result.stderr


@pytest.mark.parametrize("module, name", [
    ("yaml", "unsafe_load"), ("torch.fx.graph_module", "reduce_graph_module"),
    ("torch.utils.cpp_extension", "load_inline"), ("numpy.ctypeslib", "load_library"),
    ("torch._C", "_import_ir_module"), ("torch.package", "PackageImporter"),
    ("IPython.core.interactiveshell", "InteractiveShell"), ("jinja2", "Template")])
def test_third_party_gadgets_are_unsafe(module: str, name: str) -> None:
    from ckptkit.pickles import danger

    assert danger.is_dangerous(module, name)


@pytest.mark.parametrize("index", [1, 4], ids=["protocol", "storage_keys"])
def test_legacy_payload_in_a_pickle_that_must_be_plain_data(index: int, tmp_path: Path) -> None:
    """torch.load runs pickles 2 and 5 too: a payload there is unsafe, not merely corrupt."""
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps({"little_endian": True}, protocol=2), pickle.dumps({"a": 1}, protocol=2),
             pickle.dumps([], protocol=2)]
    parts[index] = pickle.dumps(Reduce(os.system, "true"), protocol=2)
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"".join(parts))
    with pytest.raises(ckptkit.CkptkitError) as caught:
        ckptkit.inspect(path)
    assert caught.value.exit_code == ExitCode.UNSAFE
    assert "system" in str(caught.value)
    assert_scanned_unsafe(path, Target(tmp_path).arm(), (SYSTEM,))
    figures.count("hostile-files")


def test_corpus_covers_the_required_techniques() -> None:
    """At least 25 distinct techniques, each aiming at a different callable or route."""
    ids = [t.id for t in TECHNIQUES]
    assert len(set(ids)) == len(ids) >= 25
    routes = {t.via for t in TECHNIQUES if t.via}
    assert {"GLOBAL", "STACK_GLOBAL", "INST"} <= routes  # the corpus counts the figure
