"""A LoFTR-shaped checkpoint without torch: the layout of the released weights, as data.

LoFTR (zju3dv/LoFTR; kornia mirrors the dual-softmax weights) is released as PyTorch
Lightning checkpoints: ``{"state_dict": {"matcher.<module>.<param>": tensor}, "epoch": ...,
"global_step": ...}``.  Its two transformers are what the built-in ``loftr`` recipe converts:

- ``loftr_coarse``: 8 encoder layers of width 256, 80 arrays, 5,251,072 parameters;
- ``loftr_fine``: 2 layers of width 128, 20 arrays, 328,704 parameters.

Each layer holds ``q_proj``/``k_proj``/``v_proj``/``merge`` (``d × d``, no bias), an MLP
``mlp.0`` (``2d × 2d``) and ``mlp.2`` (``d × 2d``), both without bias, and the LayerNorms
``norm1``/``norm2`` (weight and bias, ``d``).  A few backbone and ``fine_preprocess`` entries
stand for the rest of the network, so that a converter has something to leave out.

The layout is shared by the conversion tests (which build the same networks in PyTorch and
check their state dicts against :func:`state_dict_layout`) and by ``scripts/demo``, whose
mirror serves :func:`write_checkpoint`'s file where the catalogue expects
``loftr_outdoor.ckpt``.  Values are random (seeded), not trained weights.

Run from a shell: ``python -m ckptkit.testing.loftr OUT.ckpt [--seed N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ckptkit.model import ByteSpan, TensorRef

#: The two transformers, as LoFTR's configs and kornia build them.
COARSE = {"d_model": 256, "nhead": 8, "layer_names": ("self", "cross") * 4}
FINE = {"d_model": 128, "nhead": 8, "layer_names": ("self", "cross")}
#: The rest of the network, abridged: (name, dtype, shape) in state-dict order.
BACKBONE = (
    ("backbone.conv1.weight", "float32", (128, 1, 7, 7)),
    ("backbone.bn1.weight", "float32", (128,)),
    ("backbone.bn1.bias", "float32", (128,)),
    ("backbone.bn1.running_mean", "float32", (128,)),
    ("backbone.bn1.running_var", "float32", (128,)),
    ("backbone.bn1.num_batches_tracked", "int64", ()),
)
FINE_PREPROCESS = (
    ("fine_preprocess.down_proj.weight", "float32", (128, 256)),
    ("fine_preprocess.down_proj.bias", "float32", (128,)),
)
#: How the released Lightning checkpoints wrap the state dict.
LIGHTNING_PREFIX = "matcher."
LIGHTNING_FACTS = {"epoch": 29, "global_step": 1000}


def layer_layout(d_model: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of one encoder layer's parameters, in ``state_dict()`` order."""
    d = d_model
    return (("q_proj.weight", (d, d)), ("k_proj.weight", (d, d)), ("v_proj.weight", (d, d)),
            ("merge.weight", (d, d)), ("mlp.0.weight", (2 * d, 2 * d)),
            ("mlp.2.weight", (d, 2 * d)), ("norm1.weight", (d,)), ("norm1.bias", (d,)),
            ("norm2.weight", (d,)), ("norm2.bias", (d,)))


def transformer_layout(config: dict, prefix: str = "") -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of a ``LocalFeatureTransformer`` built from ``config``."""
    return [(f"{prefix}layers.{i}.{name}", "float32", shape)
            for i in range(len(config["layer_names"]))
            for name, shape in layer_layout(config["d_model"])]


def state_dict_layout() -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of the whole (abridged) LoFTR state dict, without ``matcher.``."""
    return [*BACKBONE, *transformer_layout(COARSE, "loftr_coarse."), *FINE_PREPROCESS,
            *transformer_layout(FINE, "loftr_fine.")]


def state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays with :func:`state_dict_layout`: weights scaled as Xavier initialises
    them, LayerNorm and BatchNorm parameters near their identity values (never exactly, so
    that a mix-up of weight and bias shows)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape in state_dict_layout():
        if dtype == "int64":
            arrays[name] = np.array(rng.integers(0, 10_000), dtype=np.int64).reshape(shape)
        elif len(shape) > 1:
            bound = np.sqrt(6.0 / (shape[0] + int(np.prod(shape[1:]))))
            arrays[name] = rng.uniform(-bound, bound, shape).astype(dtype)
        elif name.endswith(("norm1.weight", "norm2.weight", "bn1.weight", "running_var")):
            arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
        else:
            arrays[name] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    return arrays


def write_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a Lightning-style LoFTR checkpoint to ``path`` as ``torch.save`` would, without
    torch: ``{"state_dict": {"matcher.<name>": tensor, ...}, "epoch": 29,
    "global_step": 1000}``, loadable with ``torch.load(weights_only=True)``.

    The arrays are laid out in a scratch file beside ``path`` and copied into the zip by
    :func:`ckptkit.formats.tree_writer.write_torch_tree` (the writer behind ``ckpt strip``, which
    keeps the nesting); the file is replaced atomically.  About 23 MB.

    Example:
        >>> write_checkpoint("loftr_outdoor.ckpt")                     # doctest: +SKIP
        PosixPath('loftr_outdoor.ckpt')
    """
    from ckptkit.formats.tree_writer import write_torch_tree

    target = Path(path)
    arrays = state_dict(seed)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".loftr-") as scratch:
        blob = Path(scratch) / "storages.bin"
        refs: dict[str, TensorRef] = {}
        with open(blob, "wb") as fh:
            for name, array in arrays.items():
                data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
                span = ByteSpan(str(blob), fh.tell(), data.nbytes)
                fh.write(data.tobytes())
                refs[LIGHTNING_PREFIX + name] = TensorRef(array.dtype.name, array.shape, span)
        write_torch_tree(target, {"state_dict": refs, **LIGHTNING_FACTS})
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptkit.testing.loftr",
                                     description="Write a LoFTR-shaped Lightning checkpoint "
                                                 "(random weights) without torch.")
    parser.add_argument("out", metavar="OUT", help="the file to write, e.g. loftr_outdoor.ckpt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_checkpoint(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
