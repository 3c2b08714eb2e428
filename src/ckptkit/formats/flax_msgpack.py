"""Flax msgpack checkpoints (``flax.serialization.to_bytes``), read without JAX.

Arrays are msgpack ext type 1 holding ``(shape, dtype name, C-order bytes)``; type 2 is a
complex number and type 3 a numpy scalar.  Arrays over 1 GiB are split into
``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}`` dicts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ckptkit.errors import IntegrityError, UsageError
from ckptkit.model import ByteSpan, RawCheckpoint, TensorRef
from ckptkit.pickle_globals import numpy_dtype_name
from ckptkit.tree import iter_tensors

FORMAT = "flax-msgpack"
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_MAP_MARKERS = set(range(0x80, 0x90)) | {0xDE, 0xDF}


def sniff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if not head or head[0] not in _MAP_MARKERS:
        return False
    import msgpack

    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(head) + 1)
    unpacker.feed(head)
    try:
        header = unpacker.read_map_header()
        first_key = unpacker.unpack() if header else ""
    except (msgpack.OutOfData, ValueError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError):
        return False
    return isinstance(first_key, str)


def _dtype_name(raw: Any) -> str:
    name = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    return numpy_dtype_name(name)


def _decode(path: Path, materialise: bool) -> Any:
    import msgpack

    cursor = 0  # where the previous array ended: msgpack calls the hook in file order

    def span(data: bytes, buffer: bytes) -> ByteSpan | None:
        # The hook gets a copy of the extension's bytes, not its offset; they are found by
        # searching forward from the previous array (an earlier identical copy would hold
        # the same bytes).  The buffer is the extension's last field, hence its tail.
        nonlocal cursor
        at = raw.find(data, cursor)
        if at < 0 or not data.endswith(buffer):
            return None
        cursor = at + len(data)
        return ByteSpan(str(path), cursor - len(buffer), len(buffer))

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_NDARRAY:
            shape, dtype, buffer = msgpack.unpackb(data, raw=True)
            shape = tuple(int(s) for s in shape)
            name = _dtype_name(dtype)
            ref = TensorRef(name, shape, span(data, buffer) if isinstance(buffer, bytes) else None)
            if len(buffer) != ref.nbytes:
                raise IntegrityError(f"{path}: array {name}{list(shape)} holds {len(buffer)} "
                                     f"bytes, expected {ref.nbytes}")
            if materialise:
                from ckptkit.tensor_io import numpy_dtype

                import numpy as np

                return np.frombuffer(buffer, dtype=numpy_dtype(name)).reshape(shape).copy()
            return ref
        if code == _EXT_COMPLEX:
            real, imag = msgpack.unpackb(data)
            return complex(real, imag)
        if code == _EXT_SCALAR:
            fields = msgpack.unpackb(data, raw=True)
            if not isinstance(fields, (list, tuple)) or len(fields) not in (2, 3):
                raise IntegrityError(f"{path}: malformed numpy scalar in Flax msgpack")
            dtype, buffer = fields[-2], fields[-1]  # flax writes (shape, dtype, buffer)
            if materialise:
                import numpy as np

                from ckptkit.tensor_io import numpy_dtype

                return np.frombuffer(buffer, dtype=numpy_dtype(_dtype_name(dtype)))[0]
            return TensorRef(_dtype_name(dtype), ())
        return msgpack.ExtType(code, b"")

    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        tree = msgpack.unpackb(raw, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError, TypeError) as exc:
        raise IntegrityError(f"{path}: not a complete Flax msgpack file ({type(exc).__name__}: "
                             f"{exc})", hint="The file is truncated or corrupt",
                             path=str(path)) from exc
    return _unchunk(path, tree, materialise)


def _unchunk(path: Path, node: Any, materialise: bool) -> Any:
    if isinstance(node, dict):
        if node.get("__msgpack_chunked_array__") is True:
            try:
                return _chunked(node, materialise)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise IntegrityError(f"{path}: malformed chunked array ({type(exc).__name__}: "
                                     f"{exc})", hint="The file is truncated or corrupt",
                                     path=str(path)) from None
        return {k: _unchunk(path, v, materialise) for k, v in node.items()}
    return node


def _chunked(node: dict[Any, Any], materialise: bool) -> Any:
    """A ``{"shape": {"0": n, ...}, "chunks": {"0": array, ...}}`` array put together."""
    shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
    chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
    if materialise:
        import numpy as np

        return np.concatenate(chunks).reshape(shape)
    dtype = chunks[0].dtype if chunks else "float32"
    if sum(c.numel for c in chunks) != math.prod(shape):
        raise ValueError("chunks do not add up to its shape")
    return TensorRef(dtype, shape)


def read_info(path: Path) -> RawCheckpoint:
    tree = _decode(path, materialise=False)
    if not isinstance(tree, dict):
        raise IntegrityError(f"{path}: Flax msgpack root is not a mapping")
    tensors = tuple(iter_tensors(tree))
    return RawCheckpoint(FORMAT, tree, tensors, details={}, separator="/")


def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``flax``/``numpy``: the nested tree of numpy arrays (``flax.serialization`` layout)."""
    if framework not in ("flax", "jax", "numpy"):
        raise UsageError(f"{path}: cannot load Flax msgpack as {framework!r}",
                         hint="Use framework='flax' or framework='numpy'")
    return _decode(path, materialise=True)
