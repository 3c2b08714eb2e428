"""Benign files as the real libraries write them, each with the verdict ckpt scan owes it.

``safe``: only tensors, arrays and plain values; ``unknown-objects``: loading constructs a
class or needs a flag to load (custom classes, object arrays, TorchScript code).  None may be
``unsafe``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import fractions
import pathlib
import pickle
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corpus import containers


def _stdlib_values() -> dict[str, Any]:
    return {
        "when": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 5, 1), "span": datetime.timedelta(hours=3),
        "price": decimal.Decimal("1.25"), "ratio": fractions.Fraction(3, 4),
        "id": uuid.UUID(int=7), "queue": collections.deque([1, 2]),
        "ordered": collections.OrderedDict(a=1), "counts": collections.Counter("aab"),
        "default": collections.defaultdict(list, {"k": [1]}), "tags": {"x", "y"},
        "frozen": frozenset({1}), "z": 1 + 2j, "raw": b"\x00\x01", "buf": bytearray(b"ab"),
        "steps": range(3), "cut": slice(1, 5, 2), "where": pathlib.PurePosixPath("/data/x"),
        "ns": types.SimpleNamespace(lr=0.1), "lr": 3e-4, "name": "run", "flag": True,
        "nested": {"list": [1, 2.5, None], "tuple": (1, "a")},
    }


def _torch_state(torch: Any) -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 10,
            "best": 0.5, "half": torch.ones(3, dtype=torch.float16),
            "ints": torch.arange(5), "flags": torch.tensor([True, False])}


def write(root: Path) -> list[tuple[str, Path, str]]:
    """Write the benign files under ``root``: ``(id, path, expected verdict)``."""
    import joblib
    import numpy as np
    import torch

    root.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, Path, str]] = []

    def add(name: str, expected: str, writer: Callable[[Path], Any]) -> None:
        path = root / name
        writer(path)
        made.append((name, path, expected))

    state = _torch_state(torch)
    add("torch_zip.pt", "safe", lambda p: torch.save(state, p))
    add("torch_legacy.pt", "safe",
        lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
    add("torch_args.pt", "unknown-objects",
        lambda p: torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, p))
    add("torch_legacy_args.pth.tar", "unknown-objects", lambda p: torch.save(
        {"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, p,
        _use_new_zipfile_serialization=False))
    add("module.pt", "unknown-objects",
        lambda p: torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(p)))
    for protocol in (2, 4):
        add(f"pickled_tensor_p{protocol}.pkl", "safe", lambda p, pr=protocol: p.write_bytes(
            pickle.dumps({"w": torch.arange(6.0).reshape(2, 3),
                          "p": torch.nn.Parameter(torch.ones(2))}, protocol=pr)))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        add(f"stdlib_values_p{protocol}.pkl", "safe", lambda p, pr=protocol: p.write_bytes(
            pickle.dumps(_stdlib_values(), protocol=pr)))
    add("plain_lists.pickle", "safe",
        lambda p: p.write_bytes(pickle.dumps({"a": list(range(100))}, protocol=0)))
    add("arrays.npy", "safe", lambda p: np.save(p, np.arange(12, dtype=np.float32)))
    add("strings.npy", "unknown-objects",
        lambda p: np.save(p, np.array(["a", None, 3], dtype=object), allow_pickle=True))
    add("arrays.npz", "safe",
        lambda p: np.savez(p, w=np.ones((2, 3)), b=np.zeros(3, dtype=np.int64)))
    add("arrays_compressed.npz", "safe", lambda p: np.savez_compressed(p, w=np.ones(8)))
    add("labels.npz", "unknown-objects",
        lambda p: np.savez(p, w=np.ones(2), labels=np.array(["x", None], dtype=object)))
    for compress in (0, 3, ("gzip", 3), ("xz", 3)):
        label = compress[0] if isinstance(compress, tuple) else f"z{compress}"
        add(f"head_{label}.joblib", "safe", lambda p, c=compress: joblib.dump(
            {"w": np.arange(1000, dtype=np.float32).reshape(40, 25), "bias": np.zeros(4),
             "classes": ["cat", "dog"], "step": 3}, p, compress=c))
    add("dcp_checkpoint", "safe", lambda p: containers.dcp(p, containers.dcp_state()))
    return made


def write_orbax(root: Path) -> list[tuple[str, Path, str]]:
    """An Orbax step directory and a CheckpointManager tree (kept apart: JAX is slow to
    import, so callers may run this in its own process)."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    root.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    step = root / "orbax_step"
    checkpointer.save(step, {"w": jnp.ones((2, 3)), "b": jnp.zeros(3), "step": 3})
    checkpointer.wait_until_finished()
    manager = ocp.CheckpointManager(root / "orbax_runs",
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    for number in (10, 20):
        manager.save(number, args=ocp.args.StandardSave({"w": jnp.full((2,), number)}))
    manager.wait_until_finished()
    return [("orbax_step", step, "safe"), ("orbax_runs/10", root / "orbax_runs" / "10", "safe"),
            ("orbax_runs/20", root / "orbax_runs" / "20", "safe")]
