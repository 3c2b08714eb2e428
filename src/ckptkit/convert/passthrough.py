"""Plain format conversions: every tensor under its own name, with its exact dtype and bytes.

No renaming and no layout changes (those are the rules and recipes); this is torch <->
safetensors, npz <-> safetensors, torch -> npz and the like.  Tensors are read one at a time
straight from their byte ranges in the source (no torch, TensorFlow or JAX needed, no pickle
code run) and handed to :func:`ckptkit.formats.writers.write`, so memory stays near the largest
tensor.  The one exception is a Flax msgpack source, which cannot be read piecemeal: it is
decoded whole, once.

What is carried and what is not:

- names: torch nested dicts joined with ``.`` (``model.layers.0.weight``,
  ``optimizer.state.0.exp_avg``), npz and safetensors keys as stored, TF and Flax names joined
  with ``/``;
- every tensor, including the optimizer's; tensors that share storage (tied weights) are
  written once per name, each with its own copy of the bytes (safetensors refuses aliases);
- metadata: top-level plain values (``step``, ``epoch``, ``best_val_loss``), safetensors
  ``__metadata__`` and what ckptkit wrote itself (torch metadata record, npz/flax sidecar),
  stringified (JSON for non-strings), into wherever the target format keeps metadata;
- not carried: every other non-tensor entry (optimizer hyper-parameters, recorded custom
  objects, TF string tensors); :attr:`FormatConversion.left_out` lists them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ckptkit.storage import budget
from ckptkit import formats
from ckptkit.formats.chunked import ChunkedCheckpoint, ChunkedTensor, Piece, whole
from ckptkit.formats.writers import Fmt, LayoutEntry, WriteResult, check_dtype, read_sidecar, write
from ckptkit.formats.zip_writer import TORCH_METADATA_RECORD
from ckptkit.errors import IntegrityError, UsageError
from ckptkit.model import Opaque, RawCheckpoint, TensorRef, itemsize
from ckptkit.summary import summarise
from ckptkit.formats.tensor_io import materialised, numpy_dtype
from ckptkit.tree import is_scalar, join

#: Formats whose reader gives each tensor's values itself (``tensor_reader``): GGUF
#: dequantizes, ONNX decodes varint-coded data, Keras reads HDF5 through its child process,
#: Orbax reads through TensorStore, DeepSpeed puts each parameter's ZeRO partitions together.
_BY_READER = ("gguf", "onnx", "keras", "keras-h5", "orbax", "deepspeed")
#: Formats whose tensors are read by byte range from the file ckptkit parsed.
_BY_SPAN = ("torch-zip", "torch-legacy", "torchscript", "npz", "safetensors", "pickle", "npy",
            "hf-sharded", "torch-dcp")


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source: its output name, dtype, shape and how to read it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray] = field(repr=False, compare=False)
    #: for a tensor stored in chunks (DCP), each chunk ready to read into its place.
    pieces: tuple[Piece, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class FormatConversion:
    """A decided conversion: what will be read, written and left out.  Nothing is read or
    written until :meth:`execute`."""

    source: Path
    source_format: str
    target: Fmt
    out: Path
    tensors: tuple[SourceTensor, ...]
    metadata: dict[str, str]
    left_out: tuple[str, ...]
    separator: str

    @property
    def layout(self) -> tuple[LayoutEntry, ...]:
        return tuple((t.name, t.dtype, t.shape) for t in self.tensors)

    @property
    def param_count(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    def execute(self) -> WriteResult:
        """Read each tensor and write it; atomic (see :func:`~ckptkit.formats.writers.write`).

        Within the source's reading budget: a broadcast view is written out in full only if
        its extra bytes fit (:func:`~ckptkit.formats.tensor_io.materialised`)."""
        # A generator expression holds no reference to the array it last yielded, so the
        # writer's ``del`` really frees each tensor before the next is read.
        with budget.reading(self.source):
            return write(self.out, self.target, ((t.name, t.read()) for t in self.tensors),
                         metadata=self.metadata or None, separator=self.separator,
                         layout=self.layout)


def plan_format_conversion(src: str | os.PathLike[str], to: Fmt,
                           out: str | os.PathLike[str]) -> FormatConversion:
    """Decide how ``src`` becomes a ``to`` file at ``out``, reading structure only.

    Raises:
        UsageError: ``out`` is the input (or one of its files), the source holds no tensors,
            or a tensor's dtype cannot be stored in ``to``.
        NotFoundError, FormatError, IntegrityError: from reading ``src``.
    """
    source, target = Path(src), Path(out)
    name, (tensors, metadata, left_out, inputs, separator) = _read(source)
    refuse_overwrite(source, target, inputs)
    if not tensors:
        raise UsageError(f"{source}: holds no tensors to convert; converting to 0 tensors is "
                         "always an error",
                         hint="Run `ckpt inspect` on it to see what it holds")
    for tensor in tensors:
        check_dtype(to, tensor.name, tensor.dtype)
    return FormatConversion(source, name, to, target, tuple(tensors), metadata,
                            tuple(left_out), separator)


def _read(source: Path) -> tuple[str, _Plan]:
    reader = formats.detect(source)
    name = reader.FORMAT
    if name in _BY_SPAN:
        return name, _from_spans(source, reader.read_info(source))
    if name in ("tf-checkpoint", "savedmodel"):
        return name, _from_bundle(source, name)
    if name == "flax-msgpack":
        return name, _from_flax(source, reader.read_info(source))
    if name in _BY_READER:
        return name, _from_reader(source, reader, reader.read_info(source))
    raise UsageError(f"{source}: cannot convert {name} files")  # pragma: no cover


def chunked_source(src: str | os.PathLike[str]) -> ChunkedCheckpoint:
    """A single-file checkpoint (any format above) as global tensors of one chunk each, read
    the way :func:`plan_format_conversion` reads them; what the consolidation engine takes."""
    source = Path(src)
    name, (tensors, metadata, left_out, inputs, separator) = _read(source)
    return ChunkedCheckpoint(
        source, name, tuple(ChunkedTensor(t.name, t.dtype, t.shape, t.pieces) if t.pieces
                            else whole(t.name, t.dtype, t.shape, t.read, source.name)
                            for t in tensors),
        metadata, tuple(left_out), frozenset(inputs), separator)


def convert_format(src: str | os.PathLike[str], to: Fmt,
                   out: str | os.PathLike[str]) -> WriteResult:
    """Convert the checkpoint ``src`` to format ``to`` at ``out``, one tensor at a time.

    Reads any format ckptkit reads (PyTorch zip and legacy, TorchScript weights, npz,
    safetensors, Flax msgpack, TF checkpoints and SavedModel variables); names, dtypes
    (bfloat16 and float8 included) and bytes are kept exactly; metadata such as step and epoch
    is carried where ``to`` can hold it.  See the module docstring for what is left out.

    Raises:
        UsageError: ``out`` would overwrite the input, nothing to convert, or a dtype ``to``
            cannot hold.
        NotFoundError, FormatError, IntegrityError: the source is missing, unknown or corrupt.

    Example:
        >>> convert_format("model.pt", "safetensors", "model.safetensors")  # doctest: +SKIP
        WriteResult(path=PosixPath('model.safetensors'), format='safetensors', ...)
    """
    return plan_format_conversion(src, to, out).execute()


_Plan = tuple[list[SourceTensor], dict[str, str], list[str], set[Path], str]


def _from_spans(source: Path, raw: RawCheckpoint) -> _Plan:
    big = raw.details.get("byteorder") == "big"
    sidecar = read_sidecar(source) if raw.format == "npz" else {}
    dtypes = sidecar.get("dtypes", {})
    tensors, inputs = [], {source}
    for where, ref in raw.tensors:
        name = where if isinstance(where, str) else join(where, raw.separator)
        if ref.chunks:
            inputs.update(Path(c.span.path) for c in ref.chunks)
            _check_readable(source, name, ref.dtype)
            tensors.append(SourceTensor(name, ref.dtype, ref.shape,
                                        lambda ref=ref: materialised(ref, name),
                                        _pieces(ref)))
            continue
        if ref.span is None:
            continue  # a meta tensor: no data anywhere; listed in left_out by _left_out
        inputs.add(Path(ref.span.path))
        dtype = dtypes.get(name, ref.dtype)
        if dtype != ref.dtype:  # float8 stored by our npz writer as raw one-byte voids
            ref = TensorRef(dtype, ref.shape, ref.span, ref.stride, ref.element_offset,
                            ref.storage_key, ref.device, ref.fortran_order)
        _check_readable(source, name, dtype)
        tensors.append(SourceTensor(name, dtype, ref.shape, _span_reader(ref, name, big)))
    metadata = _stringified(summarise(raw, str(source), 0).metadata)
    metadata.update(sidecar.get("metadata", {}))
    if raw.format == "torch-zip":
        metadata.update(_torch_metadata(source, raw.details.get("zip_prefix", "")))
    return tensors, metadata, _left_out(raw.tree, raw.separator), inputs, raw.separator


def _pieces(ref: TensorRef) -> tuple[Piece, ...]:
    """A chunked tensor's chunks, each read straight from its raw bytes where they are stored
    so, else decoded by the format's chunk reader."""
    from ckptkit.formats import dcp_chunks

    return tuple(dcp_chunks.piece(chunk, ref.dtype) for chunk in ref.chunks)


