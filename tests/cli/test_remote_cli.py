"""Commands on URLs: sources read from and outputs written to a local S3 (moto, through the
real s3fs/botocore), with the same results as on local files and nothing partial left."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_main
from tests.s3_store import S3Store, moto_endpoint, s3  # noqa: F401

pytest.importorskip("s3fs")


@pytest.fixture(autouse=True)
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def torch_checkpoint() -> bytes:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 5},
               buffer)
    return buffer.getvalue()


def test_strip_from_s3_to_s3(s3: S3Store, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(work := tmp_path / "work")
    source = s3.put("run/step_5.pt", torch_checkpoint())
    code, out, err = run_main(capsys, "strip", source, "-o", s3.url("deploy/model.pt"),
                              "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["source"], report["output"]) == (source, s3.url("deploy/model.pt"))
    assert "optimizer" in report["dropped"]
    body = s3.client.get_object(Bucket=s3.bucket, Key="deploy/model.pt")["Body"].read()
    state = torch.load(io.BytesIO(body), weights_only=True)
    assert set(state) == {"model", "step"}
    assert s3.uploads() == [] and list(work.iterdir()) == []


def test_convert_from_s3_to_s3(s3: S3Store, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from safetensors.numpy import save

    monkeypatch.chdir(work := tmp_path / "work")
    weights = {"encoder.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
    source = s3.put("models/enc.safetensors", save(weights))
    code, out, err = run_main(capsys, "convert", source, "--to", "npz", "-o",
                              s3.url("models/enc.npz"), "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == s3.url("models/enc.npz")
    body = s3.client.get_object(Bucket=s3.bucket, Key="models/enc.npz")["Body"].read()
    with np.load(io.BytesIO(body)) as arrays:
        assert np.array_equal(arrays["encoder.weight"], weights["encoder.weight"])
    assert list(work.iterdir()) == []


def test_output_to_a_missing_bucket_exits_4_and_leaves_nothing(
        s3: S3Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.chdir(work := tmp_path / "work")
    source = s3.put("run/step_5.pt", torch_checkpoint())
    code, out, err = run_main(capsys, "strip", source, "-o", "s3://no-such-bucket-x/m.pt")
    assert code == 4, err
    assert "no-such-bucket-x" in err and len(err.strip().splitlines()) == 1
    assert list(work.iterdir()) == []
