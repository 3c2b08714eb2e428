"""`ckptkit.inspect` never imports a framework, and the bundled samples stay readable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ckptkit
from tests.conftest import SRC

SAMPLES = SRC / "ckptkit" / "samples"
ALL_SAMPLES = {
    "thinker_step_200.pt": "torch-zip", "prior_level_2.pth.tar": "torch-legacy",
    "redimnet_epoch_3.pt": "torch-zip", "encoder_scripted.pt": "torchscript",
    "spaq_ckpt.npz": "npz", "model.safetensors": "safetensors",
    "musiq_saved_model": "savedmodel", "tf_ckpt/ckpt-1.index": "tf-checkpoint",
    "flax_params.msgpack": "flax-msgpack", "orbax_step_3": "orbax",
}

# Make the frameworks unimportable, then inspect every format: proves no reader needs them.
NO_FRAMEWORKS = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'tensorflow', 'jax', 'flax', 'keras', 'safetensors',
                                  'tensorstore', 'orbax'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import ckptkit
for path in sys.argv[1:]:
    info = ckptkit.inspect(path)
    assert info.tensor_count > 0, path
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'jax',
                                                              'tensorstore'))
print('heavy:', heavy)
"""


def test_no_framework_is_imported_for_any_format() -> None:
    paths = [str(SAMPLES / name) for name in ALL_SAMPLES]
    result = subprocess.run([sys.executable, "-c", NO_FRAMEWORKS, *paths], capture_output=True,
                            text=True, env={"PYTHONPATH": str(SRC)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy: []"


@pytest.mark.parametrize("name, fmt", sorted(ALL_SAMPLES.items()))
def test_bundled_samples_are_recognised(name: str, fmt: str) -> None:
    info = ckptkit.inspect(SAMPLES / name)
    assert info.format == fmt and info.unsafe == ()


def test_samples_carry_the_layouts_of_their_origin_projects() -> None:
    thinker = ckptkit.inspect(SAMPLES / "thinker_step_200.pt")
    assert thinker.metadata == {"step": 200, "best_val_loss": 2.3125}
    assert thinker.scheduler and thinker.scaler and thinker.optimizer.kind == "AdamW"
    prior = ckptkit.inspect(SAMPLES / "prior_level_2.pth.tar")
    assert prior.objects == ("jukebox.hparams.Hyperparams",)
    assert prior.opaque["hps"]["state"]["name"] == "1b_lyrics/prior_level_2"
    musiq = ckptkit.inspect(SAMPLES / "spaq_ckpt.npz")
    assert musiq.details["flax_optimizer_target"] == "opt/target"
    saved = ckptkit.inspect(SAMPLES / "musiq_saved_model")
    assert [s.key for s in saved.signatures] == ["serving_default"]
    assert saved.signatures[0].inputs[0].name == "image_bytes_tensor"


def test_cli_help_does_not_import_numpy() -> None:
    code = ("import sys; from ckptkit.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'torch', 'tensorflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC)}, timeout=60)
    assert result.stdout.strip().endswith("[]"), result.stdout + result.stderr


def test_torch_zip_inspect_does_not_import_numpy() -> None:
    code = ("import sys, ckptkit; ckptkit.inspect(sys.argv[1]); "
            "print('numpy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(SAMPLES / "thinker_step_200.pt")],
                            capture_output=True, text=True, env={"PYTHONPATH": str(SRC)},
                            timeout=60)
    assert result.stdout.strip() == "False", result.stderr
