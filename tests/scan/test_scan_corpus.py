"""The scan corpus (scripts/scan_corpus.py): every hostile file is live under its real loader
and ``unsafe`` under ``ckpt scan``; no benign file is ``unsafe``.

The corpus is written once per session.  Liveness is proven in one throwaway interpreter
(``scan_corpus.py --fire``) that loads every hostile file with its loader: each payload must
create its own marker, or (network techniques) connect to a port this test listens on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ckptkit.errors import ExitCode
from ckptkit.scan.scanning import ScanOptions, scan
from tests import figures
from tests.conftest import run_ckpt

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import scan_corpus  # noqa: E402
from corpus.techniques import TECHNIQUES  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("joblib")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Any:
    listeners: dict[str, socket.socket] = {}

    def port_for(entry_id: str) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listeners[entry_id] = listener
        return listener.getsockname()[1]

    root = tmp_path_factory.mktemp("corpus")
    entries = scan_corpus.build(root, port_for)
    yield root, entries, listeners
    for listener in listeners.values():
        listener.close()


def _connected(listener: socket.socket) -> bool:
    listener.settimeout(0)
    try:
        connection, _address = listener.accept()
    except OSError:
        return False
    connection.close()
    return True


def test_every_hostile_file_is_live_under_its_loader(corpus: Any, tmp_path: Path) -> None:
    """Without this, 'unsafe' could be said of a file whose payload never ran anywhere."""
    root, entries, listeners = corpus
    result = tmp_path / "fired.json"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    fire = subprocess.run([sys.executable, str(SCRIPTS / "scan_corpus.py"), "--fire", str(root),
                           str(result)], cwd=tmp_path, env={**env, "NO_PROXY": "*"},
                          capture_output=True, text=True, timeout=900)
    assert fire.returncode == 0, fire.stderr[-3000:]
    fired = json.loads(result.read_text())
    for entry in entries:
        if entry.hostile and entry.port:
            fired[entry.id]["live"] = _connected(listeners[entry.id])
    dead = [e.id for e in entries if e.hostile and not fired[e.id]["live"]]
    assert dead == []
    # CVE-2025-32434 went through the legacy tar path; the torch installed here refuses it
    # under weights_only=True (the file is still live without it, and unsafe to scan).
    assert {e.id: fired[e.id]["weights_only"] for e in entries if e.weights_only} == {
        "torch-legacy-tar": False}


def test_every_hostile_file_is_unsafe_every_benign_file_is_not(corpus: Any) -> None:
    root, entries, _listeners = corpus
    report = scan([root / "hostile", root / "benign"])
    verdicts = {Path(r.path).relative_to(root).as_posix(): r for r in report.results}
    wrong = {e.id: verdicts[e.path].verdict for e in entries
             if verdicts[e.path].verdict != ("unsafe" if e.hostile else e.expected)}
    assert wrong == {}
    assert all(r.unsafe and all(d.via and d.where for d in r.unsafe)
               for r in report.results if r.verdict == "unsafe")
    assert len(report.results) == len(entries) and report.skipped == []
    hostile = [e for e in entries if e.hostile]
    figures.count("hostile-files", len(hostile))
    figures.count("benign-files", sum(not e.hostile for e in entries))


def test_corpus_covers_every_class_of_issue_12(corpus: Any) -> None:
    _root, entries, _listeners = corpus
    classes = Counter(e.klass for e in entries if e.hostile)
    assert set(classes) == {"named-callable", "gadget", "computed-callable", "frames",
                            "module-state", "encoding", "what-loaders-read", "every-file",
                            "container"}
    assert sum(classes.values()) > 100
    assert {e.loader for e in entries if e.hostile} == set(scan_corpus.LOADERS)
    figures.count("hostile-techniques", len(TECHNIQUES))


def test_cli_gate_over_the_corpus(corpus: Any) -> None:
    """One CI invocation: unsafe and not-proven-safe files fail it; the JSON names the
    callable, opcode, pickle and byte offset of each finding."""
    root, entries, _listeners = corpus
    result = run_ckpt("scan", str(root / "benign"), "--fail-on", "unknown", "--json")
    assert result.returncode == ExitCode.UNSAFE, result.stderr  # TorchScript, Namespace ...
    data = json.loads(result.stdout)
    assert data["summary"]["unsafe"] == 0 and data["summary"]["unknown-objects"] > 0
    safe_only = [str(root / e.path) for e in entries if not e.hostile and e.expected == "safe"]
    assert run_ckpt("scan", *safe_only, "--fail-on", "unknown").returncode == ExitCode.OK
    hostile = run_ckpt("scan", str(root / "hostile" / "pkgutil-resolve-name.pkl"), "--json")
    assert hostile.returncode == ExitCode.UNSAFE
    (file,) = json.loads(hostile.stdout)["files"]
    assert {(d["callable"], d["opcode"], d["pickle"]) for d in file["unsafe"]} == {
        ("pkgutil.resolve_name", "STACK_GLOBAL", "pickle 1"),
        ("<pkgutil.resolve_name('os:system')>()", "REDUCE", "pickle 1")}
    assert all(isinstance(d["offset"], int) for d in file["unsafe"])


def test_torchscript_code_is_not_vetted_unless_trusted(corpus: Any) -> None:
    root, _entries, _listeners = corpus
    module = root / "benign" / "module.pt"
    (result,) = scan([module]).results
    assert result.verdict == "unknown-objects"
    assert any("TorchScript code" in o and "not vetted" in o for o in result.objects)
    (trusted,) = scan([module], ScanOptions(trust_torchscript=True)).results
    assert trusted.verdict == "safe" and "trusted" in trusted.note
    cli = run_ckpt("scan", str(module), "--trust-torchscript", "--fail-on", "unknown")
    assert cli.returncode == ExitCode.OK and "safe" in cli.stdout
