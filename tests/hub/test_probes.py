"""`ckptkit.hub.probes`: one small request per source, against the test HTTP server and the Kaggle
stand-in on 127.0.0.1; every kind of non-answer comes back as words, never as an exception."""

from __future__ import annotations

import json
import socket

import pytest

from ckptkit.hub.probes import KAGGLE_RPC, ProbeRequest, download_probe, kaggle_probe, send
from ckptkit.testing.hubs import KaggleStub, StubHandler, StubServer
from tests.servers.http import UNRESOLVABLE, Fault, HTTPTestServer

PAYLOAD = bytes(range(256)) * 40


def test_a_file_is_asked_for_one_byte_and_its_size_learnt(http_server: HTTPTestServer) -> None:
    http_server.add("/w.bin", PAYLOAD)
    result = send(download_probe(http_server.url("/w.bin")), timeout=2)
    assert (result.status, result.size, result.error, result.html) == (206, len(PAYLOAD), None,
                                                                       False)
    hit, = http_server.hits("/w.bin")
    assert hit.range == "bytes=0-0" and hit.sent <= 1  # the server may still be writing it
    assert hit.headers["User-Agent"].startswith("ckptkit/")


def test_a_server_without_ranges_is_not_read(http_server: HTTPTestServer) -> None:
    http_server.add("/w.bin", PAYLOAD * 100, ranges=False)
    result = send(download_probe(http_server.url("/w.bin")), timeout=2)
    assert result.status == 200 and result.size == len(PAYLOAD) * 100


def test_redirects_are_followed(http_server: HTTPTestServer) -> None:
    http_server.add("/real.bin", PAYLOAD)
    http_server.redirect("/handle", http_server.url("/real.bin"))
    result = send(download_probe(http_server.url("/handle")), timeout=2)
    assert result.status == 206 and http_server.ranges("/real.bin") == ["bytes=0-0"]


@pytest.mark.parametrize("status", [401, 403, 404, 503])
def test_error_statuses_are_reported(http_server: HTTPTestServer, status: int) -> None:
    http_server.add("/w.bin", PAYLOAD, faults=[Fault("status", status=status, times=None)])
    result = send(download_probe(http_server.url("/w.bin")), timeout=2)
    assert result.status == status and result.error is None


def test_an_html_page_is_recognised(http_server: HTTPTestServer) -> None:
    http_server.add("/w.bin", PAYLOAD, faults=[Fault("html", times=None)])
    assert send(download_probe(http_server.url("/w.bin")), timeout=2).html


def test_html_counts_only_where_a_fetch_would_refuse_it(http_server: HTTPTestServer) -> None:
    # The downloader accepts HTML from a URL naming an HTML document; so does the probe.
    http_server.add("/page.html", b"<!doctype html><html></html>",
                    faults=[Fault("html", times=None)])
    result = send(download_probe(http_server.url("/page.html")), timeout=2)
    assert result.status in (200, 206) and not result.html


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_refused_connection_is_words() -> None:
    refused = send(download_probe(f"http://127.0.0.1:{free_port()}/w.bin"), timeout=2)
    assert refused.status is None and refused.error == "connection refused"


def test_a_slow_server_times_out(http_server: HTTPTestServer) -> None:
    http_server.add("/w.bin", PAYLOAD, faults=[Fault("delay", seconds=None, times=None)])
    result = send(download_probe(http_server.url("/w.bin")), timeout=0.3)
    assert result.error == "timed out after 0.3 s"  # the server holds until released


def test_headers_trickled_byte_by_byte_time_out_too(http_server: HTTPTestServer) -> None:
    # A byte every 20 ms resets a read timeout forever; the probe's time still runs out.
    http_server.add("/w.bin", PAYLOAD, faults=[Fault("drip-headers", after=4000, seconds=0.02,
                                                     times=None)])
    result = send(download_probe(http_server.url("/w.bin")), timeout=0.3)
    assert result.status is None and result.error == "timed out after 0.3 s"
    assert 0 < http_server.hits()[0].sent < 4000  # cut off mid-headers


def test_an_unresolvable_host_is_host_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    # Longer than DNS allows: the resolver refuses it without sending a query anywhere.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "*")
    result = send(download_probe(f"http://{UNRESOLVABLE}/w.bin"), timeout=2)
    assert result.status is None and result.error == "host not found"


def test_kaggle_probe_is_the_listing_kagglehub_sends_first() -> None:
    pytest.importorskip("kagglehub")
    request = kaggle_probe("google/musiq/tensorFlow2/spaq/1", "http://127.0.0.1:1/kaggle")
    assert request.method == "POST" and request.url == "http://127.0.0.1:1/kaggle" + KAGGLE_RPC
    assert json.loads(request.body or "") == {
        "ownerSlug": "google", "modelSlug": "musiq", "instanceSlug": "spaq",
        "framework": "MODEL_FRAMEWORK_TENSOR_FLOW_2", "versionNumber": 1, "pageSize": 25}


def test_kaggle_probe_refuses_an_unknown_framework_as_fetch_does() -> None:
    pytest.importorskip("kagglehub")
    from ckptkit.errors import UsageError
    from ckptkit.hub.sources.kaggle import check_framework

    handle = "google/musiq/notAFramework/spaq/1"
    with pytest.raises(UsageError) as fetching:
        check_framework(handle)
    with pytest.raises(UsageError) as probing:
        kaggle_probe(handle, "http://127.0.0.1:1/kaggle")
    assert str(probing.value) == str(fetching.value) and handle in str(probing.value)


def test_kaggle_answers_404_for_an_unknown_model_and_403_when_forbidden() -> None:
    pytest.importorskip("kagglehub")
    with KaggleStub() as stub:
        request = kaggle_probe("google/musiq/tensorFlow2/spaq/1", stub.base)
        assert send(request, timeout=2).status == 404
        stub.forbidden = True
        assert send(request, timeout=2, headers={"Authorization": "Bearer t"}).status == 403
        assert stub.requests[-1].headers["Authorization"] == "Bearer t"


class _CodeInBody(StubHandler):
    def do_POST(self) -> None:
        self._record()
        self._json({"code": 403, "message": "terms not accepted"}, status=200)


class CodeInBodyServer(StubServer):
    handler_class = _CodeInBody


def test_a_json_error_code_in_a_2xx_answer_counts() -> None:
    # kagglesdk raises on {"code": 403, ...} even when the HTTP status is 200.
    with CodeInBodyServer() as server:
        result = send(ProbeRequest("POST", server.base + "/rpc", "{}"), timeout=2)
    assert result.status == 403
