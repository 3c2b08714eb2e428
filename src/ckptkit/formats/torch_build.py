"""Torch objects built from what the restricted reader parsed: torch allocates, never unpickles.

``torch.load(weights_only=True)`` runs torch's own unpickler over the file, and that unpickler
has been talked past its allowlist more than once (CVE-2025-32434).  Here the pickle has
already been read by :mod:`ckptkit.pickles.unpickler`, which imports and calls nothing; the
tree it left (plain values and :class:`~ckptkit.model.TensorRef` records) is turned into torch
objects by asking torch only for storages and tensor views:

- a zip file's stored records are memory-mapped once (copy-on-write, as
  ``torch.load(mmap=True)`` maps them) and each storage is a slice of that mapping;
- compressed records and legacy files, whose storages are not aligned, are read into buffers
  and wrapped with ``torch.frombuffer``;
- every tensor is ``set_`` onto its storage with the recorded offset, size and stride, so
  views stay views and tensors that shared a storage share it again.

A tree holding anything else (custom classes, numpy arrays pickled inside a torch file) is
refused the way ``weights_only`` refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ckptkit.errors import FormatError, IntegrityError
from ckptkit.formats.tensor_io import read_span
from ckptkit.model import ByteSpan, Opaque, TensorRef, itemsize

#: ckptkit dtype names torch spells differently (the rest are ``torch.<name>``).
_TORCH_NAMES = {"complex32": "complex32"}
#: Quantized and packed dtypes need torch's quantizer objects, which only unpickling builds.
_UNBUILDABLE = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4", "string",
                          "resource", "variant"})


class TorchBuilder:
    """Builds one file's torch objects, one storage object per storage of the file."""

    def __init__(self, torch: Any, path: Path, *, big_endian: bool = False, mmap: bool = False):
        self.torch = torch
        self.path = path
        self.big_endian = big_endian
        self.mmap = mmap
        self._mapping: Any = None
        self._storages: dict[tuple[Any, ...], Any] = {}
        self._seen: dict[int, Any] = {}

    def build(self, value: Any) -> Any:
        """``value`` (a resolved tree) with every TensorRef made a torch tensor."""
        if isinstance(value, TensorRef):
            return self.tensor(value)
        if isinstance(value, Opaque):
            raise FormatError(
                f"{self.path}: the file holds an object of class {value.qualname}, which "
                "torch.load(weights_only=True) would refuse too",
                hint="Use framework='numpy' to read its tensors safely, or unsafe=True only "
                     "if you trust the file", path=str(self.path))
        if isinstance(value, (dict, list)):
            # A container the pickle shares through its memo is one object here too.
            known = self._seen.get(id(value))
            if known is not None:
                return known
            if isinstance(value, dict):
                out: Any = {}
                self._seen[id(value)] = out
                for k, v in value.items():
                    out[k] = self.build(v)
                return out
            out = []
            self._seen[id(value)] = out
            out.extend(self.build(v) for v in value)
            return out
        if isinstance(value, tuple):
            return tuple(self.build(v) for v in value)
        return value

    def tensor(self, ref: TensorRef) -> Any:
        torch = self.torch
        dtype = self._dtype(ref.dtype)
        stride = ref.stride if ref.stride is not None else _contiguous(ref.shape)
        if ref.span is None:
            if ref.device == "meta":
                return torch.empty_strided(ref.shape, stride, dtype=dtype, device="meta")
            raise FormatError(
                f"{self.path}: a {ref.dtype}{list(ref.shape)} value has no storage in the file "
                "(a numpy array pickled inside it)",
                hint="Use framework='numpy' to read it", path=str(self.path))
        size = int(itemsize(ref.dtype))
        # Byte order is per scalar: a complex number is two of them.
        storage = self._storage(ref.span, ref.storage_key,
                                size // 2 if ref.dtype.startswith("complex") else size)
        last = ref.element_offset + sum((n - 1) * s for n, s in zip(ref.shape, stride,
                                                                    strict=True))
        if ref.numel and (min(stride, default=0) < 0
                          or (last + 1) * size > storage.nbytes()):
            raise IntegrityError(
                f"{self.path}: tensor view (offset {ref.element_offset}, stride {stride}) "
                f"reaches outside its storage of {storage.nbytes()} bytes",
                hint="The file is corrupt or crafted; do not load it", path=str(self.path))
        out = torch.empty((0,), dtype=dtype)
        return out.set_(storage, ref.element_offset, ref.shape, stride)

    def _dtype(self, name: str) -> Any:
        if name in _UNBUILDABLE or not hasattr(self.torch, _TORCH_NAMES.get(name, name)):
            raise FormatError(f"{self.path}: {name} tensors cannot be built without torch's "
                              "unpickler", hint="Use framework='numpy', or unsafe=True only "
                                                "if you trust the file", path=str(self.path))
        return getattr(self.torch, _TORCH_NAMES.get(name, name))

    def _storage(self, span: ByteSpan, key: str | None, width: int) -> Any:
        ident = (span.path, span.offset, span.member, span.compression, key)
        storage = self._storages.get(ident)
        if storage is None:
            storage = self._storages[ident] = self._new_storage(span, width)
        return storage

    def _new_storage(self, span: ByteSpan, width: int) -> Any:
        torch = self.torch
        if self.mmap and span.member is None and span.compression is None \
                and not self.big_endian:
            if self._mapping is None:
                size = Path(span.path).stat().st_size
                if span.offset + span.length > size:
                    raise IntegrityError(f"{span.path}: storage at byte {span.offset} runs "
                                         f"past the end of the file ({size} bytes)",
                                         hint="The file is truncated; fetch it again",
                                         path=span.path)
                self._mapping = torch.UntypedStorage.from_file(span.path, False, size)
            return self._mapping[span.offset:span.offset + span.length]
        data = bytearray(read_span(span))
        if self.big_endian and width > 1:
            swapped = np.frombuffer(data, dtype=f">u{width}").astype(f"<u{width}")
            data = bytearray(swapped.tobytes())
        if not data:
            return torch.UntypedStorage(0)
        return torch.frombuffer(data, dtype=torch.uint8).untyped_storage()


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
