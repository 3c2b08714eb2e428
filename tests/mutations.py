"""Damaged checkpoints for fuzzing: the bundled samples truncated, bit-flipped and spliced.

A mutated input is the list of operations that made it from a sample, so a failing example
prints as a few short tuples and replays exactly (:func:`apply`), which is how the regression
cases of ``tests/formats/test_fuzz.py`` are written down.  Positions are drawn from the places where
parsers decide things (the first KiB, the last KiB, a zip's central directory) as often as
uniformly, since a flip in the middle of a weight buffer rarely changes any decision.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.conftest import SRC

SAMPLES = SRC / "ckptkit" / "samples"
#: Size of the "header" regions at either end of a file that positions are biased towards.
HEAD = 1024
#: A donor of "self" splices bytes from the input being mutated (as it is at that point).
SELF = "self"

#: ("truncate", at) | ("flip", ((at, bit), ...)) | ("overwrite"/"insert", at, donor, start,
#: length) | ("duplicate"/"delete", start, length)
Op = tuple


@dataclass(frozen=True)
class Seed:
    """A valid sample and the one file of it that gets damaged.

    ``sample`` is a file or a directory under the samples folder; for a directory (SavedModel,
    TF checkpoint) ``member`` names the file inside it that is mutated and the directory is
    what readers are given.  ``fmt`` is the sample's format.  ``names_files``: the member
    names other files (a TF ``checkpoint`` state file names its prefix), so damage can make it
    name one that does not exist, which is a not-found error (exit 4), not a crash.
    """

    name: str
    fmt: str
    sample: str
    member: str | None = None
    names_files: bool = False
    #: Files beside the sample file that are copied with it, undamaged (ONNX external data).
    beside: tuple[str, ...] = ()
    #: Reading it starts a child process (HDF5): CI runs fewer examples of it.
    slow: bool = False

    @property
    def source(self) -> Path:
        """The file whose bytes are mutated."""
        return SAMPLES / self.sample / (self.member or "")

    @property
    def original(self) -> bytes:
        return _read(self.source)

    @property
    def torch(self) -> bool:
        return self.fmt in ("torch-zip", "torch-legacy")

    def materialise(self, data: bytes, where: Path) -> Path:
        """Write the sample into directory ``where`` with the member replaced by ``data``;
        returns the path to hand to readers (the file, or the copied directory)."""
        target = where / Path(self.sample).name
        if self.member is None:
            target.write_bytes(data)
            for name in self.beside:
                shutil.copy((SAMPLES / self.sample).parent / name, where / name)
        else:
            shutil.copytree(SAMPLES / self.sample, target)
            (target / self.member).write_bytes(data)
        return target


SEEDS: tuple[Seed, ...] = (
    Seed("torch-zip", "torch-zip", "redimnet_epoch_3.pt"),
    Seed("torch-zip-training", "torch-zip", "thinker_step_200.pt"),
    Seed("torch-legacy", "torch-legacy", "jukebox/vqvae.pth.tar"),
    Seed("torch-legacy-objects", "torch-legacy", "prior_level_2.pth.tar"),
    Seed("torchscript", "torchscript", "encoder_scripted.pt"),
    Seed("npz", "npz", "spaq_ckpt.npz"),
    Seed("safetensors", "safetensors", "model.safetensors"),
    Seed("flax-msgpack", "flax-msgpack", "flax_params.msgpack"),
    Seed("savedmodel-pb", "savedmodel", "musiq_saved_model", "saved_model.pb"),
    Seed("savedmodel-index", "savedmodel", "musiq_saved_model", "variables/variables.index"),
    Seed("savedmodel-shard", "savedmodel", "musiq_saved_model",
         "variables/variables.data-00000-of-00001"),
    Seed("tf-index", "tf-checkpoint", "tf_ckpt", "ckpt-1.index"),
    Seed("tf-shard", "tf-checkpoint", "tf_ckpt", "ckpt-1.data-00000-of-00001"),
    Seed("tf-state", "tf-checkpoint", "tf_ckpt", "checkpoint", names_files=True),
    Seed("gguf", "gguf", "tiny_llama.gguf"),
    Seed("onnx", "onnx", "onnx_mlp/mlp.onnx", beside=("mlp.onnx.data",)),
    Seed("keras", "keras", "keras_mlp.keras", slow=True),
    Seed("keras-h5", "keras-h5", "keras_mlp.h5", slow=True),
    Seed("orbax-manifest", "orbax", "orbax_step_3", "manifest.ocdbt"),
    Seed("orbax-node", "orbax", "orbax_step_3", "d/6b50e57efa39c57015b5e3106da316f9"),
    Seed("orbax-metadata", "orbax", "orbax_step_3", "_METADATA"),
    Seed("pickle", "pickle", "params.pkl"),
    Seed("joblib", "pickle", "probe_head.joblib"),
    Seed("npy", "npy", "embeddings.npy"),
)
SEED_BY_NAME = {s.name: s for s in SEEDS}


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


@cache
def donors() -> dict[str, bytes]:
    """Every seed file's bytes by seed name: material for splices across formats."""
    return {seed.name: seed.original for seed in SEEDS}


# --- applying operations -------------------------------------------------------------------

def apply_op(data: bytes, op: Op) -> bytes:
    """``data`` changed by one operation (positions are clipped, so any op applies)."""
    kind = op[0]
    n = len(data)
    if kind == "truncate":
        return data[:op[1]]
    if kind == "flip":
        out = bytearray(data)
        for at, bit in op[1]:
            if n:
                out[at % n] ^= 1 << bit
        return bytes(out)
    if kind in ("overwrite", "insert"):
        _kind, at, donor, start, length = op
        source = data if donor == SELF else donors()[donor]
        piece = source[start:start + length]
        at = min(at, n)
        end = at + (len(piece) if kind == "overwrite" else 0)
        return data[:at] + piece + data[end:]
    if kind == "duplicate":
        _kind, start, length = op
        return data[:start + length] + data[start:start + length] + data[start + length:]
    if kind == "delete":
        _kind, start, length = op
        return data[:start] + data[start + length:]
    raise ValueError(f"unknown mutation {op!r}")


