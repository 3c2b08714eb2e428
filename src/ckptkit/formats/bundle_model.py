"""The model of a TensorFlow tensor bundle: its header, its entries, and where its files are.

:mod:`ckptkit.formats.tensor_bundle` decodes an index into these.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptkit.model import ByteSpan, TensorRef
from ckptkit.storage.location import Location, locate

HEADER_KEY = b""
#: Key of the serialized ``TrackableObjectGraph`` in TF2 object-based checkpoints.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

#: TF ``DataType`` enum (``tensorflow/core/framework/types.proto``) in numpy spelling.
DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
    8: "complex64", 9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32",
    14: "bfloat16", 15: "qint16", 16: "quint16", 17: "uint16", 18: "complex128", 19: "float16",
    20: "resource", 21: "variant", 22: "uint32", 23: "uint64", 24: "float8_e5m2",
    25: "float8_e4m3fn", 26: "float8_e4m3fnuz", 27: "float8_e4m3b11fnuz", 28: "float8_e5m2fnuz",
    29: "int4", 30: "uint4", 31: "int2", 32: "uint2", 33: "float4_e2m1fn",
}
_REF_OFFSET = 100  # DT_FLOAT_REF = 101 etc.; graphs may carry them, bundles never should


def dtype_name(enum: int) -> str:
    """Numpy spelling of a TF ``DataType`` enum value; unknown values keep their number."""
    if enum > _REF_OFFSET:
        enum -= _REF_OFFSET
    return DTYPES.get(enum, f"tf_dtype_{enum}")


# --- the bundle model --------------------------------------------------------------------------

Extents = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class BundleHeader:
    """``BundleHeaderProto``: how many data shards there are and how they are encoded."""

    num_shards: int
    endianness: str
    version: int
    min_consumer: int


@dataclass(frozen=True)
class BundleEntry:
    """One ``BundleEntryProto``: a tensor's dtype, shape and byte range in its shard.

    ``crc32c`` is unmasked.  ``slices`` is set for a partitioned tensor (TF1 partitioners, or
    TF2's ``MaxShardSizePolicy`` splitting a large variable across shards): one
    ``((start, length), ...)`` per part, length ``-1`` meaning the whole dimension.  Such an
    entry has no bytes of its own; each part is an entry under a binary slice key.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None
    slices: tuple[Extents, ...] = ()


@dataclass(frozen=True)
class BundleIndex:
    """A decoded ``<prefix>.index``: header plus tensor entries in key (file) order."""

    index_path: Location
    prefix: str
    header: BundleHeader
    entries: tuple[BundleEntry, ...]
    #: The parts of each partitioned tensor, by tensor name: ``(extents, part entry)``.
    parts: dict[str, tuple[tuple[Extents, BundleEntry], ...]] = field(default_factory=dict)

    @property
    def slice_entries(self) -> int:
        return sum(len(p) for p in self.parts.values())

    def shard_path(self, shard_id: int) -> str:
        return shard_path(self.prefix, shard_id, self.header.num_shards)

    def span(self, entry: BundleEntry) -> ByteSpan | None:
        if entry.slices:
            return None
        return ByteSpan(self.shard_path(entry.shard_id), entry.offset, entry.size)

    def tensor_ref(self, entry: BundleEntry) -> TensorRef:
        return TensorRef(entry.dtype, entry.shape, self.span(entry))

    def stored_entries(self) -> Iterator[BundleEntry]:
        """Every entry that owns bytes in a shard: plain tensors and parts of partitioned ones."""
        for entry in self.entries:
            if entry.slices:
                yield from (part for _extents, part in self.parts.get(entry.name, ()))
            else:
                yield entry

    def variables(self) -> list[tuple[str, TensorRef]]:
        """``(name, ref)`` for every tensor except the serialized object graph."""
        return [(e.name, self.tensor_ref(e)) for e in self.entries if e.name != OBJECT_GRAPH_KEY]

    @property
    def has_object_graph(self) -> bool:
        return any(e.name == OBJECT_GRAPH_KEY for e in self.entries)

    def details(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "prefix": self.prefix,
            "num_shards": self.header.num_shards,
            "version": self.header.version,
            "endianness": self.header.endianness,
            "has_object_graph": self.has_object_graph,
        }
        if self.parts:
            facts["partitioned_tensors"] = {name: len(p) for name, p in self.parts.items()}
        return facts


def shard_path(prefix: str, shard_id: int, num_shards: int) -> str:
    """Path of data shard ``shard_id``: ``<prefix>.data-00000-of-00001``."""
    return f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}"


def index_path(prefix: str) -> Location:
    """Where the index of the bundle at ``prefix`` lives (``<prefix>.index``)."""
    return locate(f"{prefix}.index")
