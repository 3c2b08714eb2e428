"""ONNX models: the reader verbs over :mod:`~ckptkit.formats.onnx_model`.

What is read, and why external data that leaves the model's folder is never opened, is said
in :mod:`~ckptkit.formats.onnx_model`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ckptkit.errors import IntegrityError, UsageError
from ckptkit.formats.onnx_model import (Model, decode_varints, escapes, looks_like_onnx,
                                        read_model)
from ckptkit.model import Problem, RawCheckpoint, SafetyReport, TensorRef
from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.storage.location import locate

__all__ = ["FORMAT", "sniff", "read_info", "verify", "load", "tensor_reader", "escapes"]

FORMAT = "onnx"


def sniff(path: Path) -> bool:
    return looks_like_onnx(path)


def verify(path: str | Path, *, hashes: bool = False) -> list[Problem]:
    """External data that leaves the model's folder, is missing, or is shorter than its
    tensors need; a model that cannot be parsed is one ``corrupt`` problem.  ONNX keeps no
    checksums ckptkit could check with ``hashes=True`` (``checksum`` entries are not
    written by the ``onnx`` package); the tensors' bytes are read to prove they are there."""
    location = locate(path)
    location.size()
    with budget.reading(path):
        try:
            model = read_model(location)
        except IntegrityError as exc:
            return [Problem(str(location), "corrupt", str(exc))]
    problems = [Problem(str(location), "escapes-folder",
                        f"{location}: initializer {n!r} names external data {w}, outside the "
                        "model's folder; it was not opened") for n, w in model.escapes.items()]
    problems += [Problem(str(location), "missing-external",
                         f"{location}: initializer {n!r} needs external data {w!r}, which is "
                         "not there") for n, w in model.missing.items()]
    for init in model.initializers:
        span = init.span
        if span is None or span.path == str(location):
            continue
        have = os.path.getsize(span.path)
        if span.offset + span.length > have:
            problems.append(Problem(span.path, "truncated",
                                    f"{span.path}: initializer {init.name!r} needs bytes up "
                                    f"to {span.offset + span.length:,}, the file has {have:,}"))
        elif hashes:
            from ckptkit.formats.tensor_io import read_bytes

            read_bytes(TensorRef(init.dtype, init.shape, span))
    return problems


@metered
def read_info(path: Path) -> RawCheckpoint:
    model = read_model(path)
    tree: dict[str, Any] = {}
    tensors = []
    for init in model.initializers:
        ref = TensorRef(init.dtype, init.shape, init.span)
        tree[init.name] = ref
        tensors.append((init.name, ref))
    details: dict[str, Any] = {
        "ir_version": model.ir_version, "producer": model.producer, "opsets": model.opsets,
        "graph": model.graph_name, "inputs": [v.to_dict() for v in model.inputs],
        "outputs": [v.to_dict() for v in model.outputs], "operators": model.operators,
        "model_metadata": model.metadata, "external_files": model.external_files,
    }
    if model.sparse_initializers:
        details["sparse_initializers"] = model.sparse_initializers
    if model.missing:
        details["external_missing"] = dict(model.missing)
    if model.escapes:
        details["external_escapes"] = dict(model.escapes)
    inline = {i.name: i.varint for i in model.initializers if i.varint}
    if inline:
        details["varint_coded"] = sorted(inline)
    safety = SafetyReport()
    if model.escapes:
        names = tuple(f"external data {w}" for w in model.escapes.values())
        safety = SafetyReport(unsafe=names)
        details["unsafe_via"] = {n: "an external-data location outside the model folder"
                                 for n in names}
        details["unsafe_where"] = {f"external data {w}": f"initializer {t!r}"
                                   for t, w in model.escapes.items()}
    return RawCheckpoint(FORMAT, tree, tuple(tensors), safety=safety, details=details)


def tensor_reader(path: Path) -> Callable[[str, TensorRef], np.ndarray]:
    """A function giving each initializer's values: from its byte span, or decoded from the
    varint-coded fields (``int32_data`` for float16/int8/bool..., ``int64_data``)."""
    from ckptkit.formats.tensor_io import read_tensor

    model: list[Model] = []

    def array(name: str, ref: TensorRef) -> np.ndarray:
        if ref.span is not None:
            return read_tensor(ref)
        if not model:
            model.append(read_model(path))
        init = next((i for i in model[0].initializers if i.name == name), None)
        if init is None or init.varint is None:
            raise IntegrityError(f"{path}: initializer {name!r} has no data ckptkit can read"
                                 + (" (its external data is missing or outside the model's "
                                    "folder)" if init is not None and init.external else ""),
                                 hint="Run `ckpt verify` on it", path=str(path))
        return decode_varints(path, init)

    return array


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy``: a dict of initializer arrays.  A model whose external data leaves its
    folder is refused."""
    if framework != "numpy":
        raise UsageError(f"{path}: cannot load ONNX as {framework!r}",
                         hint="Use framework='numpy', or onnxruntime for inference")
    raw = read_info(path)
    if raw.safety.unsafe:
        raise IntegrityError(f"{path}: {raw.safety.unsafe[0]} leaves the model's folder; "
                             "not read", hint="Move the data beside the model", path=str(path))
    array = tensor_reader(path)
    return {name: array(name, ref) for name, ref in raw.tensors
            if ref.dtype != "string"}
