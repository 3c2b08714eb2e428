"""TensorFlow checkpoints (``tf.train.Checkpoint``, ``tf.compat.v1.train.Saver``) read by hand.

A checkpoint is a prefix: ``<prefix>.index`` (a tensor bundle index, see
:mod:`ckptkit.formats.tensor_bundle`) plus ``<prefix>.data-NNNNN-of-MMMMM`` shards.  Users name
it by the ``.index`` file, a data shard, the bare prefix, or the directory whose ``checkpoint``
state file names the latest prefix.  Reading the structure never imports TensorFlow.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ckptkit.storage.budget import metered
from ckptkit.storage.location import Location, locate
from ckptkit.errors import (
    CkptkitError,
    IntegrityError,
    MissingDependencyError,
    NotFoundError,
    UsageError,
)
from ckptkit.formats import bundle_arrays, tensor_bundle
from ckptkit.model import FormatName, RawCheckpoint

FORMAT: FormatName = "tf-checkpoint"
STATE_FILE = "checkpoint"
_STATE_MAX_BYTES = 1 << 20
_SHARD_NAME = re.compile(r"(?P<prefix>.+)\.data-\d{5}-of-\d{5}")
_STATE_LINE = re.compile(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*'
                         r'"((?:[^"\\]|\\.)*)"\s*$', re.MULTILINE)
_ESCAPE = re.compile(rb"\\([0-7]{1,3}|x[0-9a-fA-F]{1,2}|.)")
_SIMPLE_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b'"': b'"', b"'": b"'", b"\\": b"\\"}


def _unescape(text: str) -> str:
    """Undo the C escaping text-format protos apply to strings (octal for non-ASCII bytes)."""
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code[:1] in b"01234567":
            return bytes([int(code, 8) & 0xFF])
        if code[:1] == b"x" and len(code) > 1:
            return bytes([int(code[1:], 16)])
        return _SIMPLE_ESCAPES.get(code, code)

    raw = _ESCAPE.sub(one, text.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


def read_state(state: Path | Location) -> tuple[str | None, list[str]]:
    """The latest and all prefixes a ``checkpoint`` state file names, as written (unresolved).

    Returns ``(None, [])`` for a file that is not a CheckpointState text proto.
    """
    state = locate(state)
    try:
        if not state.is_file():
            return None, []
        size = state.size()
        if size > _STATE_MAX_BYTES:
            return None, []
        text = state.read(0, size).decode("utf-8", "replace")
    except (OSError, CkptkitError):
        return None, []
    latest: str | None = None
    everything: list[str] = []
    for key, value in _STATE_LINE.findall(text):
        if key == "model_checkpoint_path":
            latest = _unescape(value)
        else:
            everything.append(_unescape(value))
    return latest, everything


def _state_prefix(directory: Location, named: str) -> str:
    """Resolve a prefix from a state file: relative to its directory, like TensorFlow does.

    An absolute path from another machine is tried by its base name here, since checkpoint
    directories are often copied without rewriting the state file.
    """
    absolute = Path(named).is_absolute()
    candidate = named if absolute else str(directory.child(named))
    if absolute and not tensor_bundle.index_path(candidate).exists():
        local = str(directory.child(Path(named).name))
        if tensor_bundle.index_path(local).exists():
            return local
    return candidate


def _is_savedmodel_dir(path: Location) -> bool:
    return path.child("saved_model.pb").exists() or path.child("saved_model.pbtxt").exists()


def _bundle_indexes(directory: Location) -> list[Location]:
    try:
        return [directory.child(e.name) for e in directory.list()
                if not e.is_dir and e.name.endswith(".index")
                and tensor_bundle.looks_like_bundle(directory.child(e.name))]
    except OSError:
        return []


def resolve(path: Path | Location) -> tuple[str, dict[str, Any]]:
    """The checkpoint prefix ``path`` names, plus how it was found (for ``details``).

    Raises:
        NotFoundError: nothing at ``path`` names a checkpoint, or the state file's prefix is gone.
        UsageError: a directory holds several checkpoints and no state file picks one.
    """
    path = locate(path)
    if path.is_dir():
        state = path.child(STATE_FILE)
        latest, everything = read_state(state)
        if latest is not None:
            prefix = _state_prefix(path, latest)
            if not tensor_bundle.index_path(prefix).exists():
                raise NotFoundError(
                    f"{state}: names checkpoint {latest!r}, but {prefix}.index does not exist",
                    hint="Pass one of the checkpoint prefixes in the directory explicitly",
                    path=str(path))
            return prefix, {"state_file": str(state), "all_checkpoints": everything}
        indexes = _bundle_indexes(path)
        if len(indexes) == 1:
            return str(indexes[0])[: -len(".index")], {}
        if indexes:
            names = ", ".join(p.name[: -len(".index")] for p in indexes[:10])
            raise UsageError(f"{path}: holds {len(indexes)} checkpoints and no '{STATE_FILE}' "
                             f"file saying which is latest ({names})",
                             hint="Pass the prefix of one, e.g. "
                                  f"{path.child(indexes[-1].name[: -len('.index')])}",
                             path=str(path))
        raise NotFoundError(f"{path}: no TensorFlow checkpoint (.index file) in this directory",
                            hint="Pass the checkpoint prefix (e.g. ckpt-1 for ckpt-1.index) or "
                                 "the directory that holds it", path=str(path))
    if path.is_file():
        if path.name == STATE_FILE and read_state(path)[0] is not None:
            return resolve(path.parent())
        text = str(path)
        if text.endswith(".index"):
            return text[: -len(".index")], {}
        shard = _SHARD_NAME.fullmatch(text)
        if shard and tensor_bundle.index_path(shard.group("prefix")).is_file():
            return shard.group("prefix"), {}
        # A renamed index: its shards would have to sit beside it under the same stem.
        return str(path.sibling(Path(path.name).stem)), {}
    if tensor_bundle.index_path(str(path)).is_file():
        return str(path), {}
    raise NotFoundError(f"{path}: no such checkpoint prefix, file or directory",
                        hint="Pass the checkpoint prefix (e.g. 'ckpt-3'), its .index file or "
                             "its directory", path=str(path))


def sniff(path: Path | Location) -> bool:
    """True for a checkpoint ``.index`` (by content), one of its data shards, its bare prefix,
    its ``checkpoint`` state file, or a directory whose state file or ``*.index`` files name
    one."""
    try:
        path = locate(path)
        if path.is_dir():
            if _is_savedmodel_dir(path):
                return False
            if read_state(path.child(STATE_FILE))[0] is not None:
                return True
            return bool(_bundle_indexes(path))
        if path.is_file():
            if tensor_bundle.looks_like_bundle(path):
                return True
            if path.name == STATE_FILE and read_state(path)[0] is not None:
                return not _is_savedmodel_dir(path.parent())
            shard = _SHARD_NAME.fullmatch(str(path))
            if shard is None:
                return False
            return tensor_bundle.looks_like_bundle(tensor_bundle.index_path(shard.group("prefix")))
        return tensor_bundle.looks_like_bundle(tensor_bundle.index_path(str(path)))
    except (OSError, ValueError, CkptkitError):
        return False


def read_index(path: Path | Location) -> tuple[tensor_bundle.BundleIndex, dict[str, Any]]:
    """Resolve ``path``, decode its index and check its shards cover every tensor."""
    path = locate(path)
    prefix, found = resolve(path)
    index_file = tensor_bundle.index_path(prefix)
    renamed = (path.is_file() and not str(path).endswith(".index")
               and not _SHARD_NAME.fullmatch(str(path)) and path.name != STATE_FILE)
    if renamed:
        index_file = path
    try:
        index = tensor_bundle.read_index(prefix, index_file)
    except CkptkitError:
        raise
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{index_file}: malformed checkpoint index ({exc})",
                             hint="Re-save or re-download the checkpoint",
                             path=str(index_file)) from None
    tensor_bundle.check_shards(index)
    return index, found


@metered
def read_info(path: Path | Location) -> RawCheckpoint:
    """Names, dtypes, shapes and shard spans of every variable, without reading tensor bytes."""
    index, found = read_index(path)
    tensors = tuple(index.variables())
    details = index.details()
    details.update(found)
    if index.slice_entries:
        details["slice_entries"] = index.slice_entries
    return RawCheckpoint(FORMAT, tensor_bundle.nest(tensors), tensors, details=details,
                         separator="/")


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: ``{name: ndarray}`` read from the shards; ``tf``: a ``CheckpointReader``.

    Checkpoints hold data only, so ``unsafe`` changes nothing.
    """
    if framework == "numpy":
        index, _found = read_index(path)
        return bundle_arrays.read_arrays(index)
    if framework == "tf":
        prefix, _found = resolve(path)
        try:
            import tensorflow as tf
        except ImportError:
            raise MissingDependencyError("tensorflow", "tf",
                                         "Loading a TF checkpoint with framework='tf'") from None
        return tf.train.load_checkpoint(prefix)
    raise UsageError(f"{path}: cannot load a TensorFlow checkpoint as {framework!r}",
                     hint="Use framework='tf' or framework='numpy'")
