"""Regenerate the bundled sample checkpoints in src/ckptkit/samples with the real libraries.

Run with the test environment (it has torch, TensorFlow and Flax):
    .venv/bin/python scripts/make_samples.py
The samples are tiny on purpose; their key layouts follow the projects ckptkit was designed
from (μOmni, Jukebox, MRL-ReDimNet, MUSIQ, LoFTR).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "src" / "ckptkit" / "samples"


def thinker() -> None:
    """μOmni thinker periodic checkpoint: model, optimizer, scheduler, scaler, step, best."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.attn_norm = nn.LayerNorm(d)
            self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.mlp_norm = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x):
            h = self.attn_norm(x)
            x = x + self.o_proj(self.v_proj(h) * torch.sigmoid(self.q_proj(h) * self.k_proj(h)))
            return x + self.mlp(self.mlp_norm(x))

    class Thinker(nn.Module):
        def __init__(self, vocab: int = 64, d: int = 16, layers: int = 2):
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
            self.norm = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)

        def forward(self, ids):
            x = self.embed_tokens(ids)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.norm(x))

    model = Thinker()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 8))
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "step": 200, "best_val_loss": 2.3125}, OUT / "thinker_step_200.pt")


def jukebox_prior() -> None:
    """Jukebox-style legacy .pth.tar: custom hps class, model, opt=None, step."""
    import torch

    module = types.ModuleType("jukebox.hparams")

    class Hyperparams(dict):
        __module__ = "jukebox.hparams"
        __qualname__ = "Hyperparams"

        def __getattr__(self, name):
            return self[name]

    module.Hyperparams = Hyperparams
    sys.modules.setdefault("jukebox", types.ModuleType("jukebox"))
    sys.modules["jukebox.hparams"] = module
    hps = Hyperparams(name="1b_lyrics/prior_level_2", level=2, n_ctx=64, width=16, depth=2,
                      heads=2, l_bins=32, sr=44100, labels=True)
    g = torch.Generator().manual_seed(1)
    model = {"prior.x_emb.weight": torch.randn(32, 16, generator=g),
             "prior.pos_emb.pos_emb": torch.randn(64, 16, generator=g)}
    for i in range(2):
        p = f"prior.transformer._attn_mods.{i}"
        model[f"{p}.attn.c_attn.w"] = torch.randn(16, 48, generator=g)
        model[f"{p}.attn.c_attn.b"] = torch.zeros(48)
        model[f"{p}.attn.c_proj.w"] = torch.randn(16, 16, generator=g)
        model[f"{p}.ln_0.weight"] = torch.ones(16)
        model[f"{p}.mlp.c_fc.w"] = torch.randn(16, 64, generator=g).half()
    model["prior.x_out.weight"] = model["prior.x_emb.weight"]  # tied, as in Jukebox
    torch.save({"hps": hps, "model": model, "opt": None, "step": 1_030_000},
               OUT / "prior_level_2.pth.tar", _use_new_zipfile_serialization=False)


def jukebox_shared() -> None:
    """The shared 5b files of a Jukebox bundle (VQ-VAE, two upsamplers), tiny, legacy format."""
    import torch

    for seed, name in enumerate(("vqvae", "prior_level_0", "prior_level_1"), start=10):
        g = torch.Generator().manual_seed(seed)
        model = {f"{name}.encoder.weight": torch.randn(16, 8, generator=g),
                 f"{name}.decoder.weight": torch.randn(8, 16, generator=g)}
        torch.save({"hps": {"name": f"5b/{name}", "level": seed - 10}, "model": model,
                    "opt": None, "step": 1000 + seed},
                   OUT / "jukebox" / f"{name}.pth.tar", _use_new_zipfile_serialization=False)


def redimnet_epoch() -> None:
    """MRL-ReDimNet epoch file: frozen backbone, trained head, argparse args, val_loss."""
    import torch
    from torch import nn

    torch.manual_seed(2)
    backbone = nn.Sequential(nn.Conv1d(1, 8, 3), nn.BatchNorm1d(8), nn.ReLU())
    head = nn.Linear(8, 16)
    model = nn.ModuleDict({"backbone": backbone, "mrl_head": head})
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    out = head(backbone(torch.randn(4, 1, 10)).mean(-1))
    out.sum().backward()
    opt.step()
    args = argparse.Namespace(embed_dims=[64, 128, 192, 256], lr=0.01, epochs=10,
                              freeze_backbone=True)
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": opt.state_dict(), "val_loss": 18.0021, "args": args},
               OUT / "redimnet_epoch_3.pt")


