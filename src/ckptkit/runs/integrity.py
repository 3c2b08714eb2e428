"""Is a checkpoint completely written?  Cheap structural checks, no hashing, no tensor bytes.

Used before anything is deleted (:mod:`ckptkit.runs.retention`) and when picking the checkpoint to
resume from (:func:`ckptkit.latest`).  Each check reads only what a truncated or half-written
save would lack: a zip's central directory and local headers, the end of a legacy stream, a
safetensors header and its last byte, npz array headers, a TF index and its shard lengths, and
the marker files directory formats write last.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ckptkit import formats
from ckptkit.formats import completeness
from ckptkit.errors import CkptkitError, UnsafeContentError

#: Files whose presence completes an Orbax step directory (atomic-rename and commit-file modes).
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")
ORBAX_TMP = ".orbax-checkpoint-tmp"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
              "adapter_model.bin", "tf_model.h5", "flax_model.msgpack")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_DIR = re.compile(r"checkpoint-\d+")


@dataclass(frozen=True)
class Completeness:
    """The verdict of :func:`check_complete`: ``ok`` and one line saying why."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def check_complete(path: str | os.PathLike[str]) -> Completeness:
    """Check, from metadata only, that the checkpoint at ``path`` was written to the end.

    Handles torch zip and legacy files, safetensors, npz, TF checkpoints (``ckpt-N.index`` or
    the bare prefix ``ckpt-N``), HF ``checkpoint-N/`` directories, Orbax step directories and
    other directories :func:`ckptkit.formats.detect` knows.  Never raises for a damaged file:
    damage is the answer.

    Args:
        path: the checkpoint file, directory or TF prefix.

    Returns:
        ``Completeness(ok, reason)``; ``reason`` names what is missing or short.

    Example:
        >>> check_complete("thinker_step_300.pt")            # doctest: +SKIP
        Completeness(ok=False, reason='truncated: ... central directory ...')
    """
    target = Path(path)
    try:
        if target.is_dir():
            return _check_dir(target)
        if target.name.endswith(".index") or not target.exists():
            return _check_tf(target)
        return _check_file(target)
    except UnsafeContentError:
        # Completeness is about the bytes being all there; safety is `ckpt inspect`'s verdict.
        return Completeness(True, "complete (holds pickle code; inspect before loading)")
    except (CkptkitError, OSError, ValueError) as exc:
        return Completeness(False, _one_line(exc, target))


def _one_line(exc: BaseException, path: Path) -> str:
    text = exc.message if isinstance(exc, CkptkitError) else f"{type(exc).__name__}: {exc}"
    # Readers start messages with the path; the caller already shows it.
    for lead in (f"{path}: ", f"{path.name}: "):
        text = text.removeprefix(lead)
    return " ".join(text.split())


def _check_file(path: Path) -> Completeness:
    return Completeness(True, completeness.check_file(path))


def _check_tf(path: Path) -> Completeness:
    return Completeness(True, completeness.check_tf(path))


def _check_dir(path: Path) -> Completeness:
    name = path.name
    if ORBAX_TMP in name:
        return Completeness(False, f"Orbax temporary directory ({ORBAX_TMP}): save never finished")
    if _HF_DIR.fullmatch(name):
        return _check_hf(path)
    if any((path / m).exists() for m in ORBAX_MARKERS) or name.isdigit():
        markers = [m for m in ORBAX_MARKERS if (path / m).is_file()]
        if not markers:
            return Completeness(False, "Orbax step directory without _CHECKPOINT_METADATA or "
                                       "commit_success.txt (save not committed)")
        return Completeness(True, f"complete (Orbax marker {markers[0]})")
    reader = formats.detect(path)
    reader.read_info(path)
    return Completeness(True, "complete (directory checkpoint reads)")


def _check_hf(path: Path) -> Completeness:
    state = path / "trainer_state.json"
    if not state.is_file():
        # The Trainer writes trainer_state.json last: without it the save was cut short.
        return Completeness(False, "no trainer_state.json (the Trainer writes it last)")
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Completeness(False, f"trainer_state.json is not valid JSON ({exc})")
    for name in HF_INDEXES:
        index = path / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                    AttributeError) as exc:
                return Completeness(False, f"{name} is unreadable ({exc})")
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                return Completeness(False, f"{name} names missing shard(s): {', '.join(missing)}")
            for shard in sorted(shards):
                verdict = check_complete(path / shard)
                if not verdict:
                    return Completeness(False, f"{shard}: {verdict.reason}")
            return Completeness(True, f"complete ({len(shards)} weight shard(s), trainer_state)")
    for name in HF_WEIGHTS:
        weights = path / name
        if weights.is_file():
            if name.endswith((".h5", ".msgpack")):
                return Completeness(True, f"complete ({name}, trainer_state.json)")
            verdict = check_complete(weights)
            if not verdict:
                return Completeness(False, f"{name}: {verdict.reason}")
            return Completeness(True, f"complete ({name}, trainer_state.json)")
    return Completeness(False, "no model weights (model.safetensors, pytorch_model.bin or a "
                               "sharded index)")


__all__ = ["Completeness", "check_complete"]
