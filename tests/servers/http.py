"""An HTTP/1.1 file server on 127.0.0.1 with byte ranges, validators, redirects and faults.

Built on ``http.server.ThreadingHTTPServer`` (one thread per connection, keep-alive).  Each
path serves an in-memory or on-disk payload with ``Accept-Ranges``, ``ETag``,
``Last-Modified`` and ``Content-Length``; ``Range`` gives 206 (``If-Range`` honoured, 416 when
unsatisfiable).  Faults are queued per path and consumed by the requests they apply to, and
every request is recorded, so tests can assert on retries, ranges and bytes sent.

Example::

    from tests.servers.http import Fault, http_server  # noqa: F401  (the fixture)

    def test_retry(http_server):
        http_server.add("/f.bin", payload, faults=[Fault("drop", after=1000)])
        download(http_server.url("/f.bin"), dest)
        assert len(http_server.hits("/f.bin")) == 3  # probe, dropped piece, retried piece
"""

from __future__ import annotations

import email.utils
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pytest

from ckptkit.testing.faults import consume

HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
             b"<body><p>Please sign in to continue.</p></body></html>\n")
_BLOCK = 64 << 10
#: A host name no resolver can look up and none sends a query for: 5 labels of 60 letters,
#: past DNS's 253-character limit, so glibc fails it locally ("Name or service not known").
#: Tests reach it with NO_PROXY=no_proxy=* (the suite's proxies are a dead loopback port).
UNRESOLVABLE = ".".join(["unresolvable" + "x" * 48] * 5)

FaultKind = Literal["status", "drop", "stall", "delay", "flip", "length", "html", "drip",
                    "drip-headers", "chunked"]


@dataclass
class Fault:
    """One misbehaviour for the next ``times`` requests it applies to (None: all of them).

    kinds: ``status`` (answer ``status``, with ``retry_after``), ``drop`` (close the connection
    after ``after`` body bytes), ``stall`` (send ``after`` bytes, then nothing for ``seconds``;
    None: until :attr:`HTTPTestServer.release` is set), ``delay`` (wait ``seconds`` before the
    headers, or less: until :attr:`HTTPTestServer.stalled` is set when ``until_stalled``, until
    ``concurrent`` requests have been in flight at once when that is given), ``flip`` (invert
    the byte at absolute ``offset`` in transit), ``length`` (declare ``Content-Length`` off by
    ``delta``), ``html`` (answer 200 with an HTML page; ``content_type`` can lie about it),
    ``drip`` (send
    ``after`` bytes, then one byte every ``seconds``), ``drip-headers`` (send the status line and
    headers, padded to ``after`` bytes, one byte every ``seconds``), ``chunked`` (no
    ``Content-Length``: the body is chunked, endless when ``after`` is 0, else the payload).

    ``only`` restricts it to the probe (``Range: bytes=0-0``) or to data requests; ``start``
    to requests whose range starts at that offset; ``skip`` lets that many matching requests
    through first.  drop/stall/flip only match responses long enough to be affected.
    """

    kind: FaultKind
    times: int | None = 1
    skip: int = 0
    status: int = 500
    retry_after: str | None = None
    after: int = 0
    seconds: float = 0.0
    offset: int = 0
    delta: int = 0
    content_type: str = "text/html; charset=utf-8"
    only: Literal["probe", "data"] | None = None
    start: int | None = None
    until_stalled: bool = False
    concurrent: int | None = None