def _from_bundle(source: Path, name: str) -> _Plan:
    # TF bundles: read through the CRC-checking reader, which also reassembles partitions.
    from ckptkit.formats import bundle_arrays, tensor_bundle, tf_checkpoint

    if name == "savedmodel":
        directory = source if source.is_dir() else source.parent
        index = tensor_bundle.read_index(str(directory / "variables" / "variables"))
        tensor_bundle.check_shards(index)
    else:
        index, _found = tf_checkpoint.read_index(source)
    tensors, left_out = [], []
    inputs = {source, Path(str(tensor_bundle.index_path(index.prefix)))}
    for entry in index.entries:
        if entry.name == tensor_bundle.OBJECT_GRAPH_KEY:
            continue  # TensorFlow's own bookkeeping, not a weight
        if entry.dtype in ("string", "resource", "variant"):
            left_out.append(f"{entry.name} ({entry.dtype} tensor)")
            continue
        _check_readable(source, entry.name, entry.dtype)
        inputs.update(Path(index.shard_path(part.shard_id)) for part in (
            [p for _e, p in index.parts.get(entry.name, ())] if entry.slices else [entry]))

        def read(entry: Any = entry) -> np.ndarray:
            # One shard reader per tensor: it only keeps file handles, never data.
            reader = bundle_arrays._ShardReader(index)
            try:
                return reader.assembled(entry) if entry.slices else reader.array(entry)
            finally:
                reader.close()

        tensors.append(SourceTensor(entry.name, entry.dtype, tuple(entry.shape), read))
    return tensors, {}, left_out, inputs, "/"


