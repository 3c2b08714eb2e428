"""http(s):// locations against the project's range server (ckptkit.testing.static): requests
and bytes counted, headers in one round trip, a torch zip read without its tensor data, and
every bad answer mapped to one error with the documented exit code."""

from __future__ import annotations

import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ckptkit.errors import AuthError, ExitCode, NotFoundError, SourceError
from ckptkit.storage import http_location
from ckptkit.storage.location import PREFETCH, locate
from ckptkit.storage.remote import HEAD
from ckptkit.storage.remote import TAIL, display
from ckptkit.testing.faults import Fault
from ckptkit.testing.static import StaticServer


@pytest.fixture
def served(tmp_path: Path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    # 2 MiB of tensor data behind a header of a few hundred bytes.
    save_file({"encoder.weight": rng.standard_normal((1024, 512)).astype(np.float32),
               "encoder.bias": np.zeros(512, np.float32)}, tmp_path / "model.safetensors",
              metadata={"step": "3"})
    with StaticServer(tmp_path, record=True) as server:
        yield server, tmp_path


def header_of(location) -> dict:
    (length,) = struct.unpack("<Q", location.read(0, 8))
    return json.loads(location.read(8, length))


def test_safetensors_header_costs_one_request_and_no_tensor_bytes(served) -> None:
    server, folder = served
    location = locate(f"{server.base}/model.safetensors")
    size = location.size()
    header = header_of(location)
    assert size == (folder / "model.safetensors").stat().st_size
    assert header["__metadata__"] == {"step": "3"}
    assert [r.method for r in server.requests] == ["GET"]  # no HEAD: the size came with it
    assert server.requests[0].header("Range") == f"bytes=0-{HEAD - 1}"
    assert server.bytes_sent() == HEAD == location.fetched
    assert location.requests == 1


def test_a_header_larger_than_the_prefetch_costs_a_second_request(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    tensors = {f"layer.{i}.weight": np.zeros(4, np.float32) for i in range(6000)}
    save_file(tensors, tmp_path / "wide.safetensors")
    size = (tmp_path / "wide.safetensors").stat().st_size
    assert size > HEAD
    with StaticServer(tmp_path, record=True) as server:
        location = locate(f"{server.base}/wide.safetensors")
        assert len(header_of(location)) == 6000
        assert len(server.requests) == 2
        # The second request asks only for what the head did not bring.
        assert server.requests[1].header("Range").startswith(f"bytes={HEAD}-")
        assert server.bytes_sent() <= size


def test_torch_zip_reads_tail_then_data_pkl_never_tensor_data(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"model": {"w": torch.randn(1024, 1024)}, "step": 7}, tmp_path / "ckpt.pt")
    size = (tmp_path / "ckpt.pt").stat().st_size
    with StaticServer(tmp_path, record=True) as server:
        location = locate(f"{server.base}/ckpt.pt")
        with zipfile.ZipFile(location.open()) as archive:
            [pkl] = [n for n in archive.namelist() if n.endswith("data.pkl")]
            assert b"step" in archive.read(pkl)
    assert size > 4 << 20
    assert len(server.requests) <= 3
    assert server.bytes_sent() <= HEAD + TAIL  # the head (data.pkl) and the tail


def test_coalesced_reads_share_one_request(served) -> None:
    server, folder = served
    location = locate(f"{server.base}/model.safetensors")
    location.size()
    server.reset_counts()
    data = (folder / "model.safetensors").read_bytes()
    spans = [(1 << 20, 100), ((1 << 20) + 1000, 50), ((1 << 20) + 5000, 10)]
    got = location.read_many(spans)
    assert got == [data[o:o + n] for o, n in spans]
    assert len(server.requests) == 1


def test_a_server_ignoring_range_gives_a_bounded_fallback_or_a_clear_error(
        served, monkeypatch: pytest.MonkeyPatch) -> None:
    server, folder = served
    size = (folder / "model.safetensors").stat().st_size
    server.faults.add("/model.safetensors", Fault("ignore-range"))
    location = locate(f"{server.base}/model.safetensors")
    assert header_of(location)["__metadata__"] == {"step": "3"}  # 2 MiB: kept, one request
    assert len(server.requests) == 1

    monkeypatch.setattr(http_location, "WHOLE_BODY_LIMIT", 1 << 20)
    server.faults.add("/model.safetensors", Fault("ignore-range"))
    with pytest.raises(SourceError, match="ignores byte ranges and would send all "
                                          f"{size:,} bytes") as caught:
        locate(f"{server.base}/model.safetensors").size()
    assert caught.value.exit_code == ExitCode.NOT_FOUND


def test_missing_file_and_access_denied_exit_4(served) -> None:
    server, _folder = served
    with pytest.raises(NotFoundError) as missing:
        locate(f"{server.base}/absent.safetensors").size()
    assert missing.value.exit_code == ExitCode.NOT_FOUND
    assert not locate(f"{server.base}/absent.safetensors").exists()

    server.faults.add("/model.safetensors", Fault("status", status=403))
    with pytest.raises(AuthError, match="access denied") as denied:
        locate(f"{server.base}/model.safetensors").size()
    assert denied.value.exit_code == ExitCode.NOT_FOUND
    assert "credential" in str(denied.value)


def test_refused_connection_exits_4_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("CKPTKIT_TIMEOUT", "2")
    began = time.monotonic()
    with pytest.raises(SourceError, match="connection refused") as caught:
        locate(f"http://127.0.0.1:{port}/model.safetensors").size()
    assert caught.value.exit_code == ExitCode.NOT_FOUND
    assert time.monotonic() - began < 2


def test_a_reset_mid_body_is_retried_then_reported(served) -> None:
    server, folder = served
    data = (folder / "model.safetensors").read_bytes()
    server.faults.add("/model.safetensors", Fault("reset", after=1000))
    location = locate(f"{server.base}/model.safetensors")
    assert location.read(0, 8) == data[:8]
    assert [r.status for r in server.requests] == [206, 206]

    server.faults.add("/model.safetensors", Fault("reset", after=1000, times=None))
    with pytest.raises(SourceError, match="unreachable .connection") as caught:
        locate(f"{server.base}/model.safetensors").size()
    assert caught.value.exit_code == ExitCode.NOT_FOUND
    assert len(server.requests) == 2 + 1 + http_location.RETRIES


def test_a_short_object_reads_short_so_readers_can_call_it_truncated(served) -> None:
    server, folder = served
    (folder / "short.bin").write_bytes(b"x" * 100)
    location = locate(f"{server.base}/short.bin")
    assert location.read(90, 50) == b"x" * 10
    assert location.read(500, 10) == b""


def test_credentials_in_urls_are_never_shown_nor_sent_to_another_host(served) -> None:
    from ckptkit.testing.server import StubHandler, StubServer

    server, folder = served
    target = server.base

    class Redirect(StubHandler):
        def do_GET(self) -> None:
            self._record()
            self._redirect(target + self.path)

    class Redirector(StubServer):
        handler_class = Redirect

    with Redirector() as front:
        url = front.base.replace("http://", "http://user:s3cret@") + \
            "/model.safetensors?X-Amz-Signature=abcdef&v=1"
        location = locate(url)
        assert location.size() == (folder / "model.safetensors").stat().st_size
        assert "s3cret" not in str(location) and "abcdef" not in str(location)
        assert front.requests[0].header("Authorization") is not None  # its own host: sent
    assert [r.header("Authorization") for r in server.requests] == [None]  # another host
    assert display("https://u:p@h/x?token=t&a=1") == "https://h/x?token=***&a=1"


def test_hub_redirect_to_the_cdn_carries_no_credentials() -> None:
    from ckptkit.testing.hf_hub import HfHubStandIn
    from tests.hf_content import WEIGHTS

    with HfHubStandIn() as hub:
        hub.add_repo("org/tiny", {"model.safetensors": WEIGHTS})
        location = locate(f"{hub.endpoint}/org/tiny/resolve/main/model.safetensors")
        assert location.size() == len(WEIGHTS)
        assert hub.cdn_authorized() == []
