"""The download engine against a real local HTTP server: ranges, resume, faults, processes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit.hub.download import download as dl
from ckptkit.hub.download import transfer
from ckptkit.hub.download.download import DownloadResult, download
from ckptkit.errors import (AuthError, CkptkitError, ExitCode, IntegrityError, NotFoundError,
                            SourceError)
from ckptkit.hub.download.stalls import SpeedWatch
from ckptkit.hub.download.transfer_plan import (ContentRange, PieceSizing, Probe, Sidecar, TransferLimits,
                                   backoff_delay, can_resume, looks_like_html,
                                   parse_content_range, parse_retry_after, plan_pieces)
from tests import figures
from tests.conftest import SRC
from tests.servers.http import HTML_PAGE, Fault, HTTPTestServer

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZING = PieceSizing(min_size=dl.MIN_PIECE_SIZE, max_size=dl.MAX_PIECE_SIZE,
                             parallel_threshold=dl.PARALLEL_THRESHOLD, align=dl.PIECE_ALIGN)
TINY = PieceSizing(min_size=64 * KiB, max_size=256 * KiB, parallel_threshold=128 * KiB,
                   align=4 * KiB)
FAST_BACKOFF = {"base": 0.001, "cap": 0.01, "retry_after_cap": 0.3}

CLIENT = """
import json, sys
from pathlib import Path
from ckptkit.hub.download import download as dl
from ckptkit.hub.download import transfer
url, dest, connections, piece = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dl.MIN_PIECE_SIZE = dl.MAX_PIECE_SIZE = dl.PARALLEL_THRESHOLD = piece
dl.LOCK_POLL_INTERVAL = 0.02
waited = []
result = dl.download(url, dest, connections=connections, on_wait=waited.append)
print(json.dumps({"transferred": result.transferred, "sha256": result.sha256,
                  "resumed_from": result.resumed_from, "waited": bool(waited)}), flush=True)
"""


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny pieces and near-zero backoff so every scenario runs in milliseconds."""
    for name, value in {"MIN_PIECE_SIZE": TINY.min_size, "MAX_PIECE_SIZE": TINY.max_size,
                        "PARALLEL_THRESHOLD": TINY.parallel_threshold, "PIECE_ALIGN": TINY.align,
                        "BACKOFF_BASE": FAST_BACKOFF["base"], "BACKOFF_CAP": FAST_BACKOFF["cap"],
                        "RETRY_AFTER_CAP": FAST_BACKOFF["retry_after_cap"],
                        "LOCK_POLL_INTERVAL": 0.02,
                        # No checkpoint inside a piece unless a test asks for one.
                        "CHECKPOINT_FLOOR": 1 * MiB, "CHECKPOINT_CAP": 1 * MiB}.items():
        monkeypatch.setattr(dl, name, value)


@pytest.fixture(autouse=True)
def no_leftover_threads() -> None:
    yield
    assert [t.name for t in threading.enumerate() if t.name.startswith("ckpt-")] == []


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name != dest.name)


class Recorder:
    """A Progress that checks it is never called from two threads at once."""

    def __init__(self) -> None:
        self.totals: list[int | None] = []
        self.updates: list[int] = []
        self._busy = threading.Lock()

    def set_total(self, total: int | None) -> None:
        self.totals.append(total)

    def update(self, n: int) -> None:
        assert self._busy.acquire(blocking=False), "update() called concurrently"
        self.updates.append(n)
        self._busy.release()


def interrupt(server: HTTPTestServer, path: str, dest: Path, start: int) -> Sidecar:
    """A first run that fails on the piece at ``start``, leaving .part and sidecar behind."""
    route = server.routes[path]
    route.faults.append(Fault("status", status=503, times=None, start=start, only="data"))
    with pytest.raises(SourceError, match="unreachable: HTTP 503"):
        download(server.url(path), dest, connections=2, retries=1)
    route.faults.clear()
    assert not dest.exists()
    saved = Sidecar.from_json(Path(f"{dest}.part.json").read_text())
    assert saved is not None and saved.done and len(saved.done) < 8
    return saved


# --- deciding ---------------------------------------------------------------------------------

