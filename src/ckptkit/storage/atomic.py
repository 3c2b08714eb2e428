"""Atomic writes: a file appears under its final name complete, or not at all.

Every writer in ckptkit (``save``, ``convert``, ``strip``, the cache's records, pins, the
mirror tree) goes through :func:`atomic_file`:

1. the bytes go to a temporary file beside the target, named ``.<name>.<pid>.<8 hex>.partial``
   (unique per process and call, so concurrent writers never share one);
2. the file is flushed and fsynced, renamed over the target with :func:`os.replace`, and the
   directory is fsynced, so after a crash the target holds the old file or the new one;
3. on any error, Ctrl-C included, the temporary file is removed.

Content another routine produces (a hardlink, a copy, a directory tree) goes through
:func:`staged` instead: the same temporary name, filled by the caller, renamed over the target.

One sweep rule cleans up after writers that were killed (``kill -9`` runs no cleanup): the next
write to the same target removes a temporary file (or staged directory) whose pid is gone here
and which has sat untouched for :data:`ABANDONED_AFTER` seconds.  The age matters on shared
file systems, where the pid may belong to a live writer on another machine that keeps its file
fresh.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ckptkit.errors import NotFoundError, UsageError, disk_full

#: Seconds a dead writer's temporary file must sit untouched before it is removed.
ABANDONED_AFTER = 60.0

#: Every temporary file :func:`atomic_file` creates matches this (group 1: the target's name,
#: group 2: the writer's pid).
TEMP_NAME = re.compile(r"\.(.+)\.(\d+)\.[0-9a-f]{8}\.partial", re.DOTALL)


def temp_path(target: Path) -> Path:
    """A new temporary name for ``target``, in its directory."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")


def is_temp(name: str) -> bool:
    """True for a name :func:`temp_path` makes: never a checkpoint, never a cache entry."""
    return TEMP_NAME.fullmatch(name) is not None


@contextlib.contextmanager
def atomic_file(target: Path, *, make_parents: bool = False, doing: str = "writing it",
                hint: str | None = None) -> Iterator[BinaryIO]:
    """A new file that becomes ``target`` only if the ``with`` block completes.

    Args:
        target: the final path.
        make_parents: create missing parent directories (else a missing one is an error).
        doing, hint: what a disk-full message says was going on, and its next step.

    Raises:
        UsageError: ``target`` is a directory.
        NotFoundError: its directory does not exist (and ``make_parents`` is false).
        DiskFullError: the disk (or quota, or file size limit) filled up; nothing is left.
    """
    directory = target.parent
    if target.is_dir():
        raise UsageError(f"{target} is a directory", hint="Give a file name for the output")
    if make_parents:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        raise NotFoundError(f"{directory}: no such directory for the output {target.name}",
                            hint="Create it first, or choose another output path",
                            path=str(directory))
    sweep(target)
    tmp = temp_path(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        full = disk_full(exc, target, "creating its temporary file")
        if full is None:
            raise
        raise full from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        full = disk_full(exc, target, doing, hint)
        if full is not None:
            raise full from exc
        raise
    fsync_dir(directory)


@contextlib.contextmanager
def staged(target: Path, *, make_parents: bool = False) -> Iterator[Path]:
    """A temporary path beside ``target`` (not yet created) for the caller to fill with a file
    or a directory; renamed over ``target`` when the block completes, removed if it fails.

    For content :func:`atomic_file` cannot stream: hardlinks, copies, unpacked trees.  A
    directory can only replace a missing or empty ``target`` (``os.replace``'s rule).
    """
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    tmp = temp_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(target.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_bytes(target: Path, data: bytes, *, make_parents: bool = False) -> None:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_file`)."""
    with atomic_file(target, make_parents=make_parents) as fh:
        fh.write(data)


def write_text(target: Path, text: str, *, make_parents: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically (see :func:`atomic_file`)."""
    write_bytes(target, text.encode("utf-8"), make_parents=make_parents)


def sweep(target: Path) -> None:
    """Remove temporary files of earlier writes to ``target`` whose writer was killed."""
    from ckptkit.storage.locks import pid_alive

    now = time.time()
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        match = TEMP_NAME.fullmatch(leftover.name)
        if (not match or match[1] != target.name or leftover.is_symlink()
                or pid_alive(int(match[2]))):
            continue
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime >= ABANDONED_AFTER:
                _remove(leftover)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open directories; its rename is durable enough
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
