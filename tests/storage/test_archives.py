"""Safe archive extraction: hostile members are refused by name, nothing is written outside
the destination, failures leave no destination and no temporary tree, good archives extract."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from ckptkit.storage import archives
from ckptkit.errors import IntegrityError, UsageError
from tests import figures

Member = tuple[tarfile.TarInfo, bytes | None]


def info(name: str, kind: bytes = tarfile.REGTYPE, *, size: int = 0, link: str = "",
         mode: int = 0o644) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.size, member.linkname, member.mode = kind, size, link, mode
    return member


def file(name: str, data: bytes, mode: int = 0o644) -> Member:
    return info(name, size=len(data), mode=mode), data


def write_tar(path: Path, members: list[Member], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


def write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry, data in entries:
            zf.writestr(entry, data)
    return path


@pytest.fixture
def area(tmp_path: Path) -> dict[str, Path]:
    """``in/`` for archives, ``work/out`` as destination, ``outside/`` must stay empty."""
    paths = {name: tmp_path / name for name in ("in", "work", "outside")}
    for path in paths.values():
        path.mkdir()
    paths["dest"] = paths["work"] / "out"
    return paths


def refused(archive: Path, area: dict[str, Path], member: str, *, attack: bool = True,
            **limits: int) -> IntegrityError:
    """Extraction fails naming ``member``; no destination, no temp tree, nothing outside.

    ``attack``: the member is hostile, so the refusal counts for docs/security.md.
    """
    with pytest.raises(IntegrityError) as err:
        archives.extract(archive, area["dest"], **limits)
    assert repr(member) in str(err.value), str(err.value)
    assert "\n" not in str(err.value) and err.value.hint
    assert list(area["work"].iterdir()) == []
    assert list(area["outside"].iterdir()) == []
    if attack:
        figures.count("archive-attacks")
    return err.value


# --- good archives ---------------------------------------------------------------------------

def test_tar_gz_extracts_files_dirs_links_and_modes(area: dict[str, Path]) -> None:
    archive = write_tar(area["in"] / "model.bin", [  # the name says nothing: content decides
        (info(".", tarfile.DIRTYPE, mode=0o755), None),
        file("./saved_model.pb", b"pb"),
        (info("./variables", tarfile.DIRTYPE, mode=0o755), None),
        file("./variables/variables.index", b"index"),
        file("./bin/run.sh", b"#!/bin/sh\n", mode=0o4755),
        (info("./latest", tarfile.SYMTYPE, link="variables/variables.index"), None),
        (info("./variables/up", tarfile.SYMTYPE, link="../saved_model.pb"), None),
        (info("./copy.pb", tarfile.LNKTYPE, link="./saved_model.pb"), None),
    ])
    result = archives.extract(archive, area["dest"])
    dest = area["dest"]
    assert (result.path, result.kind, result.members) == (dest, "tar", 8)
    assert result.bytes == len(b"pb") + len(b"index") + len(b"#!/bin/sh\n")
    assert (dest / "saved_model.pb").read_bytes() == b"pb"
    assert (dest / "latest").read_bytes() == b"index" and (dest / "latest").is_symlink()
    assert (dest / "variables" / "up").read_bytes() == b"pb"
    assert (dest / "copy.pb").stat().st_ino == (dest / "saved_model.pb").stat().st_ino
    mode = (dest / "bin" / "run.sh").stat().st_mode
    assert mode & stat.S_IXUSR and not mode & stat.S_ISUID
    assert sorted(p.name for p in area["work"].iterdir()) == ["out"]


def test_zip_extracts(area: dict[str, Path]) -> None:
    archive = write_zip(area["in"] / "bundle.tar.gz", [  # misleading suffix on purpose
        ("config.json", b"{}"), ("weights/", b""), ("weights/model.bin", b"\x00" * 1000)])
    result = archives.extract(archive, area["dest"])
    assert result.kind == "zip" and result.members == 3 and result.bytes == 1002
    assert (area["dest"] / "weights" / "model.bin").stat().st_size == 1000


def test_plain_and_xz_tars_and_empty_existing_dest(area: dict[str, Path]) -> None:
    for mode in ("w", "w:xz", "w:bz2"):
        archive = write_tar(area["in"] / f"a{mode[-2:]}", [file("x.txt", b"x")], mode=mode)
        area["dest"].mkdir()  # an empty directory may be replaced
        archives.extract(archive, area["dest"])
        assert (area["dest"] / "x.txt").read_bytes() == b"x"
        (area["dest"] / "x.txt").unlink()
        area["dest"].rmdir()


# --- hostile tar members -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/../../x", "./../x"])
def test_traversal_is_refused(area: dict[str, Path], name: str) -> None:
    archive = write_tar(area["in"] / "a.tgz", [file("ok.txt", b"ok"), file(name, b"evil")])
    refused(archive, area, name)
    assert not (area["work"].parent / "x").exists()


def test_absolute_path_is_refused(area: dict[str, Path]) -> None:
    target = str(area["outside"] / "abs.txt")
    archive = write_tar(area["in"] / "a.tgz", [file(target, b"evil")])
    refused(archive, area, target)


@pytest.mark.parametrize("link", ["../../outside", "/etc", "a/../../../outside", "..", "/"])
def test_symlink_leaving_dest_is_refused(area: dict[str, Path], link: str) -> None:
    archive = write_tar(area["in"] / "a.tgz", [
        (info("escape", tarfile.SYMTYPE, link=link), None), file("escape/pwned", b"evil")])
    refused(archive, area, "escape")


@pytest.mark.parametrize("then_write", [False, True])
def test_symlink_chain_cannot_escape(area: dict[str, Path], then_write: bool) -> None:
    # Each link is inside when created; "a" leaves only once "sub/deep" exists.
    members: list[Member] = [
        (info("sub", tarfile.DIRTYPE, mode=0o755), None),
        (info("a", tarfile.SYMTYPE, link="sub/deep/.."), None),
        (info("sub/deep", tarfile.SYMTYPE, link=".."), None)]
    if then_write:
        members.append(file("a/pwned", b"evil"))
    archive = write_tar(area["in"] / "a.tgz", members)
    refused(archive, area, "a/pwned" if then_write else "a")
    assert not (area["work"].parent / "pwned").exists()


@pytest.mark.parametrize("link", ["../outside/secret", "/etc/passwd", "missing.txt"])
def test_hardlink_leaving_dest_is_refused(area: dict[str, Path], link: str) -> None:
    (area["outside"] / "secret").write_text("s")
    archive = write_tar(area["in"] / "a.tgz", [(info("h", tarfile.LNKTYPE, link=link), None)])
    with pytest.raises(IntegrityError, match="'h'"):
        archives.extract(archive, area["dest"])
    assert list(area["work"].iterdir()) == []
    assert [p.name for p in area["outside"].iterdir()] == ["secret"]
    assert (area["outside"] / "secret").stat().st_nlink == 1
    figures.count("archive-attacks")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_are_refused(area: dict[str, Path], kind: bytes) -> None:
    archive = write_tar(area["in"] / "a.tgz", [(info("dev/null", kind), None)])
    refused(archive, area, "dev/null")


def test_compression_bomb_is_refused(area: dict[str, Path]) -> None:
    archive = write_tar(area["in"] / "bomb.tgz", [file("zeros", b"\0" * (4 << 20))])
    assert archive.stat().st_size < 64 << 10
    refused(archive, area, "zeros", max_bytes=1 << 20)


def test_declared_size_over_default_cap_is_refused_before_reading(area: dict[str, Path]) -> None:
    huge = info("huge.bin", size=archives.BOMB_FLOOR + 1)
    raw = huge.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096  # header claims 1 GiB + 1, data absent
    archive = area["in"] / "liar.tgz"
    archive.write_bytes(gzip.compress(raw))
    refused(archive, area, "huge.bin")


def test_member_count_is_capped(area: dict[str, Path]) -> None:
    archive = write_tar(area["in"] / "many.tgz", [file(f"f{i}", b"") for i in range(20)])
    refused(archive, area, "f10", max_members=10)


def test_data_after_the_end_of_the_tar_counts_toward_the_cap(area: dict[str, Path]) -> None:
    # tarfile stops at the end-of-archive blocks; the gzip stream goes on for 4 MiB.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        member, data = file("ok.txt", b"ok")
        tar.addfile(member, io.BytesIO(data))
    archive = area["in"] / "tail.tgz"
    archive.write_bytes(gzip.compress(raw.getvalue() + b"\0" * (4 << 20)))
    assert archive.stat().st_size < 64 << 10
    refused(archive, area, "<data after the end of the archive>", max_bytes=1 << 20)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_traversal_in_a_long_name_is_refused(area: dict[str, Path], fmt: int) -> None:
    name = "a" * 120 + "/../../../x"  # over 100 bytes: a GNU longname or a PAX path record
    archive = area["in"] / "long.tgz"
    with tarfile.open(archive, "w:gz", format=fmt) as tar:
        member, data = file(name, b"evil")
        tar.addfile(member, io.BytesIO(data))
    refused(archive, area, name)
    assert not (area["work"].parent / "x").exists()


def test_gzip_crc_mismatch_after_the_last_member_is_caught(area: dict[str, Path]) -> None:
    archive = write_tar(area["in"] / "a.tgz", [file("w.bin", os.urandom(3000))])
    data = bytearray(archive.read_bytes())
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer, which tarfile alone never reads
    archive.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="truncated or corrupt"):
        archives.extract(archive, area["dest"])
    assert list(area["work"].iterdir()) == []


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_truncated_compressed_tar(area: dict[str, Path], mode: str) -> None:
    archive = write_tar(area["in"] / "a.tar", [file("w.bin", os.urandom(50_000))], mode=mode)
    archive.write_bytes(archive.read_bytes()[:20_000])
    with pytest.raises(IntegrityError, match="truncated or corrupt"):
        archives.extract(archive, area["dest"])
    assert list(area["work"].iterdir()) == []


# --- hostile zip entries -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../evil.txt", "a/../../evil.txt", "..\\evil.txt",
                                  "/abs/evil.txt", "C:/evil.txt"])
def test_zip_slip_is_refused(area: dict[str, Path], name: str) -> None:
    archive = area["in"] / "slip.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        entry = zipfile.ZipInfo("placeholder")
        entry.filename = name  # ZipInfo() would sanitise it; attackers do not
        zf.writestr(entry, b"evil")
    refused(archive, area, name.replace("\\", "/"))
    assert not (area["work"].parent / "evil.txt").exists()


@pytest.mark.parametrize("target", [b"../../outside", b"/etc", b"..", b"a/../../outside", b""])
def test_zip_symlink_out_is_refused(area: dict[str, Path], target: bytes) -> None:
    link = zipfile.ZipInfo("escape")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = write_zip(area["in"] / "l.zip", [(link, target), ("escape/pwned", b"evil")])
    refused(archive, area, "escape")


@pytest.mark.parametrize("kind", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO])
def test_zip_devices_and_fifos_are_refused(area: dict[str, Path], kind: int) -> None:
    dev = zipfile.ZipInfo("dev")
    dev.external_attr = (kind | 0o600) << 16
    archive = write_zip(area["in"] / "d.zip", [("ok.txt", b"ok"), (dev, b"")])
    refused(archive, area, "dev")


def test_zip_member_count_is_capped(area: dict[str, Path]) -> None:
    archive = write_zip(area["in"] / "many.zip", [(f"f{i}", b"") for i in range(20)])
    refused(archive, area, "f10", max_members=10)


def test_zip_lying_about_its_sizes_is_refused(area: dict[str, Path]) -> None:
    """The headers say 10 bytes, the deflate stream holds 4 MiB: reading stops at the declared
    size, so it never expands, and the CRC of what was read does not match."""
    archive = write_zip(area["in"] / "liar.zip", [("zeros", b"\0" * (4 << 20))])
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        entry = zf.getinfo("zeros")
    real = (4 << 20).to_bytes(4, "little")
    for at in (entry.header_offset + 22, data.rindex(b"PK\x01\x02") + 24):
        assert data[at:at + 4] == real  # uncompressed size, local header and central directory
        data[at:at + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    err = refused(archive, area, "zeros", max_bytes=1 << 20)
    assert "Bad CRC-32" in str(err)


def test_zip_bomb_is_refused(area: dict[str, Path]) -> None:
    archive = write_zip(area["in"] / "bomb.zip", [("zeros", b"\0" * (4 << 20))])
    refused(archive, area, "zeros", max_bytes=1 << 20)


# --- misuse ---------------------------------------------------------------------------------------

def test_not_an_archive(area: dict[str, Path]) -> None:
    page = area["in"] / "model.tar.gz"
    page.write_text("<!DOCTYPE html><html></html>")
    assert archives.archive_kind(page) is None
    with pytest.raises(IntegrityError, match="not a tar or zip"):
        archives.extract(page, area["dest"])


@pytest.mark.parametrize("second", ["dir", "file-below"])
def test_member_clashing_with_a_file_is_refused(area: dict[str, Path], second: str) -> None:
    clash = (info("x", tarfile.DIRTYPE, mode=0o755), None) if second == "dir" \
        else file("x/y", b"y")
    archive = write_tar(area["in"] / "a.tgz", [file("x", b"x"), clash])
    refused(archive, area, "x" if second == "dir" else "x/y", attack=False)


def test_existing_destination_is_not_overwritten(area: dict[str, Path]) -> None:
    archive = write_tar(area["in"] / "a.tgz", [file("x", b"x")])
    area["dest"].mkdir()
    (area["dest"] / "keep").write_text("mine")
    with pytest.raises(UsageError):
        archives.extract(archive, area["dest"])
    assert (area["dest"] / "keep").read_text() == "mine"


def test_default_cap() -> None:
    assert archives.default_max_bytes(10) == archives.BOMB_FLOOR
    assert archives.default_max_bytes(1 << 30) == 64 << 30
