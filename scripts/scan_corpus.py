#!/usr/bin/env python3
"""Write the scan corpus: hostile files (every technique of scripts/corpus/techniques.py, and
payloads placed in every container a loader runs) and benign checkpoints written by the real
libraries, with a manifest saying how each hostile file is loaded.

    scripts/scan_corpus.py OUT_DIR              write the corpus and OUT_DIR/manifest.json
    scripts/scan_corpus.py --fire MANIFEST OUT  (run in a throwaway process) load every
                                                hostile file with its real loader, write which
                                                payloads fired to OUT (JSON)

Every payload is harmless: it creates its own marker file under OUT_DIR/markers, or opens a
connection to a 127.0.0.1 port the caller listens on (network techniques).  The corpus is a
weapon only against the process that loads it with pickle, torch.load, numpy or joblib: load
it only through ``--fire``, in a process you throw away.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import benign, containers  # noqa: E402
from corpus.opcodes import Reduce, inject  # noqa: E402
from corpus.techniques import TECHNIQUES, Target  # noqa: E402

#: Loaders a hostile file can be meant for (what ``--fire`` runs).
LOADERS = ("pickle.loads", "pickle.load", "pickle.load-bytesio", "pickle.load-all",
           "torch.load", "np.load", "joblib.load", "dcp.load", "tar-member")


@dataclass(frozen=True)
class Entry:
    """One corpus file: how its loader is called, and (hostile files) the marker its payload
    creates or the port it connects to."""

    id: str
    path: str  # relative to the corpus root
    hostile: bool
    klass: str = ""  # the class of issue 12 a hostile file exercises
    container: str = ""
    loader: str = ""
    source: str = ""
    marker: str = ""
    port: int = 0
    member: str = ""  # tar-member: the member a hub download's user would load
    weights_only: bool = False  # the technique targets torch.load(weights_only=True) too
    expected: str = ""  # benign files: the verdict ckpt scan owes them


def build(root: Path, port_for: Callable[[str], int] = lambda _id: 9) -> list[Entry]:
    """Write the corpus under ``root`` (hostile/, benign/, markers/, manifest.json).

    ``port_for(entry id)`` is the 127.0.0.1 port a network payload connects to: the caller
    listens there to see it happen (9, discard, when nobody checks)."""
    hostile_dir, markers = root / "hostile", root / "markers"
    for folder in (hostile_dir, markers):
        folder.mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []

    def add(entry_id: str, name: str, klass: str, container: str, loader: str,
            writer: Callable[[Path, Target], Any], source: str = "", **extra: Any) -> None:
        marker = markers / entry_id
        port = port_for(entry_id) if extra.pop("network", False) else 0
        path = hostile_dir / name
        writer(path, Target(marker, port))
        entries.append(Entry(entry_id, str(path.relative_to(root)), True, klass, container,
                             loader, source, str(marker.relative_to(root)), port, **extra))

    for tech in TECHNIQUES:
        add(tech.id, f"{tech.id}.pkl", tech.klass, "pickle", tech.loader,
            lambda p, t, tech=tech: p.write_bytes(tech.pickle(t)), tech.source,
            network=tech.network)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        add(f"protocol-{protocol}", f"protocol-{protocol}.pkl", "named-callable", "pickle",
            "pickle.load", lambda p, t, pr=protocol: p.write_bytes(
                pickle.dumps({"hps": Reduce(os.system, t.cmd)}, protocol=pr)), "every suite")
    _every_file(add)
    _containers(add)
    benign_dir = root / "benign"
    for name, path, expected in benign.write(benign_dir):
        entries.append(Entry(f"benign-{name}", str(path.relative_to(root)), False,
                             expected=expected))
    orbax = subprocess.run([sys.executable, __file__, "--orbax", str(benign_dir)],
                           capture_output=True, text=True, timeout=600)
    if orbax.returncode:
        raise SystemExit(f"writing the Orbax checkpoints failed:\n{orbax.stderr[-2000:]}")
    for name, path, expected in json.loads(orbax.stdout):
        entries.append(Entry(f"benign-{name}", str(Path(path).relative_to(root)), False,
                             expected=expected))
    (root / "manifest.json").write_text(json.dumps([asdict(e) for e in entries], indent=1))
    return entries


def _every_file(add: Callable[..., None]) -> None:
    """Files read as what they are, whatever they are named."""
    def proto(number: int) -> Callable[[Path, Target], Any]:
        return lambda p, t: p.write_bytes(pickle.dumps(Reduce(os.system, t.cmd),
                                                       protocol=number))

    add("protocol-0-pickle-named-pt", "model.pt", "every-file", "pickle", "torch.load",
        proto(0), "issue 12")
    add("protocol-1-pickle-named-bin", "pytorch_model.bin", "every-file", "pickle",
        "torch.load", proto(1), "issue 12")
    add("pickle-named-txt", "readme.txt", "every-file", "pickle", "pickle.load", proto(4),
        "JFrog CVE-2025-10155")
    add("npy-object-array", "arrays.npy", "every-file", "npy", "np.load",
        lambda p, t: containers.npy(p, t.cmd), "picklescan dns_exfiltration")
    add("npy-named-dat", "arrays.dat", "every-file", "npy", "np.load",
        lambda p, t: containers.npy(p, t.cmd), "picklescan")
    add("second-pickle-in-stream", "two.pkl", "every-file", "pickle", "pickle.load-all",
        lambda p, t: p.write_bytes(pickle.dumps({"a": 1}) + pickle.dumps(
            Reduce(os.system, t.cmd))), "picklescan malicious6")


def _containers(add: Callable[..., None]) -> None:
    """Payloads placed where each format's loader runs them."""
    by_id = {t.id: t for t in TECHNIQUES}
    for tech_id in ("global-os-system", "pkgutil-resolve-name", "dataclasses-create-fn",
                    "build-module-then-stack-global", "torch-collect-env-run"):
        add(f"torch-zip-{tech_id}", f"zip-{tech_id}.pt", by_id[tech_id].klass, "torch-zip",
            "torch.load", lambda p, t, b=by_id[tech_id].body: containers.torch_zip(
                p, lambda old: inject(old, b(t))), by_id[tech_id].source)
    frames = by_id["frame-hides-payload-in-bytes"]
    add("torch-zip-frame-hides-payload", "zip-frames.pt", "frames", "torch-zip", "torch.load",
        lambda p, t: containers.torch_zip(p, lambda _old: frames.pickle(t)), frames.source)

    def payload(t: Target) -> Callable[[bytes], bytes]:
        return lambda old: inject(old, containers.system_body(t.cmd))

    add("torch-zip-wrong-crc", "zip-crc.pt", "what-loaders-read", "torch-zip", "torch.load",
        lambda p, t: containers.wrong_crc(containers.torch_zip(p, payload(t)),
                                          f"{p.stem}/data.pkl"), "JFrog CVE-2025-10156")
    add("torch-zip-local-header-renamed", "zip-lname.pt", "what-loaders-read", "torch-zip",
        "torch.load", lambda p, t: containers.renamed_local_header(
            containers.torch_zip(p, payload(t)), f"{p.stem}/data.pkl"), "picklescan")
    add("torch-zip-duplicate-data-pkl", "zip-dup.pt", "what-loaders-read", "torch-zip",
        "torch.load", lambda p, t: containers.torch_zip(
            p, lambda old: old, rebuild=lambda records: records[:1] + [
                (zipfile.ZipInfo(f"{p.stem}/data.pkl"),
                 inject(records[0][1], containers.system_body(t.cmd)))] + records[1:]),
        "ckptkit")
    add("torch-zip-deflated", "zip-deflated.pt", "what-loaders-read", "torch-zip", "torch.load",
        lambda p, t: containers.torch_zip(p, payload(t), compression=zipfile.ZIP_DEFLATED),
        "ckptkit")
    add("pickle-then-zip-polyglot", "polyglot.pt", "what-loaders-read", "torch-legacy",
        "torch.load", lambda p, t: containers.pickle_then_zip(p, t.cmd), "fickling polyglots")
    for index, part in enumerate(containers.LEGACY_PICKLES):
        add(f"torch-legacy-{part}", f"legacy-{part}.pt", "container", "torch-legacy",
            "torch.load", lambda p, t, i=index: containers.legacy_with(
                p, i, containers.system_body(t.cmd)), "picklescan pytorch_magic_bypass")
    add("torch-legacy-tar", "legacy.tar", "container", "torch-legacy-tar", "torch.load",
        lambda p, t: containers.legacy_tar(p, t.cmd), "CVE-2025-32434", weights_only=True)
    for compressed in (False, True):
        kind = "deflated" if compressed else "stored"
        add(f"npz-object-array-{kind}", f"arrays-{kind}.npz", "container", "npz", "np.load",
            lambda p, t, c=compressed: containers.npz(p, t.cmd, c), "picklescan")
    add("npz-object-array-wrong-crc", "arrays-crc.npz", "what-loaders-read", "npz", "np.load",
        lambda p, t: containers.npz_wrong_crc(p, t.cmd), "JFrog CVE-2025-10156")
    for compress in (0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)):
        label = compress[0] if isinstance(compress, tuple) else f"z{compress}"
        add(f"joblib-{label}", f"head-{label}.joblib", "container", "joblib", "joblib.load",
            lambda p, t, c=compress: containers.joblib_file(p, t.cmd, c), "modelscan")
    add("hub-tar-gz-member", "model.tar.gz", "container", "archive", "tar-member",
        lambda p, t: containers.tar_gz(p, t.cmd), "fickling polyglots", member="1/opt.pkl")
    for protocol in (2, 4):
        add(f"pickled-tensor-embedded-p{protocol}", f"tensor-p{protocol}.pkl", "container",
            "pickle", "pickle.loads", lambda p, t, pr=protocol: containers.pickled_tensor(
                p, t.cmd, pr), "issue 12")
    add("dcp-metadata", "dcp-metadata", "container", "torch-dcp", "dcp.load",
        lambda p, t: containers.dcp_hostile_metadata(p, t.cmd), "issue 12")
    add("dcp-byte-item", "dcp-item", "container", "torch-dcp", "dcp.load",
        lambda p, t: containers.dcp_hostile_item(p, t.cmd), "issue 12")


