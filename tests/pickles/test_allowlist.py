"""Every entry of data/pickle_allowlist.toml only builds data: a test per entry.

A name counts as proven when one of these holds for the real object it imports:

- torch vets it for ``torch.load(weights_only=True)`` (or it is the same object as one that
  torch vets: ``torch.float`` is ``torch.float32``);
- pickling an example value names it, and a restricted loader that resolves nothing but the
  allowlist (the real objects, not ckptkit's stand-ins) rebuilds an equal value;
- for the few with their own rules (TorchScript's list builders, joblib's array wrapper, the
  pickled-tensor reader), a test below shows what they do.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import fractions
import importlib
import io
import pathlib
import pickle
import pickletools
import sys
import types
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit.pickles import danger
from ckptkit.pickles.pickle_globals import allowlist_kinds, stand_in

torch = pytest.importorskip("torch")

SECTIONS = ("everywhere", "torchscript", "joblib")
ENTRIES = [(section, module, name, kind) for section in SECTIONS
           for (module, name), kind in allowlist_kinds(section).items()]
EVERYWHERE = set(allowlist_kinds("everywhere"))


def real(module: str, name: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy.core is numpy._core under a warning
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    return obj


def names_in(data: bytes) -> set[tuple[str, str]]:
    """Every global a pickle names, as the loader imports it (Python 2 names mapped)."""
    found, strings, memo, proto = set(), [], {}, 0
    for op, arg, _pos in pickletools.genops(data):
        if op.name == "PROTO":
            proto = arg
        if op.name in ("GLOBAL", "INST"):
            module, _, name = arg.partition(" ")
            found.add(danger.py2_alias(module, name) if proto < 3 else (module, name))
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        if isinstance(arg, str) and ("UNICODE" in op.name or op.name.endswith("STRING")):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET") and isinstance(memo.get(arg), str):
            strings.append(memo[arg])
    return found


class AllowlistOnly(pickle._Unpickler):  # type: ignore[name-defined]
    """The real objects, but only for allowlisted names: anything else stops the load."""

    def find_class(self, module: str, name: str) -> Any:
        key = danger.py2_alias(module, name) if self.proto < 3 else (module, name)
        if key not in EVERYWHERE:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowlisted")
        return super().find_class(module, name)


def _stdlib_values() -> dict[str, Any]:
    return {
        "when": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 5, 1), "noon": datetime.time(12),
        "span": datetime.timedelta(hours=3), "price": decimal.Decimal("1.25"),
        "ratio": fractions.Fraction(3, 4), "id": uuid.UUID(int=7),
        "queue": collections.deque([1, 2]), "ordered": collections.OrderedDict(a=1),
        "counts": collections.Counter("aab"), "default": collections.defaultdict(list, k=[1]),
        "tags": {"x"}, "frozen": frozenset({1}), "z": 1 + 2j, "raw": b"\x00",
        "buf": bytearray(b"ab"), "steps": range(3), "cut": slice(1, 5, 2),
        "where": pathlib.PurePosixPath("/data/x"), "here": pathlib.Path("/data"),
        "win": pathlib.PureWindowsPath("c:/x"), "ns": types.SimpleNamespace(lr=0.1),
        "types": [list, dict, tuple, int, float, str, bool, set, frozenset, bytes, bytearray,
                  complex, slice, range, object, pathlib.PurePath, pathlib.WindowsPath,
                  pathlib.Path],
    }


def _dcp_metadata(tmp: Path) -> Any:
    import torch.distributed.checkpoint as dist_cp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_cp.save({"w": torch.ones(2, 3), "step": 7, "extra": {"lr": 0.1}},
                     checkpoint_id=str(tmp / "dcp"))
    with open(tmp / "dcp" / ".metadata", "rb") as fh:
        return pickle.load(fh)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tolist() == b.tolist()
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(
            _equal(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


@pytest.fixture(scope="module")
def proofs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """``(module, name) -> how it was shown to build only data``."""
    from torch._weights_only_unpickler import _get_allowed_globals

    vetted = _get_allowed_globals()
    vetted_objects = {id(v) for v in vetted.values()}
    found: dict[tuple[str, str], str] = {}
    for section, module, name, _kind in ENTRIES:
        if f"{module}.{name}" in vetted:
            found[(module, name)] = "torch vets it for weights_only=True"
        elif module.startswith("torch") and id(real(module, name)) in vetted_objects:
            found[(module, name)] = "the same object as one torch vets"
        elif module.startswith("numpy.core"):
            twin = real(module.replace("numpy.core", "numpy._core"), name)
            if real(module, name) is twin:
                found[(module, name)] = "numpy 1's name of numpy._core's object"
    examples = {
        "stdlib values": _stdlib_values(),
        "numpy arrays and scalars": {"f": np.arange(6, dtype=np.float32).reshape(2, 3),
                                     "i": np.int64(3), "s": np.array(["a", None], object),
                                     "dt": np.dtype("float16")},
        "DCP .metadata": _dcp_metadata(tmp_path_factory.mktemp("allowlist")),
    }
    for label, value in examples.items():
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            data = pickle.dumps(value, protocol=protocol)
            named = names_in(data)
            assert named <= EVERYWHERE, (label, protocol, named - EVERYWHERE)
            restored = AllowlistOnly(io.BytesIO(data)).load()
            assert _equal(value, restored), (label, protocol)
            for key in named:
                found.setdefault(key, f"round trip of {label}")
    return found


@pytest.mark.parametrize("section, module, name, kind", ENTRIES,
                         ids=[f"{m}:{n}" for _s, m, n, _k in ENTRIES])
def test_entry_only_builds_data(section: str, module: str, name: str, kind: str,
                                proofs: dict[tuple[str, str], str]) -> None:
    stand_in(kind, f"{module}.{name}")  # every kind has a stand-in
    assert not isinstance(real(module, name), types.ModuleType)  # a value, not a module
    if (module, name) in proofs:
        return
    if section == "torchscript":
        from torch.jit import _pickle

        function = real(module, name)
        assert function([1, 2], "List[int]") == [1, 2] if name == "restore_type_tag" else \
            function([1, 2]) == [1, 2]
        assert function.__module__ == "torch.jit._pickle" and _pickle is sys.modules[module]
        return
    if section == "joblib":
        from joblib.numpy_pickle import NumpyArrayWrapper

        # A record of an array's shape and dtype: pickle's BUILD only sets its attributes.
        assert "__setstate__" not in vars(NumpyArrayWrapper)
        assert NumpyArrayWrapper.__reduce__ is object.__reduce__
        return
    if kind == "embedded-torch-file":
        return  # judged by the file it embeds: test_pickled_tensor_is_judged_by_its_file
    pytest.fail(f"no proof that {module}.{name} only builds data")


def test_pickled_tensor_is_judged_by_its_file(tmp_path: Path) -> None:
    """torch.storage._load_from_bytes runs torch.load on the bytes it is given: a pickled
    tensor is safe when that embedded file is, unsafe when it is not."""
    from ckptkit.scan.scanning import scan

    benign = tmp_path / "tensor.pkl"
    benign.write_bytes(pickle.dumps({"w": torch.ones(3)}, protocol=2))
    assert [r.verdict for r in scan([benign]).results] == ["safe"]
    embedded = io.BytesIO()
    torch.save({"args": argparse.Namespace(a=1)}, embedded, _use_new_zipfile_serialization=False)
    inner = tmp_path / "inner.pkl"
    inner.write_bytes(pickle.dumps(_Embedded(embedded.getvalue()), protocol=4))
    (result,) = scan([inner]).results
    assert result.verdict == "unknown-objects" and "argparse.Namespace" in result.objects
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(pickle.dumps(_Embedded(b"not a torch file"), protocol=4))
    (unreadable,) = scan([garbage]).results
    assert unreadable.verdict == "unsafe"
    assert "cannot read" in unreadable.unsafe[0].where


class _Embedded:
    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return torch.storage._load_from_bytes, (self.data,)
