"""`ckptkit.load(framework="torch")` builds tensors from ckptkit's own reading of the pickle:
equal to `torch.load(weights_only=True)` on real files, and refusing hostile ones unrun."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest

import ckptkit
from ckptkit.errors import FormatError, UnsafeContentError
from tests.checkpoints import mixed_dtype_state_dict, save_torch, tiny_training_state
from tests.conftest import run_main

torch = pytest.importorskip("torch")


def assert_same(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal values, and tensors equal bit for bit with the same dtype, shape, stride and
    storage offset (a view stays a view)."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        assert ours.dtype == theirs.dtype, where
        assert ours.shape == theirs.shape, where
        assert ours.stride() == theirs.stride(), where
        assert ours.storage_offset() == theirs.storage_offset(), where
        assert ours.untyped_storage().nbytes() == theirs.untyped_storage().nbytes(), where
        assert ours.requires_grad is False
        if theirs.numel():
            width = theirs.element_size()
            as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
            if theirs.dtype.is_complex:
                ours, theirs = torch.view_as_real(ours), torch.view_as_real(theirs)
                width //= 2
            assert torch.equal(ours.contiguous().view(as_int[width]),
                               theirs.contiguous().view(as_int[width])), where
        return
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
        return
    if isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) or isinstance(theirs, torch.Size), where
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
        return
    assert ours == theirs or (ours != ours and theirs != theirs), where  # NaN is NaN


def shared(a: Any, b: Any) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.fixture(params=[False, True], ids=["zip", "legacy"])
def legacy(request: pytest.FixtureRequest) -> bool:
    return request.param


def test_training_checkpoint_equals_weights_only_load(tmp_path: Path, legacy: bool) -> None:
    path = save_torch(tiny_training_state(), tmp_path / "step.pt", legacy=legacy)
    assert_same(ckptkit.load(path, framework="torch"), torch.load(path, weights_only=True))


def test_every_dtype_view_and_slice_matches(tmp_path: Path, legacy: bool) -> None:
    state = mixed_dtype_state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state.update({
        "i16": torch.tensor([-3, 7], dtype=torch.int16), "i8": torch.tensor([-1], dtype=torch.int8),
        "f8e5": torch.ones(3).to(torch.float8_e5m2), "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "strided": base[:, ::2], "offset_col": base[1:, 3], "expanded": torch.ones(1).expand(5),
        "permuted": torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1),
    })
    if legacy:  # torch's legacy loader itself cannot read back untyped (uint16, float8) storages
        state = {k: v for k, v in state.items() if k not in ("f8", "f8e5", "u16")}
    path = save_torch(state, tmp_path / "mixed.pt", legacy=legacy)
    ours = ckptkit.load(path, framework="torch")
    assert_same(ours, torch.load(path, weights_only=True))
    assert not ours["strided"].is_contiguous() and ours["expanded"].stride() == (0,)
    assert shared(ours["view_row"], ours["w32"]) and shared(ours["transposed"], ours["w32"])


def test_shared_storage_stays_shared(tmp_path: Path, legacy: bool) -> None:
    weight = torch.randn(8, 4)
    state = {"embed.weight": weight, "lm_head.weight": weight, "half": weight[4:],
             "other": torch.zeros(2)}
    path = save_torch(state, tmp_path / "tied.pt", legacy=legacy)
    ours = ckptkit.load(path, framework="torch")
    assert_same(ours, torch.load(path, weights_only=True))
    assert shared(ours["embed.weight"], ours["lm_head.weight"])
    assert shared(ours["half"], ours["embed.weight"])
    assert not shared(ours["other"], ours["embed.weight"])
    ours["embed.weight"][0, 0] = 42.0  # one storage: a write shows through every view of it
    assert ours["lm_head.weight"][0, 0] == 42.0


def test_nested_containers_and_optimizer_state(tmp_path: Path, legacy: bool) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    obj = {"ordered": collections.OrderedDict([("b", torch.ones(2)), ("a", torch.zeros(1))]),
           "list": [torch.tensor(1), [torch.tensor([True, False])], "text"],
           "tuple": (1, 2.5, None, torch.full((2,), 7, dtype=torch.int32)),
           "optimizer": opt.state_dict(), "size": torch.Size([3, 4]), "epoch": 3}
    path = save_torch(obj, tmp_path / "nested.pt", legacy=legacy)
    ours = ckptkit.load(path, framework="torch")
    assert_same(ours, torch.load(path, weights_only=True))
    assert list(ours["ordered"]) == ["b", "a"]
    assert ours["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_torch_unpickler_is_never_called(tmp_path: Path, legacy: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_torch(tiny_training_state(), tmp_path / "s.pt", legacy=legacy)
    expected = torch.load(path, weights_only=True)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("torch's loader was called")

    import torch._weights_only_unpickler as wou

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    monkeypatch.setattr(wou, "load", refuse)
    monkeypatch.setattr(wou.Unpickler, "load", refuse)
    assert_same(ckptkit.load(path, framework="torch"), expected)


def test_zip_storages_are_memory_mapped_copy_on_write(tmp_path: Path) -> None:
    path = save_torch({"w": torch.arange(16, dtype=torch.float32)}, tmp_path / "w.pt")
    before = path.read_bytes()
    loaded = ckptkit.load(path, framework="torch")
    loaded["w"] += 1  # a private mapping: the file is not written
    assert path.read_bytes() == before
    assert loaded["w"][0] == 1.0


def test_custom_class_is_refused_like_weights_only(tmp_path: Path) -> None:
    import argparse

    path = save_torch({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, tmp_path / "a.pt")
    with pytest.raises(FormatError, match="argparse.Namespace.*framework='numpy'"):
        ckptkit.load(path, framework="torch")


# --- hostile files: what bypassed weights_only on older torch never runs here ---------------

class _Touch:
    """Pickles as a call that creates ``path`` (what the payload would do if it ran)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _hostile_zip(path: Path, sentinel: Path) -> Path:
    """A torch zip whose data.pkl builds the state dict through a payload."""
    good = path.with_name("good.pt")
    torch.save({"w": torch.ones(2)}, good)
    payload = pickle.dumps({"w": _Touch(sentinel)}, protocol=2)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, payload if info.filename.endswith("/data.pkl") else data)
    return path