def read_manifest(root: Path) -> list[Entry]:
    return [Entry(**e) for e in json.loads((root / "manifest.json").read_text())]


# --- --fire: the real loaders, in a process that is thrown away -------------------------------

class _Timeout(BaseException):
    pass


def _load(entry: Entry, root: Path, *, weights_only: bool = False) -> None:
    path = root / entry.path
    if entry.loader == "pickle.loads":
        pickle.loads(path.read_bytes())
    elif entry.loader == "pickle.load":
        with open(path, "rb") as fh:
            pickle.load(fh)
    elif entry.loader == "pickle.load-bytesio":
        pickle.load(io.BytesIO(path.read_bytes()))
    elif entry.loader == "pickle.load-all":
        with open(path, "rb") as fh:
            while fh.peek(1):
                pickle.load(fh)
    elif entry.loader == "torch.load":
        import torch

        torch.load(path, weights_only=weights_only)
    elif entry.loader == "np.load":
        import numpy as np

        loaded = np.load(path, allow_pickle=True)
        for key in getattr(loaded, "files", ()):
            loaded[key]
    elif entry.loader == "joblib.load":
        import joblib

        joblib.load(path)
    elif entry.loader == "dcp.load":
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as out:
            dcp_to_torch_save(str(path), str(Path(out) / "consolidated.pt"))
    elif entry.loader == "tar-member":
        import tarfile

        with tarfile.open(path) as tar:
            pickle.load(tar.extractfile(entry.member))  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown loader {entry.loader}")


