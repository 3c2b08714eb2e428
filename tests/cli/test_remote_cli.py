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


# --- reading: inspect, latest, cleanup on URLs ------------------------------------------------

def safetensors_blob(step: int, rows: int = 64) -> bytes:
    from safetensors.numpy import save

    return save({"w": np.ones((rows, 64), np.float32)}, metadata={"step": str(step)})


def test_inspect_https_reads_one_range_and_matches_local_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptkit.storage.remote import HEAD
    from ckptkit.testing.static import StaticServer

    (tmp_path / "served").mkdir()
    local = tmp_path / "served" / "model.safetensors"
    local.write_bytes(safetensors_blob(7, rows=8192))  # 2 MiB of tensor data
    code, expected, _err = run_main(capsys, "inspect", str(local), "--json")
    assert code == 0
    with StaticServer(tmp_path / "served", record=True, latency=0.05) as server:
        url = f"{server.base}/model.safetensors"
        code, out, err = run_main(capsys, "inspect", url, "--json")
        assert code == 0, err
        assert len(server.requests) == 1 and server.bytes_sent() == HEAD
    got, want = json.loads(out), json.loads(expected)
    assert got.pop("path") == url and want.pop("path") == str(local)
    assert got == want


def test_inspect_torch_zip_url_never_reads_tensor_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    from ckptkit.storage.remote import HEAD
    from ckptkit.storage.remote import TAIL
    from ckptkit.testing.static import StaticServer

    (tmp_path / "served").mkdir()
    local = tmp_path / "served" / "ckpt.pt"
    torch.save({"model": {"w": torch.randn(1024, 1024)}, "step": 3}, local)
    with StaticServer(tmp_path / "served", record=True) as server:
        code, out, err = run_main(capsys, "inspect", f"{server.base}/ckpt.pt", "--json")
        assert code == 0, err
        assert json.loads(out)["metadata"]["step"] == 3
        assert len(server.requests) <= 3
        assert server.bytes_sent() <= HEAD + TAIL < local.stat().st_size // 8