def scripted() -> None:
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.proj(x))

    torch.jit.script(Encoder()).save(str(OUT / "encoder_scripted.pt"))


def safetensors_file() -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    save_file({"encoder.weight": torch.randn(8, 4, generator=g),
               "encoder.bias": torch.zeros(8, dtype=torch.bfloat16),
               "head.weight": torch.randn(2, 8, generator=g).half()},
              str(OUT / "model.safetensors"), metadata={"step": "1200", "format": "pt"})


def musiq_npz() -> None:
    """MUSIQ-style Flax optimizer checkpoint: '/'-joined keys under opt/target."""
    rng = np.random.default_rng(4)
    d = 8
    arrays = {
        "opt/target/conv_root/kernel": rng.standard_normal((7, 7, 3, 4), np.float32),
        "opt/target/gn_root/scale": np.ones(4, np.float32),
        "opt/target/gn_root/bias": np.zeros(4, np.float32),
        "opt/target/embedding/kernel": rng.standard_normal((16, d), np.float32),
        "opt/target/embedding/bias": np.zeros(d, np.float32),
        "opt/target/Transformer/posembed_input/pos_embedding": rng.standard_normal(
            (1, 100, d), np.float32),
        "opt/target/Transformer/scaleembed_input/scale_embedding": rng.standard_normal(
            (1, 3, d), np.float32),
        "opt/target/Transformer/cls": np.zeros((1, 1, d), np.float32),
        "opt/target/Transformer/encoder_norm/scale": np.ones(d, np.float32),
        "opt/target/Transformer/encoder_norm/bias": np.zeros(d, np.float32),
        "opt/target/head/kernel": np.zeros((d, 1), np.float32),
        "opt/target/head/bias": np.zeros(1, np.float32),
    }
    for i in range(2):
        p = f"opt/target/Transformer/encoderblock_{i}"
        arrays[f"{p}/LayerNorm_0/scale"] = np.ones(d, np.float32)
        arrays[f"{p}/MultiHeadDotProductAttention_1/query/kernel"] = rng.standard_normal(
            (d, 2, d // 2), np.float32)
        arrays[f"{p}/MlpBlock_3/Dense_0/kernel"] = rng.standard_normal((d, 3 * d), np.float32)
    arrays["opt/state/step"] = np.array(52_000, np.int64)
    np.savez(OUT / "spaq_ckpt.npz", **arrays)


def saved_model_and_tf_checkpoint() -> None:
    import tensorflow as tf

    class Scorer(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(tf.ones([4]), name="scale")
            self.bias = tf.Variable(0.5, name="bias")

        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="image_bytes_tensor")])
        def score(self, image_bytes_tensor):
            length = tf.cast(tf.strings.length(image_bytes_tensor), tf.float32)
            return {"output_0": tf.reduce_sum(self.scale) * length / 1e6 + self.bias}

    scorer = Scorer()
    target = OUT / "musiq_saved_model"
    shutil.rmtree(target, ignore_errors=True)
    tf.saved_model.save(scorer, str(target), signatures={"serving_default": scorer.score})

    model = tf.Module()
    model.dense_kernel = tf.Variable(tf.random.stateless_normal([4, 3], seed=[1, 2]))
    model.dense_bias = tf.Variable(tf.zeros([3]))
    model.embedding = tf.Variable(tf.zeros([10, 4], dtype=tf.float16))
    step = tf.Variable(7, dtype=tf.int64)
    ckpt_dir = OUT / "tf_ckpt"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tf.train.Checkpoint(model=model, step=step).save(str(ckpt_dir / "ckpt"))


def flax_msgpack() -> None:
    import flax.linen as nn
    import jax
    from flax import serialization

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(8, name="hidden")(x))
            return nn.Dense(2, name="out")(nn.LayerNorm(name="norm")(x))

    params = MLP().init(jax.random.PRNGKey(0), np.zeros((1, 4), np.float32))
    (OUT / "flax_params.msgpack").write_bytes(serialization.to_bytes(params))


