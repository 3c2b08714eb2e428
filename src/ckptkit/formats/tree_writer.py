"""Writing a checkpoint tree as a ``torch.save`` zip without torch, copying storages verbatim.

:func:`write_torch_tree` takes a tree as the restricted reader returns it (dicts, lists,
tuples, plain scalars and :class:`~ckptkit.model.TensorRef` leaves) and writes what
``torch.save`` would have written for the same values: tensors keep their storage, offset,
shape and stride, and storages shared by several tensors stay shared.  Dicts are written as
plain dicts: the reader's tree does not keep ``OrderedDict`` or a state dict's ``_metadata``
(module versions), which ``load_state_dict`` does without, as it does for safetensors files.  Each storage's
bytes are copied from the source file in bounded chunks, so the weights are bit-identical and
memory does not grow with the model.  The pickle names only what
``torch.load(weights_only=True)`` accepts; anything else in the tree is refused, never
approximated.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ckptkit.formats.chunks import iter_bytes
from ckptkit.formats.torch_pickle import LEGACY_STORAGES, UNTYPED_DTYPES, _Emitter
from ckptkit.storage.atomic import atomic_file
from ckptkit.formats.zip_writer import ALIGNMENT, add_member, archive_stem
from ckptkit.errors import FormatError
from ckptkit.model import ByteSpan, Opaque, TensorRef, itemsize
from ckptkit.tree import join


@dataclass(frozen=True)
class TreeWriteResult:
    """The written file, its size, and how many tensors and distinct storages it holds."""

    path: Path
    bytes: int
    tensor_count: int
    storage_count: int


def write_torch_tree(out: Path, tree: Any, *, big_endian: bool = False) -> TreeWriteResult:
    """Write ``tree`` to ``out`` as a torch zip checkpoint, atomically.

    Args:
        out: the file to create or replace (temporary file beside it, fsync, ``os.replace``).
        tree: nested containers with :class:`TensorRef` leaves whose spans point at the
            source file's storages.
        big_endian: the source stores elements big-endian (legacy files from such machines);
            the output is little-endian, as ``torch.save`` writes today.

    Raises:
        FormatError: the tree holds a value ``torch.load(weights_only=True)`` would refuse
            (custom objects, bytes, sets), or a tensor without bytes; nothing is written.
    """
    emitter = _TreeEmitter()
    emitter.emit_root(tree)
    with atomic_file(out) as fh:
        size = _write_zip(fh, out, emitter, big_endian)
    return TreeWriteResult(out, size, emitter.tensor_count, len(emitter.storages))


def _write_zip(fh: BinaryIO, out: Path, emitter: _TreeEmitter, big_endian: bool) -> int:
    stem = archive_stem(out)
    archive = zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True)
    try:
        for name, text in ((".format_version", "1"), (".storage_alignment", str(ALIGNMENT)),
                           ("byteorder", "little")):
            add_member(archive, f"{stem}/{name}", (text.encode("ascii"),), align=ALIGNMENT)
        add_member(archive, f"{stem}/data.pkl", (emitter.payload(),), align=ALIGNMENT)
        for key, (where, dtype) in emitter.storages.items():
            if isinstance(where, TensorRef):  # stored in chunks: gathered as it is written
                data, length = _gathered_bytes(where), where.nbytes
            else:
                data, length = _storage_bytes(where, dtype, big_endian), where.length
            add_member(archive, f"{stem}/data/{key}", data, align=ALIGNMENT, size=length)
        add_member(archive, f"{stem}/version", (b"3\n",), align=ALIGNMENT)
        archive.close()
    except BaseException:
        try:
            archive.close()
        except Exception:  # noqa: BLE001 - the output is discarded anyway; keep the first error
            pass
        raise
    fh.flush()
    return os.fstat(fh.fileno()).st_size


def _storage_bytes(span: ByteSpan, dtype: str, big_endian: bool):
    size = int(itemsize(dtype))
    for data in iter_bytes(span, chunk=(8 << 20) // max(size, 1) * max(size, 1)):
        if big_endian and size > 1:
            # Swap element by element; chunks are whole elements (the chunk is a multiple).
            yield np.frombuffer(data, f">u{size}").astype(f"<u{size}").tobytes()
        else:
            yield data


def _gathered_bytes(ref: TensorRef):
    """A tensor stored in chunks (DCP), gathered into one array only while it is written."""
    from ckptkit.formats.streams import raw_bytes
    from ckptkit.formats.tensor_io import tensor_view

    yield raw_bytes(tensor_view(ref))


class _TreeEmitter(_Emitter):
    """Pickle opcodes for a tree; collects the storages the tensors use, each once."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[str, tuple[ByteSpan | TensorRef, str]] = {}
        self._keys: dict[Any, str] = {}
        self._chunked: dict[str, TensorRef] = {}
        self.tensor_count = 0

    def emit_root(self, tree: Any) -> None:
        self.op(pickle.PROTO + b"\x02")
        self.value(tree, ())
        self.op(pickle.STOP)

    def payload(self) -> bytes:
        return bytes(self.buffer)

    def value(self, node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, TensorRef):
            self.tensor(node, path)
        elif isinstance(node, dict):
            self.mapping(node, path)
        elif isinstance(node, list):
            self.op(pickle.EMPTY_LIST)
            self.sequence(node, path, pickle.APPENDS)
        elif isinstance(node, tuple):
            self.op(pickle.MARK)
            for i, item in enumerate(node):
                self.value(item, path + (i,))
            self.op(pickle.TUPLE)
        elif node is None:
            self.op(pickle.NONE)
        elif isinstance(node, bool):
            self.op(pickle.NEWTRUE if node else pickle.NEWFALSE)
        elif isinstance(node, int):
            self.int_(node)
        elif isinstance(node, float):
            self.op(pickle.BINFLOAT + struct.pack(">d", node))
        elif isinstance(node, str):
            self.text(node)
        else:
            what = f"custom object {node.qualname}" if isinstance(node, Opaque) else (
                f"a {type(node).__name__} value")
            raise FormatError(f"{join(path) or 'the top level'} holds {what}, which "
                              "torch.load(weights_only=True) refuses",
                              hint="Leave that entry out of the stripped file")

    def mapping(self, node: dict[Any, Any], path: tuple[Any, ...]) -> None:
        self.op(pickle.EMPTY_DICT)
        items = list(node.items())
        for start in range(0, len(items), 1000):
            self.op(pickle.MARK)
            for key, item in items[start:start + 1000]:
                self.value(key, path + ("<key>",))
                self.value(item, path + (key,))
            self.op(pickle.SETITEMS)

    def sequence(self, node: list[Any], path: tuple[Any, ...], opcode: bytes) -> None:
        for start in range(0, len(node), 1000):
            self.op(pickle.MARK)
            for i, item in enumerate(node[start:start + 1000], start):
                self.value(item, path + (i,))
            self.op(opcode)

    def tensor(self, ref: TensorRef, path: tuple[Any, ...]) -> None:
        if ref.chunks:
            # Written as one contiguous storage of its own, gathered from its chunks.
            ref = self._gathered(ref, path)
        if ref.span is None:
            raise FormatError(f"tensor {join(path)} has no bytes in the file (a meta tensor)",
                              hint="Leave that entry out of the stripped file")
        if ref.dtype not in LEGACY_STORAGES and ref.dtype not in UNTYPED_DTYPES:
            raise FormatError(f"tensor {join(path)} has dtype {ref.dtype}, which ckptkit "
                              "cannot write to a torch file",
                              hint="Convert it to safetensors or npz with `ckpt convert`")
        ident = ref.storage_key or (ref.span.path, ref.span.offset, ref.span.member)
        key = self._keys.get(ident)
        if key is None:
            key = self._keys[ident] = str(len(self._keys))
            self.storages[key] = (self._chunked.get(ident, ref.span), ref.dtype)
        size = itemsize(ref.dtype)
        legacy = LEGACY_STORAGES.get(ref.dtype)
        stride = ref.stride or _contiguous(ref.shape)
        # Persistent id as torch.save writes it: typed storages count elements, untyped
        # ones (uint16/32/64, float8) count bytes and name the dtype in _rebuild_tensor_v3.
        self.global_("torch._utils", "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3")
        self.op(pickle.MARK)
        self.op(pickle.MARK)
        self.text("storage")
        self.global_(*(("torch", legacy) if legacy else ("torch.storage", "UntypedStorage")))
        self.text(key)
        self.text("cpu")
        self.int_(ref.span.length // int(size) if legacy else ref.span.length)
        self.op(pickle.TUPLE)
        self.op(pickle.BINPERSID)
        self.int_(ref.element_offset)
        self.ints(ref.shape)
        self.ints(stride)
        self.op(pickle.NEWFALSE)
        self.global_("collections", "OrderedDict")
        self.op(pickle.EMPTY_TUPLE)
        self.op(pickle.REDUCE)
        if not legacy:
            self.global_("torch", ref.dtype)
        self.op(pickle.TUPLE)
        self.op(pickle.REDUCE)
        self.tensor_count += 1


    def _gathered(self, ref: TensorRef, path: tuple[Any, ...]) -> TensorRef:
        """A contiguous stand-in for a chunked tensor: its storage is the gathered tensor."""
        ident = f"chunked:{join(path)}"
        stand_in = TensorRef(ref.dtype, ref.shape, ByteSpan(ident, 0, ref.nbytes),
                             storage_key=ident)
        self._chunked[ident] = ref
        return stand_in


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides)) if shape else ()


def storage_bytes(tree: Any) -> int:
    """Bytes of the distinct storages the tensors of ``tree`` use (the size a write adds)."""
    seen: dict[Any, int] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, TensorRef) and node.chunks:
            seen[id(node)] = node.nbytes
        elif isinstance(node, TensorRef) and node.span is not None:
            seen[node.storage_key or (node.span.path, node.span.offset)] = node.span.length
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return sum(seen.values())