def apply(data: bytes, ops: tuple[Op, ...]) -> bytes:
    for op in ops:
        data = apply_op(data, op)
    return data


class Mutation:
    """The operations and the bytes they produced; printed as the operations only (not a
    dataclass: hypothesis would print every byte of a failing example)."""

    def __init__(self, ops: tuple[Op, ...], data: bytes):
        self.ops = ops
        self.data = data

    def __repr__(self) -> str:
        return f"Mutation(ops={self.ops!r}, len={len(self.data)})"

    def _repr_pretty_(self, printer: Any, _cycle: bool) -> None:
        printer.text(repr(self))


# --- strategies ----------------------------------------------------------------------------

def _central_directory(data: bytes) -> int | None:
    """Where a zip's central directory starts, if ``data`` still has a plausible one."""
    eocd = data.rfind(b"PK\x05\x06")
    if eocd < 0 or eocd + 22 > len(data):
        return None
    (offset,) = struct.unpack_from("<I", data, eocd + 16)
    return offset if offset < len(data) else eocd


def positions(data: bytes) -> st.SearchStrategy[int]:
    """A byte position in ``data`` (which must not be empty): the first or last KiB, the zip
    central directory, or anywhere."""
    n = len(data)
    choices = [st.integers(0, min(n, HEAD) - 1), st.integers(max(0, n - HEAD), n - 1),
               st.integers(0, n - 1)]
    directory = _central_directory(data)
    if directory is not None:
        choices.insert(2, st.integers(directory, n - 1))
    return st.one_of(choices)


_LENGTHS = st.one_of(st.integers(1, 16), st.integers(1, 4096))


@st.composite
def _op(draw: st.DrawFn, data: bytes) -> Op:
    n = len(data)
    kinds = ["truncate", "flip", "overwrite", "insert", "duplicate", "delete"] if n else ["insert"]
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        return ("truncate", draw(positions(data)))
    if kind == "flip":
        flips = draw(st.lists(st.tuples(positions(data), st.integers(0, 7)), min_size=1,
                              max_size=8))
        return ("flip", tuple(flips))
    if kind in ("overwrite", "insert"):
        donor = draw(st.sampled_from([SELF, *donors()]))
        source = data if donor == SELF else donors()[donor]
        if not source:
            donor, source = next((k, v) for k, v in donors().items() if v)
        start = draw(positions(source))
        at = draw(positions(data)) if n else 0
        return (kind, at, donor, start, draw(_LENGTHS))
    start = draw(positions(data))
    return (kind, start, min(draw(_LENGTHS), n - start))


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> Mutation:
    """One to three operations applied in turn to ``original``."""
    data = original
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(_op(data))
        ops.append(op)
        data = apply_op(data, op)
    return Mutation(tuple(ops), data)


# --- adversarial shapes: small inputs that ask for far more work than their size ------------

@dataclass(frozen=True)
class Shape:
    """An input built to exceed a budget: a writer of :mod:`ckptkit.testing.adversarial` and
    its arguments (printed as such, so a failing example replays exactly)."""

    case: str
    args: tuple[tuple[str, Any], ...]

    def write(self, where: Path) -> Path:
        from ckptkit.testing import adversarial

        return getattr(adversarial, self.case)(where, **dict(self.args))

    def __repr__(self) -> str:
        return f"Shape({self.case}, {dict(self.args)})"


def _shape(case: str, **args: st.SearchStrategy[Any]) -> st.SearchStrategy[Shape]:
    return st.fixed_dictionaries(args).map(lambda drawn: Shape(case, tuple(drawn.items())))


def shapes() -> st.SearchStrategy[Shape]:
    """Deep nesting, huge repetition counts, keys hashed again and again, pickles hidden in
    records, broadcast views, archives in archives and giant headers, at sizes that go past
    the reduced budget :data:`tests.formats.test_fuzz.SHAPE_LIMITS` sets (inputs stay small)."""
    from ckptkit.testing.adversarial import UNITS

    big = st.one_of(st.integers(1, 1_000), st.integers(1, 2_000_000))
    return st.one_of(
        _shape("repeated", unit=st.sampled_from(sorted(UNITS.values())), count=big),
        _shape("nested", kind=st.sampled_from(["list", "dict", "tuple"]),
               depth=st.integers(1, 600), items=st.integers(0, 300_000),
               tensors=st.booleans()),
        _shape("rechecked_key", width=st.integers(1, 1_500), setitems=st.integers(1, 300_000)),
        _shape("pickle_records", records=st.integers(1, 3), record_mib=st.integers(1, 4)),
        _shape("broadcast_view", shape=st.lists(st.integers(1, 50_000), min_size=1,
                                                max_size=3).map(tuple),
               stride=st.lists(st.integers(0, 2), min_size=3, max_size=3).map(tuple),
               numel=st.integers(1, 64)).map(_matching_stride),
        _shape("nested_zips", levels=st.integers(1, 3), fanout=st.integers(1, 3),
               member_mib=st.integers(1, 6)),
        _shape("header_flood", count=big),
        _shape("msgpack_flood", count=big, depth=st.integers(1, 600)),
    )


def _matching_stride(shape: Shape) -> Shape:
    args = dict(shape.args)
    args["stride"] = args["stride"][:len(args["shape"])]
    return Shape(shape.case, tuple(args.items()))
