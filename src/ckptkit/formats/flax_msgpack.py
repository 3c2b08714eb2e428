"""Flax msgpack checkpoints (``flax.serialization.to_bytes``), read without JAX.

Arrays are msgpack ext type 1 holding ``(shape, dtype name, C-order bytes)``; type 2 is a
complex number and type 3 a numpy scalar.  Arrays over 1 GiB are split into
``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}`` dicts.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

from ckptkit.storage import budget
from ckptkit.storage.budget import metered
from ckptkit.errors import CkptkitError, IntegrityError, UsageError
from ckptkit.storage.location import Location, locate
from ckptkit.model import ByteSpan, RawCheckpoint, TensorRef, checked_shape
from ckptkit.pickles.pickle_globals import numpy_dtype_name
from ckptkit.tree import iter_tensors

FORMAT = "flax-msgpack"
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_MAP_MARKERS = set(range(0x80, 0x90)) | {0xDE, 0xDF}


def sniff(path: Path | Location) -> bool:
    try:
        head = locate(path).read(0, 4096)
    except (OSError, CkptkitError):
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
            msgpack.StackError, UnicodeDecodeError, TypeError):
        return False  # TypeError: a map or list as a map key (unhashable)
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

    def array(data: bytes) -> Any:
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        name = _dtype_name(dtype)
        shape = checked_shape(shape, "the array", name)
        ref = TensorRef(name, shape, span(data, buffer) if isinstance(buffer, bytes) else None)
        if len(buffer) != ref.nbytes:
            raise IntegrityError(f"the array {name}{list(shape)} holds {len(buffer)} bytes, "
                                 f"expected {ref.nbytes}")
        if materialise:
            from ckptkit.formats.tensor_io import numpy_dtype

            import numpy as np

            return np.frombuffer(buffer, dtype=numpy_dtype(name)).reshape(shape).copy()
        return ref

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_NDARRAY:
            try:
                return array(data)
            except IntegrityError as exc:  # reported with its key once the tree is built
                bad.append(exc.message)
                return _Bad(exc.message)
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

                from ckptkit.formats.tensor_io import numpy_dtype

                return np.frombuffer(buffer, dtype=numpy_dtype(_dtype_name(dtype)))[0]
            return TensorRef(_dtype_name(dtype), ())
        return msgpack.ExtType(code, b"")

    bad: list[str] = []  # what is wrong with each malformed array, in file order
    loc = locate(path)
    raw = loc.read(0, loc.size())
    _count(raw)
    try:
        tree = msgpack.unpackb(raw, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except IntegrityError:
        raise
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError, TypeError, OverflowError) as exc:
        raise IntegrityError(f"{path}: not a complete Flax msgpack file ({type(exc).__name__}: "
                             f"{exc})", hint="The file is truncated or corrupt",
                             path=str(path)) from exc
    tree = _unchunk(path, tree, materialise)
    if bad:  # outside any map, so without a key to name
        raise IntegrityError(f"{path}: {bad[0]}", hint="The file is truncated or corrupt",
                             path=str(path))
    return tree


class _Bad:
    """Stands in for an array that cannot be read, until its key is known."""

    def __init__(self, why: str):
        self.why = why


def _unchunk(path: Path, node: Any, materialise: bool, where: tuple[str, ...] = ()) -> Any:
    """``node`` with chunked arrays put together, in place (a copy would double the tree).

    Raises:
        IntegrityError: an array that cannot be read, named by its key path."""
    if isinstance(node, dict):
        if node.get("__msgpack_chunked_array__") is True:
            try:
                return _chunked(node, materialise)
            except IntegrityError as exc:
                raise IntegrityError(f"{path}: {exc.message}", hint=exc.hint,
                                     path=str(path)) from None
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise IntegrityError(f"{path}: malformed chunked array ({type(exc).__name__}: "
                                     f"{exc})", hint="The file is truncated or corrupt",
                                     path=str(path)) from None
        for key, value in node.items():
            if isinstance(value, dict):
                node[key] = _unchunk(path, value, materialise, (*where, str(key)))
            elif isinstance(value, _Bad):
                raise IntegrityError(f"{path}: entry {'/'.join((*where, str(key)))!r}: "
                                     f"{value.why}", hint="The file is truncated or corrupt",
                                     path=str(path))
    return node


# Bytes after the type byte of each msgpack type: (fixed size, bytes of a length prefix,
# items per counted element for containers: 1 for arrays, 2 for maps), from the format spec.
_SIZES: dict[int, tuple[int, int, int]] = {
    0xC0: (0, 0, 0), 0xC2: (0, 0, 0), 0xC3: (0, 0, 0),
    0xC4: (0, 1, 0), 0xC5: (0, 2, 0), 0xC6: (0, 4, 0),  # bin
    0xC7: (1, 1, 0), 0xC8: (1, 2, 0), 0xC9: (1, 4, 0),  # ext: type byte, then data
    0xCA: (4, 0, 0), 0xCB: (8, 0, 0), 0xCC: (1, 0, 0), 0xCD: (2, 0, 0), 0xCE: (4, 0, 0),
    0xCF: (8, 0, 0), 0xD0: (1, 0, 0), 0xD1: (2, 0, 0), 0xD2: (4, 0, 0), 0xD3: (8, 0, 0),
    0xD4: (2, 0, 0), 0xD5: (3, 0, 0), 0xD6: (5, 0, 0), 0xD7: (9, 0, 0), 0xD8: (17, 0, 0),
    0xD9: (0, 1, 0), 0xDA: (0, 2, 0), 0xDB: (0, 4, 0),  # str
    0xDC: (0, 2, 1), 0xDD: (0, 4, 1), 0xDE: (0, 2, 2), 0xDF: (0, 4, 2),
}
_PREFIX = {1: ">B", 2: ">H", 4: ">I"}


def _count(raw: bytes) -> None:
    """Charge the maps, arrays and extensions of ``raw`` to the budget's ``nodes`` and check
    its nesting against ``depth``, in one pass that builds nothing: unpacking builds them all
    at once, so a file of a million empty maps must be refused before that.  Malformed data
    is left for the unpacker to report."""
    account = budget.current()
    room, deepest = account.room("nodes"), account.limit("depth")
    pending: list[int] = []  # items still to come at each open level
    pos, built = 0, 0
    while pos < len(raw):
        while pending and pending[-1] == 0:
            pending.pop()
        if not pending and pos:
            break  # the one top-level object is complete; the unpacker refuses what follows
        byte = raw[pos]
        pos += 1
        items = 0
        if byte <= 0x7F or byte >= 0xE0:
            pass
        elif byte <= 0x8F:
            items = 2 * (byte & 0x0F)
        elif byte <= 0x9F:
            items = byte & 0x0F
        elif byte <= 0xBF:
            pos += byte & 0x1F
        elif byte in _SIZES:
            fixed, prefix, per = _SIZES[byte]
            length = 0
            if prefix:
                if pos + prefix > len(raw):
                    return
                (length,) = struct.unpack_from(_PREFIX[prefix], raw, pos)
                pos += prefix
            if per:
                items, length = per * length, 0
            pos += fixed + length
        else:
            return
        if byte >= 0x80 and (byte <= 0x9F or byte >= 0xDC or 0xC7 <= byte <= 0xC9
                             or 0xD4 <= byte <= 0xD8):
            built += 1
            if built > room:
                account.charge("nodes", built, "its maps, arrays and arrays' extensions")
        if pending:
            pending[-1] -= 1
        if items:
            pending.append(items)
            if len(pending) > deepest:
                account.check("depth", len(pending), "its maps and arrays")
    account.charge("nodes", built, "its maps, arrays and arrays' extensions")


def _chunked(node: dict[Any, Any], materialise: bool) -> Any:
    """A ``{"shape": {"0": n, ...}, "chunks": {"0": array, ...}}`` array put together."""
    shape = checked_shape([node["shape"][str(i)] for i in range(len(node["shape"]))],
                          "chunked array")
    chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
    if materialise:
        import numpy as np

        return np.concatenate(chunks).reshape(shape)
    dtype = chunks[0].dtype if chunks else "float32"
    if sum(c.numel for c in chunks) != math.prod(shape):
        raise ValueError("chunks do not add up to its shape")
    return TensorRef(dtype, shape)


@metered
def read_info(path: Path) -> RawCheckpoint:
    tree = _decode(path, materialise=False)
    if not isinstance(tree, dict):
        raise IntegrityError(f"{path}: Flax msgpack root is not a mapping")
    tensors = tuple(iter_tensors(tree))
    return RawCheckpoint(FORMAT, tree, tensors, details={}, separator="/")


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``flax``/``numpy``: the nested tree of numpy arrays (``flax.serialization`` layout)."""
    if framework not in ("flax", "jax", "numpy"):
        raise UsageError(f"{path}: cannot load Flax msgpack as {framework!r}",
                         hint="Use framework='flax' or framework='numpy'")
    return _decode(path, materialise=True)
