"""Real files for the Hugging Face Hub stand-in's repos: a safetensors file written by the
safetensors library, a config.json, and a stand-in holding them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from ckptkit.testing.hf_hub import HfHubStandIn, client_constants_now

try:  # read now, under the environment pytest started with (what reread_hf_constants restores)
    import huggingface_hub.constants  # noqa: F401
except ImportError:
    pass

CONFIG = json.dumps({"model_type": "tiny", "hidden_size": 64}, indent=2).encode() + b"\n"
NOTES = b"trained for 3 steps\n"
TOKEN = "hf_granted_token_0123456789"


def safetensors_bytes(rows: int = 64, seed: int = 0) -> bytes:
    """A safetensors file as the library writes it; 64 rows is about 33 KiB, 400 rows ~200 KiB
    (more than the first 100 kB the Hub client reads for a header)."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({"encoder.weight": rng.standard_normal((rows, 128)).astype(np.float32),
                 "encoder.bias": np.zeros(128, dtype=np.float32),
                 "step": np.array([3], dtype=np.int64)}, metadata={"format": "np"})


WEIGHTS = safetensors_bytes()


def reread_hf_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``huggingface_hub.constants`` what a process started now would read (the client
    reads ``HF_*`` variables once, at import): for a test that sets them in this process.
    Undone with ``monkeypatch``, back to the values read when this module was imported."""
    from huggingface_hub import constants

    for name, value in client_constants_now().items():
        monkeypatch.setattr(constants, name, value, raising=False)


@pytest.fixture
def hub() -> Iterator[HfHubStandIn]:
    """A running stand-in with ``org/tiny`` (config.json, model.safetensors in LFS,
    docs/notes.txt) and a gated ``org/gated`` that :data:`TOKEN` may read."""
    with HfHubStandIn() as standin:
        standin.add_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": WEIGHTS,
                                      "docs/notes.txt": NOTES})
        standin.add_repo("org/gated", {"config.json": CONFIG, "model.safetensors": WEIGHTS},
                         gated=True)
        standin.grant(TOKEN, "org/gated")
        yield standin