def test_inspect_s3_missing_is_4_and_truncated_is_3(
        s3: S3Store, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_main(capsys, "inspect", s3.url("absent.safetensors"))
    assert code == 4 and len(err.strip().splitlines()) == 1
    s3.put("cut.safetensors", safetensors_blob(1)[:-100])
    code, _out, err = run_main(capsys, "inspect", s3.url("cut.safetensors"))
    assert code == 3 and "truncated" in err


def put_run(s3: S3Store) -> None:
    for step in (100, 200, 300, 400):
        blob = safetensors_blob(step)
        s3.put(f"run/step_{step}.safetensors", blob if step < 400 else blob[:-100])
    s3.put("run/notes.txt", b"keep me")


def test_latest_s3_prefix_skips_the_truncated_newest(
        s3: S3Store, capsys: pytest.CaptureFixture[str]) -> None:
    put_run(s3)
    code, out, err = run_main(capsys, "latest", s3.url("run"), "--json")
    assert code == 0, err
    assert json.loads(out) == {"path": s3.url("run/step_300.safetensors"), "step": 300}
    assert "skipped " + s3.url("run/step_400.safetensors") in err


def test_cleanup_s3_prefix_plans_confirms_and_deletes_only_the_plan(
        s3: S3Store, capsys: pytest.CaptureFixture[str]) -> None:
    put_run(s3)
    code, out, err = run_main(capsys, "cleanup", s3.url("run/"), "--keep-last", "1",
                              "--dry-run", "--json")
    assert code == 0, err
    assert [d["path"] for d in json.loads(out)["deleted"]] == [
        s3.url("run/step_100.safetensors"), s3.url("run/step_200.safetensors")]
    assert len(s3.keys("run/")) == 5
    code, _out, err = run_main(capsys, "cleanup", s3.url("run/"), "--keep-last", "1")
    assert code == 2 and "--yes" in err  # no terminal to confirm on
    code, out, err = run_main(capsys, "cleanup", s3.url("run/"), "--keep-last", "1", "--yes")
    assert code == 0, err
    assert s3.keys("run/") == ["run/notes.txt", "run/step_300.safetensors",
                               "run/step_400.safetensors"]


def test_cleanup_s3_stops_when_an_object_was_rewritten_since_the_plan(s3: S3Store) -> None:
    from ckptkit.errors import DeletionStoppedError
    from ckptkit.runs.retention import plan_cleanup

    put_run(s3)
    plan = plan_cleanup(s3.url("run/"), keep_last=1)
    assert len(plan.deleted) == 2
    same_size = bytearray(safetensors_blob(100))
    same_size[-1] ^= 0xFF  # same size, other bytes: only the ETag tells
    s3.put("run/step_100.safetensors", bytes(same_size))
    with pytest.raises(DeletionStoppedError, match="step_100.safetensors changed") as caught:
        plan.execute()
    assert caught.value.deleted == ()
    assert len(s3.keys("run/")) == 5


def test_hf_urls_read_through_huggingface_hubs_filesystem(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    import subprocess
    import sys

    from ckptkit.testing.hf_hub import HfHubStandIn
    from tests.conftest import SRC

    blob = safetensors_blob(11, rows=4096)
    with HfHubStandIn() as hub:
        hub.add_repo("org/tiny", {"model.safetensors": blob, "config.json": b"{}"})
        env = {**hub.client_env(tmp_path / "hf"), "PYTHONPATH": str(SRC)}
        done = subprocess.run([sys.executable, "-m", "ckptkit", "inspect",
                               "hf://org/tiny/model.safetensors", "--json"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["metadata"] == {"step": "11"}
        cdn = [r for r in hub.cdn.hits() if r.method == "GET"]
        assert sum(r.sent for r in cdn) < len(blob) // 4  # the header, not the weights
        assert hub.cdn_authorized() == []
        missing = subprocess.run([sys.executable, "-m", "ckptkit", "inspect",
                                  "hf://org/tiny/absent.safetensors"],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert missing.returncode == 4, missing.stderr


def test_compare_and_diff_take_urls(s3: S3Store, capsys: pytest.CaptureFixture[str]) -> None:
    put_run(s3)
    code, out, err = run_main(capsys, "compare", s3.url("run/step_100.safetensors"),
                              s3.url("run/step_200.safetensors"), "--json")
    assert code == 0, err
    assert [r["path"] for r in json.loads(out)["rows"]] == [
        s3.url("run/step_100.safetensors"), s3.url("run/step_200.safetensors")]
    code, out, err = run_main(capsys, "diff", s3.url("run/step_100.safetensors"),
                              s3.url("run/step_200.safetensors"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["a"], report["b"]) == (s3.url("run/step_100.safetensors"),
                                          s3.url("run/step_200.safetensors"))


def test_library_inspect_load_and_latest_take_urls(s3: S3Store) -> None:
    import ckptkit

    put_run(s3)
    assert ckptkit.latest(s3.url("run/")).step == 300
    url = s3.url("run/step_300.safetensors")
    assert ckptkit.inspect(url).metadata == {"step": "300"}
    arrays = ckptkit.load(url, framework="numpy")
    assert np.array_equal(arrays["w"], np.ones((64, 64), np.float32))


def test_scan_s3_prefix_with_jobs_streams_the_same_verdicts(
        s3: S3Store, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(6):
        s3.put(f"models/m{i}.safetensors", safetensors_blob(i, rows=4))
    s3.put("models/notes.txt", b"trained on cats")
    reports = []
    for jobs in ("1", "4"):
        code, out, err = run_main(capsys, "scan", s3.url("models/"), "--jobs", jobs, "--json")
        assert code == 0, err
        reports.append(json.loads(out))
    assert reports[0] == reports[1]
    assert [f["verdict"] for f in reports[0]["files"]] == ["safe"] * 6
    assert [s["path"] for s in reports[0]["skipped"]] == [s3.url("models/notes.txt")]
