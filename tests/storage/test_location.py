"""storage/location.py: the one read interface, its coalesced header reads, listings and errors.

Real files written by the real libraries; a backend of our own (bytes in a dict, every read
counted as a round trip) is registered in ``OPENERS`` to show that readers reach their bytes
only through a Location.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

import ckptkit
from ckptkit.errors import NotFoundError, UsageError
from ckptkit.storage import location
from ckptkit.storage.location import PREFETCH, Entry, LocalLocation, Location, locate


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file LocalLocation.read opens (one per read that reaches the disk)."""
    seen: list[str] = []
    real = open

    def counting(path: object, *args: object, **kwargs: object):  # noqa: ANN202
        seen.append(os.fspath(path))  # type: ignore[arg-type]
        return real(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(location, "open", counting, raising=False)
    return seen


def write_safetensors(path: Path, tensors: int = 8) -> Path:
    from safetensors.numpy import save_file

    save_file({f"layer{i}.weight": np.full((64, 64), i, np.float32) for i in range(tensors)},
              str(path), metadata={"step": "7"})
    return path


# --- coalescing ----------------------------------------------------------------------------------

def test_reads_inside_the_first_prefetch_cost_one_disk_read(tmp_path: Path,
                                                            opens: list[str]) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    loc = locate(path)
    assert loc.read(0, 8) == bytes(range(8))
    assert loc.read(8, 100) == bytes(range(8, 108))
    assert loc.read(PREFETCH - 4, 4) == (bytes(range(256)) * 1024)[PREFETCH - 4:PREFETCH]
    assert len(opens) == 1
    # Past the prefetch, each read goes to the disk, and nothing more is kept.
    assert loc.read(PREFETCH, 4) == bytes(range(4))
    assert loc.read(200_000, 16) == (bytes(range(256)) * 1024)[200_000:200_016]
    assert len(opens) == 3


def test_a_read_larger_than_the_prefetch_is_not_kept(tmp_path: Path, opens: list[str]) -> None:
    data = os.urandom(3 * PREFETCH)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    loc = LocalLocation(path)
    assert loc.read(0, len(data)) == data
    assert loc._head is None  # a whole-file read does not pin a copy on the location
    assert loc.read(0, 4) == data[:4] and loc.read(10, 4) == data[10:14]
    assert len(opens) == 2


def test_inspecting_a_safetensors_file_reads_the_disk_once(tmp_path: Path,
                                                          opens: list[str]) -> None:
    """Sniffing by every reader in turn, then the header: all inside one coalesced read."""
    path = write_safetensors(tmp_path / "model.safetensors")
    info = ckptkit.inspect(path)
    assert info.format == "safetensors" and info.metadata["step"] == "7"
    assert opens == [str(path)]


def test_a_read_at_the_end_of_a_file_is_short(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    loc = locate(path)
    assert loc.read(4, 100) == b"ef" and loc.read(6, 10) == b"" and loc.size() == 6
    with pytest.raises(ValueError):
        loc.read(-1, 4)


# --- listing and naming --------------------------------------------------------------------------

def test_list_child_sibling_parent_and_walk(tmp_path: Path) -> None:
    (tmp_path / "variables").mkdir()
    (tmp_path / "variables" / "variables.index").write_bytes(b"i" * 10)
    (tmp_path / "saved_model.pb").write_bytes(b"p" * 3)
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    loc = locate(tmp_path)
    assert loc.is_dir() and not loc.is_file() and loc.exists()
    entries = loc.list()
    assert [e.name for e in entries] == ["saved_model.pb", "variables"]  # sorted, no dangling
    assert entries[0] == Entry("saved_model.pb", False, 3, entries[0].mtime)
    assert entries[1].is_dir and entries[1].size is None
    index = loc.child("variables").child("variables.index")
    assert index.is_file() and index.size() == 10 and index.name == "variables.index"
    assert index.sibling("variables.data-00000-of-00001").exists() is False
    assert index.parent().parent() == loc
    assert str(index) == str(tmp_path / "variables" / "variables.index")
    # walk names every file os.walk sees, a dangling link included (list() skips it).
    assert sorted(p.name for p in loc.walk()) == ["dangling", "saved_model.pb",
                                                   "variables.index"]


def test_locate_takes_paths_strings_file_urls_and_locations(tmp_path: Path) -> None:
    path = tmp_path / "a b.bin"
    path.write_bytes(b"x")
    assert locate(path) == locate(str(path)) == LocalLocation(path)
    assert locate(path.as_uri()) == LocalLocation(path)  # file://, percent-decoded
    loc = locate(path)
    assert locate(loc) is loc
    assert os.fspath(loc) == str(path)
    assert isinstance(loc, Location)


# --- errors --------------------------------------------------------------------------------------

def test_size_of_a_missing_file_is_a_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as exc:
        locate(tmp_path / "nope.pt").size()
    assert exc.value.path == str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        locate(tmp_path / "nope.pt").read(0, 4)
    with pytest.raises(FileNotFoundError):
        locate(tmp_path / "nope").list()


def test_a_scheme_without_an_opener_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(location.OPENERS, "nosuchscheme", raising=False)
    with pytest.raises(UsageError) as exc:
        locate("nosuchscheme://bucket/model.pt")
    assert "nosuchscheme://bucket/model.pt" in exc.value.message
    assert ckptkit.errors.ExitCode.USAGE == exc.value.exit_code
    assert not location.is_url("C:/models/x.pt") and location.is_url("s3://b/k")


# --- a backend of our own: readers never go around the interface -------------------------------

class MemoryLocation:
    """Files held in a dict, named ``mem://<path>``; every read is one counted round trip."""

    def __init__(self, store: dict[str, bytes], path: str, log: list[tuple[int, int]]):
        self.store, self.path, self.log = store, path.rstrip("/") or "/", log

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def __str__(self) -> str:
        return f"mem://{self.path.lstrip('/')}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryLocation) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_file(self) -> bool:
        return self.path in self.store

    def is_dir(self) -> bool:
        return any(k.startswith(self.path + "/") for k in self.store)

    def size(self) -> int:
        if self.path not in self.store:
            raise NotFoundError(f"{self}: no such file", path=str(self))
        return len(self.store[self.path])

    def read(self, offset: int, length: int) -> bytes:
        self.log.append((offset, length))
        return self.store[self.path][offset:offset + length]

    def open(self) -> BinaryIO:
        self.log.append((0, -1))
        return io.BytesIO(self.store[self.path])

    def list(self) -> list[Entry]:
        names: dict[str, Entry] = {}
        for key, data in self.store.items():
            if key.startswith(self.path + "/"):
                first, _, rest = key[len(self.path) + 1:].partition("/")
                names[first] = Entry(first, bool(rest), None if rest else len(data))
        return [names[n] for n in sorted(names)]

    def child(self, name: str) -> MemoryLocation:
        return MemoryLocation(self.store, posixpath.join(self.path, name), self.log)

    def sibling(self, name: str) -> MemoryLocation:
        return self.parent().child(name)

    def parent(self) -> MemoryLocation:
        return MemoryLocation(self.store, posixpath.dirname(self.path), self.log)


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, bytes], list[tuple[int, int]]]:
    store: dict[str, bytes] = {}
    log: list[tuple[int, int]] = []
    monkeypatch.setitem(location.OPENERS, "mem",
                        lambda url: MemoryLocation(store, "/" + url.split("://", 1)[1], log))
    return store, log


