"""Safe extraction of tar, tar.gz/bz2/xz and zip archives into a fresh directory.

Downloaded archives are untrusted input: a member may try to write outside the destination
(an absolute name, ``..`` traversal, a symlink or hardlink pointing out), create device nodes or
fifos, or expand to far more bytes than the archive holds (a decompression bomb).  Every member
is checked *before* anything is written for it, the whole archive is extracted into a hidden
temporary directory beside the destination, and only a fully extracted tree is renamed into
place, so the destination either does not exist or is complete.

The archive type is detected from the content (:func:`tarfile.is_tarfile`,
:func:`zipfile.is_zipfile`), never from the file name: servers name things freely (Kaggle
redirects to ``…/download`` URLs, TF Hub serves ``.tar.gz`` under any name).
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from ckptkit.errors import IntegrityError, UsageError
from ckptkit.storage.atomic import fsync_dir

ArchiveKind = Literal["tar", "zip"]

#: Cap on extracted bytes is ``max(BOMB_RATIO × archive size, BOMB_FLOOR)`` unless given.
BOMB_RATIO = 64
BOMB_FLOOR = 1 << 30
#: Real model archives hold tens to a few thousand files; a million headers is an attack.
DEFAULT_MAX_MEMBERS = 100_000
_CHUNK = 1 << 20
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
          (b"PK\x03\x04", "zip"))
_MAX_ZIP_SYMLINK_TARGET = 4096
# Errors the parsers and decompressors raise on truncated or damaged input (plus OSError
# without an errno, see extract).
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile,
            lzma.LZMAError)


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract` produced."""

    path: Path
    kind: ArchiveKind
    members: int
    bytes: int


def archive_kind(path: Path) -> ArchiveKind | None:
    """``"tar"`` (plain or compressed), ``"zip"``, or None, judged from the file's content.

    ``path`` may be a remote location (it is read through its ``open``)."""
    remote = not isinstance(path, (str, os.PathLike))
    if not remote:
        path = Path(path)
    if not path.is_file():
        return None
    # tar first: an uncompressed tar whose last member is a zip can pass is_zipfile (the zip
    # end record is found near the end of the file), while a zip never parses as a tar header.
    with contextlib.suppress(OSError, EOFError):
        if _probe(tarfile.is_tarfile, path, remote):
            return "tar"
    # is_zipfile lets BadZipFile out for an end record that names several disks.
    with contextlib.suppress(OSError, zipfile.BadZipFile):
        if _probe(zipfile.is_zipfile, path, remote):
            return "zip"
    return None


def _probe(test: Any, path: Any, remote: bool) -> bool:
    if not remote:
        return bool(test(path))
    with path.open() as fh:
        return bool(test(fh))


def default_max_bytes(archive_size: int) -> int:
    """The extracted-bytes cap used when none is given: ``max(64 × size, 1 GiB)``."""
    return max(BOMB_RATIO * archive_size, BOMB_FLOOR)


