"""Legacy Keras ``.h5`` files (``model.save("m.h5")``, ``save_weights``), and any HDF5 file.

The HDF5 structure is read by h5py in a child process (:mod:`~ckptkit.formats.hdf5_child`):
root attributes (``model_config``, ``keras_version``, ``backend``, ``training_config``) and
every dataset.  Datasets stored contiguously and unfiltered become tensors read by byte range
without h5py; chunked or compressed ones are read through the child when their values are
needed.  ``model_config`` is judged by Keras' safe-mode rules
(:mod:`~ckptkit.formats.keras_config`).  Needs the ``keras`` extra (h5py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ckptkit.errors import IntegrityError, UsageError
from ckptkit.formats import hdf5_child, keras_config
from ckptkit.model import ByteSpan, RawCheckpoint, SafetyReport, TensorRef, checked_shape
from ckptkit.storage.budget import metered
from ckptkit.storage.location import locate

FORMAT = "keras-h5"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: numpy kinds kept as tensors: bool, integers, floats, complex.
_NUMERIC = "biufc"


def sniff(path: Path) -> bool:
    try:
        location = locate(path)
        return location.is_file() and location.read(0, 8) == HDF5_MAGIC
    except (OSError, ValueError):
        return False


def tensors_from(answer: dict[str, Any], path: str, base: int = 0, member: str | None = None,
                 ) -> tuple[dict[str, Any], list[tuple[str, TensorRef]]]:
    """The tree and tensor list of a child's ``structure`` answer: dataset offsets become
    spans of ``path`` (shifted by ``base``, or inside zip ``member``)."""
    tree: dict[str, Any] = {}
    tensors = []
    datasets = answer.get("datasets")
    if not isinstance(datasets, list):
        raise IntegrityError(f"{path}: the HDF5 reader gave no dataset list", path=path)
    for entry in datasets:
        try:
            name, code, kind = str(entry["path"]), np.dtype(entry["dtype"]), entry["kind"]
            shape = checked_shape(entry["shape"], f"{path}: dataset {name!r}")
            offset = entry["offset"]
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{path}: malformed HDF5 dataset entry ({exc!r})",
                                 path=path) from None
        if kind not in _NUMERIC:
            continue
        ref = TensorRef(code.name, shape)
        span = None
        # Big-endian data cannot be described per tensor: it is read through the child.
        if isinstance(offset, int) and code.byteorder != ">" and offset >= 0:
            span = (ByteSpan(path, base + offset, ref.nbytes) if member is None
                    else ByteSpan(path, offset, ref.nbytes, member=member))
        ref = TensorRef(code.name, shape, span)
        tree[name] = ref
        tensors.append((name, ref))
    return tree, tensors


def safety(report: keras_config.ConfigReport) -> tuple[SafetyReport, dict[str, Any]]:
    """The config's verdict as a SafetyReport plus the ``unsafe_via``/``unsafe_where``
    details scan and inspect show."""
    details: dict[str, Any] = {}
    if report.unsafe:
        details["unsafe_via"] = dict(report.unsafe)
        details["unsafe_where"] = dict(report.where)
    return SafetyReport(objects=tuple(sorted(report.custom)),
                        unsafe=tuple(sorted(report.unsafe))), details


@metered
def read_info(path: Path) -> RawCheckpoint:
    if not sniff(path):
        raise IntegrityError(f"{path}: not an HDF5 file (no HDF5 signature)",
                             hint="Pass a Keras .h5 or .keras file", path=str(path))
    answer = hdf5_child.run("structure", Path(path))
    tree, tensors = tensors_from(answer, str(path))
    groups = answer.get("groups") if isinstance(answer.get("groups"), dict) else {}
    root = groups.get("", {}) if isinstance(groups.get("", {}), dict) else {}
    details: dict[str, Any] = {
        "keras_version": root.get("keras_version"), "backend": root.get("backend"),
        "datasets": len(answer.get("datasets", [])),
    }
    safe = SafetyReport()
    config_text = root.get("model_config")
    if isinstance(config_text, str):
        report = keras_config.analyse(keras_config.parse(config_text, f"{path}: model_config"))
        details["model"] = report.summary()
        safe, extra = safety(report)
        details.update(extra)
    if isinstance(root.get("training_config"), str):
        details["training_config"] = True
    return RawCheckpoint(FORMAT, tree, tuple(tensors), safety=safe, details=details,
                         separator="/")


def read_arrays(h5: Path, label: str | None = None) -> dict[str, np.ndarray]:
    """Every numeric dataset of ``h5``, read by h5py in the child process."""
    with tempfile.TemporaryDirectory(prefix="ckptkit-h5-") as folder:
        out = Path(folder) / "arrays.npz"
        answer = hdf5_child.run("arrays", h5, out, label=label)
        names = answer.get("names")
        if not isinstance(names, list):
            raise IntegrityError(f"{label or h5}: the HDF5 reader gave no array list")
        with np.load(out, allow_pickle=False) as saved:
            return {str(n): saved[f"a{i}"] for i, n in enumerate(names)}


def tensor_reader(path: Path) -> Callable[[str, TensorRef], np.ndarray]:
    """Each tensor's values: by byte range when it has one, else through the child (all
    datasets read once, on first need)."""
    from ckptkit.formats.tensor_io import read_tensor

    cache: dict[str, dict[str, np.ndarray]] = {}

    def array(name: str, ref: TensorRef) -> np.ndarray:
        if ref.span is not None:
            return read_tensor(ref)
        if "all" not in cache:
            cache["all"] = read_arrays(Path(path))
        return cache["all"][name]

    return array


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: every dataset as ``{path: array}`` (h5py in a child process).  Building the
    Keras model is left to Keras: ``keras.saving.load_model(path)`` (safe mode on)."""
    if framework != "numpy":
        raise UsageError(f"{path}: cannot load a Keras HDF5 file as {framework!r}",
                         hint="Use framework='numpy', or keras.saving.load_model")
    raw = read_info(path)
    array = tensor_reader(path)
    return {name: array(name, ref) for name, ref in raw.tensors}