#: A chat template in the style llama.cpp models ship (Jinja, run by the inference server;
#: ckptkit only shows it, escaped).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def gguf_tiny_llama() -> None:
    """A two-block llama in GGUF, written by the gguf package: F32 norms, an F16 embedding,
    Q8_0 and Q4_0 attention weights, a tokenizer and a chat template."""
    import gguf
    from gguf.constants import GGMLQuantizationType as Q

    rng = np.random.default_rng(7)
    vocab, d = 32, 64
    writer = gguf.GGUFWriter(str(OUT / "tiny_llama.gguf"), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(d)
    writer.add_block_count(1)
    writer.add_feed_forward_length(2 * d)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(7)  # mostly Q8_0
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(vocab - 3)])
    writer.add_token_scores([float(-i) for i in range(vocab)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, d).astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(d, np.float32))
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight(d, d), Q.Q8_0),
                      raw_dtype=Q.Q8_0)
    writer.add_tensor("blk.0.attn_k.weight", gguf.quants.quantize(weight(d, d), Q.Q4_0),
                      raw_dtype=Q.Q4_0)
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def onnx_mlp() -> None:
    """A two-layer MLP in ONNX with its weights in an external data file beside it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = OUT / "onnx_mlp"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("fc1.weight", (4, 16)), ("fc1.bias", (16,)),
                          ("fc2.weight", (16, 3)), ("fc2.bias", (3,)))]
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
             helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"]),
             helper.make_node("Add", ["h3", "fc2.bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="ckptkit-samples", producer_version="1")
    onnx.checker.check_model(model)
    onnx.save_model(model, str(folder / "mlp.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="mlp.onnx.data", size_threshold=0)


def keras_models() -> None:
    """A small Keras 3 model as a .keras archive and as a legacy .h5 (numpy backend)."""
    import subprocess

    code = (
        "import keras, numpy as np\n"
        "keras.utils.set_random_seed(9)\n"
        "m = keras.Sequential([keras.Input((4,), name='pixels'),\n"
        "    keras.layers.Dense(8, activation='relu', name='hidden'),\n"
        "    keras.layers.Dense(3, name='logits')], name='classifier')\n"
        "m.save(%r)\n"
        "m.save(%r)\n" % (str(OUT / "keras_mlp.keras"), str(OUT / "keras_mlp.h5")))
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "KERAS_BACKEND": "numpy"})


def orbax_step() -> None:
    """An Orbax step directory (OCDBT, the default) of a Flax-style train state whose arrays
    are sharded over a 4 x 2 mesh of 8 host devices, as a multi-device JAX job saves it."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if jax.device_count() < 8:
        raise SystemExit("orbax_step needs 8 devices: run with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8 (main sets it)")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))

    def put(x, *spec):
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    rng = np.random.default_rng(3)
    state = {
        "params": {
            "embed": {"embedding": put(jnp.asarray(rng.standard_normal((32, 8)),
                                                   jnp.bfloat16), None, "model")},
            "dense": {"kernel": put(jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
                                    "data", "model"),
                      "bias": put(jnp.zeros(16, jnp.float32), "model")},
        },
        "opt_state": {"count": put(jnp.asarray(3, jnp.int32)),
                      "mu": {"kernel": put(jnp.zeros((8, 16), jnp.float32), "data", "model")}},
        "step": 3,
    }
    target = OUT / "orbax_step_3"
    shutil.rmtree(target, ignore_errors=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target.resolve(), state)
        checkpointer.wait_until_finished()
    # Orbax records the absolute path it committed to; keep the bundled copy machine-neutral.
    (target / "commit_success.txt").write_text(
        "Checkpoint commit was successful to orbax_step_3")


def jax_params_pickle() -> None:
    """A JAX project's ``params.pkl``: ``pickle.dump(jax.device_get(state))`` of Flax params
    (numpy arrays in nested dicts), the step and the Adam moments, as training scripts do."""
    import flax.linen as nn
    import jax
    import optax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.relu(nn.Dense(8, name="hidden")(x)))

    params = MLP().init(jax.random.PRNGKey(1), np.zeros((1, 4), np.float32))["params"]
    opt_state = optax.adam(1e-3).init(params)
    state = jax.device_get({"params": params, "opt_state": {"mu": opt_state[0].mu,
                                                            "nu": opt_state[0].nu},
                            "step": 1500, "config": {"lr": 1e-3, "hidden": 8}})
    with open(OUT / "params.pkl", "wb") as fh:
        pickle.dump(state, fh, protocol=4)