def extract(archive: Path, dest: Path, *, max_bytes: int | None = None,
            max_members: int = DEFAULT_MAX_MEMBERS) -> ExtractResult:
    """Extract ``archive`` into the new directory ``dest``, refusing anything unsafe.

    The tree is built in ``.<dest name>.<uuid>.extract`` beside ``dest`` and renamed to ``dest``
    only when every member is extracted; on any failure the temporary tree is removed and
    ``dest`` is untouched.  Symlinks and hardlinks are kept only when they stay inside the tree.
    File modes keep only the owner/group/other read-write-execute bits (no setuid, no owner).

    Args:
        archive: a tar (optionally gzip/bz2/xz compressed) or zip file.
        dest: the directory to create; it must not exist (an empty directory is replaced).
        max_bytes: cap on the total extracted bytes; default ``max(64 × archive size, 1 GiB)``.
        max_members: cap on the number of members.

    Returns:
        The :class:`ExtractResult` (``path`` is ``dest``).

    Raises:
        IntegrityError: not an archive, truncated or corrupt, or a member that is unsafe
            (the message names it); nothing is left at ``dest``.
        UsageError: ``dest`` already exists and is not an empty directory.

    Example:
        >>> extract(Path("model.tar.gz"), Path("model"))          # doctest: +SKIP
        ExtractResult(path=PosixPath('model'), kind='tar', members=5, bytes=40213)
    """
    archive, dest = Path(archive), Path(dest)
    kind = archive_kind(archive)
    if kind is None:
        container = _container(archive)
        if container is not None:
            raise IntegrityError(f"{archive} is truncated or corrupt: a {container} stream "
                                 "without a readable tar or zip inside",
                                 hint="Delete it and download it again", path=str(archive))
        raise IntegrityError(f"{archive} is not a tar or zip archive",
                             hint="The source served something else; try another source",
                             path=str(archive))
    if dest.is_symlink() or (dest.exists() and not (dest.is_dir() and not any(dest.iterdir()))):
        raise UsageError(f"cannot extract {archive.name} into {dest}: it already exists",
                         hint="Remove it or choose another destination", path=str(dest))
    cap = default_max_bytes(archive.stat().st_size) if max_bytes is None else max_bytes
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.extract"
    staging.mkdir()
    try:
        writer = _TreeWriter(staging, archive, cap, max_members)
        try:
            if kind == "tar":
                _extract_tar(archive, writer)
            else:
                _extract_zip(archive, writer)
        except (*_CORRUPT, OSError) as exc:
            # Decompressors raise OSError without errno (bz2 "Invalid data stream"); an errno
            # means the disk or the file system, which is not the archive's fault.
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise IntegrityError(f"{archive} is truncated or corrupt: {_one_line(exc)}",
                                 hint="Delete it and download it again",
                                 path=str(archive)) from exc
        writer.check_links()
        fsync_dir(staging)
        if dest.is_dir():
            dest.rmdir()  # empty (checked above); rename cannot replace it on every OS
        os.rename(staging, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExtractResult(path=dest, kind=kind, members=writer.members, bytes=writer.total)


class _TreeWriter:
    """Writes members under ``root`` after checking each one; counts members and bytes."""

    def __init__(self, root: Path, archive: Path, max_bytes: int, max_members: int) -> None:
        self.root = os.path.realpath(root)
        self.archive = archive
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.members = 0
        self.total = 0
        self.symlinks: list[str] = []

    def refuse(self, name: str, why: str) -> IntegrityError:
        return IntegrityError(f"unsafe member {name!r} in {self.archive}: {why}",
                              hint="Nothing was extracted; the archive is not trusted",
                              path=str(self.archive), reason=f"unsafe member {name!r}: {why}")

    def relative(self, name: str) -> str | None:
        """The member's normalised relative path; None for the archive root itself."""
        if "\x00" in name:
            raise self.refuse(name, "NUL byte in name")
        if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
            raise self.refuse(name, "absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(name, "'..' in path (traversal)")
        return "/".join(parts) or None

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.root or real.startswith(self.root + os.sep)

    def count(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise self.refuse(name, f"more than {self.max_members:,} members "
                                    "(raise max_members if this archive is genuine)")

    def reserve(self, name: str, size: int) -> None:
        """Refuse before writing when the declared size would pass the byte cap."""
        if size < 0 or self.total + size > self.max_bytes:
            raise self.refuse(name, f"extracting it would exceed {self.max_bytes:,} bytes "
                                    "(decompression bomb?)")

    def target(self, name: str, rel: str) -> str:
        """Absolute path for ``rel`` whose parent directory exists inside the tree."""
        path = os.path.join(self.root, rel)
        parent = os.path.dirname(path)
        if not self.inside(parent):
            raise self.refuse(name, "its directory leads outside the destination")
        self.makedirs(name, parent)
        # A symlink extracted earlier may have been swapped under a parent component.
        if not self.inside(parent):
            raise self.refuse(name, "its directory leads outside the destination")
        if os.path.isdir(path) and not os.path.islink(path):
            raise self.refuse(name, "it would replace a directory")
        if os.path.lexists(path):
            os.unlink(path)  # a later duplicate wins, as with tar; never write through a link
        return path

    def directory(self, name: str) -> None:
        rel = self.relative(name)
        if rel is None:
            return
        path = os.path.join(self.root, rel)
        if not self.inside(path):
            raise self.refuse(name, "directory leads outside the destination")
        self.makedirs(name, path)

    def makedirs(self, name: str, path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise self.refuse(name, "a file of the archive is in the way of a directory") from exc

    def file(self, name: str, source: BinaryIO, size: int, mode: int) -> None:
        rel = self.relative(name)
        if rel is None:
            raise self.refuse(name, "a file cannot replace the destination itself")
        self.reserve(name, size)
        path = self.target(name, rel)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     _file_mode(mode))
        written = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                # Declared sizes can lie (zip); count what really comes out too.
                if self.total + written > self.max_bytes:
                    raise self.refuse(name, f"extracting it would exceed {self.max_bytes:,} "
                                            "bytes (decompression bomb?)")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        self.total += written

    def symlink(self, name: str, link_target: str) -> None:
        rel = self.relative(name)
        if rel is None:
            raise self.refuse(name, "a symlink cannot replace the destination itself")
        if not link_target or link_target.startswith("/") or "\x00" in link_target:
            raise self.refuse(name, f"symlink to {link_target!r} leaves the destination")
        lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link_target))
        if lexical == ".." or lexical.startswith("../"):
            raise self.refuse(name, f"symlink to {link_target!r} leaves the destination")
        path = self.target(name, rel)
        if not self.inside(os.path.join(os.path.dirname(path), link_target)):
            raise self.refuse(name, f"symlink to {link_target!r} leaves the destination")
        os.symlink(link_target, path)
        self.symlinks.append(path)

    def hardlink(self, name: str, link_target: str) -> None:
        rel = self.relative(name)
        if rel is None:
            raise self.refuse(name, "a hardlink cannot replace the destination itself")
        if link_target.startswith("/"):
            raise self.refuse(name, f"hardlink to {link_target!r} leaves the destination")
        parts = [p for p in link_target.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise self.refuse(name, f"hardlink to {link_target!r} leaves the destination")
        source = os.path.join(self.root, *parts)
        if not self.inside(source):
            raise self.refuse(name, f"hardlink to {link_target!r} leaves the destination")
        real = os.path.realpath(source)
        if not os.path.isfile(real):
            raise self.refuse(name, f"hardlink to {link_target!r}, which is not an extracted file")
        path = self.target(name, rel)
        try:
            os.link(real, path)
        except OSError:
            shutil.copyfile(real, path)  # filesystems without hardlinks

    def check_links(self) -> None:
        """Re-check every symlink once the tree is complete (later members may move targets)."""
        for path in self.symlinks:
            if os.path.islink(path) and not self.inside(path):
                rel = os.path.relpath(path, self.root)
                raise self.refuse(rel, f"symlink to {os.readlink(path)!r} leaves the destination")


def _extract_tar(archive: Path, writer: _TreeWriter) -> None:
    with tarfile.open(archive, mode="r:*") as tar:
        # Iterating reads headers lazily, so the member cap stops a header flood early.
        for member in tar:
            name = member.name
            writer.count(name)
            if member.isfile():  # REGTYPE, AREGTYPE, CONTTYPE and GNU sparse files
                writer.reserve(name, member.size)
                source = tar.extractfile(member)
                if source is None:
                    raise writer.refuse(name, "unreadable file member")
                with source:
                    writer.file(name, source, member.size, member.mode)
            elif member.isdir():
                writer.directory(name)
            elif member.issym():
                writer.symlink(name, member.linkname)
            elif member.islnk():
                writer.hardlink(name, member.linkname)
            elif member.ischr() or member.isblk():
                raise writer.refuse(name, "device node")
            elif member.isfifo():
                raise writer.refuse(name, "fifo")
            else:
                raise writer.refuse(name, f"unsupported member type {member.type!r}")
        _drain(tar, writer)


def _drain(tar: tarfile.TarFile, writer: _TreeWriter) -> None:
    """Read the rest of a compressed tar so that the decompressor checks its CRC.

    tarfile stops at the end-of-archive blocks and never reads the gzip/bz2/xz trailer, so a
    corrupted member would otherwise extract as silently wrong bytes.
    """
    stream = tar.fileobj
    if stream is None or not hasattr(stream, "read"):
        return
    trailing = 0
    while chunk := stream.read(_CHUNK):
        trailing += len(chunk)
        if writer.total + trailing > writer.max_bytes:
            raise writer.refuse("<data after the end of the archive>",
                                f"more than {writer.max_bytes:,} bytes (decompression bomb?)")


def _extract_zip(archive: Path, writer: _TreeWriter) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > writer.max_members:
            raise writer.refuse(infos[writer.max_members].filename,
                                f"more than {writer.max_members:,} members "
                                "(raise max_members if this archive is genuine)")
        declared = sum(max(info.file_size, 0) for info in infos)
        if declared > writer.max_bytes:
            biggest = max(infos, key=lambda i: i.file_size)
            writer.reserve(biggest.filename, declared)
        for info in infos:
            # The zip spec says "/" only; backslashes come from Windows tools and would
            # otherwise hide "..\\" traversal from the checks below.
            name = info.filename.replace("\\", "/")
            writer.count(name)
            unix_mode = info.external_attr >> 16
            kind = stat.S_IFMT(unix_mode) if unix_mode else 0
            if info.is_dir() or kind == stat.S_IFDIR:
                writer.directory(name)
            elif kind == stat.S_IFLNK:
                if info.file_size > _MAX_ZIP_SYMLINK_TARGET:
                    raise writer.refuse(name, "symlink target too long")
                writer.symlink(name, zf.read(info).decode("utf-8", "surrogateescape"))
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                raise writer.refuse(name, "device node")
            elif kind == stat.S_IFIFO:
                raise writer.refuse(name, "fifo")
            elif kind in (0, stat.S_IFREG):
                with zf.open(info) as source:
                    writer.file(name, source, info.file_size, unix_mode or 0o644)
            else:
                raise writer.refuse(name, f"unsupported member type {oct(kind)}")


def _container(path: Path) -> str | None:
    """The compression or archive format the first bytes announce, if any."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def _file_mode(mode: int) -> int:
    # Owner can always read and write; exec bits survive (scripts), special bits never do.
    return (mode & 0o777) | 0o600




def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["ArchiveKind", "BOMB_FLOOR", "BOMB_RATIO", "DEFAULT_MAX_MEMBERS", "ExtractResult",
           "archive_kind", "default_max_bytes", "extract"]