@settings(deadline=None)  # a 4 GiB file is 16,384 tiny pieces: the work, not the clock, bounds it
@given(size=st.integers(0, 1 << 32), connections=st.integers(1, 16), seed=st.integers(0, 99))
def test_plan_pieces_tiles_the_file(size: int, connections: int, seed: int) -> None:
    plan = plan_pieces(size, frozenset(), None, connections, TINY)
    assert [p.index for p in plan.pieces] == list(range(len(plan.pieces)))
    assert [p.start for p in plan.pieces] == list(range(0, size, plan.piece_size))
    assert all(0 < p.size <= plan.piece_size for p in plan.pieces)
    assert (plan.pieces[-1].end if plan.pieces else 0) == size
    if size >= connections * TINY.min_size:
        assert len(plan.pieces) >= connections
    have = frozenset(random.Random(seed).sample(range(len(plan.pieces)),
                                                len(plan.pieces) // 2))
    again = plan_pieces(size, have, plan.piece_size, connections, TINY)
    assert {p.index for p in again.missing} == {p.index for p in plan.pieces} - have
    assert again.have == have and again.workers == min(connections, len(again.missing))
    assert again.have_bytes == sum(plan.pieces[i].size for i in have)


def test_plan_pieces_uses_8_to_16_mib_pieces() -> None:
    def plan(size: int) -> tuple:
        return plan_pieces(size, frozenset(), None, 8, DEFAULT_SIZING).pieces

    assert [p.size for p in plan(64 * MiB)] == [8 * MiB] * 8
    assert len(plan(1 << 30)) == 64  # 16 MiB each
    assert len(plan(5 * MiB)) == 1
    assert plan(0) == ()


def test_engine_passes_on_the_knobs_patched_on_download() -> None:
    """The ``fast`` fixture patched ``ckptkit.hub.download.download``; the engine reads them at call time."""
    assert dl._piece_sizing() == TINY
    assert dl._backoff(30, None) <= FAST_BACKOFF["cap"]
    assert dl._backoff(1, 3600) == FAST_BACKOFF["retry_after_cap"]


def test_header_parsers() -> None:
    assert parse_content_range("bytes 0-0/1234") == ContentRange(0, 0, 1234)
    assert parse_content_range("bytes */0") == ContentRange(None, None, 0)
    assert parse_content_range("bytes 5-9/*").total is None
    assert parse_content_range("items 0-1/2") is None and parse_content_range(None) is None
    assert parse_retry_after("120") == 120
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_grows_is_capped_and_obeys_retry_after() -> None:
    assert backoff_delay(1, rand=lambda: 1.0, **FAST_BACKOFF) == pytest.approx(0.001)
    assert backoff_delay(3, rand=lambda: 1.0, **FAST_BACKOFF) == pytest.approx(0.004)
    assert backoff_delay(3, rand=lambda: 0.0, **FAST_BACKOFF) == pytest.approx(0.002)
    assert backoff_delay(30, rand=lambda: 1.0, **FAST_BACKOFF) == pytest.approx(0.01)
    assert backoff_delay(1, retry_after=0.1, **FAST_BACKOFF) == 0.1
    assert backoff_delay(1, retry_after=3600, **FAST_BACKOFF) == 0.3


def test_html_sniffing() -> None:
    assert looks_like_html(b"\n  <!DOCTYPE HTML PUBLIC>") and looks_like_html(b"<HTML lang=en>")
    assert looks_like_html(b"\xef\xbb\xbf<!-- x --><html>")
    assert not looks_like_html(b"PK\x03\x04<html>") and not looks_like_html(b"")
    assert not looks_like_html(b"<" + b" " * 600 + b"<html>")  # only the first 512 bytes count


def test_can_resume_needs_same_url_size_and_validator() -> None:
    saved = Sidecar("u", "u", 10, '"e1"', "Mon", 4, frozenset({0}))
    probe = Probe("u", 10, True, '"e1"', "Tue")
    assert can_resume(saved, probe, "u", 10)
    assert not can_resume(saved, Probe("u", 10, True, '"e2"', "Mon"), "u", 10)
    assert not can_resume(saved, probe, "other", 10)
    assert not can_resume(saved, probe, "u", 9)  # .part of the wrong size
    assert not can_resume(saved, Probe("u", 11, True, '"e1"', "Mon"), "u", 10)
    assert can_resume(saved, Probe("u", 10, True, None, "Mon"), "u", 10)
    assert not can_resume(saved, Probe("u", 10, True, None, None), "u", 10)
    assert not can_resume(None, probe, "u", 10)


# --- transfers ----------------------------------------------------------------------------------

def test_small_file_is_one_verified_piece(http_server: HTTPTestServer, tmp_path: Path) -> None:
    data = payload(100 * KiB)
    http_server.add("/small.bin", data)
    dest, bar = tmp_path / "small.bin", Recorder()
    result = download(http_server.url("/small.bin"), dest, expected_size=len(data),
                      expected_sha256=sha(data).upper(), progress=bar)
    assert result == DownloadResult(dest, len(data), sha(data), http_server.url("/small.bin"),
                                    len(data), 0)
    assert dest.read_bytes() == data and leftovers(dest) == []
    assert bar.totals == [len(data)] and sum(bar.updates) == len(data)
    assert http_server.ranges("/small.bin") == ["bytes=0-0", f"bytes=0-{len(data) - 1}"]


def test_large_file_is_fetched_in_parallel_ranges(http_server: HTTPTestServer,
                                                  tmp_path: Path) -> None:
    data = payload(2 * MiB + 123)
    route = http_server.add("/big.bin", data)
    dest, bar = tmp_path / "big.bin", Recorder()
    result = download(http_server.url("/big.bin"), dest, connections=4, progress=bar)
    assert result.sha256 == sha(data) and dest.read_bytes() == data
    hits = http_server.hits("/big.bin")[1:]
    assert len(hits) == 9 and {hit.status for hit in hits} == {206}  # 256 KiB pieces
    assert {hit.if_range for hit in hits} == {route.etag_value()}
    spans = sorted(tuple(int(x) for x in h.range[6:].split("-")) for h in hits)
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))
    assert http_server.bytes_sent() == len(data) + 1 and http_server.connections <= 5
    assert sum(bar.updates) == len(data) and leftovers(dest) == []


