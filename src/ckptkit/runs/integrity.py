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
from ckptkit.storage.location import Location, locate

#: Files whose presence completes an Orbax step directory (atomic-rename and commit-file modes).
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")
ORBAX_TMP = ".orbax-checkpoint-tmp"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
              "adapter_model.bin", "tf_model.h5", "flax_model.msgpack")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_DIR = re.compile(r"checkpoint-\d+")
#: PyTorch Distributed Checkpoint: torch renames ``.metadata`` into place after every data file.
DCP_METADATA = ".metadata"
_HF_SHARD = re.compile(r".+-\d{5,}-of-\d{5,}\.(?:safetensors|bin)")
#: DeepSpeed's per-rank files in a ``global_stepN/`` directory.
_DEEPSPEED = re.compile(r"(?:zero_pp_rank_\d+_)?mp_rank_\d+_(?:model|optim)_states\.pt")

Layout = str  # "dcp" | "orbax" | "hf" | "deepspeed"


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
    # A remote location (a URL's object or prefix) is used as it is: Path() would mangle it.
    target = path if not isinstance(path, (str, os.PathLike)) else Path(path)
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


def directory_layout(path: Path) -> Layout | None:
    """Which sharded or distributed checkpoint ``path`` holds, judged by its file names only:
    ``dcp`` (``.metadata`` or ``*.distcp``), ``orbax`` (commit markers, ``_METADATA``, an
    OCDBT manifest), ``hf`` (an index, weights, or ``*-NNNNN-of-NNNNN`` shards), ``deepspeed``
    (``*mp_rank_NN_model_states.pt``, ``*_optim_states.pt``), or None.  A save cut short still shows its layout; it
    is :func:`check_complete` that says whether it finished."""
    try:
        names = {e.name for e in os.scandir(path)}
    except OSError:
        return None
    if DCP_METADATA in names or any(n.endswith(".distcp") for n in names):
        return "dcp"
    if names & {*ORBAX_MARKERS, "_METADATA", "manifest.ocdbt", "_sharding"}:
        return "orbax"
    if names & {*HF_INDEXES, *HF_WEIGHTS} or any(_HF_SHARD.fullmatch(n) for n in names):
        return "hf"
    if any(_DEEPSPEED.fullmatch(n) for n in names):
        return "deepspeed"
    return None


def _check_dir(path: Path) -> Completeness:
    name = path.name
    if ORBAX_TMP in name:
        return Completeness(False, f"Orbax temporary directory ({ORBAX_TMP}): save never finished")
    if _HF_DIR.fullmatch(name):
        return _check_hf(path)
    layout = directory_layout(path)
    if layout == "orbax" or name.isdigit():
        markers = [m for m in ORBAX_MARKERS if (path / m).is_file()]
        if not markers:
            return Completeness(False, "Orbax step directory without _CHECKPOINT_METADATA or "
                                       "commit_success.txt (save not committed)")
        return _verified(path) or Completeness(True, f"complete (Orbax marker {markers[0]})")
    verdict = _verified(path)
    if verdict is not None:
        return verdict
    if layout == "dcp":
        return _check_dcp(path)
    if layout == "hf":
        return _check_hf_weights(path, "")
    reader = formats.detect(path)
    reader.read_info(path)
    return Completeness(True, "complete (directory checkpoint reads)")


def _verified(path: Path) -> Completeness | None:
    """The verdict of the format's own ``verify`` verb, or None when its reader has none.

    This is the one place a reader's verification takes over from the layout checks below
    (which only look at which files exist and how long they are)."""
    try:
        reader = formats.detect(path)
    except CkptkitError:
        return None
    verify = getattr(reader, "verify", None)
    if verify is None:
        return None
    problems = verify(path)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        where = Path(first.file).name if first.file else ""
        return Completeness(False, f"{where + ': ' if where else ''}{first.message}{more}")
    return Completeness(True, f"complete ({reader.FORMAT}, verified)")


def _check_dcp(path: Path) -> Completeness:
    metadata = path / DCP_METADATA
    if not metadata.is_file():
        # torch writes every .distcp file first and renames .metadata into place last.
        return Completeness(False, "DCP directory without .metadata (save not finished)")
    if metadata.stat().st_size == 0:
        return Completeness(False, ".metadata is empty")
    shards = [p for p in path.iterdir() if p.name.endswith(".distcp")]
    if not shards:
        return Completeness(False, ".metadata but no .distcp data file")
    return Completeness(True, f"complete (DCP .metadata and {len(shards)} data file(s))")


def _check_hf(path: Path) -> Completeness:
    state = path / "trainer_state.json"
    if not state.is_file():
        # The Trainer writes trainer_state.json last: without it the save was cut short.
        return Completeness(False, "no trainer_state.json (the Trainer writes it last)")
    try:
        json.loads(_text(state))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Completeness(False, f"trainer_state.json is not valid JSON ({exc})")
    return _verified(path) or _check_hf_weights(path, ", trainer_state")


def _check_hf_weights(path: Path, also: str) -> Completeness:
    """An index with every shard it names complete, or one complete weights file."""
    for name in HF_INDEXES:
        index = path / name
        if index.is_file():
            try:
                shards = set(json.loads(_text(index))["weight_map"].values())
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
            return Completeness(True, f"complete ({len(shards)} weight shard(s){also})")
    for name in HF_WEIGHTS:
        weights = path / name
        if weights.is_file():
            if name.endswith((".h5", ".msgpack")):
                return Completeness(True, f"complete ({name}{also})")
            verdict = check_complete(weights)
            if not verdict:
                return Completeness(False, f"{name}: {verdict.reason}")
            return Completeness(True, f"complete ({name}{also})")
    if any(_HF_SHARD.fullmatch(p.name) for p in path.iterdir()):
        return Completeness(False, "shards but no index (model.safetensors.index.json is "
                                   "written last)")
    return Completeness(False, "no model weights (model.safetensors, pytorch_model.bin or a "
                               "sharded index)")


def _text(path: Path) -> str:
    """A small JSON file beside the weights (trainer state, shard index), read whole."""
    loc = locate(path)
    return loc.read(0, loc.size()).decode("utf-8")


__all__ = ["Completeness", "check_complete", "directory_layout"]