def _from_flax(source: Path, raw: RawCheckpoint) -> _Plan:
    from ckptkit.formats import flax_msgpack

    # msgpack cannot be read piecemeal: the tree is decoded whole on first use, then each
    # tensor is looked up in it.
    cache: dict[str, Any] = {}

    def lookup(path: tuple[Any, ...]) -> np.ndarray:
        if "tree" not in cache:
            cache["tree"] = flax_msgpack.load(source, "flax")
        node = cache["tree"]
        for part in path:
            node = node[part]
        return np.asarray(node)

    tensors = []
    for where, ref in raw.tensors:
        path = (where,) if isinstance(where, str) else tuple(where)
        name = join(path, "/")
        _check_readable(source, name, ref.dtype)
        tensors.append(SourceTensor(name, ref.dtype, ref.shape, lambda p=path: lookup(p)))
    metadata = _stringified(summarise(raw, str(source), 0).metadata)
    metadata.update(read_sidecar(source).get("metadata", {}))
    return tensors, metadata, _left_out(raw.tree, "/"), {source}, "/"


def _from_reader(source: Path, reader: Any, raw: RawCheckpoint) -> _Plan:
    array = reader.tensor_reader(source)
    out_dtype = getattr(reader, "converted_dtype", lambda ref, name: ref.dtype)
    if raw.safety.unsafe and raw.format == "onnx":
        raise UsageError(f"{source}: {raw.safety.unsafe[0]} leaves the model's folder; "
                         "not converted", hint="Move the data beside the model",
                         path=str(source))
    tensors, inputs, left_out = [], {source}, []
    for where, ref in raw.tensors:
        name = where if isinstance(where, str) else join(where, raw.separator)
        if ref.dtype == "string":
            left_out.append(f"{name} (string tensor)")
            continue
        dtype = out_dtype(ref, name)  # refuses what cannot be converted, before any write
        _check_readable(source, name, dtype)
        if ref.span is not None:
            inputs.add(Path(ref.span.path))
        tensors.append(SourceTensor(name, dtype, ref.shape,
                                    lambda n=name, r=ref: array(n, r)))
    metadata = {k: v for k, v in _stringified(raw.details.get("metadata", {})).items()
                if len(v) <= 4096} if raw.format in ("gguf", "deepspeed") else {}
    if raw.details.get("missing_extra"):
        from ckptkit.errors import MissingDependencyError

        raise MissingDependencyError("h5py", raw.details["missing_extra"],
                                     f"converting the weights of {source}")
    return tensors, metadata, left_out, inputs, raw.separator


def refuse_overwrite(source: Path, target: Path, inputs: set[Path]) -> None:
    """No output may be the source or any file of it (hard links included)."""
    for path in inputs:
        try:
            same = os.path.samefile(path, target)
        except OSError:  # one of them does not exist (yet)
            same = os.path.realpath(path) == os.path.realpath(target)
        if same:
            part = "" if path == source else f" ({path} is part of it)"
            raise UsageError(f"{target}: refusing to write over the input {source}{part}",
                             hint="Choose another output path", path=str(target))


