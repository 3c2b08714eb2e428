"""HDF5 read in a child process: h5py is C code parsing whatever the file says.

A crafted HDF5 file can make the HDF5 library crash, loop or allocate without bound, and none
of that can be caught in Python.  So ckptkit never opens HDF5 in its own process: it runs
``python -m ckptkit.formats.hdf5_child`` with the file, under an address-space and CPU limit
and a timeout sized by the reading budget, and reads its answer (JSON on stdout).  A child
that dies, runs out of memory or time, or answers nonsense makes the file unreadable (exit 3),
never the command.

Two jobs:

``structure``
    Every group's attributes (numbers and strings, long ones cut), every dataset's path, dtype,
    shape, and, for contiguous unfiltered datasets, the byte offset of its data in the file
    (so tensors are later read by byte range, without h5py).
``arrays``
    Every numeric dataset written to an ``.npz`` the parent names (read back with
    ``allow_pickle=False``).

The child runs this file as a script and imports only h5py, numpy and the standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Characters of one attribute value kept (a Keras model_config is a few hundred KB at most).
ATTRIBUTE_CHARS = 4 << 20
#: Datasets and groups one file may hold before the child gives up.
MAX_OBJECTS = 1_000_000


# --- the parent's side ---------------------------------------------------------------------

def available() -> bool:
    """Whether h5py can be imported here (checked without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("h5py") is not None
    except ImportError:  # a broken install, or an import hook refusing it
        return False


def run(job: str, h5: Path, out: Path | None = None, *, label: str | None = None
        ) -> dict[str, Any]:
    """Run ``job`` on ``h5`` in a child process; its JSON answer.

    Raises:
        MissingDependencyError: h5py is not installed (the ``keras`` extra).
        IntegrityError: the child failed, ran out of its limits, or answered nonsense.
    """
    from ckptkit.errors import IntegrityError, MissingDependencyError
    from ckptkit.storage import budget

    name = label or str(h5)
    if not available():
        raise MissingDependencyError("h5py", "keras", f"reading the HDF5 data of {name}")
    account = budget.current()
    size = h5.stat().st_size
    memory = (1 << 30) + account.limit("decompressed")
    # CPU seconds: structure and data of a genuine file take well under a second per 20 MiB,
    # while a damaged file can make HDF5 spin, so the CPU limit stops that early.  The wall
    # clock allows more, for a machine busy with other work (the child may wait, not spin).
    cpu_seconds = 10 + size // (20 << 20)
    seconds = 60 + size // (20 << 20)
    # Run as a script, isolated (-I: no PYTHONPATH, user site or current folder): the child
    # side of this module imports nothing from ckptkit.
    command = [sys.executable, "-I", str(Path(__file__).resolve()), f"{memory},{cpu_seconds}",
               job, str(h5)]
    if out is not None:
        # What the arrays may take in all: the budget's bytes still free (a few KiB of
        # compressed HDF5 can inflate to gigabytes).
        command += [str(out), str(account.room("decompressed"))]
    # No HDF5 filter plugins: a file must not make the library load a shared object.
    # One BLAS thread: each thread's buffers would count against the address-space limit.
    env = {"PATH": os.environ.get("PATH", ""), "HDF5_USE_FILE_LOCKING": "FALSE",
           "HDF5_PLUGIN_PATH": os.devnull, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, capture_output=True, timeout=seconds, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise IntegrityError(f"{name}: reading its HDF5 data took more than {seconds} s; "
                             "stopped", hint="The file is corrupt or crafted; do not load it",
                             path=name) from None
    if done.returncode != 0:
        last = (done.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[-1]
        why = last[:200] if last else f"the reader stopped with signal or code {done.returncode}"
        raise IntegrityError(f"{name}: not a readable HDF5 file ({why})",
                             hint="The file is truncated or corrupt; re-download or re-save it",
                             path=name)
    account.check("header", len(done.stdout), "the HDF5 structure")
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        raise IntegrityError(f"{name}: the HDF5 reader gave no answer", path=name) from None
    if not isinstance(answer, dict):
        raise IntegrityError(f"{name}: the HDF5 reader gave no answer", path=name)
    return answer


def _limit_myself(limits: str) -> None:
    """Set the limits the parent passed ("bytes,seconds") on this process, before h5py is
    imported (no preexec_fn: starting the child is then safe from a threaded parent)."""
    import resource

    memory, seconds = (int(v) for v in limits.split(","))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# --- the child's side ----------------------------------------------------------------------

def _attr(value: Any) -> Any:
    import numpy as np

    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value[:ATTRIBUTE_CHARS]
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SUO" and value.size <= 100_000:
            return [_attr(v) for v in value.reshape(-1).tolist()]
        if value.dtype.kind in "biuf" and value.size <= 1024:
            return value.tolist()
        return f"<array {value.dtype} {list(value.shape)}>"
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (int, float, bool)):
        return value
    return f"<{type(value).__name__}>"


def _structure(h5: str) -> dict[str, Any]:
    import h5py

    groups: dict[str, dict[str, Any]] = {}
    datasets: list[dict[str, Any]] = []
    with h5py.File(h5, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if len(groups) + len(datasets) > MAX_OBJECTS:
                raise ValueError(f"more than {MAX_OBJECTS} groups and datasets")
            if isinstance(obj, h5py.Dataset):
                offset = obj.id.get_offset()
                plain = obj.chunks is None and not obj.compression and offset is not None
                datasets.append({
                    "path": name, "dtype": obj.dtype.str, "kind": obj.dtype.kind,
                    "shape": list(obj.shape or ()), "offset": offset if plain else None,
                    "stored": int(obj.id.get_storage_size()),
                    "attrs": {k: _attr(v) for k, v in obj.attrs.items()}})
            else:
                groups[name] = {k: _attr(v) for k, v in obj.attrs.items()}

        groups[""] = {k: _attr(v) for k, v in f.attrs.items()}
        f.visititems(visit)
    return {"groups": groups, "datasets": datasets}


def _arrays(h5: str, out: str, room: int) -> dict[str, Any]:
    import h5py
    import numpy as np

    arrays: dict[str, Any] = {}
    with h5py.File(h5, "r") as f:
        wanted: list[Any] = []
        f.visititems(lambda name, obj: wanted.append((name, obj)) if isinstance(
            obj, h5py.Dataset) and obj.dtype.kind in "biufc" else None)
        total = sum(int(obj.size) * obj.dtype.itemsize for _name, obj in wanted)
        if total > room:
            raise ValueError(f"its datasets hold {total:,} bytes, more than the {room:,} the "
                             "reading budget has left (raise CKPTKIT_MAX_BYTES if genuine)")
        for name, obj in wanted:
            arrays[name] = obj[()]
    with open(out, "wb") as fh:
        np.savez(fh, **{f"a{i}": a for i, a in enumerate(arrays.values())})
    return {"names": list(arrays)}


def main(argv: list[str]) -> int:
    _limit_myself(argv[0])
    job, h5 = argv[1], argv[2]
    answer = _structure(h5) if job == "structure" else _arrays(h5, argv[3], int(argv[4]))
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as exc:  # noqa: BLE001 - the parent turns this line into its error
        print(f"{type(exc).__name__}: {str(exc)[:300]}".replace("\n", " "), file=sys.stderr)
        sys.exit(1)