def fire(root: Path) -> dict[str, dict[str, bool | None]]:
    """Load every hostile file of the corpus at ``root`` with its loader, in this process;
    returns ``{id: {"live": fired, "weights_only": fired under weights_only=True or None}}``
    (network payloads are judged by the caller, who listens on their ports)."""
    import collections
    import socket
    import warnings

    warnings.simplefilter("ignore")
    socket.setdefaulttimeout(2)
    ordered_dict = collections.OrderedDict  # a module-state payload replaces it

    def alarm(_signum: int, _frame: Any) -> None:
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    results: dict[str, dict[str, bool | None]] = {}
    hostile = [e for e in read_manifest(root) if e.hostile]
    for entry in hostile:
        marker = root / entry.marker
        wo: bool | None = None
        if entry.weights_only:
            _attempt(entry, root, weights_only=True)
            wo = _settled(marker, wait=1.0)
            marker.unlink(missing_ok=True)
        _attempt(entry, root)
        collections.OrderedDict = ordered_dict  # type: ignore[misc]
        results[entry.id] = {"live": None, "weights_only": wo}
    for entry in hostile:  # subprocesses started by payloads may finish a little later
        if not entry.port:
            results[entry.id]["live"] = _settled(root / entry.marker)
    return results


def _attempt(entry: Entry, root: Path, **how: Any) -> None:
    signal.alarm(30)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            _load(entry, root, **how)
    except BaseException:  # noqa: BLE001 - loaders fail after the payload ran
        pass
    finally:
        signal.alarm(0)


def _settled(marker: Path, wait: float = 5.0) -> bool:
    deadline = time.monotonic() + wait
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return marker.exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--fire", nargs=2, metavar=("ROOT", "RESULT"), type=Path)
    parser.add_argument("--orbax", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fire:
        root, result = args.fire
        result.write_text(json.dumps(fire(root)))
    elif args.orbax:
        made = benign.write_orbax(args.orbax)
        print(json.dumps([(n, str(p), v) for n, p, v in made]))
    elif args.out:
        entries = build(args.out)
        hostile = sum(e.hostile for e in entries)
        print(f"wrote {hostile} hostile and {len(entries) - hostile} benign files to {args.out}")
    else:
        parser.error("give OUT_DIR (or --fire ROOT RESULT)")


if __name__ == "__main__":
    main()
