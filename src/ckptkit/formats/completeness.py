"""Was a single-file checkpoint written to the end?  Cheap structural checks from metadata,
no tensor bytes: a zip's central directory and local headers, a safetensors header and its
last byte, npz array headers, a TF index and its shard lengths, the end of a legacy stream.

Shared by ``ckpt verify`` (:mod:`ckptkit.verification`), by the sharded readers (each shard is
such a file) and by ``latest``/``cleanup`` (:mod:`ckptkit.runs.integrity`).  Also the
``--hashes`` check that needs no network: a file in a Hugging Face cache is a link to a blob
named by its sha256 (the LFS id the Hub published), so its expected hash is known offline.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptkit.errors import CkptkitError, IntegrityError, UnsafeContentError
from ckptkit.model import Problem
from ckptkit.storage.location import Location, locate

_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_file(path: Path | Location) -> str:
    """Why the file at ``path`` is complete (one line).

    Raises:
        CkptkitError, OSError, ValueError: it is not (the message says what is short).
    """
    from ckptkit import formats

    path = locate(path)  # sniffing and reading share its first, coalesced read
    if not path.exists():  # a TF checkpoint named by its prefix (ckpt-1: ckpt-1.index, ...)
        return check_tf(path)
    if path.size() == 0:
        raise IntegrityError(f"{path}: file is empty", path=str(path))
    reader = formats.detect(path)
    fmt = reader.FORMAT
    if fmt in ("torch-zip", "torchscript", "npz"):
        check_zip(path)
        if fmt == "npz":
            reader.read_info(path)  # array headers are small and say how long each array is
        return "complete (zip central directory and local headers in bounds)"
    if fmt == "safetensors":
        return check_safetensors(path)
    if fmt == "tf-checkpoint":
        return check_tf(path)
    # Legacy torch streams, Flax msgpack: their readers walk the structure without tensor
    # bytes and raise IntegrityError when the file ends early (or runs on past its end).
    reader.read_info(path)
    return f"complete ({fmt} structure reads to the end)"


def check_zip(path: Path | Location) -> None:
    from ckptkit.formats import ziparchive

    path = locate(path)
    size = path.size()
    with ziparchive.open_zip(path, "zip archive") as archive, path.open() as fh:
        for info in archive.infolist():
            ziparchive.data_offset(fh, info, size)


def check_safetensors(path: Path | Location) -> str:
    from ckptkit.formats import safetensors

    path = locate(path)
    header, start = safetensors.read_header(path)
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v),
              default=0)
    size = path.size()
    if start + end > size:
        raise IntegrityError(f"{path}: truncated: tensors need {start + end} bytes, the file "
                             f"has {size}", path=str(path))
    return "complete (safetensors header and data length agree)"


def check_tf(path: Path | Location) -> str:
    from ckptkit.formats import tf_checkpoint

    index, _found = tf_checkpoint.read_index(path)  # read_index also runs check_shards
    return f"complete (index and {index.header.num_shards} data shard(s))"


def file_problems(path: Path) -> list[Problem]:
    """``[]`` when :func:`check_file` passes, else the one problem it found."""
    try:
        check_file(path)
    except UnsafeContentError:
        return []  # complete; whether it is safe is `ckpt inspect`'s and `ckpt scan`'s verdict
    except (CkptkitError, OSError, ValueError) as exc:
        text = exc.message if isinstance(exc, CkptkitError) else f"{type(exc).__name__}: {exc}"
        text = " ".join(text.removeprefix(f"{path}: ").split())
        kind = ("truncated" if "truncat" in text or "past the end" in text else
                "missing-shard" if "shard" in text and "missing" in text else "unreadable")
        return [Problem(str(path), kind, text)]
    return []


def known_sha256(path: Path) -> tuple[str, str] | None:
    """``(sha256, where it comes from)`` known offline for ``path``, or None: a Hugging Face
    cache snapshot links each file to ``blobs/<sha256>`` for files the Hub stores in LFS."""
    try:
        target = path.resolve()
    except OSError:
        return None
    if target != path.absolute() and target.parent.name == "blobs" and _SHA256.fullmatch(
            target.name):
        return target.name, "Hugging Face LFS id (cache blob name)"
    return None


def hash_problems(path: Path, expected: str | None = None, source: str = "") -> list[Problem]:
    """Re-hash ``path`` against ``expected`` (or :func:`known_sha256`); ``[]`` when it
    matches or nothing is known."""
    from ckptkit.storage.hashing import sha256_file

    if expected is None:
        known = known_sha256(path)
        if known is None:
            return []
        expected, source = known
    actual = sha256_file(path)
    if actual != expected:
        return [Problem(str(path), "hash-mismatch",
                        f"sha256 {actual[:16]}… differs from the {source} {expected[:16]}…")]
    return []
