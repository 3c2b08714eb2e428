"""Reference models for conversion tests: the same networks in PyTorch and in Flax (linen).

- LoFTR's ``LocalFeatureTransformer`` (zju3dv/LoFTR ``src/loftr/loftr_module/transformer.py``):
  encoder layers with q/k/v/merge Linear without bias, an MLP ``2d -> 2d -> d`` without bias,
  ``norm1`` on the attention message and ``norm2`` after the MLP, linear attention with the
  ``elu + 1`` feature map; each layer is applied to both feature sets with shared weights.
- A small CNN: Conv2d + BatchNorm2d + ReLU, global average pooling, LayerNorm, Linear.

``loftr_ckpt`` is a session fixture: a Lightning-style checkpoint at full LoFTR size
(``{"state_dict": {"matcher.loftr_coarse....": ...}, "epoch": 29, "global_step": 1000}``),
written once per test session.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
fnn = pytest.importorskip("flax.linen")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from ckptkit.testing.loftr import COARSE, FINE, state_dict  # noqa: E402  (shapes are data)


# --- PyTorch --------------------------------------------------------------------------------


def self_then_cross(layers, feat0, feat1):
    """LoFTR's layer schedule, shared by both frameworks: a "self" layer attends each feature
    map to itself, a "cross" layer each to the other (feat1 sees the updated feat0)."""
    for layer, name in layers:
        if name == "self":
            feat0, feat1 = layer(feat0, feat0), layer(feat1, feat1)
        else:
            feat0 = layer(feat0, feat1)
            feat1 = layer(feat1, feat0)
    return feat0, feat1

class LinearAttention(nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, queries, keys, values):
        q, k = F.elu(queries) + 1, F.elu(keys) + 1
        length = values.size(1)
        values = values / length  # LoFTR's guard against fp16 overflow
        kv = torch.einsum("nshd,nshv->nhdv", k, values)
        z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + self.eps)
        return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


class LoFTREncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.dim, self.nhead = d_model // nhead, nhead
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.attention = LinearAttention()
        self.merge = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model * 2, d_model * 2, bias=False), nn.ReLU(True),
                                 nn.Linear(d_model * 2, d_model, bias=False))
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x, source):
        bs = x.size(0)
        query = self.q_proj(x).view(bs, -1, self.nhead, self.dim)
        key = self.k_proj(source).view(bs, -1, self.nhead, self.dim)
        value = self.v_proj(source).view(bs, -1, self.nhead, self.dim)
        message = self.attention(query, key, value)
        message = self.norm1(self.merge(message.reshape(bs, -1, self.nhead * self.dim)))
        message = self.norm2(self.mlp(torch.cat([x, message], dim=2)))
        return x + message


class LocalFeatureTransformer(nn.Module):
    def __init__(self, d_model: int, nhead: int, layer_names: tuple[str, ...]):
        super().__init__()
        self.layer_names = layer_names
        self.layers = nn.ModuleList(LoFTREncoderLayer(d_model, nhead) for _ in layer_names)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            else:  # LayerNorm: random, so that a wrong scale/bias mapping shows in the outputs
                nn.init.normal_(p, mean=1.0 if p.data.eq(1).all() else 0.0, std=0.1)

    def forward(self, feat0, feat1):
        return self_then_cross(zip(self.layers, self.layer_names), feat0, feat1)


class TorchCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.norm(x.mean(dim=(2, 3))))


def random_cnn(seed: int = 0) -> TorchCNN:
    """A TorchCNN in eval mode with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TorchCNN()
    with torch.no_grad():
        model.bn.weight.normal_(1.0, 0.2)
        model.bn.bias.normal_(0.0, 0.2)
        model.bn.running_mean.normal_(0.0, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(17)
        model.norm.weight.normal_(1.0, 0.2)
        model.norm.bias.normal_(0.0, 0.2)
    return model.eval()


# --- Flax (linen) ---------------------------------------------------------------------------

def linear_attention(q, k, v, eps: float = 1e-6):
    q, k = fnn.elu(q) + 1, fnn.elu(k) + 1
    length = v.shape[1]
    v = v / length
    kv = jnp.einsum("nshd,nshv->nhdv", k, v)
    z = 1 / (jnp.einsum("nlhd,nhd->nlh", q, k.sum(axis=1)) + eps)
    return jnp.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


class FlaxEncoderLayer(fnn.Module):
    d_model: int
    nhead: int

    @fnn.compact
    def __call__(self, x, source):
        d, h = self.d_model, self.nhead
        bs = x.shape[0]

        def dense(name, features):
            return fnn.Dense(features, use_bias=False, name=name)

        q = dense("q_proj", d)(x).reshape(bs, -1, h, d // h)
        k = dense("k_proj", d)(source).reshape(bs, -1, h, d // h)
        v = dense("v_proj", d)(source).reshape(bs, -1, h, d // h)
        message = dense("merge", d)(linear_attention(q, k, v).reshape(bs, -1, d))
        # torch's LayerNorm: eps 1e-5 (Flax defaults to 1e-6) and the two-pass variance.
        message = fnn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm1")(message)
        message = dense("mlp.0", 2 * d)(jnp.concatenate([x, message], axis=-1))
        message = dense("mlp.2", d)(fnn.relu(message))
        return x + fnn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm2")(message)


class FlaxLoFTR(fnn.Module):
    d_model: int
    nhead: int
    layer_names: tuple[str, ...]

    @fnn.compact
    def __call__(self, feat0, feat1):
        layers = (FlaxEncoderLayer(self.d_model, self.nhead, name=f"layers.{i}")
                  for i in range(len(self.layer_names)))
        return self_then_cross(zip(layers, self.layer_names), feat0, feat1)


class FlaxCNN(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # NHWC
        x = fnn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)
        x = fnn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
        x = fnn.relu(x).mean(axis=(1, 2))
        x = fnn.LayerNorm(epsilon=1e-5, name="norm")(x)
        return fnn.Dense(5, name="fc")(x)


def unflatten(arrays: dict[str, np.ndarray]) -> dict:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}`` (what an IFViT/MUSIQ loader does)."""
    tree: dict = {}
    for key, value in arrays.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    return tree


def assert_agree(torch_model, flax_module, variables: dict, inputs: Sequence[np.ndarray],
                 to_flax: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> None:
    """Both forward passes agree on ``inputs``, with the converted weights as they are.

    float64 (weights and inputs cast exactly, so only the conversion can differ): max abs
    diff <= 1e-5.  float32, as deployed: <= 1e-5 relative to the output's magnitude; absolute
    diffs there are float32 rounding in different summation orders (about 1e-5 on LoFTR's
    outputs of magnitude 10 after 16 layer applications), not conversion errors.
    """
    for dtype, x64 in ((np.float32, False), (np.float64, True)):
        model = torch_model if dtype == np.float32 else copy.deepcopy(torch_model).double()
        xs = [x.astype(dtype) for x in inputs]
        with torch.no_grad():
            want = model(*(torch.from_numpy(x) for x in xs))
        with jax.enable_x64(x64):
            cast = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a).astype(dtype)),
                                          variables)
            got = flax_module.apply(cast, *(to_flax(x) for x in xs))
            got = [np.asarray(g) for g in (got if isinstance(got, tuple) else (got,))]
        want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == dtype
            scale = 1.0 if x64 else max(1.0, float(np.abs(w).max()))
            assert np.abs(g - w).max() <= 1e-5 * scale, (dtype, np.abs(g - w).max())


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# --- the LoFTR checkpoint fixture -----------------------------------------------------------

def loftr_state(seed: int = 0) -> tuple[dict, LocalFeatureTransformer, LocalFeatureTransformer]:
    """A LoFTR-shaped state dict (coarse + fine + some backbone) and the two transformers."""
    torch.manual_seed(seed)
    coarse = LocalFeatureTransformer(**COARSE).eval()
    fine = LocalFeatureTransformer(**FINE).eval()
    state = {f"loftr_coarse.{k}": v for k, v in coarse.state_dict().items()}
    state.update({f"loftr_fine.{k}": v for k, v in fine.state_dict().items()})
    # The rest of the network (backbone, fine_preprocess) as the demo's checkpoint has it.
    state.update({k: torch.from_numpy(v) for k, v in state_dict(seed).items()
                  if not k.startswith(("loftr_coarse.", "loftr_fine."))})
    return state, coarse, fine


@pytest.fixture(scope="session")
def loftr_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """(path, coarse torch model, fine torch model) of a Lightning-style LoFTR checkpoint."""
    state, coarse, fine = loftr_state()
    path = tmp_path_factory.mktemp("loftr") / "outdoor_ds.ckpt"
    torch.save({"state_dict": {f"matcher.{k}": v for k, v in state.items()},
                "epoch": 29, "global_step": 1000}, path)
    return path, coarse, fine