def test_existing_file_is_reused_or_replaced(http_server: HTTPTestServer,
                                            tmp_path: Path) -> None:
    data, old = payload(50 * KiB), payload(50 * KiB, seed=1)
    http_server.add("/f.bin", data)
    dest = tmp_path / "f.bin"
    dest.write_bytes(old)
    reused = download(http_server.url("/f.bin"), dest)
    assert (reused.transferred, reused.sha256, http_server.hits()) == (0, sha(old), [])
    fresh = download(http_server.url("/f.bin"), dest, expected_sha256=sha(data))
    assert fresh.transferred == len(data) and dest.read_bytes() == data
    again = download(http_server.url("/f.bin"), dest, expected_sha256=sha(data))
    assert again.transferred == 0 and len(http_server.hits()) == 2


def test_interrupted_download_resumes_only_missing_pieces(http_server: HTTPTestServer,
                                                          tmp_path: Path) -> None:
    data = payload(2 * MiB)
    route = http_server.add("/r.bin", data)
    dest = tmp_path / "r.bin"
    saved = interrupt(http_server, "/r.bin", dest, start=5 * 256 * KiB)
    assert sorted(leftovers(dest)) == ["r.bin.part", "r.bin.part.json"]
    have = len(saved.done) * 256 * KiB
    http_server.reset_stats()
    bar = Recorder()
    result = download(http_server.url("/r.bin"), dest, connections=3, progress=bar)
    assert (result.resumed_from, result.transferred) == (have, len(data) - have)
    assert result.sha256 == sha(data) and dest.read_bytes() == data
    fetched = http_server.hits("/r.bin")[1:]
    assert len(fetched) == 8 - len(saved.done)
    assert {hit.if_range for hit in fetched} == {route.etag_value()}
    assert {int(hit.range[6:].split("-")[0]) // (256 * KiB) for hit in fetched} \
        == set(range(8)) - saved.done
    assert http_server.bytes_sent() == len(data) - have + 1
    assert bar.totals == [len(data)] and bar.updates[0] == have
    assert sum(bar.updates) == len(data) and leftovers(dest) == []
    figures.count("network-faults")


def test_changed_validator_restarts_from_scratch(http_server: HTTPTestServer,
                                                 tmp_path: Path) -> None:
    data, new = payload(2 * MiB), payload(2 * MiB, seed=7)  # same size, new ETag
    route = http_server.add("/v.bin", data)
    dest = tmp_path / "v.bin"
    interrupt(http_server, "/v.bin", dest, start=3 * 256 * KiB)
    route.data, route.version = new, route.version + 1
    result = download(http_server.url("/v.bin"), dest, connections=4)
    assert (result.resumed_from, result.transferred) == (0, len(new))
    assert dest.read_bytes() == new and leftovers(dest) == []
    figures.count("network-faults")


def test_file_changing_mid_download_is_noticed_by_if_range(http_server: HTTPTestServer,
                                                           tmp_path: Path) -> None:
    data, new = payload(1 * MiB), payload(1 * MiB, seed=3)
    http_server.add("/c.bin", data, swap_to=new, swap_after=1)  # changes right after the probe
    dest = tmp_path / "c.bin"
    result = download(http_server.url("/c.bin"), dest, connections=2)
    assert result.sha256 == sha(new) and dest.read_bytes() == new
    hits = http_server.hits("/c.bin")
    assert any(h.status == 200 and h.range and h.if_range for h in hits)  # If-Range said no
    assert [h.range for h in hits].count("bytes=0-0") == 2  # and it started over
    figures.count("network-faults")


def test_server_ignoring_range_gets_one_streamed_get(http_server: HTTPTestServer,
                                                     tmp_path: Path) -> None:
    data = payload(1 * MiB)
    http_server.add("/n.bin", data, ranges=False)
    dest = tmp_path / "n.bin"
    result = download(http_server.url("/n.bin"), dest, expected_sha256=sha(data))
    assert (result.resumed_from, result.transferred) == (0, len(data))
    assert [h.status for h in http_server.hits()] == [200]  # the probe's body was used
    assert dest.read_bytes() == data and leftovers(dest) == []
    figures.count("network-faults")


def test_streamed_get_restarts_after_a_drop(http_server: HTTPTestServer,
                                            tmp_path: Path) -> None:
    data = payload(1 * MiB)
    http_server.add("/n.bin", data, ranges=False, faults=[Fault("drop", after=300 * KiB)])
    dest = tmp_path / "n.bin"
    result = download(http_server.url("/n.bin"), dest)
    assert result.sha256 == sha(data) and result.transferred == len(data) + 300 * KiB
    assert [h.sent for h in http_server.hits()] == [300 * KiB, len(data)]
    figures.count("network-faults")


def test_dropped_connection_resumes_inside_the_piece(http_server: HTTPTestServer,
                                                     tmp_path: Path) -> None:
    data = payload(1 * MiB)
    http_server.add("/d.bin", data, faults=[Fault("drop", after=10_000, times=3, only="data")])
    dest = tmp_path / "d.bin"
    result = download(http_server.url("/d.bin"), dest, connections=4, retries=1)
    assert result.sha256 == sha(data) and result.transferred == len(data)
    hits = http_server.hits("/d.bin")
    dropped = [h for h in hits if h.faults == ["drop"]]
    assert len(dropped) == 3 and len(hits) == 1 + 4 + 3
    for hit in dropped:  # each retry asked for the rest of its piece only
        start, end = (int(x) for x in hit.range[6:].split("-"))
        assert f"bytes={start + 10_000}-{end}" in [h.range for h in hits]
    assert http_server.bytes_sent() == len(data) + 1
    figures.count("network-faults")


@pytest.mark.parametrize("status, error, code", [
    (404, NotFoundError, ExitCode.NOT_FOUND), (410, NotFoundError, ExitCode.NOT_FOUND),
    (401, AuthError, ExitCode.NOT_FOUND), (403, AuthError, ExitCode.NOT_FOUND),
    (418, SourceError, ExitCode.NOT_FOUND)])
def test_http_errors_map_to_ckptkit_errors(http_server: HTTPTestServer, tmp_path: Path,
                                           status: int, error: type, code: ExitCode) -> None:
    http_server.add("/e.bin", payload(1000), faults=[Fault("status", status=status)])
    with pytest.raises(error) as info:
        download(http_server.url("/e.bin"), tmp_path / "e.bin")
    assert info.value.exit_code == code and http_server.url("/e.bin") in str(info.value)
    assert f"HTTP {status}" in str(info.value) and "\n" not in str(info.value)
    assert len(http_server.hits()) == 1  # not retried
    if error is AuthError:
        assert info.value.status == status and "credentials" in str(info.value)
    assert leftovers(tmp_path / "e.bin") == []
    figures.count("network-faults")


def test_unreachable_server_is_retried_then_reported(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/f.bin"
    with pytest.raises(SourceError, match=r"is unreachable: .*\(after 3 attempts\)") as info:
        download(url, tmp_path / "f.bin", retries=2)
    assert info.value.url == url and info.value.status is None
    assert leftovers(tmp_path / "f.bin") == [] and not (tmp_path / "f.bin").exists()
    figures.count("network-faults")


def test_caller_headers_are_sent_and_encoding_is_identity(http_server: HTTPTestServer,
                                                           tmp_path: Path) -> None:
    data = payload(300 * KiB)
    http_server.add("/h.bin", data)
    download(http_server.url("/h.bin"), tmp_path / "h.bin", connections=2,
             headers={"Authorization": "Bearer t0k", "Accept-Encoding": "gzip"})
    for hit in http_server.hits():
        assert hit.headers["Authorization"] == "Bearer t0k"
        assert hit.headers["Accept-Encoding"] == "identity"  # ranges of the file, not of a gzip


def test_corrupt_sidecar_means_a_fresh_start(http_server: HTTPTestServer,
                                             tmp_path: Path) -> None:
    data = payload(300 * KiB)
    http_server.add("/cs.bin", data)
    dest = tmp_path / "cs.bin"
    Path(f"{dest}.part").write_bytes(b"\0" * len(data))
    Path(f"{dest}.part.json").write_bytes(b"\xff\xfe not json")
    result = download(http_server.url("/cs.bin"), dest)
    assert (result.resumed_from, result.sha256) == (0, sha(data)) and leftovers(dest) == []


def test_missing_path_is_not_found(http_server: HTTPTestServer, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        download(http_server.url("/nothing.bin"), tmp_path / "x.bin")
    assert leftovers(tmp_path / "x.bin") == [] and not (tmp_path / "x.bin").exists()
    figures.count("network-faults")


def test_server_errors_are_retried_then_reported_unreachable(http_server: HTTPTestServer,
                                                             tmp_path: Path) -> None:
    http_server.add("/e.bin", payload(1000), faults=[Fault("status", status=500, times=None)])
    with pytest.raises(SourceError, match=r"unreachable: HTTP 500 \(after 3 attempts\)") as info:
        download(http_server.url("/e.bin"), tmp_path / "e.bin", retries=2)
    assert info.value.status == 500 and info.value.exit_code == ExitCode.NOT_FOUND
    assert len(http_server.hits()) == 3
    assert leftovers(tmp_path / "e.bin") == [] and not (tmp_path / "e.bin").exists()
    figures.count("network-faults")


def test_transient_statuses_then_success(http_server: HTTPTestServer, tmp_path: Path) -> None:
    data = payload(300 * KiB)
    http_server.add("/t.bin", data, faults=[Fault("status", status=s) for s in (429, 502, 504)]
                    + [Fault("status", status=503, only="data")])
    result = download(http_server.url("/t.bin"), tmp_path / "t.bin", connections=2)
    assert result.sha256 == sha(data)
    assert [h.status for h in http_server.hits()][:4] == [429, 502, 504, 206]
    assert 503 in [h.status for h in http_server.hits()]
    figures.count("network-faults")


def test_retry_after_is_honoured_and_capped(http_server: HTTPTestServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(1000)
    http_server.add("/ra.bin", data, faults=[Fault("status", status=503, retry_after="3600")])
    waits: list[float] = []

    def backoff(*args: object, **kwargs: float) -> float:
        waits.append(backoff_delay(*args, **kwargs))  # type: ignore[arg-type]
        return waits[-1]

    monkeypatch.setattr(dl, "backoff_delay", backoff)
    result = download(http_server.url("/ra.bin"), tmp_path / "ra.bin")
    assert waits == [FAST_BACKOFF["retry_after_cap"]]  # RETRY_AFTER_CAP, not the backoff
    assert result.sha256 == sha(data) and len(http_server.hits()) == 3
    figures.count("network-faults")


def test_wrong_content_length_is_an_integrity_error(http_server: HTTPTestServer,
                                                    tmp_path: Path) -> None:
    http_server.add("/l.bin", payload(100 * KiB),
                    faults=[Fault("length", delta=100, times=None, only="data")])
    with pytest.raises(IntegrityError, match=r"Content-Length .*after 3 attempts"):
        download(http_server.url("/l.bin"), tmp_path / "l.bin", retries=2)
    assert len(http_server.hits()) == 1 + 3
    assert not (tmp_path / "l.bin").exists()
    figures.count("network-faults")


def test_short_body_without_ranges_is_an_integrity_error(http_server: HTTPTestServer,
                                                         tmp_path: Path) -> None:
    http_server.add("/l.bin", payload(100 * KiB), ranges=False,
                    faults=[Fault("length", delta=100, times=None)])
    with pytest.raises(IntegrityError, match=r"after 2 attempts") as info:
        download(http_server.url("/l.bin"), tmp_path / "l.bin", retries=1)
    assert info.value.exit_code == ExitCode.INTEGRITY and len(http_server.hits()) == 2
    figures.count("network-faults")


def test_flipped_byte_fails_the_hash_and_deletes_the_part(http_server: HTTPTestServer,
                                                          tmp_path: Path) -> None:
    data = payload(1 * MiB)
    http_server.add("/x.bin", data, faults=[Fault("flip", offset=700_001)])
    dest = tmp_path / "x.bin"
    with pytest.raises(IntegrityError) as info:
        download(http_server.url("/x.bin"), dest, expected_sha256=sha(data), connections=4)
    bad = bytearray(data)
    bad[700_001] ^= 0xFF
    assert sha(data) in str(info.value) and sha(bytes(bad)) in str(info.value)
    assert info.value.exit_code == ExitCode.INTEGRITY
    assert not dest.exists() and leftovers(dest) == []
    figures.count("network-faults")


def test_expected_size_mismatch_fails_before_transfer(http_server: HTTPTestServer,
                                                      tmp_path: Path) -> None:
    http_server.add("/s.bin", payload(5000))
    with pytest.raises(IntegrityError, match="serves 5,000 bytes but 5,001 were expected"):
        download(http_server.url("/s.bin"), tmp_path / "s.bin", expected_size=5001)
    assert http_server.bytes_sent() == 1
    assert leftovers(tmp_path / "s.bin") == [] and not (tmp_path / "s.bin").exists()
    figures.count("network-faults")


def test_stall_longer_than_timeout_is_retried(http_server: HTTPTestServer,
                                              tmp_path: Path) -> None:
    data = payload(100 * KiB)
    http_server.add("/st.bin", data,
                    faults=[Fault("stall", after=1000, seconds=60, only="data")])
    result = download(http_server.url("/st.bin"), tmp_path / "st.bin", timeout=0.3)
    assert result.sha256 == sha(data)
    probe, stalled, retry = http_server.hits("/st.bin")
    assert (stalled.range, retry.range) == (f"bytes=0-{len(data) - 1}",
                                            f"bytes=1000-{len(data) - 1}")
    # Abandoned mid-stall: waiting the stall out would have had it send the rest.
    assert stalled.sent == 1000 and stalled.stalling
    figures.count("network-faults")


def test_slow_headers_time_out_and_are_retried(http_server: HTTPTestServer,
                                               tmp_path: Path) -> None:
    data = payload(1000)
    http_server.add("/sl.bin", data, faults=[Fault("delay", seconds=10)])
    result = download(http_server.url("/sl.bin"), tmp_path / "sl.bin", timeout=0.3)
    assert result.sha256 == sha(data) and http_server.ranges("/sl.bin")[:2] == ["bytes=0-0"] * 2
    figures.count("network-faults")


def test_slow_but_steady_body_is_not_a_timeout(http_server: HTTPTestServer,
                                               tmp_path: Path) -> None:
    data = payload(60 * KiB)
    http_server.add("/slow.bin", data, rate=100 * KiB)  # 0.6 s, a block every 50 ms
    result = download(http_server.url("/slow.bin"), tmp_path / "slow.bin", timeout=0.3)
    assert result.sha256 == sha(data) and len(http_server.hits()) == 2


@pytest.mark.parametrize("fault", [Fault("html"),
                                   Fault("html", content_type="application/octet-stream")])
def test_html_page_instead_of_the_file(http_server: HTTPTestServer, tmp_path: Path,
                                       fault: Fault) -> None:
    http_server.add("/model.bin", payload(1000), faults=[fault])
    dest = tmp_path / "model.bin"
    with pytest.raises(SourceError, match="returned an HTML page instead of the file") as info:
        download(http_server.url("/model.bin"), dest)
    assert info.value.exit_code == ExitCode.NOT_FOUND and leftovers(dest) == []
    figures.count("network-faults")


def test_html_body_served_with_ranges_is_rejected(http_server: HTTPTestServer,
                                                  tmp_path: Path) -> None:
    page = HTML_PAGE + b" " * (600 * KiB)  # several pieces; the sniff is on piece 0
    http_server.add("/m.bin", page)
    dest = tmp_path / "m.bin"
    with pytest.raises(SourceError, match="HTML page"):
        download(http_server.url("/m.bin"), dest, connections=2)
    assert leftovers(dest) == []
    figures.count("network-faults")


def test_html_is_fine_when_the_url_is_a_page(http_server: HTTPTestServer,
                                             tmp_path: Path) -> None:
    http_server.add("/index.html", HTML_PAGE, content_type="text/html")
    result = download(http_server.url("/index.html"), tmp_path / "index.html")
    assert result.sha256 == sha(HTML_PAGE)


def test_redirects_are_followed_and_pieces_use_the_final_url(http_server: HTTPTestServer,
                                                             tmp_path: Path) -> None:
    data = payload(600 * KiB)
    http_server.add("/files/real.bin", data)
    http_server.redirect("/a", "/b", 301)
    http_server.redirect("/b", "/c", 302)
    http_server.redirect("/c", http_server.url("/files/real.bin"), 307)
    result = download(http_server.url("/a"), tmp_path / "real.bin", connections=3)
    assert result.url == http_server.url("/files/real.bin") and result.sha256 == sha(data)
    assert [h.path for h in http_server.hits()][:4] == ["/a", "/b", "/c", "/files/real.bin"]
    assert {h.path for h in http_server.hits()[4:]} == {"/files/real.bin"}


def test_redirect_loop_is_a_clear_error(http_server: HTTPTestServer, tmp_path: Path) -> None:
    http_server.redirect("/loop1", "/loop2")
    http_server.redirect("/loop2", "/loop1")
    with pytest.raises(SourceError, match="redirects in a loop") as info:
        download(http_server.url("/loop1"), tmp_path / "x.bin")
    assert len(http_server.hits()) == dl.MAX_REDIRECTS + 1
    assert info.value.exit_code == ExitCode.NOT_FOUND and "\n" not in str(info.value)
    assert leftovers(tmp_path / "x.bin") == [] and not (tmp_path / "x.bin").exists()
    figures.count("network-faults")


def test_not_enough_free_space(http_server: HTTPTestServer, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(300 * KiB)
    http_server.add("/big.bin", data)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(transfer.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(CkptkitError, match=rf"needs [\d,]+ bytes in {tmp_path}, 1,000 free") \
            as info:
        download(http_server.url("/big.bin"), tmp_path / "big.bin")
    assert info.value.exit_code == ExitCode.ERROR and http_server.bytes_sent() == 1
    result = download(http_server.url("/big.bin"), tmp_path / "big.bin", check_free_space=False)
    assert result.sha256 == sha(data)


def test_empty_file(http_server: HTTPTestServer, tmp_path: Path) -> None:
    http_server.add("/empty.bin", b"")
    result = download(http_server.url("/empty.bin"), tmp_path / "empty.bin")
    assert (result.size, result.sha256) == (0, sha(b""))
    assert (tmp_path / "empty.bin").read_bytes() == b""


def test_fatal_error_stops_the_other_pieces_at_once(http_server: HTTPTestServer,
                                                    tmp_path: Path) -> None:
    http_server.add("/f.bin", payload(1 * MiB), faults=[
        Fault("stall", after=1000, seconds=60, start=0),
        Fault("delay", seconds=60, until_stalled=True, start=768 * KiB),  # once 0 is stalled
        Fault("status", status=404, start=768 * KiB)])
    with pytest.raises(NotFoundError):
        download(http_server.url("/f.bin"), tmp_path / "f.bin", connections=4, timeout=120)
    # The error came while piece 0 was still stalled: its reader was woken, not waited for.
    stalled, = [hit for hit in http_server.hits("/f.bin") if hit.range == "bytes=0-262143"]
    assert stalled.stalling and stalled.sent == 1000
    figures.count("network-faults")


@pytest.mark.parametrize("seed, route, faults, expect, error, says", [
    pytest.param(0, {}, [Fault("drop", after=0, times=None, only="data")], {}, IntegrityError,
                 r"connection broke mid-body .*\(after 3 attempts\)", id="reset-every-time"),
    pytest.param(0, {}, [Fault("stall", after=0, seconds=5, times=None, only="data")], {},
                 SourceError, r"is unreachable: .*timed out.* \(after 3 attempts\)",
                 id="stall-every-time"),
    pytest.param(0, {}, [Fault("status", status=503, retry_after="1", times=None)], {},
                 SourceError, r"unreachable: HTTP 503 \(after 3 attempts\)",
                 id="503-retry-after-every-time"),
    pytest.param(0, {}, [Fault("length", delta=-100, times=None, only="data")], {},
                 IntegrityError, r"Content-Length 65,436 for bytes=0-65535 .*\(after 3 attempts\)",
                 id="content-length-too-short"),
    pytest.param(0, {"ranges": False}, [Fault("length", delta=-100, times=None)],
                 {"expected_size": 64 * KiB}, IntegrityError,
                 r"serves 65,436 bytes but 65,536 were expected",
                 id="content-length-too-short-no-ranges"),
    pytest.param(0, {"ranges": False}, [Fault("length", delta=100, times=None)], {},
                 IntegrityError, r": the connection broke mid-body \(after 3 attempts\)",
                 id="content-length-too-long-no-ranges"),
    pytest.param(5, {}, [], {"expected_sha256": sha(payload(64 * KiB))}, IntegrityError,
                 rf"sha256 is {sha(payload(64 * KiB, seed=5))}, expected "
                 rf"{sha(payload(64 * KiB))}", id="other-file-same-size"),
])
def test_fault_that_persists_ends_in_a_clean_error_and_no_final_file(
        http_server: HTTPTestServer, tmp_path: Path, seed: int, route: dict,
        faults: list[Fault], expect: dict, error: type, says: str) -> None:
    http_server.add("/m.bin", payload(64 * KiB, seed=seed), **route,
                    faults=[dataclasses.replace(f) for f in faults])
    dest = tmp_path / "m.bin"
    with pytest.raises(error, match=says) as info:
        download(http_server.url("/m.bin"), dest, retries=2, timeout=0.2, **expect)
    message = str(info.value)
    assert http_server.url("/m.bin") in message and "\n" not in message and info.value.hint
    assert not dest.exists()
    # Resumable state may stay beside it; bytes that failed the hash may not.
    allowed = set() if "expected_sha256" in expect else {"m.bin.part", "m.bin.part.json"}
    assert set(leftovers(dest)) <= allowed
    figures.count("network-faults")


# --- limits: size ceiling, low speed, header deadline, checkpoints ------------------------------

TIGHT = TransferLimits(max_bytes=1 * MiB, min_speed=1000, speed_window=0.3, header_timeout=0.5)


def test_an_endless_chunked_body_stops_at_the_ceiling(http_server: HTTPTestServer,
                                                      tmp_path: Path) -> None:
    http_server.add("/endless.bin", b"", ranges=False, etag=False, last_modified=False,
                    faults=[Fault("chunked", after=0, times=None)])
    dest = tmp_path / "endless.bin"
    with pytest.raises(SourceError) as info:
        download(http_server.url("/endless.bin"), dest, limits=TIGHT)
    assert info.value.reason == "too large (over 1,048,576 bytes)"
    assert "\n" not in str(info.value) and "CKPTKIT_MAX_DOWNLOAD" in str(info.value)
    assert len(http_server.hits()) == 1  # no retry: it would only stream again
    assert not dest.exists() and leftovers(dest) == []  # the useless bytes are gone
    figures.count("network-faults")


def test_an_announced_size_over_the_ceiling_is_refused_before_the_body(
        http_server: HTTPTestServer, tmp_path: Path) -> None:
    http_server.add("/big.bin", payload(2 * MiB))
    dest = tmp_path / "big.bin"
    with pytest.raises(SourceError, match=r"too large \(over 1,048,576 bytes\)"):
        download(http_server.url("/big.bin"), dest, limits=TIGHT)
    assert http_server.bytes_sent() == 1 and leftovers(dest) == []  # the probe's byte only
    # A size the caller expects (the catalogue's) is the limit instead of the ceiling.
    result = download(http_server.url("/big.bin"), dest, expected_size=2 * MiB, limits=TIGHT)
    assert result.size == 2 * MiB and result.announced
    figures.count("network-faults")


def test_a_streamed_body_without_length_is_not_announced(http_server: HTTPTestServer,
                                                         tmp_path: Path) -> None:
    data = payload(100 * KiB)
    http_server.add("/s.bin", data, ranges=False, faults=[Fault("chunked", after=1)])
    result = download(http_server.url("/s.bin"), tmp_path / "s.bin")
    assert result.sha256 == sha(data) and not result.announced
    http_server.add("/l.bin", data, ranges=False)
    assert download(http_server.url("/l.bin"), tmp_path / "l.bin").announced


def test_a_body_dripping_a_byte_at_a_time_is_stalled(http_server: HTTPTestServer,
                                                     tmp_path: Path) -> None:
    # One byte every 20 ms: never silent for the 30 s timeout, far below 1000 B/s.
    http_server.add("/drip.bin", payload(64 * KiB),
                    faults=[Fault("drip", after=1000, seconds=0.02, times=None, only="data")])
    dest = tmp_path / "drip.bin"
    with pytest.raises(SourceError) as info:
        download(http_server.url("/drip.bin"), dest, limits=TIGHT)
    assert info.value.reason == "stalled (below 1,000 B/s for 0.3 s)"
    probe, dripped = http_server.hits("/drip.bin")  # given up at once, not retried
    assert 1000 < dripped.sent < 64 * KiB
    figures.count("network-faults")


def test_headers_dripping_a_byte_at_a_time_hit_the_deadline(http_server: HTTPTestServer,
                                                            tmp_path: Path) -> None:
    # 4000 bytes of headers at a byte per 20 ms take 80 s; the deadline is half a second.
    http_server.add("/slow.bin", payload(1000),
                    faults=[Fault("drip-headers", after=4000, seconds=0.02, times=None)])
    with pytest.raises(SourceError) as info:
        download(http_server.url("/slow.bin"), tmp_path / "slow.bin", limits=TIGHT)
    assert info.value.reason == "no complete headers within 0.5 s"
    hit, = http_server.hits("/slow.bin")  # not retried
    assert 0 < hit.sent < 4000
    figures.count("network-faults")


def test_speed_watch_judges_whole_windows() -> None:
    now = [0.0]
    watch = SpeedWatch(1000, 2.0, clock=lambda: now[0])
    for _ in range(3):  # 1 KiB every 0.5 s: 2048 B/s
        now[0] += 0.5
        assert not watch.add(1024)
    now[0] += 0.5
    assert not watch.add(1024)  # 4096 bytes in 2 s: fast enough, a new window starts
    now[0] += 1.9
    assert not watch.add(10)  # the window is not over yet
    now[0] += 0.2
    assert watch.add(10)  # 20 bytes in 2.1 s
    assert not SpeedWatch(0, 1.0).add(0)  # off


def test_a_piece_in_flight_keeps_its_progress(http_server: HTTPTestServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 (here: a piece failing for good) loses at most one checkpoint of a piece."""
    monkeypatch.setattr(dl, "CHECKPOINT_FLOOR", 16 * KiB)
    monkeypatch.setattr(dl, "CHECKPOINT_CAP", 16 * KiB)
    data = payload(1 * MiB)
    piece = 2 * 256 * KiB  # the third piece of four
    route = http_server.add("/p.bin", data, faults=[
        Fault("drop", after=100_000, start=piece),  # dies 100,000 bytes in
        Fault("status", status=503, times=None, start=piece + 100_000)])  # and stays dead
    dest = tmp_path / "p.bin"
    with pytest.raises(SourceError, match="HTTP 503"):  # one connection: pieces in order
        download(http_server.url("/p.bin"), dest, connections=1, retries=1)
    saved = Sidecar.from_json(Path(f"{dest}.part.json").read_text())
    assert saved is not None and saved.done == {0, 1}
    (index, kept), = saved.partial
    assert index == 2 and 100_000 - 16 * KiB < kept <= 100_000  # one checkpoint lost at most
    route.faults.clear()
    http_server.reset_stats()
    result = download(http_server.url("/p.bin"), dest, connections=1)
    assert result.sha256 == sha(data) and result.resumed_from == 2 * 256 * KiB + kept
    assert http_server.ranges("/p.bin") == ["bytes=0-0",
                                            f"bytes={piece + kept}-{piece + 256 * KiB - 1}",
                                            f"bytes={3 * 256 * KiB}-{MiB - 1}"]
    assert http_server.bytes_sent() == 2 * 256 * KiB - kept + 1
    figures.count("network-faults")


# --- processes ------------------------------------------------------------------------------------

def run_client(url: str, dest: Path, connections: int, piece: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CLIENT, url, str(dest), str(connections),
                             str(piece)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})


def test_kill_9_mid_download_then_rerun_fetches_only_the_rest(http_server: HTTPTestServer,
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    data = os.urandom(64 * MiB)
    route = http_server.add("/k.bin", data, rate=4 * MiB)  # 4 connections: ~4 s in all
    dest, sidecar = tmp_path / "k.bin", tmp_path / "k.bin.part.json"
    client = run_client(http_server.url("/k.bin"), dest, 4, 2 * MiB)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and client.poll() is None:
            assert not dest.exists()  # never a partial file under the final name
            saved = Sidecar.from_json(sidecar.read_text()) if sidecar.exists() else None
            if saved is not None and len(saved.done) >= 8:
                break
            time.sleep(0.01)
    finally:
        client.kill()
        client.wait()
        client.stdout.close()
    assert client.returncode == -9 and not dest.exists()
    saved = Sidecar.from_json(sidecar.read_text())
    assert saved is not None and 8 <= len(saved.done) < 32
    # Pieces in flight kept their progress up to their last checkpoint (every 256 KiB).
    started = {i: n for i, n in saved.partial if n < 2 * MiB}
    finished = set(saved.done) | {i for i, n in saved.partial if n == 2 * MiB}
    have = len(finished) * 2 * MiB + sum(started.values())
    assert (tmp_path / "k.bin.part").stat().st_size == len(data)

    route.rate = None
    http_server.wait_idle()  # requests of the killed client must not count for the rerun
    http_server.reset_stats()
    monkeypatch.setattr(dl, "MIN_PIECE_SIZE", 8 * MiB)  # the sidecar's layout must win
    result = download(http_server.url("/k.bin"), dest, connections=4)
    assert result.resumed_from == have and result.transferred == len(data) - have
    assert http_server.bytes_sent() == len(data) - have + 1
    assert len(http_server.hits()) == 1 + 32 - len(finished)
    resumed = {int(h.range[6:].split("-")[0]) for h in http_server.hits()[1:]}
    assert {i * 2 * MiB + started[i] for i in started} <= resumed  # mid-piece, not from 0
    assert result.sha256 == sha(data) and leftovers(dest) == []


def test_concurrent_processes_download_the_file_once(http_server: HTTPTestServer,
                                                     tmp_path: Path) -> None:
    data = payload(4 * MiB)
    http_server.add("/p.bin", data, rate=1 * MiB)  # 2 connections: ~2 s
    dest = tmp_path / "p.bin"
    clients = [run_client(http_server.url("/p.bin"), dest, 2, 2 * MiB) for _ in range(3)]
    results = []
    for client in clients:
        out, _ = client.communicate(timeout=30)
        assert client.returncode == 0
        results.append(json.loads(out))
    assert {r["sha256"] for r in results} == {sha(data)}
    assert sorted(r["transferred"] for r in results) == [0, 0, len(data)]
    assert any(r["waited"] for r in results)
    assert http_server.bytes_sent() == len(data) + 1
    assert dest.read_bytes() == data and leftovers(dest) == []
