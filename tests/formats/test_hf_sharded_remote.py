"""A sharded Hugging Face checkpoint read over http:// from the project's range server: the
same result as on disk, one request for the index and one per shard (its head, holding the
safetensors header), never a request for tensor data, and shard headers read a few at once."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

import ckptkit
from ckptkit.storage.remote import HEAD
from ckptkit.testing.static import StaticServer
from tests.conftest import run_main

SHARDS = 12
INDEX = "model.safetensors.index.json"
#: Shard requests the gated server holds until they have all arrived.
WIDTH = 4


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 shards written by huggingface_hub, each larger than the prefetched head, so that a
    read of tensor data would show in the bytes served."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import save_torch_state_dict

    root = tmp_path_factory.mktemp("served")
    out = root / "repo"
    out.mkdir()
    generator = torch.Generator().manual_seed(0)
    # 96k float32 = 384 KiB per tensor: one tensor per shard, each shard past HEAD.
    state = {f"layers.{i}.weight": torch.randn(96_000, generator=generator)
             for i in range(SHARDS)}
    save_torch_state_dict(state, out, max_shard_size=400_000)
    assert len(list(out.glob("*.safetensors"))) == SHARDS
    return root


class GatedServer(StaticServer):
    """Holds the first ``WIDTH`` shard requests until all of them have arrived: a client that
    reads shards one after another never gets them there (the wait times out instead)."""

    def __init__(self, root: Path, **kwargs: object) -> None:
        super().__init__(root, record=True, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.arrived = 0
        self.timed_out = False
        self._gate_lock = threading.Lock()

    def log(self, entry) -> None:  # type: ignore[no-untyped-def]
        super().log(entry)
        if not entry.route.endswith(".safetensors"):
            return
        with self._gate_lock:
            self.arrived += 1
            if self.arrived >= WIDTH:
                self.gate.set()
            held = self.arrived <= WIDTH
        if held and not self.gate.wait(10):
            self.timed_out = True


def without_path(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "path"}


def shard_routes(server: StaticServer) -> dict[str, list]:
    routes: dict[str, list] = {}
    for hit in server.hits():
        routes.setdefault(hit.route, []).append(hit)
    return routes


def test_inspect_over_a_url_matches_the_local_result_in_one_request_per_shard(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, local, err = run_main(capsys, "inspect", str(repo / "repo"), "--json")
    assert code == 0, err
    with StaticServer(repo, record=True) as server:
        code, remote, err = run_main(capsys, "inspect", f"{server.base}/repo/{INDEX}",
                                     "--json")
        assert code == 0, err
        routes = shard_routes(server)
    assert without_path(json.loads(remote)) == without_path(json.loads(local))
    assert json.loads(remote)["format"] == "hf-sharded"
    assert len(routes.pop(f"/repo/{INDEX}")) <= 1
    assert len(routes) == SHARDS
    for route, hits in routes.items():
        size = (repo / route.lstrip("/")).stat().st_size
        assert len(hits) <= 2, route
        # Only the head is asked for: every request starts at 0 and none reaches past HEAD,
        # while the shard's tensor data runs on to its end.
        assert all(h.header("Range").startswith("bytes=0-") for h in hits), route
        assert sum(h.sent for h in hits) <= HEAD < size, route


def test_a_directory_url_finds_the_index_by_name(repo: Path) -> None:
    local = ckptkit.inspect(repo / "repo")
    with StaticServer(repo, record=True) as server:
        remote = ckptkit.inspect(f"{server.base}/repo/")
        shard_hits = [h for h in server.hits() if h.route.endswith(".safetensors")]
    assert remote.format == "hf-sharded"
    # The folder holds only the index and the shards: the sizes agree too.
    assert without_path(remote.to_dict()) == without_path(local.to_dict())
    assert len(shard_hits) <= 2 * SHARDS


def test_shard_headers_are_requested_concurrently(repo: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with GatedServer(repo, latency=0.05) as server:
        code, _out, err = run_main(capsys, "inspect", f"{server.base}/repo/{INDEX}", "--json")
        assert code == 0, err
    assert server.arrived == SHARDS
    assert server.gate.is_set() and not server.timed_out


def test_verify_over_a_url(repo: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    with StaticServer(repo) as server:
        code, out, err = run_main(capsys, "verify", f"{server.base}/repo/{INDEX}", "--json")
    assert code == 0, err
    assert json.loads(out)["ok"] is True and json.loads(out)["problems"] == []


def test_a_missing_shard_over_a_url_exits_3_in_one_line(
        repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    served = tmp_path / "served"
    shutil.copytree(repo / "repo", served / "repo")
    gone = "model-00005-of-00012.safetensors"
    (served / "repo" / gone).unlink()
    with StaticServer(served) as server:
        url = f"{server.base}/repo/{INDEX}"
        code, out, err = run_main(capsys, "inspect", url)
        assert code == 3 and out == ""
        assert len(err.strip().splitlines()) == 1 and gone in err and "Traceback" not in err
        code, out, err = run_main(capsys, "verify", url, "--json")
    assert code == 3
    problems = json.loads(out)["problems"]
    assert [(p["kind"], p["file"].rpartition("/")[2]) for p in problems] == [
        ("missing-shard", gone)]


def test_bin_shards_over_a_url_are_one_line_asking_for_a_local_copy(
        hf_bin_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StaticServer(hf_bin_dir.parent) as server:
        code, out, err = run_main(
            capsys, "inspect", f"{server.base}/{hf_bin_dir.name}/pytorch_model.bin.index.json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "local directory" in err
