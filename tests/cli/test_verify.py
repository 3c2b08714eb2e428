"""``ckpt verify`` and the sharded/DCP side of ``ckpt inspect`` on the command line: exit
codes, one-line errors, the --json schema, and --hashes against a real Hugging Face cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ckptkit
from tests.conftest import run_main

SAMPLES = Path(ckptkit.__file__).parent / "samples"


def test_verify_complete_samples(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("fsdp_step_200", "hf_sharded", "thinker_step_200.pt", "model.safetensors",
                 "hf_sharded/model.safetensors.index.json", "tf_ckpt/ckpt-1.index",
                 "tf_ckpt/ckpt-1"):
        code, out, err = run_main(capsys, "verify", str(SAMPLES / name))
        assert code == 0, (name, out, err)
        assert out.startswith(f"{SAMPLES / name}: complete (")


def test_verify_json_names_each_problem_and_exits_3(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = Path(shutil.copytree(SAMPLES / "fsdp_step_200", tmp_path / "step-200"))
    (folder / "__0_0.distcp").unlink()
    data = folder / "__1_0.distcp"
    with open(data, "r+b") as fh:
        fh.truncate(1000)
    code, out, err = run_main(capsys, "verify", str(folder), "--json")
    assert code == 3 and err == ""
    result = json.loads(out)
    assert result["ok"] is False and result["format"] == "torch-dcp"
    assert set(result) == {"path", "format", "ok", "hashes_checked", "problems"}
    kinds = {(p["kind"], Path(p["file"]).name) for p in result["problems"]}
    assert kinds == {("missing-shard", "__0_0.distcp"), ("truncated", "__1_0.distcp")}
    code, out, _err = run_main(capsys, "verify", str(folder))
    assert code == 3 and out.splitlines()[0].endswith("INCOMPLETE, "
                                                      f"{len(result['problems'])} problem(s)")


def test_inspect_of_a_broken_sharded_checkpoint_is_one_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    folder = Path(shutil.copytree(SAMPLES / "hf_sharded", tmp_path / "hf"))
    (folder / "model-00002-of-00003.safetensors").unlink()
    code, out, err = run_main(capsys, "inspect", str(folder))
    assert code == 3 and out == ""
    assert len(err.strip().splitlines()) == 1 and "model-00002-of-00003.safetensors" in err
    assert "Traceback" not in err
    code, _out, _err = run_main(capsys, "verify", str(folder))
    assert code == 3


def test_verify_single_file_truncated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "thinker_step_200.pt"
    cut.write_bytes((SAMPLES / "thinker_step_200.pt").read_bytes()[:50_000])
    code, out, _err = run_main(capsys, "verify", str(cut), "--json")
    assert code == 3
    [problem] = json.loads(out)["problems"]
    assert problem["file"] == str(cut) and problem["kind"] == "truncated"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert run_main(capsys, "verify", str(empty))[0] == 3
    assert run_main(capsys, "verify", str(tmp_path / "nothing.pt"))[0] == 4
    for name in ("ckpt-1.index", "checkpoint"):  # a TF checkpoint named by its prefix
        shutil.copy(SAMPLES / "tf_ckpt" / name, tmp_path / name)
    code, out, _err = run_main(capsys, "verify", str(tmp_path / "ckpt-1"), "--json")
    assert code == 3 and json.loads(out)["problems"][0]["kind"] == "missing-shard"


def test_inspect_shows_shards_and_placement(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_main(capsys, "inspect", str(SAMPLES / "fsdp_step_200"), "--tensors")
    assert code == 0
    assert "Shards    2 file(s), world size 2" in out
    assert "__0_0.distcp@[0, 0]  __1_0.distcp@[32, 0]" in out
    code, out, _err = run_main(capsys, "inspect", str(SAMPLES / "hf_sharded"), "--json")
    data = json.loads(out)
    assert data["format"] == "hf-sharded" and data["details"]["num_shards"] == 3
    assert all(t["file"].startswith("model-0000") for t in data["tensors"])


def test_hashes_against_the_hubs_lfs_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    """A snapshot downloaded by huggingface_hub links each LFS file to blobs/<sha256>:
    --hashes re-hashes against that id, offline."""
    pytest.importorskip("huggingface_hub")
    from ckptkit.testing.hf_hub import HfHubStandIn

    with HfHubStandIn() as hub:
        hub.add_repo("org/sharded", SAMPLES / "hf_sharded")
        env = hub.client_env(tmp_path / "hf")
        done = subprocess.run(
            [sys.executable, "-c", "import huggingface_hub as h; "
             "print(h.snapshot_download('org/sharded'))"],
            env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    snapshot = Path(done.stdout.strip().splitlines()[-1])
    assert (snapshot / "model-00001-of-00003.safetensors").is_symlink()
    code, out, _err = run_main(capsys, "verify", str(snapshot), "--hashes", "--json")
    assert code == 0 and json.loads(out)["hashes_checked"] is True
    # Same size, one byte changed inside a tensor: structure still complete, hash not.
    blob = (snapshot / "model-00002-of-00003.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert run_main(capsys, "verify", str(snapshot))[0] == 0
    code, out, _err = run_main(capsys, "verify", str(snapshot), "--hashes", "--json")
    assert code == 3
    [problem] = json.loads(out)["problems"]
    assert problem["kind"] == "hash-mismatch"
    assert problem["file"].endswith("model-00002-of-00003.safetensors")
