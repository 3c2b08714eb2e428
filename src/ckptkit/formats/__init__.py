"""Format readers, one module per format, all with the same three verbs.

``sniff(path) -> bool``
    Decide by content (never by suffix) whether ``path`` is in this format; cheap, reads at most
    a few KiB, never raises for unrelated input.
``read_info(path) -> RawCheckpoint``
    Read structure and metadata without reading tensor bytes and without running code.
``load(path, framework, *, unsafe=False)``
    Load for real use (see :func:`ckptkit.load`).
``verify(path, *, hashes=False) -> list[Problem]`` (optional)
    Everything that makes the checkpoint incomplete, each :class:`~ckptkit.model.Problem`
    naming its file; ``[]`` when complete.  Formats spread over several files implement it
    (index against shards, chunks against files); without it, ``ckpt verify`` runs the
    single-file checks of :mod:`ckptkit.formats.completeness`.  ``hashes`` re-hashes files
    whose sha256 is known.

Sharded and distributed formats (Hugging Face shards, PyTorch DCP, Orbax) add a verb:

``verify(path, *, hashes=False) -> list[Problem]``
    What is wrong with the checkpoint (:class:`ckptkit.model.Problem`); ``ckpt verify``,
    ``ckpt latest`` and ``ckpt cleanup`` use it.

A tensor stored in chunks is gathered one global tensor at a time by
:func:`ckptkit.formats.chunked.assemble`.

Modules are imported lazily so that sniffing one format never imports another format's
dependencies.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

from ckptkit.errors import FormatError, IntegrityError, NotFoundError, UsageError
from ckptkit.storage.location import Location, locate

#: Detection order: the common PyTorch formats first, so that inspecting a .pt file imports
#: no other reader.  Formats cannot be mistaken for each other in this order: torch-zip
#: excludes TorchScript archives itself, npz members are all .npy, and the TensorFlow readers
#: only claim directories, SSTable index files and their shards.  Plain pickles come after
#: torch-legacy, which claims the pickles that carry torch's magic number, and after
#: safetensors, whose header length can start like a pickle; before Flax msgpack, whose
#: sniff takes 0x80 (an empty map) for a map header, while 0x80 0x02-0x05 is a pickle.
FORMAT_MODULES: tuple[tuple[str, str], ...] = (
    ("torch-zip", "ckptkit.formats.torch_zip"),
    ("torchscript", "ckptkit.formats.torchscript"),
    ("npz", "ckptkit.formats.npz"),
    ("torch-legacy", "ckptkit.formats.torch_legacy"),
    ("safetensors", "ckptkit.formats.safetensors"),
    ("hf-sharded", "ckptkit.formats.hf_sharded"),
    ("torch-dcp", "ckptkit.formats.torch_dcp"),
    ("savedmodel", "ckptkit.formats.savedmodel"),
    ("tf-checkpoint", "ckptkit.formats.tf_checkpoint"),
    ("npy", "ckptkit.formats.npy"),
    ("pickle", "ckptkit.formats.pickle_file"),
    ("flax-msgpack", "ckptkit.formats.flax_msgpack"),
    ("gguf", "ckptkit.formats.gguf"),
    ("onnx", "ckptkit.formats.onnx"),
    ("keras", "ckptkit.formats.keras"),
    ("keras-h5", "ckptkit.formats.keras_h5"),
    ("deepspeed", "ckptkit.formats.deepspeed"),
    ("orbax", "ckptkit.formats.orbax"),
)

_TF_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")

EXPECTED = ("a PyTorch checkpoint (zip or legacy), TorchScript archive, .npz, .npy, "
            "safetensors, a sharded Hugging Face checkpoint (*.index.json), a PyTorch DCP "
            "directory (.metadata), TensorFlow SavedModel directory or checkpoint (.index), Flax "
            "msgpack, a pickle/joblib file, GGUF, ONNX, Keras (.keras, .h5), an Orbax step "
            "directory or a DeepSpeed ZeRO global_stepN directory")


def module_for(name: str) -> ModuleType:
    """The reader module of format ``name`` (e.g. ``"torch-zip"``)."""
    for fmt, module in FORMAT_MODULES:
        if fmt == name:
            return importlib.import_module(module)
    raise FormatError(f"unknown format name {name!r}",
                      hint="Use one of: " + ", ".join(f for f, _ in FORMAT_MODULES))


def detect(path: Path | Location) -> ModuleType:
    """Return the reader module for ``path``, judged by content.

    Pass a :class:`~ckptkit.storage.location.Location` (and then read through the same one)
    so that every sniff shares its first, coalesced read.

    Raises:
        NotFoundError: ``path`` does not exist.
        FormatError: no reader recognises it.
    """
    if not str(path) or str(path) == ".":
        raise UsageError("no checkpoint path given", hint="Pass a file or directory")
    loc = locate(path)
    if str(getattr(loc, "url", "")).endswith("/"):
        # A folder URL: HTTP cannot say a folder exists, so look for a shard index by name.
        sharded = module_for("hf-sharded")
        if sharded.sniff(loc):
            return sharded
    exists = loc.exists()
    if not exists:
        # A TF checkpoint is named by its prefix (ckpt-1 for ckpt-1.index + data shards).
        if not loc.sibling(loc.name + ".index").is_file():
            raise NotFoundError(f"{path}: no such file or directory",
                                hint="Check the path, or run `ckpt list` for catalogue names",
                                path=str(path))
    elif not (loc.is_file() or loc.is_dir()):
        raise FormatError(f"{path}: not a regular file or directory (a pipe or device?)",
                          hint="Pass the checkpoint file itself", path=str(path))
    order = FORMAT_MODULES
    if loc.name.endswith(".index") or _TF_SHARD.search(loc.name) or not exists:
        # Named like a TF checkpoint: its shards hold raw bytes that could look like anything.
        order = tuple(sorted(FORMAT_MODULES, key=lambda f: f[0] != "tf-checkpoint"))
    for _fmt, name in order:
        module = importlib.import_module(name)
        if module.sniff(loc):
            return module
    if loc.is_file() and loc.size() == 0:
        raise IntegrityError(f"{path}: file is empty", hint="Re-download or re-save it",
                             path=str(path))
    kind = "directory" if loc.is_dir() else "file"
    raise FormatError(f"{path}: not a checkpoint format ckptkit knows ({kind})",
                      hint=f"Expected {EXPECTED}", path=str(path))


def _read_embedded(data: bytes, findings: object, where: str) -> str | None:
    """A torch file inside a pickle (``torch.storage._load_from_bytes``), read by the readers
    here; the unpickler, a layer below, calls it through :mod:`~ckptkit.pickles.hooks`."""
    from ckptkit.formats.embedded import read_embedded_torch_file

    return read_embedded_torch_file(data, findings, where)  # type: ignore[arg-type]


def _register_embedded_reader() -> None:
    from ckptkit.pickles import hooks

    hooks.embedded_reader = _read_embedded


_register_embedded_reader()
