"""Atomic writes to object stores: the complete object appears under its key, or nothing does.

:func:`atomic_remote_file` is the remote counterpart of
:func:`ckptkit.storage.atomic.atomic_file`.  It opens the fsspec file with
``autocommit=False``, so nothing becomes visible while bytes are written:

* S3 (s3fs): a multipart upload, completed (``CompleteMultipartUpload``) only after the last
  part; any error, Ctrl-C included, aborts it.
* GCS (gcsfs): a resumable upload, finalised only on commit.
* ``memory://`` and other fsspec file systems with transactional files: committed at the end.

A ``kill -9`` runs no cleanup; for S3 that leaves an incomplete multipart upload (never an
object: S3 shows none under the key until completion).  Each upload ckptkit starts is written
to a small journal in the cache directory (URL, upload id, host, pid: no credentials); the
next remote write, and ``ckpt cache prune``, abort the uploads of writers that are gone
(:func:`sweep_abandoned`).

:func:`remote_output` lets any local writer produce a remote object: it yields a temporary
local path, then uploads it atomically.  Convert and strip write their output this way, so
the remote write path is the same code as the local one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ckptkit.errors import CkptkitError, UsageError
from ckptkit.storage.remote import display, require_writable

#: Bytes per multipart part (S3's minimum is 5 MiB for all but the last part).
PART_SIZE = 16 << 20


def journal_dir() -> Path:
    """Where started uploads are recorded until they complete or are aborted."""
    from ckptkit.config import settings

    return settings().cache_dir / "uploads"


@contextlib.contextmanager
def atomic_remote_file(url: str) -> Iterator[BinaryIO]:
    """A writable file that becomes the object at ``url`` only if the block completes.

    Raises:
        UsageError: the scheme cannot take writes (``http(s)://``, ``hf://``) or its file
            system has no transactional files.
        NotFoundError, AuthError, SourceError: the bucket is missing, access is denied, or the
            store cannot be reached (nothing is left under the key).
    """
    from ckptkit.storage.fsspec_location import FsspecLocation, filesystem

    scheme = url.split("://", 1)[0].lower()
    require_writable(scheme)
    with contextlib.suppress(CkptkitError, OSError):
        sweep_abandoned()
    fs, path = filesystem(url)
    where = FsspecLocation(url, fs, path)
    try:
        fh = where._call(fs.open, path, "wb", autocommit=False, block_size=PART_SIZE)
    except TypeError:
        raise UsageError(f"{display(url)}: {scheme}:// cannot take an atomic write",
                         hint="Write to a local path, s3:// or gs://") from None
    if not (hasattr(fh, "commit") and hasattr(fh, "discard")):
        raise UsageError(f"{display(url)}: {scheme}:// cannot take an atomic write",
                         hint="Write to a local path, s3:// or gs://")
    record = _journal_uploads(fh, url)
    try:
        yield fh
        where._call(fh.close)
        where._call(fh.commit)
    except BaseException:
        with contextlib.suppress(Exception):
            fh.discard()
        with contextlib.suppress(Exception):
            fh.closed = True  # nothing left to flush when it is collected
        raise
    finally:
        if record is not None:
            with contextlib.suppress(OSError):
                record.unlink()


def upload(source: Path, url: str) -> None:
    """Copy the local file ``source`` to ``url`` atomically (see :func:`atomic_remote_file`)."""
    with open(source, "rb") as src, atomic_remote_file(url) as dst:
        shutil.copyfileobj(src, dst, PART_SIZE)


@contextlib.contextmanager
def remote_output(url: str) -> Iterator[Path]:
    """A temporary local path to write; uploaded atomically to ``url`` if the block
    completes, and removed in every case."""
    require_writable(url.split("://", 1)[0].lower())
    name = url.rstrip("/").rpartition("/")[2] or "output"
    folder = Path(tempfile.mkdtemp(prefix="ckptkit-upload-"))
    try:
        local = folder / name
        yield local
        if not local.exists():
            raise UsageError(f"{display(url)}: nothing was written to upload",
                             hint="The writer produced no file")
        upload(local, url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _journal_uploads(fh: Any, url: str) -> Path | None:
    """Record the multipart upload of an s3fs file as soon as it is created (s3fs creates
    it at the first part), so a later run can abort it if this process dies."""
    initiate = getattr(fh, "_initiate_upload", None)
    if initiate is None or not hasattr(fh, "mpu"):
        return None
    from ckptkit.storage.atomic import write_text
    from ckptkit.storage.locks import HOST

    record = journal_dir() / f"{os.getpid()}-{secrets.token_hex(4)}.json"

    def initiate_and_record() -> None:
        initiate()
        mpu = getattr(fh, "mpu", None) or {}
        if mpu.get("UploadId"):
            write_text(record, json.dumps({
                "url": url, "bucket": mpu.get("Bucket"), "key": mpu.get("Key"),
                "upload_id": mpu["UploadId"], "host": HOST, "pid": os.getpid()}),
                make_parents=True)

    fh._initiate_upload = initiate_and_record
    return record


def sweep_abandoned() -> list[str]:
    """Abort the multipart uploads that writers on this host started and did not finish
    because they died (their pid is gone); returns the URLs cleaned up."""
    from ckptkit.storage.locks import HOST, pid_alive

    folder = journal_dir()
    if not folder.is_dir():
        return []
    cleaned = []
    for record in sorted(folder.glob("*.json")):
        try:
            entry = json.loads(record.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if entry.get("host") != HOST or pid_alive(int(entry.get("pid", 0))):
            continue
        if _abort(entry):
            cleaned.append(display(entry["url"]))
            with contextlib.suppress(OSError):
                record.unlink()
    return cleaned


def _abort(entry: dict[str, Any]) -> bool:
    """Abort one recorded upload; True when it is gone (aborted now, or already)."""
    from ckptkit.storage.fsspec_location import filesystem

    fs, _path = filesystem(entry["url"])
    try:
        fs.call_s3("abort_multipart_upload", Bucket=entry["bucket"], Key=entry["key"],
                   UploadId=entry["upload_id"])
    except Exception as exc:  # an upload already gone is the goal reached
        return "NoSuchUpload" in f"{type(exc).__name__} {exc}"
    return True


__all__ = ["atomic_remote_file", "journal_dir", "remote_output", "sweep_abandoned", "upload"]
