"""gs:// through the real gcsfs against a GCS-compatible server on 127.0.0.1
(gcp-storage-emulator, reached with STORAGE_EMULATOR_HOST): ranged reads, listings, atomic
writes (a resumable upload finalised only at the end), missing objects."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import pytest

from ckptkit.errors import ExitCode, NotFoundError
from ckptkit.storage.location import locate

pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import gcsfs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="ckpt")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no probing of a GCE metadata server
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        # google-auth's credential probe would go through the test's dead proxy and retry.
        monkeypatch.delenv(name, raising=False)
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield "gs://ckpt"
    server.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_write_read_list_and_abort(gcs: str) -> None:
    from safetensors.numpy import save

    from ckptkit.storage.remote_write import atomic_remote_file

    blob = save({"w": np.ones((64, 64), np.float32)}, metadata={"step": "3"})
    with atomic_remote_file(f"{gcs}/run/step_3.safetensors") as fh:
        fh.write(blob)
    location = locate(f"{gcs}/run/step_3.safetensors")
    assert location.size() == len(blob) and location.read(0, 8) == blob[:8]
    assert location.fingerprint()[1]  # the object's hash: what a deletion re-checks
    assert [e.name for e in locate(f"{gcs}/run/").list()] == ["step_3.safetensors"]
    with pytest.raises(RuntimeError):
        with atomic_remote_file(f"{gcs}/run/step_4.safetensors") as fh:
            fh.write(blob)
            raise RuntimeError("interrupted")
    assert not locate(f"{gcs}/run/step_4.safetensors").exists()
    with pytest.raises(NotFoundError) as caught:
        locate(f"{gcs}/run/absent.safetensors").size()
    assert caught.value.exit_code == ExitCode.NOT_FOUND