def _check_readable(source: Path, name: str, dtype: str) -> None:
    try:
        numpy_dtype(dtype)
    except IntegrityError as exc:  # a missing ml_dtypes propagates: exit 1, what to install
        raise UsageError(f"{source}: tensor {name!r} has dtype {dtype}, which cannot be "
                         f"converted ({exc})", hint="Convert with the framework that wrote "
                         "it, or leave that tensor out with a recipe", path=str(source)) from None


def _span_reader(ref: TensorRef, name: str, big_endian: bool) -> Callable[[], np.ndarray]:
    span = ref.span
    if (span is None or span.member is not None or span.compression is not None or big_endian or not _contiguous(ref)
            or numpy_dtype(ref.dtype).itemsize != itemsize(ref.dtype)):
        # Views, deflated members or streams and byte swaps: the general reader.
        return lambda: materialised(ref, name, big_endian=big_endian)

    def read() -> np.ndarray:
        # Straight into the array's own buffer: one allocation, no intermediate bytes object.
        dtype = numpy_dtype(ref.dtype)
        start = ref.element_offset * dtype.itemsize
        nbytes = ref.numel * dtype.itemsize
        if start + nbytes > span.length:
            raise IntegrityError(f"{span.path}: tensor of {nbytes} bytes at element "
                                 f"{ref.element_offset} overruns its storage of {span.length}")
        buffer = np.empty(nbytes, np.uint8)
        view, got = memoryview(buffer), 0
        with open(span.path, "rb", buffering=0) as fh:
            fh.seek(span.offset + start)
            while got < nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise IntegrityError(f"{span.path}: file ends {nbytes - got} bytes into a "
                                         "tensor (truncated?)", path=span.path)
                got += n
        return buffer.view(dtype).reshape(ref.shape, order="F" if ref.fortran_order else "C")

    return read


def _contiguous(ref: TensorRef) -> bool:
    if ref.stride is None:
        return True
    from ckptkit.formats.torch_pickle import contiguous_strides

    expected = contiguous_strides(ref.shape)
    return all(size <= 1 or a == b for size, a, b in zip(ref.shape, ref.stride, expected))


def _torch_metadata(source: Path, prefix: str) -> dict[str, str]:
    """What :class:`~ckptkit.formats.zip_writer.TorchZipWriter` stored, if it wrote ``source``."""
    with contextlib.suppress(KeyError, OSError, ValueError, zipfile.BadZipFile):
        with zipfile.ZipFile(source) as archive:
            info = archive.getinfo(f"{prefix}/{TORCH_METADATA_RECORD}")
            if info.file_size < 1 << 20:
                data = json.loads(archive.read(info))
                if isinstance(data, dict):
                    return {str(k): str(v) for k, v in data.items()}
    return {}


def _stringified(values: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()
            if v is not None}


def _left_out(tree: Any, separator: str) -> list[str]:
    """Non-tensor entries that no target can hold: whole subtrees without tensors are named
    once (``optimizer.param_groups``), top-level plain values are metadata, not left out."""
    out: list[str] = []
    root = tree.state if isinstance(tree, Opaque) and isinstance(tree.state, dict) else tree
    if not isinstance(root, dict):
        return ["<root object>"] if not isinstance(root, TensorRef) else []
    for key, value in root.items():
        if not is_scalar(value):
            _collect(value, (key,), separator, out, set())
    return out


def _collect(node: Any, path: tuple[Any, ...], sep: str, out: list[str], seen: set[int]) -> None:
    if isinstance(node, TensorRef):
        if node.span is None and node.device == "meta":
            out.append(f"{join(path, sep)} (meta tensor, no data)")
        return
    if not _has_tensor(node, set()):
        kind = f" ({node.qualname})" if isinstance(node, Opaque) else ""
        out.append(join(path, sep) + kind)
        return
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, Opaque):
        out.append(f"{join(path, sep)} ({node.qualname}; its tensors are kept)")
        node = node.state if isinstance(node.state, dict) else {}
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        _collect(value, path + (key,), sep, out, seen)


def _has_tensor(node: Any, seen: set[int]) -> bool:
    if isinstance(node, TensorRef):
        return True
    if id(node) in seen or not isinstance(node, (dict, list, tuple, Opaque)):
        return False
    seen.add(id(node))
    if isinstance(node, Opaque):
        return _has_tensor(node.state, seen) or any(_has_tensor(a, seen) for a in node.args)
    values = node.values() if isinstance(node, dict) else node
    return any(_has_tensor(v, seen) for v in values)