@dataclass
class Route:
    """What one path serves.  ``swap_to`` replaces the payload (new ETag and Last-Modified)
    once ``swap_after`` requests have been answered: "the file changed on the server"."""

    data: bytes | Path
    content_type: str = "application/octet-stream"
    ranges: bool = True
    etag: bool = True
    last_modified: bool = True
    rate: float | None = None
    faults: list[Fault] = field(default_factory=list)
    swap_to: bytes | None = None
    swap_after: int | None = None
    version: int = 0
    served: int = 0

    @property
    def size(self) -> int:
        return self.data.stat().st_size if isinstance(self.data, Path) else len(self.data)

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.data, Path):
            with open(self.data, "rb") as fh:
                fh.seek(start)
                return fh.read(end - start)
        return self.data[start:end]

    def etag_value(self) -> str | None:
        if not self.etag:
            return None
        basis = (f"{self.data}:{self.size}".encode() if isinstance(self.data, Path)
                 else hashlib.sha1(self.data).hexdigest().encode())
        return '"' + hashlib.sha1(basis + b"%d" % self.version).hexdigest()[:16] + '"'

    def last_modified_value(self) -> str | None:
        if not self.last_modified:
            return None
        return email.utils.formatdate(1_700_000_000 + 3600 * self.version, usegmt=True)


@dataclass
class Hit:
    """One request as the server saw it; ``sent`` grows while the body is written."""

    path: str
    method: str
    range: str | None
    if_range: str | None
    connection: int
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    sent: int = 0
    faults: list[str] = field(default_factory=list)
    stalling: bool = False  # inside a stall fault right now


