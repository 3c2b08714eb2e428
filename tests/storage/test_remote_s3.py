"""s3:// locations and atomic writes through the real s3fs/botocore against moto's standalone
server: ranged reads, listings, validators, errors with exit codes, multipart uploads completed
only at the end, aborted on errors, and cleaned up after a kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckptkit.errors import AuthError, ExitCode, NotFoundError, SourceError
from ckptkit.storage.location import PREFETCH, locate
from ckptkit.storage.remote import HEAD
from tests.conftest import SRC
from tests.s3_store import AWS_ENV, S3Store, aws_env, moto_endpoint, s3  # noqa: F401

pytest.importorskip("s3fs")


def safetensors_blob(rows: int = 512) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"w": np.ones((rows, 256), np.float32)}, metadata={"step": "9"})


def test_header_read_is_one_ranged_get(s3: S3Store) -> None:
    blob = safetensors_blob()
    location = locate(s3.put("run/model.safetensors", blob))
    (length,) = struct.unpack("<Q", location.read(0, 8))
    header = json.loads(location.read(8, length))
    assert header["__metadata__"] == {"step": "9"}
    assert location.size() == len(blob)
    # One GetObject with Range: the size comes from its Content-Range, no HEAD first.
    assert location.requests == 1 and location.fetched == HEAD
    assert str(location) == s3.url("run/model.safetensors")
    empty = locate(s3.put("run/empty.bin", b""))  # S3 answers 416 to a range of nothing
    assert empty.size() == 0 and empty.read(0, 10) == b""


def test_listing_walk_and_fingerprint(s3: S3Store) -> None:
    s3.put("run/step_1.pt", b"a" * 10)
    s3.put("run/step_2.pt", b"b" * 20)
    s3.put("run/logs/events.txt", b"c")
    run = locate(s3.url("run/"))
    assert run.is_dir() and not run.is_file() and locate(s3.url("run")).is_dir()
    assert [(e.name, e.is_dir, e.size) for e in run.list()] == [
        ("logs", True, None), ("step_1.pt", False, 10), ("step_2.pt", False, 20)]
    assert [str(x) for x in run.walk()] == [s3.url(k) for k in (
        "run/logs/events.txt", "run/step_1.pt", "run/step_2.pt")]
    first = run.child("step_1.pt")
    size, etag = first.fingerprint()
    assert size == 10 and etag
    s3.put("run/step_1.pt", b"A" * 10)  # same size, new content: the ETag tells
    assert first.fingerprint()[1] != etag
    assert first.sibling("step_2.pt").size() == 20


def test_missing_key_and_bucket_exit_4(s3: S3Store) -> None:
    for url in (s3.url("absent.pt"), "s3://no-such-bucket-here/x.pt"):
        with pytest.raises(NotFoundError) as caught:
            locate(url).size()
        assert caught.value.exit_code == ExitCode.NOT_FOUND
        assert not locate(url).exists()


def test_refused_endpoint_exits_4_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    aws_env(monkeypatch, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CKPTKIT_TIMEOUT", "2")
    began = time.monotonic()
    with pytest.raises(SourceError, match="unreachable") as caught:
        locate("s3://bucket/model.safetensors").size()
    assert caught.value.exit_code == ExitCode.NOT_FOUND
    assert "testing-secret-key" not in str(caught.value)
    assert time.monotonic() - began < 30


def test_access_denied_names_the_credential_chain(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A moto server that checks signatures (its own process: the setting is global): the
    # keys in the environment are unknown to it, as stale or wrong keys are to AWS.
    script = textwrap.dedent("""
        import logging, sys, time
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        from moto.server import ThreadedMotoServer
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        print(server.get_host_and_port()[1], flush=True)
        sys.stdin.read()
        """)
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0", **AWS_ENV}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        port = int(proc.stdout.readline())
        aws_env(monkeypatch, f"http://127.0.0.1:{port}")
        with pytest.raises(AuthError, match="access denied") as caught:
            locate("s3://guarded/model.safetensors").size()
        assert caught.value.exit_code == ExitCode.NOT_FOUND
        assert "AWS credential chain" in str(caught.value)
        assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_atomic_write_completes_only_at_the_end(s3: S3Store) -> None:
    from ckptkit.storage.remote_write import PART_SIZE, atomic_remote_file

    url = s3.url("out/model.safetensors")
    with atomic_remote_file(url) as fh:
        fh.write(b"x" * (PART_SIZE + 10))  # one full part uploaded...
        assert s3.keys("out/") == [] and len(s3.uploads()) == 1  # ...nothing visible yet
    assert s3.keys("out/") == ["out/model.safetensors"]
    assert locate(url).size() == PART_SIZE + 10
    assert s3.uploads() == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_atomic_write_aborted_on_error_leaves_nothing(s3: S3Store, error: type) -> None:
    from ckptkit.storage.remote_write import PART_SIZE, atomic_remote_file

    s3.put("out/model.safetensors", b"old")
    with pytest.raises(error):
        with atomic_remote_file(s3.url("out/model.safetensors")) as fh:
            fh.write(b"y" * (PART_SIZE + 1))
            raise error()
    assert s3.uploads() == []
    assert s3.client.get_object(Bucket=s3.bucket, Key="out/model.safetensors")["Body"].read() \
        == b"old"


def test_kill_9_leaves_no_object_and_the_next_run_aborts_the_upload(
        s3: S3Store, tmp_path: Path) -> None:
    from ckptkit.storage.remote_write import atomic_remote_file, journal_dir

    script = textwrap.dedent(f"""
        import sys, time
        from ckptkit.storage.remote_write import PART_SIZE, atomic_remote_file
        with atomic_remote_file({s3.url('out/big.bin')!r}) as fh:
            fh.write(b"z" * (PART_SIZE + 1))
            print("uploading", flush=True)
            time.sleep(60)
        """)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env,
                            text=True)
    assert proc.stdout.readline().strip() == "uploading"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert s3.keys("out/") == []
    assert [u["Key"] for u in s3.uploads()] == ["out/big.bin"]
    assert len(list(journal_dir().glob("*.json"))) == 1
    record = json.loads(next(journal_dir().glob("*.json")).read_text())
    assert set(record) == {"url", "bucket", "key", "upload_id", "host", "pid"}  # no secrets

    with atomic_remote_file(s3.url("out/other.bin")) as fh:  # the next run sweeps first
        fh.write(b"ok")
    assert s3.uploads() == []
    assert list(journal_dir().glob("*.json")) == []
    assert s3.keys("out/") == ["out/other.bin"]


def test_cache_prune_aborts_the_upload_of_a_killed_writer(
        s3: S3Store, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import run_main

    script = textwrap.dedent(f"""
        import time
        from ckptkit.storage.remote_write import PART_SIZE, atomic_remote_file
        with atomic_remote_file({s3.url('out/big.bin')!r}) as fh:
            fh.write(b"z" * (PART_SIZE + 1))
            print("uploading", flush=True)
            time.sleep(60)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(SRC)}, text=True)
    assert proc.stdout.readline().strip() == "uploading"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert len(s3.uploads()) == 1
    code, _out, err = run_main(capsys, "cache", "prune", "--yes")
    assert code == 0, err
    assert f"aborted the unfinished upload to {s3.url('out/big.bin')}" in err
    assert s3.uploads() == [] and s3.keys("out/") == []