def _hostile_legacy(path: Path, sentinel: Path) -> Path:
    """A legacy file whose system-info pickle (read before any check of the object) calls
    the payload: legacy loading was the route of CVE-2025-32434."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    stream = io.BytesIO(data)
    for _ in range(2):  # magic number, protocol version
        pickle.load(stream)
    start = stream.tell()
    pickle.load(stream)  # system info
    hostile = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                            "type_sizes": _Touch(sentinel)}, protocol=2)
    path.write_bytes(data[:start] + hostile + data[stream.tell():])
    return path


@pytest.mark.parametrize("make", [_hostile_zip, _hostile_legacy], ids=["zip", "legacy"])
def test_hostile_files_are_refused_and_nothing_runs(tmp_path: Path, make: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "pwned"
    path = make(tmp_path / "hostile.pt", sentinel)
    with pytest.raises(UnsafeContentError, match="builtins.open|io.open"):
        ckptkit.load(path, framework="torch")
    code, _out, err = run_main(capsys, "inspect", str(path))
    assert code == 5 and "Traceback" not in err
    assert not sentinel.exists()


def test_legacy_tar_layout_of_cve_2025_32434_is_not_loaded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The pre-1.0 tar layout, the route of CVE-2025-32434 past weights_only: ckptkit reads no
    such format, so load refuses it (nothing runs) and scan names the payload."""
    import tarfile

    sentinel = tmp_path / "pwned"
    members = {"sys_info": pickle.dumps({"protocol_version": 1001, "little_endian": True}),
               "storages": pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
               "tensors": pickle.dumps(0, protocol=2),
               "pickle": pickle.dumps({"hps": _Touch(sentinel)}, protocol=2)}
    path = tmp_path / "legacy.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(FormatError, match="not a checkpoint format"):
        ckptkit.load(path, framework="torch")
    code, out, _err = run_main(capsys, "scan", str(path))
    assert code == 5 and "unsafe" in out
    assert not sentinel.exists()
