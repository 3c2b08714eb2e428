"""Keras v3 ``.keras`` archives: a zip of ``config.json``, ``metadata.json`` and
``model.weights.h5`` (plus ``assets/``).

``config.json`` and ``metadata.json`` are read as JSON and the config is judged by Keras'
safe-mode rules (:mod:`~ckptkit.formats.keras_config`), with no extra installed.  The weights
file is HDF5, read by h5py in a child process (:mod:`~ckptkit.formats.hdf5_child`, the
``keras`` extra): each dataset (``layers/dense/vars/0``) becomes a tensor whose bytes are a
byte range of the archive (Keras stores members uncompressed).  Without h5py, inspect still
shows the config and says which extra reads the weights.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ckptkit.errors import IntegrityError, UsageError
from ckptkit.formats import hdf5_child, keras_config, keras_h5
from ckptkit.formats.ziparchive import ZIP_ERRORS, data_offset, is_zip, open_zip, zip_of
from ckptkit.model import RawCheckpoint, TensorRef
from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.storage.location import locate

FORMAT = "keras"
CONFIG, METADATA, WEIGHTS = "config.json", "metadata.json", "model.weights.h5"


def sniff(path: Path) -> bool:
    if not is_zip(path):
        return False
    try:
        with zip_of(path) as archive:
            names = set(archive.namelist())
    except (*ZIP_ERRORS, ValueError, NotImplementedError):
        return False
    return CONFIG in names and (WEIGHTS in names or METADATA in names)


def _member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    info = archive.getinfo(name)
    account = budget.current()
    account.check("header", info.file_size, f"{name} of {path}")
    try:
        return archive.read(info)
    except (*ZIP_ERRORS, NotImplementedError) as exc:
        raise IntegrityError(f"{path}: zip member {name!r} cannot be read ({exc})",
                             hint="The file is truncated or corrupt", path=str(path)) from None


@metered
def read_info(path: Path) -> RawCheckpoint:
    with open_zip(Path(path), "Keras archive") as archive:
        names = set(archive.namelist())
        if CONFIG not in names:
            raise IntegrityError(f"{path}: no {CONFIG} in the archive (not a .keras file?)",
                                 hint="Pass a .keras file saved by Keras 3", path=str(path))
        config = keras_config.parse(_member(archive, CONFIG, path), f"{path}: {CONFIG}")
        metadata: Any = {}
        if METADATA in names:
            metadata = keras_config.parse(_member(archive, METADATA, path),
                                          f"{path}: {METADATA}")
        report = keras_config.analyse(config)
        details: dict[str, Any] = {
            "keras_version": metadata.get("keras_version") if isinstance(metadata, dict)
            else None,
            "date_saved": metadata.get("date_saved") if isinstance(metadata, dict) else None,
            "model": report.summary(),
            "assets": sorted(n for n in names if n.startswith("assets/"))[:50],
        }
        safe, extra = keras_h5.safety(report)
        details.update(extra)
        tree: dict[str, Any] = {}
        tensors: list[tuple[str, TensorRef]] = []
        if WEIGHTS not in names:
            details["weights"] = f"no {WEIGHTS} in the archive"
        elif not hdf5_child.available():
            details["weights"] = (f"{WEIGHTS} not read: it needs h5py, the ckptkit[keras] "
                                  "extra")
            details["missing_extra"] = "keras"
        else:
            tree, tensors = _weights(Path(path), archive)
    return RawCheckpoint(FORMAT, tree, tuple(tensors), safety=safe, details=details,
                         separator="/")


def _weights(path: Path, archive: zipfile.ZipFile
             ) -> tuple[dict[str, Any], list[tuple[str, TensorRef]]]:
    info = archive.getinfo(WEIGHTS)
    with tempfile.TemporaryDirectory(prefix="ckptkit-keras-") as folder:
        h5 = _extract(path, archive, info, Path(folder))
        answer = hdf5_child.run("structure", h5, label=f"{path}!{WEIGHTS}")
    if info.compress_type == zipfile.ZIP_STORED:
        loc = locate(path)
        with loc.open() as fh:
            base = data_offset(fh, info, loc.size())
        return keras_h5.tensors_from(answer, str(path), base)
    return keras_h5.tensors_from(answer, str(path), member=WEIGHTS)


def _extract(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path) -> Path:
    """The weights member as a file h5py can open, its inflated bytes charged to the budget."""
    budget.current().charge("decompressed", info.file_size, f"{WEIGHTS} of {path}")
    out = folder / WEIGHTS
    try:
        with archive.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (*ZIP_ERRORS, NotImplementedError) as exc:
        raise IntegrityError(f"{path}: zip member {WEIGHTS!r} cannot be read ({exc})",
                             hint="The file is truncated or corrupt", path=str(path)) from None
    return out


def tensor_reader(path: Path) -> Callable[[str, TensorRef], np.ndarray]:
    """Each tensor's values: by byte range, else through the HDF5 child (read once)."""
    from ckptkit.formats.tensor_io import read_tensor

    cache: dict[str, dict[str, np.ndarray]] = {}

    def array(name: str, ref: TensorRef) -> np.ndarray:
        if ref.span is not None:
            return read_tensor(ref)
        if "all" not in cache:
            with open_zip(Path(path), "Keras archive") as archive, \
                    tempfile.TemporaryDirectory(prefix="ckptkit-keras-") as folder:
                h5 = _extract(Path(path), archive, archive.getinfo(WEIGHTS), Path(folder))
                cache["all"] = keras_h5.read_arrays(h5, f"{path}!{WEIGHTS}")
        return cache["all"][name]

    return array


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: the weights as ``{dataset path: array}``.  Building the model is left to
    Keras (``keras.saving.load_model``, safe mode on)."""
    if framework != "numpy":
        raise UsageError(f"{path}: cannot load a .keras archive as {framework!r}",
                         hint="Use framework='numpy', or keras.saving.load_model")
    raw = read_info(path)
    if raw.details.get("missing_extra"):
        from ckptkit.errors import MissingDependencyError

        raise MissingDependencyError("h5py", "keras", f"reading the weights of {path}")
    array = tensor_reader(path)
    return {name: array(name, ref) for name, ref in raw.tensors}