def test_inspect_reads_a_safetensors_header_only_through_the_location(
        tmp_path: Path, memory: tuple[dict[str, bytes], list[tuple[int, int]]]) -> None:
    store, log = memory
    data = write_safetensors(tmp_path / "m.safetensors", tensors=32).read_bytes()
    store["/models/m.safetensors"] = data
    info = ckptkit.inspect("mem://models/m.safetensors")
    assert info.format == "safetensors" and info.path == "mem://models/m.safetensors"
    assert info.tensor_count == 32 and info.size_bytes == len(data)
    header = 8 + int.from_bytes(data[:8], "little")
    # No tensor byte is read, and no whole-file stream is opened: ranged reads only.
    assert all(length >= 0 and offset + length <= header for offset, length in log), log
    assert len(log) <= 8, log


def test_torch_zip_and_npz_readers_work_on_any_location(
        tmp_path: Path, memory: tuple[dict[str, bytes], list[tuple[int, int]]]) -> None:
    torch = pytest.importorskip("torch")
    store, _log = memory
    torch.save({"model": {"w": torch.ones(4, 4)}, "step": 3}, tmp_path / "t.pt")
    np.savez(tmp_path / "a.npz", **{"params/dense/kernel": np.zeros((2, 3), np.float32)})
    store["/r/t.pt"] = (tmp_path / "t.pt").read_bytes()
    store["/r/a.npz"] = (tmp_path / "a.npz").read_bytes()
    info = ckptkit.inspect("mem://r/t.pt")
    assert info.format == "torch-zip" and info.metadata["step"] == 3
    assert info.tensor_count == 1
    loaded = ckptkit.load("mem://r/t.pt", "numpy")
    assert loaded["model"]["w"].tolist() == np.ones((4, 4), np.float32).tolist()
    npz = ckptkit.inspect("mem://r/a.npz")
    assert npz.format == "npz" and npz.tensor_count == 1


def test_a_missing_remote_file_is_not_found(
        memory: tuple[dict[str, bytes], list[tuple[int, int]]]) -> None:
    with pytest.raises(NotFoundError) as exc:
        ckptkit.inspect("mem://nowhere/model.pt")
    assert "mem://nowhere/model.pt" in exc.value.message


def test_the_json_of_inspect_names_the_location_as_given(
        tmp_path: Path, memory: tuple[dict[str, bytes], list[tuple[int, int]]]) -> None:
    store, _log = memory
    store["/x.safetensors"] = write_safetensors(tmp_path / "x.safetensors", 1).read_bytes()
    assert json.loads(json.dumps(ckptkit.inspect("mem://x.safetensors").to_dict()))[
        "path"] == "mem://x.safetensors"


def test_plain_pickles_read_through_any_location(
        tmp_path: Path, memory: tuple[dict[str, bytes], list[tuple[int, int]]]) -> None:
    """A remote file object has no descriptor: the pickle stream learns its size by seeking."""
    import pickle

    from ckptkit.scan.scanning import scan

    store, _log = memory
    params = {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
              "step": 7}
    store["/r/params.pkl"] = pickle.dumps(params, protocol=4)
    info = ckptkit.inspect("mem://r/params.pkl")
    assert info.format == "pickle" and info.tensor_count == 1
    (result,) = scan(["mem://r/params.pkl"]).results
    assert result.verdict == "safe", result.note
