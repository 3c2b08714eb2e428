"""`ckpt doctor`: text and JSON output, exit codes, shared flags, and a start-up that imports no
framework — against a MirrorServer on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkit import config
from ckptkit.hub.fetch import plan_fetch
from ckptkit.testing.hubs import MirrorServer
from tests.conftest import SRC, run_ckpt, run_main, run_python

SAMPLES = SRC / "ckptkit" / "samples"


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[MirrorServer]:
    root = tmp_path / "mirror"
    (root / "files" / "gresearch" / "musiq").mkdir(parents=True)
    shutil.copy(SAMPLES / "spaq_ckpt.npz", root / "files" / "gresearch" / "musiq")
    shutil.copytree(SAMPLES / "musiq_saved_model", root / "tfhub/google/musiq/spaq/1")
    shutil.copytree(SAMPLES / "musiq_saved_model",
                    root / "kaggle/google/musiq/tensorFlow2/spaq/1")
    with MirrorServer(root) as server:
        yield server


def rules(base: str) -> str:
    return (f"https://tfhub.dev={base}/tfhub,https://api.kaggle.com={base}/kaggle,"
            f"https://storage.googleapis.com={base}/files")


def fetched(mirror: MirrorServer) -> None:
    plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    mirror.requests.clear()


# Online runs go through a fresh `ckpt` process: in this one, kagglehub (imported by the Kaggle
# probe) would bind its log handler to capsys's stream, which is closed after the test.

def test_text_report_has_environment_a_table_and_a_summary(mirror: MirrorServer) -> None:
    fetched(mirror)
    result = run_ckpt("doctor", "musiq-spaq", "--mirror", rules(mirror.base))
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, err
    assert out.startswith("ckptkit ") and "\nextras    " in out and "\ncache     " in out
    assert "musiq-spaq: ok - all 2 file(s) cached and verified" in out
    header = next(line for line in out.splitlines() if "REACHABLE" in line)
    assert header.split() == ["SOURCE", "REACHABLE", "AUTH", "CACHED", "VERIFIED", "WHERE"]
    tfhub = next(line for line in out.splitlines() if line.startswith("    tfhub "))
    assert "yes (206," in tfhub and "yes (TF Hub cache" in tfhub and "matches the pin" in tfhub
    assert out.rstrip().endswith("1 model(s): 1 ok; exit 0")
    assert "checking 2 file(s): 3 request(s)" in err


def test_quiet_prints_only_the_model_reports(capsys: pytest.CaptureFixture[str],
                                             mirror: MirrorServer) -> None:
    fetched(mirror)
    args = ("doctor", "musiq-spaq", "--offline", "--mirror", rules(mirror.base))
    _, loud, loud_err = run_main(capsys, *args)
    code, out, err = run_main(capsys, *args, "--quiet")
    assert code == 0 and err == "" and "checking 2 file(s)" in loud_err
    # The environment block is informational: gone.  The per-model report is the result.
    assert loud.startswith("ckptkit ") and "\ncache     " in loud
    assert out.startswith("musiq-spaq: ok - all 2 file(s) cached and verified\n")
    starts = {line.split(" ", 1)[0] for line in out.splitlines()}
    assert not starts & {"ckptkit", "extras", "cache", "config", "kaggle", "network", "env"}
    assert out == loud[loud.index("musiq-spaq: ok"):]
    assert out.rstrip().endswith("1 model(s): 1 ok; exit 0")
    # --json is the same with or without --quiet (only stderr changes).
    _, as_json, _ = run_main(capsys, *args, "--json")
    _, quiet_json, quiet_err = run_main(capsys, *args, "--json", "-q")
    assert quiet_err == "" and json.loads(quiet_json).keys() == json.loads(as_json).keys()
    assert "environment" in json.loads(quiet_json)


def test_offline_does_not_import_requests() -> None:
    # Offline, doctor sends nothing: the HTTP stack (about 100 ms to import) is never loaded.
    code = ("import sys\nfrom ckptkit.cli.main import main\n"
            "try:\n    main(['doctor', 'musiq-spaq', 'jukebox-5b', '--offline', '-q'])\n"
            "except SystemExit as exc:\n    code = exc.code\n"
            "print('exit', code, sorted(m for m in ('requests', 'urllib3') if m in sys.modules),"
            " file=sys.stderr)")
    result = run_python(code)
    assert result.stderr.strip().splitlines()[-1] == "exit 4 []", result.stderr[-2000:]


def test_json_is_one_document(mirror: MirrorServer) -> None:
    fetched(mirror)
    result = run_ckpt("doctor", "musiq-spaq", "--json", "-q", "--mirror", rules(mirror.base))
    data = json.loads(result.stdout)
    assert result.returncode == 0 and data["exit_code"] == 0 and data["verdict"] == "ok"
    assert result.stderr == ""  # -q: no progress line
    assert [m["name"] for m in data["models"]] == ["musiq-spaq"]


def test_offline_flag_sends_nothing(capsys: pytest.CaptureFixture[str],
                                    mirror: MirrorServer) -> None:
    fetched(mirror)
    code, out, _ = run_main(capsys, "doctor", "musiq-spaq", "--offline", "--mirror",
                            rules(mirror.base))
    assert code == 0 and mirror.requests == []
    assert "offline: no request sent, reachability not checked" in out
    assert "not checked: offline" in out


def test_nothing_reachable_or_cached_exits_4(mirror: MirrorServer) -> None:
    base = mirror.base
    mirror.stop()
    result = run_ckpt("doctor", "musiq-spaq", "--mirror", rules(base), "--timeout", "2")
    assert result.returncode == 4
    assert "musiq-spaq: UNAVAILABLE" in result.stdout
    assert "FAILED: connection refused" in result.stdout


def test_a_damaged_cache_exits_3(capsys: pytest.CaptureFixture[str],
                                 mirror: MirrorServer) -> None:
    fetched(mirror)
    npz = config.settings().cache_dir / "files" / "musiq" / "spaq_ckpt.npz"
    with open(npz, "r+b") as fh:
        fh.write(b"\0")
    code, out, _ = run_main(capsys, "doctor", "musiq-spaq", "--offline")
    assert code == 3 and "FAILED: sha256 differs from the pin" in out


def test_cache_dir_flag_is_honoured(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_main(capsys, "doctor", "loftr", "--offline", "--json",
                            "--cache-dir", str(tmp_path / "elsewhere"))
    data = json.loads(out)
    assert code == 4 and data["environment"]["cache"]["path"] == str(tmp_path / "elsewhere")
    assert data["models"][0]["name"] == "loftr-outdoor"  # an alias resolves


def test_unknown_model_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "doctor", "musiq-spaqq", "--offline")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith("ckpt: error: no model named 'musiq-spaqq'") and "musiq-spaq" in err


def test_bad_timeout_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "doctor", "--timeout", "0")
    assert code == 2 and "--timeout" in err


def test_help_lists_the_shared_flags_and_examples() -> None:
    result = run_ckpt("doctor", "--help")
    assert result.returncode == 0
    for flag in ("--offline", "--mirror", "--local-dir", "--cache-dir", "--catalog", "--json",
                 "--timeout", "Examples:", "ckpt doctor --offline --json"):
        assert flag in result.stdout
    assert f"[default: {config.DOCTOR_TIMEOUT};" in result.stdout  # the one default, shown
    assert "doctor" in run_ckpt("--help").stdout


# Frameworks blocked outright: doctor must run (online and offline) without any of them, and
# must not even import them when they are installed.
NO_FRAMEWORKS = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'tensorflow', 'tensorflow_hub', 'jax', 'flax',
                                  'keras'):
            raise ImportError('blocked for this test: ' + name)
if sys.argv[1] == 'block':
    sys.meta_path.insert(0, Block())
from ckptkit.cli.main import main
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules
               if m.split('.')[0] in ('torch', 'tensorflow', 'tensorflow_hub', 'jax', 'flax'))
print('exit', code, 'heavy', heavy, file=sys.stderr)
"""


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("mode", ["block", "watch"])
@pytest.mark.parametrize("network", ["--offline", "online"])
def test_doctor_imports_no_framework(mode: str, network: str) -> None:
    import os

    dead = f"http://127.0.0.1:{dead_port()}"
    args = ["doctor", "musiq-spaq", "jukebox-5b", "--timeout", "2", "--mirror",
            f"https://tfhub.dev={dead},https://api.kaggle.com={dead},"
            f"https://storage.googleapis.com={dead},https://openaipublic.azureedge.net={dead},"
            f"https://openaipublic.blob.core.windows.net={dead}"]
    if network == "--offline":
        args.append("--offline")
    result = subprocess.run([sys.executable, "-c", NO_FRAMEWORKS, mode, *args],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    last = result.stderr.strip().splitlines()[-1]
    assert last == "exit 4 heavy []", result.stderr[-2000:]
    assert "FAILED: connection refused" in result.stdout or network == "--offline"