def test_remote_output_uploads_a_local_writers_file(s3: S3Store) -> None:
    from ckptkit.storage.remote_write import remote_output

    with remote_output(s3.url("out/converted.safetensors")) as local:
        local.write_bytes(b"converted")
        folder = local.parent
    assert not folder.exists()
    assert s3.client.get_object(Bucket=s3.bucket,
                                Key="out/converted.safetensors")["Body"].read() == b"converted"


@pytest.mark.parametrize("blocked, url, extra", [
    ("s3fs", "s3://bucket/model.safetensors", "s3"),
    ("gcsfs", "gs://bucket/model.safetensors", "gcs"),
    ("fsspec", "s3://bucket/model.safetensors", "s3"),
])
def test_a_missing_extra_is_one_line_naming_it(blocked: str, url: str, extra: str) -> None:
    from tests.conftest import run_ckpt_without

    done = run_ckpt_without((blocked,), "latest", url)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1
    assert f"pip install 'ckptkit[{extra}]'" in done.stderr


def test_local_paths_never_import_fsspec_or_requests(tmp_path: Path) -> None:
    from tests.conftest import run_python

    (tmp_path / "m.safetensors").write_bytes(safetensors_blob(4))
    done = run_python("import sys, ckptkit; ckptkit.inspect(sys.argv[1]); "
                      "print(sorted(m for m in ('fsspec', 's3fs', 'requests', 'botocore') "
                      "if m in sys.modules))", str(tmp_path / "m.safetensors"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
