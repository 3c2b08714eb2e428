"""TensorFlow SavedModel directories, read without TensorFlow and without running their graphs.

``saved_model.pb`` is a ``SavedModel`` proto: a schema version and one ``MetaGraphDef`` per tag
set, each with signatures, the (possibly huge) ``graph_def`` and, in TF2, the object graph.
Only the small parts are decoded, by hand (:mod:`ckptkit.formats.protowire`); the file is
memory-mapped so the graph is skipped, never read.  Variables are an ordinary tensor bundle at
``variables/variables``.

Field numbers are those of ``tensorflow/core/protobuf/{saved_model,meta_graph,
saved_object_graph,fingerprint}.proto`` (checked against TF 2.21's compiled descriptors).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkit.storage.budget import metered
from ckptkit.storage.location import LocalLocation, Location, locate
from ckptkit.errors import (
    CkptkitError,
    FormatError,
    IntegrityError,
    MissingDependencyError,
    NotFoundError,
    UsageError,
)
from ckptkit.formats import bundle_arrays, protowire, tensor_bundle
from ckptkit.formats.protowire import Value
from ckptkit.model import FormatName, RawCheckpoint, Signature, TensorRef, TensorSpec

FORMAT: FormatName = "savedmodel"
PB_NAME = "saved_model.pb"
PBTXT_NAME = "saved_model.pbtxt"
INIT_OP_KEY = "__saved_model_init_op"
VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_FINGERPRINT_MAX = 1 << 16
_FINGERPRINT_FIELDS = {1: "saved_model_checksum", 2: "graph_def_program_hash",
                       3: "signature_def_hash", 4: "saved_object_graph_hash",
                       5: "checkpoint_hash"}


@dataclass
class MetaGraph:
    """What ckptkit keeps of one ``MetaGraphDef``."""

    tags: tuple[str, ...] = ()
    tensorflow_version: str = ""
    tensorflow_git_version: str = ""
    signatures: list[Signature] = field(default_factory=list)
    graph_def_bytes: int = 0
    asset_files: list[str] = field(default_factory=list)
    variable_names: dict[str, str] = field(default_factory=dict)
    has_object_graph: bool = False


def model_dir(path: Path | Location) -> Location | None:
    """The SavedModel directory ``path`` names (the directory or its ``saved_model.pb``)."""
    path = locate(path)
    if path.is_dir():
        if path.child(PB_NAME).is_file() or path.child(PBTXT_NAME).is_file():
            return path
        return None
    if path.is_file() and path.name in (PB_NAME, PBTXT_NAME):
        return path.parent()
    return None


def sniff(path: Path | Location) -> bool:
    """True for a directory holding ``saved_model.pb`` (or ``.pbtxt``), or that file itself."""
    try:
        directory = model_dir(path)
        if directory is None:
            return False
        pb = directory.child(PB_NAME)
        if not pb.is_file():
            return True  # text format: read_info explains what to do with it
        first = pb.read(0, 1)
        # A SavedModel starts with field 1 (varint) or field 2 (message); an empty one is a
        # truncated SavedModel, which read_info reports as such.
        return first in (b"", b"\x08", b"\x12")
    except (OSError, CkptkitError):
        return False


# --- decoding ----------------------------------------------------------------------------------

def _map_entries(value: Value, what: str) -> tuple[str, memoryview]:
    """One entry of a proto ``map<string, Message>``: ``(key, value message bytes)``."""
    entry = protowire.fields(protowire.as_bytes(value, what))
    raw_key = protowire.last(entry, 1)
    raw_value = protowire.last(entry, 2)
    key = protowire.as_str(raw_key, f"{what} key") if raw_key is not None else ""
    body = protowire.as_bytes(raw_value, f"{what} value") if raw_value is not None \
        else memoryview(b"")
    return key, body


def _text(grouped: dict[int, list[Value]], number: int, what: str) -> str:
    raw = protowire.last(grouped, number)
    return "" if raw is None else protowire.as_str(raw, what)


def _tensor_spec(key: str, body: memoryview) -> TensorSpec:
    """Decode a ``TensorInfo`` (name=1, dtype=2, tensor_shape=3, coo_sparse=4, composite=5)."""
    what = f"tensor info {key!r}"
    grouped = protowire.fields(body)
    name = _text(grouped, 1, f"{what} name")
    raw_sparse = protowire.last(grouped, 4)
    if raw_sparse is not None:
        sparse = protowire.fields(protowire.as_bytes(raw_sparse, f"{what} coo_sparse"))
        name = _text(sparse, 1, f"{what} values_tensor_name")
    enum = protowire.as_int(protowire.last(grouped, 2) or 0, f"{what} dtype")
    if protowire.last(grouped, 5) is not None:
        dtype = "composite"
    elif enum == 0:
        dtype = "invalid"
    else:
        dtype = tensor_bundle.dtype_name(enum)
    raw_shape = protowire.last(grouped, 3)
    shape: tuple[int, ...] | None = ()
    if raw_shape is not None:
        shape = tensor_bundle.decode_shape(protowire.as_bytes(raw_shape, f"{what} shape"),
                                           f"{what} shape")
    return TensorSpec(key, dtype, shape, name)


def _signature(key: str, body: memoryview, tags: tuple[str, ...]) -> Signature:
    """Decode a ``SignatureDef`` (inputs=1, outputs=2 maps of TensorInfo, method_name=3)."""
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    method = ""
    for number, _wire, value in protowire.iter_fields(body):
        if number in (1, 2):
            name, info = _map_entries(value, f"signature {key!r} tensor")
            (inputs if number == 1 else outputs).append(_tensor_spec(name, info))
        elif number == 3:
            method = protowire.as_str(value, f"signature {key!r} method_name")
    # Map order on the wire is the writer's choice; sort as saved_model_cli shows them.
    return Signature(key, tuple(sorted(inputs, key=lambda t: t.name)),
                     tuple(sorted(outputs, key=lambda t: t.name)), method, tags)


def _escape_local_name(name: str) -> str:
    # Checkpoint keys escape "." and "/" in attribute names so paths stay unambiguous.
    return name.replace(".", "..").replace("/", ".S")


def _variable_names(object_graph: memoryview) -> dict[str, str]:
    """Map bundle keys (``a/b/.ATTRIBUTES/VARIABLE_VALUE``) to variable names, from the
    ``SavedObjectGraph`` (nodes=1; SavedObject children=1 {node_id=1, local_name=2},
    variable=7 {name=6}).

    A variable's key is its first breadth-first path from the root, which is how TensorFlow
    names checkpoint keys.
    """
    children: list[list[tuple[int, str]]] = []
    names: list[str | None] = []
    for number, _wire, value in protowire.iter_fields(object_graph):
        if number != 1:
            continue
        kids: list[tuple[int, str]] = []
        variable: str | None = None
        for sub, _w, sub_value in protowire.iter_fields(protowire.as_bytes(value, "saved object")):
            if sub == 1:
                ref = protowire.fields(protowire.as_bytes(sub_value, "object reference"))
                node_id = protowire.as_int(protowire.last(ref, 1) or 0, "child node_id")
                kids.append((node_id, _text(ref, 2, "child local_name")))
            elif sub == 7:
                saved = protowire.fields(protowire.as_bytes(sub_value, "saved variable"))
                variable = _text(saved, 6, "saved variable name")
        children.append(kids)
        names.append(variable)
    if not children:
        return {}
    paths: dict[int, tuple[str, ...]] = {0: ()}
    queue: deque[int] = deque([0])
    while queue:
        node = queue.popleft()
        for child, local in children[node]:
            if child < len(children) and child not in paths:
                paths[child] = paths[node] + (_escape_local_name(local),)
                queue.append(child)
    return {"/".join(path) + VARIABLE_SUFFIX: name
            for node, path in paths.items()
            if (name := names[node]) is not None and path}


def _meta_graph(body: memoryview) -> MetaGraph:
    """Decode the parts of a ``MetaGraphDef`` ckptkit reports; ``graph_def`` is only measured.

    Fields: meta_info_def=1 {tags=4, tensorflow_version=5, tensorflow_git_version=6},
    graph_def=2, signature_def=5 (map), asset_file_def=6 {filename=2}, object_graph_def=7.
    """
    graph = MetaGraph()
    signature_bodies: list[tuple[str, memoryview]] = []
    for number, _wire, value in protowire.iter_fields(body):
        if number == 1:
            info = protowire.fields(protowire.as_bytes(value, "meta_info_def"))
            graph.tags = tuple(protowire.as_str(t, "tag") for t in info.get(4, ()))
            graph.tensorflow_version = _text(info, 5, "tensorflow_version")
            graph.tensorflow_git_version = _text(info, 6, "tensorflow_git_version")
        elif number == 2:
            graph.graph_def_bytes += len(protowire.as_bytes(value, "graph_def"))
        elif number == 5:
            signature_bodies.append(_map_entries(value, "signature_def"))
        elif number == 6:
            asset = protowire.fields(protowire.as_bytes(value, "asset_file_def"))
            graph.asset_files.append(_text(asset, 2, "asset filename"))
        elif number == 7:
            graph.has_object_graph = True
            graph.variable_names = _variable_names(protowire.as_bytes(value, "object_graph_def"))
    # Tags may follow the signatures on the wire, so signatures are built last.
    graph.signatures = [_signature(key, sig, graph.tags) for key, sig in sorted(
        signature_bodies, key=lambda item: item[0]) if key != INIT_OP_KEY]
    return graph


def _decode_saved_model(view: memoryview) -> tuple[int, list[MetaGraph]]:
    """Decode ``SavedModel`` (saved_model_schema_version=1, meta_graphs=2)."""
    schema = 0
    graphs: list[MetaGraph] = []
    for number, _wire, value in protowire.iter_fields(view):
        if number == 1:
            schema = protowire.signed64(protowire.as_int(value, "schema version"))
        elif number == 2:
            graphs.append(_meta_graph(protowire.as_bytes(value, "meta_graph")))
    return schema, graphs


def parse_saved_model(pb: Path | Location) -> tuple[int, list[MetaGraph]]:
    """``(saved_model_schema_version, meta graphs)`` of a ``saved_model.pb``.

    Raises:
        IntegrityError: the file is empty, truncated or not a SavedModel proto.
    """
    def fail(message: str) -> IntegrityError:
        return IntegrityError(f"{pb}: {message}",
                              hint="The SavedModel is truncated or corrupt; re-export or "
                                   "re-download it", path=str(pb))

    pb = locate(pb)
    mapped: Any
    try:
        size = pb.size()
        if size == 0:
            raise fail("file is empty")
        if isinstance(pb, LocalLocation):  # mapped, not read: graph defs run to gigabytes
            with pb.open() as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            mapped = pb.read(0, size)
    except OSError as exc:
        raise NotFoundError(f"{pb}: cannot read it ({exc.strerror or exc})",
                            hint="Check the file's permissions", path=str(pb)) from None
    try:
        schema, graphs = _decode_saved_model(memoryview(mapped))
    except IntegrityError as exc:
        raise fail(exc.message) from None
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise fail(f"malformed SavedModel proto ({exc})") from None
    finally:
        # If a traceback still holds a slice, the mapping closes when that is collected.
        if isinstance(mapped, mmap.mmap):
            with contextlib.suppress(BufferError):
                mapped.close()
    if not graphs:
        raise fail("holds no MetaGraphDef")
    return schema, graphs


def _fingerprint(directory: Location) -> dict[str, Any] | None:
    """The hashes in ``fingerprint.pb`` (FingerprintDef fields 1-5 uint64, uuid=7)."""
    path = directory.child("fingerprint.pb")
    try:
        if not path.is_file() or path.size() > _FINGERPRINT_MAX:
            return None
        grouped = protowire.fields(path.read(0, path.size()))
        facts: dict[str, Any] = {}
        for number, name in _FINGERPRINT_FIELDS.items():
            raw = protowire.last(grouped, number)
            if raw is not None:
                facts[name] = protowire.as_int(raw, name)
        if protowire.last(grouped, 7) is not None:
            facts["uuid"] = _text(grouped, 7, "uuid")
        return facts
    except (OSError, CkptkitError):
        return {}


# --- the verbs ---------------------------------------------------------------------------------

def _directory(path: Path | Location) -> Location:
    directory = model_dir(path)
    if directory is None:
        raise NotFoundError(f"{path}: no {PB_NAME} here; not a SavedModel directory",
                            hint="Pass the directory that holds saved_model.pb", path=str(path))
    if not directory.child(PB_NAME).is_file():
        raise FormatError(f"{directory}: text-format SavedModel ({PBTXT_NAME}) is not supported",
                          hint="Re-export it as saved_model.pb with TensorFlow "
                               "(tf.saved_model.save)", path=str(directory))
    return directory


def _bundle(directory: Location) -> tensor_bundle.BundleIndex | None:
    variables = directory.child("variables")
    prefix = str(variables.child("variables"))
    if not tensor_bundle.index_path(prefix).is_file():
        shards = [e.name for e in variables.list() if e.name.startswith("variables.data-")] \
            if variables.is_dir() else []
        if shards:
            raise IntegrityError(f"{prefix}.index is missing but {shards[0]} exists",
                                 hint="Copy the whole variables/ folder of the SavedModel",
                                 path=f"{prefix}.index")
        return None
    try:
        index = tensor_bundle.read_index(prefix)
    except CkptkitError:
        raise
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{prefix}.index: malformed variables index ({exc})",
                             hint="Re-export or re-download the SavedModel",
                             path=f"{prefix}.index") from None
    tensor_bundle.check_shards(index)
    return index


@metered
def read_info(path: Path | Location) -> RawCheckpoint:
    """Signatures, tags and variables of a SavedModel, without TensorFlow or tensor bytes."""
    directory = _directory(path)
    schema, graphs = parse_saved_model(directory.child(PB_NAME))
    index = _bundle(directory)
    tensors: tuple[tuple[str, TensorRef], ...] = tuple(index.variables()) if index else ()
    stored = {name for name, _ in tensors}
    variable_names: dict[str, str] = {}
    for graph in graphs:
        variable_names.update({k: v for k, v in graph.variable_names.items() if k in stored})
    assets = directory.child("assets")
    asset_files = sorted({f for g in graphs for f in g.asset_files})
    details: dict[str, Any] = {
        "saved_model_schema_version": schema,
        "meta_graphs": len(graphs),
        "tags": list(graphs[0].tags),
        "tag_sets": [list(g.tags) for g in graphs],
        "tensorflow_version": graphs[0].tensorflow_version,
        "tensorflow_git_version": graphs[0].tensorflow_git_version,
        "graph_def_bytes": sum(g.graph_def_bytes for g in graphs),
        "has_object_graph": any(g.has_object_graph for g in graphs),
        "has_assets": bool(asset_files) or (assets.is_dir() and bool(assets.list())),
        "asset_files": asset_files,
        "has_fingerprint": directory.child("fingerprint.pb").is_file(),
        "has_keras_metadata": directory.child("keras_metadata.pb").is_file(),
        "has_variables": bool(tensors),
    }
    fingerprint = _fingerprint(directory)
    if fingerprint:
        details["fingerprint"] = fingerprint
    if index is not None:
        details["variables"] = index.details()
    if variable_names:
        details["variable_names"] = variable_names
    signatures = tuple(sig for graph in graphs for sig in graph.signatures)
    return RawCheckpoint(FORMAT, {"variables": tensor_bundle.nest(tensors)}, tensors,
                         details=details, signatures=signatures, separator="/")


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``tf``: ``tf.saved_model.load`` (runs the model's restore and init functions);
    ``numpy``: ``{bundle key: ndarray}`` for the variables, read from the shards."""
    directory = _directory(path)
    if framework == "numpy":
        index = _bundle(directory)
        return {} if index is None else bundle_arrays.read_arrays(index)
    if framework == "tf":
        try:
            import tensorflow as tf
        except ImportError:
            raise MissingDependencyError("tensorflow", "tf",
                                         "Loading a SavedModel with framework='tf'") from None
        return tf.saved_model.load(str(directory))
    raise UsageError(f"{path}: cannot load a SavedModel as {framework!r}",
                     hint="Use framework='tf' or framework='numpy'")