def npy_array() -> None:
    """``np.save`` of an embedding table."""
    rng = np.random.default_rng(3)
    np.save(OUT / "embeddings.npy", rng.standard_normal((16, 8)).astype(np.float32))


def joblib_file() -> None:
    """A linear probe head saved with ``joblib.dump(..., compress=3)`` (zlib)."""
    import joblib

    rng = np.random.default_rng(4)
    joblib.dump({"coef": rng.standard_normal((3, 8)).astype(np.float32),
                 "intercept": np.zeros(3, np.float32), "classes": np.arange(3, dtype=np.int64),
                 "n_iter": 25}, OUT / "probe_head.joblib", compress=3)


def hf_sharded() -> None:
    """A Hugging Face sharded checkpoint: huggingface_hub's own shards and index, mixed dtypes
    (bfloat16, float8 included)."""
    import torch
    from huggingface_hub import save_torch_state_dict

    g = torch.Generator().manual_seed(6)
    state = {"embed_tokens.weight": torch.randn(64, 16, generator=g),
             "layers.0.attn.weight": torch.randn(16, 16, generator=g).bfloat16(),
             "layers.0.mlp.weight": torch.randn(32, 16, generator=g).half(),
             "layers.1.attn.weight": torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn),
             "layers.1.mlp.weight": torch.randn(32, 16, generator=g).half(),
             "norm.weight": torch.ones(16)}
    out = OUT / "hf_sharded"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    save_torch_state_dict(state, out, max_shard_size=2048)
    for shard in out.iterdir():
        shard.chmod(0o644)  # written through a private temporary file


def dcp_fsdp() -> None:
    """A PyTorch DCP checkpoint written by a real 2-rank FSDP2 job (gloo on 127.0.0.1): each
    rank saves its half of every parameter and of the AdamW state, plus the step."""
    import socket
    import subprocess

    out = OUT / "fsdp_step_200"
    shutil.rmtree(out, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--fsdp-rank", str(out)],
        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"})
        for rank in range(2)]
    if any(p.wait(timeout=300) for p in procs):
        raise SystemExit("the FSDP job failed")
    for item in out.iterdir():
        item.chmod(0o644)


def _fsdp_rank(out: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32),
                          nn.Linear(32, 64, bias=False))
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 5))
        loss = model(ids).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    os.chdir(out.parent)  # .metadata records the checkpoint id: keep this machine's path out
    dcp.save({"model": model_sd, "optim": optim_sd, "step": 200}, checkpoint_id=out.name)
    dist.barrier()
    dist.destroy_process_group()


MAKERS = {f.__name__: f for f in (
    thinker, jukebox_prior, jukebox_shared, redimnet_epoch, scripted, safetensors_file,
    musiq_npz, saved_model_and_tf_checkpoint, flax_msgpack, gguf_tiny_llama, onnx_mlp,
    keras_models, orbax_step, jax_params_pickle, npy_array, joblib_file, hf_sharded, dcp_fsdp)}


def main() -> None:
    """Write every sample, or only those named on the command line (``npy_array ...``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"samples to regenerate (default: all): {', '.join(MAKERS)}")
    parser.add_argument("--only", nargs="+", choices=sorted(MAKERS), metavar="NAME",
                        help="the same as naming them")
    parser.add_argument("--fsdp-rank", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fsdp_rank:  # one rank of dcp_fsdp's job
        _fsdp_rank(args.fsdp_rank)
        return
    names = args.names or args.only or list(MAKERS)
    unknown = sorted(set(names) - set(MAKERS))
    if unknown:
        parser.error(f"unknown sample(s) {', '.join(unknown)}; choose from {', '.join(MAKERS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # JAX reads this once, when it is first imported (by flax_msgpack or orbax_step).
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    (OUT / "jukebox").mkdir(exist_ok=True)
    for name in names:
        MAKERS[name]()
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