class HTTPTestServer:
    """The server; use as a context manager or through the ``http_server`` fixture."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.redirects: dict[str, tuple[int, str]] = {}
        self.stopping = threading.Event()
        #: set by a test to end every open-ended stall (``Fault("stall", seconds=None)``)
        self.release = threading.Event()
        #: set by the server when a stall begins: the transfer is surely under way
        self.stalled = threading.Event()
        self.in_flight = 0
        self.peak_in_flight = 0  # most requests being answered at once
        self._lock = threading.Lock()
        self._hits: list[Hit] = []
        self._connections = 0
        self._sockets: set[socket.socket] = set()
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="test-http",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, data: bytes | Path, **options: object) -> Route:
        """Serve ``data`` at ``path``; ``options`` are :class:`Route` fields."""
        route = Route(data=data, **options)  # type: ignore[arg-type]
        with self._lock:
            self.routes[path] = route
        return route

    def redirect(self, path: str, to: str, status: int = 302) -> None:
        with self._lock:
            self.redirects[path] = (status, to)

    def hits(self, path: str | None = None) -> list[Hit]:
        with self._lock:
            return [hit for hit in self._hits if path is None or hit.path == path]

    def ranges(self, path: str) -> list[str | None]:
        return [hit.range for hit in self.hits(path)]

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(hit.sent for hit in self.hits(path))

    @property
    def connections(self) -> int:
        return self._connections

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every client connection is closed (e.g. those of a killed client)."""
        deadline = time.monotonic() + timeout
        while self._sockets and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self._sockets, f"{len(self._sockets)} connections still open"

    def reset_stats(self) -> None:
        with self._lock:
            self._hits.clear()
            self._connections = 0

    def start(self) -> HTTPTestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.release.set()
        self._httpd.shutdown()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:  # idle keep-alive connections would keep their threads alive
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HTTPTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # used by the handler
    def _record(self, hit: Hit) -> None:
        with self._lock:
            self._hits.append(hit)

    def _connect(self, sock: socket.socket) -> int:
        with self._lock:
            self._connections += 1
            self._sockets.add(sock)
            return self._connections

    def _disconnect(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def _take_faults(self, route: Route, kind_filter: set[str], info: _Request) -> list[Fault]:
        """The faults that apply to this request (the first of each kind), consumed."""
        with self._lock:
            return consume(route.faults, kind_filter, lambda fault: _applies(fault, info))

    def _current(self, route: Route) -> Route:
        with self._lock:
            route.served += 1
            if route.swap_to is not None and route.swap_after is not None \
                    and route.served > route.swap_after:
                route.data, route.swap_to = route.swap_to, None
                route.version += 1
        return route


@dataclass(frozen=True)
class _Request:
    probe: bool
    start: int
    end: int  # exclusive end of the body that would be sent


def _applies(fault: Fault, info: _Request) -> bool:
    if fault.only == "probe" and not info.probe or fault.only == "data" and info.probe:
        return False
    if fault.start is not None and fault.start != info.start:
        return False
    if fault.kind in ("drop", "stall"):
        return info.end - info.start > fault.after
    if fault.kind == "flip":
        return info.start <= fault.offset < info.end
    return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 owner: HTTPTestServer) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up mid-body are the point of these tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.owner = self.server.owner
        self.conn_id = self.owner._connect(self.connection)

    def finish(self) -> None:
        self.owner._disconnect(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path
        hit = Hit(path=path, method=self.command, range=self.headers.get("Range"),
                  if_range=self.headers.get("If-Range"), connection=self.conn_id,
                  headers=dict(self.headers.items()))
        self.owner._record(hit)
        with self.owner._lock:
            self.owner.in_flight += 1
            self.owner.peak_in_flight = max(self.owner.peak_in_flight, self.owner.in_flight)
        try:
            self._respond(hit, path, body)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        finally:
            with self.owner._lock:
                self.owner.in_flight -= 1

    def _respond(self, hit: Hit, path: str, body: bool) -> None:
        if path in self.owner.redirects:
            status, to = self.owner.redirects[path]
            self._simple(hit, status, b"", extra={"Location": to})
            return
        route = self.owner.routes.get(path)
        if route is None:
            self._simple(hit, 404, b"not found\n")
            return
        route = self.owner._current(route)
        size, etag, modified = route.size, route.etag_value(), route.last_modified_value()
        start, end, status = 0, size, 200
        if route.ranges and hit.range and (hit.if_range is None
                                           or hit.if_range in (etag, modified)):
            span = _parse_range(hit.range, size)
            if span is None:
                self._simple(hit, 416, b"", extra={"Content-Range": f"bytes */{size}"})
                return
            start, end, status = span[0], span[1], 206
        info = _Request(probe=hit.range == "bytes=0-0", start=start, end=end)
        early = self.owner._take_faults(route, {"status", "html", "delay"}, info)
        for fault in early:
            hit.faults.append(fault.kind)
            if fault.kind == "delay":
                self._delay(fault)
            elif fault.kind == "status":
                extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self._simple(hit, fault.status, b"error\n", extra=extra)
                return
            elif fault.kind == "html":
                self._simple(hit, 200, HTML_PAGE, ctype=fault.content_type)
                return
        faults = self.owner._take_faults(route, {"drop", "stall", "flip", "length", "drip",
                                                 "drip-headers", "chunked"}, info)
        hit.faults.extend(fault.kind for fault in faults)
        declared = end - start + sum(f.delta for f in faults if f.kind == "length")
        chunked = next((f for f in faults if f.kind == "chunked"), None)
        headers = {"Content-Type": route.content_type, "Content-Length": str(declared)}
        if chunked is not None:
            del headers["Content-Length"]
            headers["Transfer-Encoding"] = "chunked"
        if route.ranges:
            headers["Accept-Ranges"] = "bytes"
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if etag:
            headers["ETag"] = etag
        if modified:
            headers["Last-Modified"] = modified
        hit.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        slow = next((f for f in faults if f.kind == "drip-headers"), None)
        if slow is not None:
            self._drip_headers(hit, slow)
            return
        self.end_headers()
        if body and chunked is not None:
            self._send_chunked(hit, route, chunked)
            self.close_connection = True
        elif body:
            # Never send more than declared: extra bytes would corrupt the next keep-alive reply.
            self._send_body(hit, route, start, min(end, start + declared), faults)
            if declared > end - start:
                self.close_connection = True  # the client waits for bytes that never come

    def _delay(self, fault: Fault) -> None:
        """Wait before the headers: ``seconds`` at most, less when the fault names an event."""
        deadline = time.monotonic() + (fault.seconds if fault.seconds is not None else 3600)
        while not self.owner.stopping.is_set() and time.monotonic() < deadline:
            if fault.until_stalled and self.owner.stalled.is_set():
                return
            if fault.concurrent is not None and self.owner.peak_in_flight >= fault.concurrent:
                return
            if fault.seconds is None and self.owner.release.is_set():
                return
            self.owner.stopping.wait(0.005)

    def _drip_headers(self, hit: Hit, fault: Fault) -> None:
        """Send the buffered status line and headers, padded, one byte per ``seconds``."""
        pad = max(0, fault.after - len(b"".join(self._headers_buffer)))
        self.send_header("X-Padding", "p" * pad)
        self._headers_buffer.append(b"\r\n")
        raw = b"".join(self._headers_buffer)
        self._headers_buffer = []
        self.close_connection = True
        for byte in raw:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            hit.sent += 1
            if self.owner.stopping.wait(fault.seconds):
                return

    def _send_chunked(self, hit: Hit, route: Route, fault: Fault) -> None:
        """A chunked body: the payload (``after`` > 0), or zeros until the client hangs up."""
        block = bytes(_BLOCK)
        pos = 0
        while not self.owner.stopping.is_set():
            data = route.read(pos, pos + _BLOCK) if fault.after else block
            if not data:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            pos += len(data)
            hit.sent += len(data)
        self.wfile.write(b"0\r\n\r\n")

    def _send_body(self, hit: Hit, route: Route, start: int, end: int,
                   faults: list[Fault]) -> None:
        drop = next((f.after for f in faults if f.kind == "drop"), None)
        stall = next((f for f in faults if f.kind == "stall"), None)
        drip = next((f for f in faults if f.kind == "drip"), None)
        flips = [f.offset for f in faults if f.kind == "flip"]
        block = _BLOCK if route.rate is None else max(1024, min(_BLOCK, int(route.rate / 20)))
        began = time.monotonic()
        pos = start
        while pos < end:
            limit = end
            if drop is not None:
                limit = min(limit, start + drop)
            if stall is not None:
                limit = min(limit, start + stall.after)
            if pos >= limit:
                if stall is not None:
                    self._stall(hit, stall)
                    stall = None
                    continue
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            step = block
            if drip is not None:  # ``after`` bytes as usual, then one at a time
                step = max(1, min(block, start + drip.after - pos))
            data = bytearray(route.read(pos, min(pos + step, limit)))
            for offset in flips:
                if pos <= offset < pos + len(data):
                    data[offset - pos] ^= 0xFF
            self.wfile.write(data)
            pos += len(data)
            hit.sent += len(data)
            if drip is not None and pos - start > drip.after:
                self.wfile.flush()
                if self.owner.stopping.wait(drip.seconds):
                    return
            if route.rate is not None:
                ahead = (pos - start) / route.rate - (time.monotonic() - began)
                if ahead > 0 and self.owner.stopping.wait(ahead):
                    return

    def _stall(self, hit: Hit, fault: Fault) -> None:
        """Send nothing for ``fault.seconds`` (None: until released or stopped)."""
        self.wfile.flush()
        hit.stalling = True
        self.owner.stalled.set()
        try:
            if fault.seconds is None:
                self.owner.release.wait()
            else:
                self.owner.stopping.wait(fault.seconds)
        finally:
            hit.stalling = False

    def _simple(self, hit: Hit, status: int, payload: bytes, *,
                ctype: str = "text/plain", extra: dict[str, str] | None = None) -> None:
        hit.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
            hit.sent += len(payload)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``a-`` / ``-n`` -> [start, end); None when unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first:
        length = int(last)
        return (max(0, size - length), size) if length > 0 and size > 0 else None
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    return (start, end) if start < size and start < end else None


@pytest.fixture
def http_server() -> Iterator[HTTPTestServer]:
    """A started :class:`HTTPTestServer`, stopped after the test."""
    with HTTPTestServer() as server:
        yield server
