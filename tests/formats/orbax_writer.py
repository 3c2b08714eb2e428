"""Writes the Orbax checkpoints the Orbax tests read, with ``orbax.checkpoint`` itself.

Run as a script in its own interpreter (``python orbax_writer.py OUT``): JAX must see 8 host
devices, which it reads from ``XLA_FLAGS`` once, at import, so the test process (which may
have imported JAX already, with one device) cannot write them itself.  Next to each
checkpoint it stores what ``orbax.checkpoint`` restores from it (``<name>.restored.json``:
per ``/``-joined leaf path its Python type, dtype, shape and bytes in hex), so the tests
compare bit for bit without importing JAX.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def state() -> dict:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    return {
        "params": {
            "encoder": {
                "layer_0": {"kernel": put(jnp.asarray(rng.standard_normal((64, 32)),
                                                      jnp.float32), P("data", "model")),
                            "bias": put(jnp.asarray(rng.standard_normal(32), jnp.bfloat16),
                                        P("model"))},
                "embed": put(jnp.arange(16 * 8, dtype=jnp.int32).reshape(16, 8),
                             P(None, "model")),
            },
            "big": put(jnp.asarray(rng.standard_normal((256, 64)), jnp.float32),
                       P("data", None)),
            "replicated": put(jnp.full((8, 8), 0.5, jnp.bfloat16), P()),
        },
        "step": jnp.int32(7),
        "lr": np.float32(0.125),
        "epoch": 2,
        "host": np.arange(6, dtype=np.int64).reshape(2, 3),
        "stack": [jnp.ones(3, jnp.float32), jnp.zeros((2, 2), jnp.int32)],
    }


def flat(tree) -> dict[str, dict]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if isinstance(leaf, str):
            out[name] = {"type": "str", "value": leaf}
            continue
        array = np.asarray(leaf)
        out[name] = {"type": type(leaf).__name__, "dtype": str(array.dtype),
                     "shape": list(array.shape), "hex": array.tobytes().hex()}
    return out


def save(out: Path, name: str, tree: dict, **handler) -> None:
    target = out / name
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**handler)) as checkpointer:
        checkpointer.save(target, tree)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**handler)) as checkpointer:
        restored = checkpointer.restore(target)
    (out / f"{name}.restored.json").write_text(json.dumps(flat(restored)))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tree = state()
    save(out, "ocdbt", tree)
    save(out, "per_array", tree, use_ocdbt=False)
    save(out, "zarr3", dict(tree, note="hello", nothing=None), use_zarr3=True)
    with ocp.CheckpointManager(out / "run") as manager:
        for step in (1, 2):
            manager.save(step, args=ocp.args.StandardSave({"w": jnp.full((4,), step)}))
        manager.wait_until_finished()
    with ocp.CheckpointManager(out / "items", item_names=("params", "extra")) as manager:
        manager.save(5, args=ocp.args.Composite(
            params=ocp.args.StandardSave({"w": jnp.arange(4, dtype=jnp.float32)}),
            extra=ocp.args.JsonSave({"dataset": "c4", "seen": 1200})))
        manager.wait_until_finished()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
