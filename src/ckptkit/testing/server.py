"""HTTP plumbing shared by the local hub stand-ins: a threaded server on 127.0.0.1 that records
every request, and a handler base that answers with byte ranges and validators.

Payloads (in memory or on disk) are served with ``Content-Length``, ``Accept-Ranges``, ``ETag``
(and ``Last-Modified`` for files); one ``Range`` gives 206, honouring ``If-Range``, and an
unsatisfiable one 416 — what ckptkit's downloader and kagglehub rely on to resume.

Each request's status and body bytes sent are recorded; ``StubServer.rate`` caps every
connection's body throughput, and the body faults of :mod:`ckptkit.testing.faults` (drop,
reset, corrupt) are applied while a payload is written.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import re
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

from ckptkit.testing.faults import Fault

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 20  # bytes read from a served file at once: bounds memory per connection
_PACED_BLOCK = 64 << 10  # largest write under a rate cap: keeps the pace smooth
_Self = TypeVar("_Self", bound="StubServer")  # typing.Self needs Python 3.11
_Served = TypeVar("_Served", bound=AbstractContextManager[Any])


@dataclass
class Logged:
    """One request as the server saw it; ``status`` and ``sent`` (body bytes written) are
    filled in as it is answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any = None
    status: int = 0
    sent: int = 0

    @property
    def route(self) -> str:
        """The path without its query string, percent-decoded."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive ``(start, end)`` one ``Range`` header asks of ``size`` bytes.

    Returns None when the header is malformed or unsatisfiable (the caller answers 416).

    Example:
        >>> parse_range("bytes=2-", 10), parse_range("bytes=-3", 10), parse_range("bytes=10-", 10)
        ((2, 9), (7, 9), None)
    """
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    if match.group(1):
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else size - 1
    else:  # a suffix: the last N bytes
        start, end = max(0, size - int(match.group(2))), size - 1
    end = min(end, size - 1)
    if start >= size or start > end:
        return None
    return start, end


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-body (a cancelled download, a killed demo) are routine here;
        # a traceback for each would drown the real failures.
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return
        super().handle_error(request, client_address)


class StubServer:
    """A threaded HTTP server on ``127.0.0.1:port`` (0: ephemeral) running ``handler_class``
    with ``self`` as ``handler.stub``; use as a context manager or call start/stop.

    Every request is appended to ``requests`` (a :class:`Logged`), for assertions, unless
    ``record`` is off (long-running processes).  ``rate`` (bytes per second, None: unlimited)
    caps the body throughput of each connection.
    """

    handler_class: type[BaseHTTPRequestHandler] = BaseHTTPRequestHandler
    record = True
    #: Seconds every request waits before it is answered (a round trip to a far server).
    latency: float = 0.0
    #: Write an access log line per request to stderr.
    verbose: bool = False

    def __init__(self, port: int = 0, *, rate: float | None = None) -> None:
        self.requests: list[Logged] = []
        self.rate = rate
        self.stopping = threading.Event()  # wakes paced writers when the server stops
        self._lock = threading.Lock()
        stub = self

        class Handler(self.handler_class):  # type: ignore[name-defined,misc]
            pass

        Handler.stub = stub
        self._server = _Server(("127.0.0.1", port), Handler)
        self.port: int = self._server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self: _Self) -> _Self:
        """Serve in a daemon thread; returns ``self``."""
        # A short poll keeps stop() (and every test teardown) from waiting half a second.
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket: later connections are refused."""
        self.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self: _Self) -> _Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, entry: Logged) -> None:
        """Record one request (called by the handler threads)."""
        if not self.record:
            return
        with self._lock:
            self.requests.append(entry)

    def paths(self, method: str | None = None) -> list[str]:
        """The request paths (with query) seen so far, optionally only those of ``method``."""
        with self._lock:
            return [r.path for r in self.requests if method is None or r.method == method]

    def hits(self, route: str | None = None, method: str | None = None) -> list[Logged]:
        """The requests to ``route`` (a decoded path without query; None: all), optionally
        only those of ``method``."""
        with self._lock:
            return [r for r in self.requests if (route is None or r.route == route)
                    and (method is None or r.method == method)]

    def bytes_sent(self, route: str | None = None) -> int:
        """Body bytes written so far in answers to ``route`` (None: to every request)."""
        return sum(r.sent for r in self.hits(route))

    def reset_counts(self) -> None:
        """Forget the requests recorded so far (counting starts again from zero)."""
        with self._lock:
            self.requests.clear()


class StubHandler(BaseHTTPRequestHandler):
    """Handler base: HTTP/1.1 keep-alive, quiet, and helpers to answer with ranges."""

    stub: Any
    protocol_version = "HTTP/1.1"
    #: Headers and body go out in separate writes: without TCP_NODELAY the body waits for the
    #: client's delayed ACK (~40 ms), which would swamp the latency tests inject.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        # Quiet unless asked: test output stays clean, requests are in stub.requests.
        if getattr(self.stub, "verbose", False):
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    _entry: Logged | None = None

    def _record(self, body: Any = None) -> Logged:
        self._entry = Logged(self.command, self.path, dict(self.headers.items()), body)
        self.stub.log(self._entry)
        latency = getattr(self.stub, "latency", 0.0)
        if latency:
            self.stub.stopping.wait(latency)
        return self._entry

    def _answered(self, status: int) -> None:
        if self._entry is not None:
            self._entry.status = status

    def _count(self, sent: int) -> None:
        if self._entry is not None:
            self._entry.sent += sent

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._answered(status)
        if self.command != "HEAD":
            self.wfile.write(body)
            self._count(len(body))

    def _redirect(self, location: str) -> None:
        self._send(302, b"", headers={"Location": location})

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        """A JSON error body as the Kaggle API sends it."""
        self._json({"code": status, "message": message}, status)

    def _send_blob(self, data: bytes, extra: dict[str, str] | None = None,
                   etag: str | None = None) -> None:
        """Serve ``data`` honouring ``Range`` (one range) and ``If-Range``.

        ``etag`` saves hashing ``data`` again when the caller has it cached.
        """
        etag = etag or blob_etag(data)
        headers = {"Accept-Ranges": "bytes", "ETag": etag, **(extra or {})}
        self._send_span(len(data), lambda start, stop: iter((data[start:stop],)), headers)

    def _send_under(self, root: Path, parts: list[str] | None) -> None:
        """Serve the file ``root/<parts>`` as a static web server would: 404 when ``parts``
        is None (a path that could leave ``root``) or names no file, 403 when unreadable."""
        target = root.joinpath(*parts) if parts else None
        if target is None or not target.is_file():
            self._send(404, b"not found\n")
            return
        try:
            self._send_file(target)
        except PermissionError:
            self._send(403, b"not readable\n")

    def _send_file(self, path: Path, extra: dict[str, str] | None = None) -> None:
        """Serve the file at ``path`` like :meth:`_send_blob`, streamed, with Last-Modified."""
        with open(path, "rb") as fh:
            stat = path.stat()
            headers = {"Accept-Ranges": "bytes", "ETag": file_etag(stat.st_size, stat.st_mtime_ns),
                       "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
                       **(extra or {})}
            self._send_span(stat.st_size, lambda start, stop: self._chunks(fh, start, stop),
                            headers)

    def _send_span(self, size: int, body: Callable[[int, int], Iterator[bytes]],
                   headers: dict[str, str], *, ranges: bool = True,
                   faults: Callable[[int, int], Sequence[Fault]] | None = None) -> None:
        """Answer 200, 206 or 416 for a payload of ``size`` bytes; ``body(start, stop)``
        yields the bytes of ``[start, stop)``.  ``If-Range`` must equal the ETag or the
        Last-Modified in ``headers`` for the range to apply (RFC 9110 13.1.5).

        ``ranges=False`` ignores ``Range`` (a server answering 200 and the whole payload);
        ``faults(start, stop)`` returns the body faults to apply once the span is known.
        """
        wanted = self.headers.get("Range") if ranges else None
        if_range = self.headers.get("If-Range")
        validators = {headers.get("ETag"), headers.get("Last-Modified")} - {None}
        status, start, end = 200, 0, size - 1
        if wanted and (if_range is None or if_range in validators):
            span = parse_range(wanted, size)
            if span is None:
                self._send(416, headers={"Content-Range": f"bytes */{size}"})
                return
            start, end = span
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end + 1 - start))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._answered(status)
        if self.command == "HEAD":
            return
        taken = faults(start, end + 1) if faults is not None else ()
        sent = self._write_body(body(start, end + 1), start, taken)
        if sent != end + 1 - start:
            # The file shrank while being sent, or a fault cut it: the declared length is a
            # lie, so the connection cannot carry another response.
            self.close_connection = True

    def _write_body(self, chunks: Iterator[bytes], start: int, faults: Sequence[Fault]) -> int:
        """Write ``chunks`` (the payload from offset ``start``) under the server's rate cap,
        applying ``faults``; returns the bytes written."""
        cut = min((f.after for f in faults if f.kind in ("drop", "reset")), default=None)
        flips = [f.offset for f in faults if f.kind == "corrupt"]
        rate = self.stub.rate
        block = _CHUNK if rate is None else max(1024, min(_PACED_BLOCK, int(rate / 20)))
        began = time.monotonic()
        sent = 0
        for chunk in chunks:
            view = memoryview(chunk)  # slices without copying; copied only to corrupt
            for at in range(0, len(view), block):
                piece: memoryview | bytearray = view[at:at + block]
                if cut is not None and sent + len(piece) >= cut:
                    piece = piece[:cut - sent]
                hit = [o - start - sent for o in flips if 0 <= o - start - sent < len(piece)]
                if hit:
                    piece = bytearray(piece)
                    for index in hit:
                        piece[index] ^= 0xFF
                # Counted before the write: a client that has read these bytes must already
                # see them in the counters (tests read them as soon as a response ends).
                self._count(len(piece))
                try:
                    self.wfile.write(piece)
                except OSError:
                    self._count(-len(piece))
                    raise
                sent += len(piece)
                if cut is not None and sent >= cut:
                    self._abort(reset=any(f.kind == "reset" for f in faults))
                    return sent
                if rate is not None:
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0 and self.stub.stopping.wait(ahead):
                        return sent
        return sent

    def _abort(self, *, reset: bool) -> None:
        """End the connection mid-body: a clean close (FIN) or, with ``reset``, an RST."""
        self.close_connection = True
        self.wfile.flush()
        if reset:
            # Linger 0: close() sends RST instead of FIN, so the peer's read fails.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
        else:
            self.connection.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _chunks(fh: IO[bytes], start: int, stop: int) -> Iterator[bytes]:
        fh.seek(start)
        left = stop - start
        while left > 0:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def blob_etag(data: bytes) -> str:
    """The strong ETag the stand-ins give an in-memory payload: a prefix of its sha256."""
    return f'"{hashlib.sha256(data).hexdigest()[:16]}"'


def file_etag(size: int, mtime_ns: int) -> str:
    """A strong ETag for a file that changes whenever its size or modification time does."""
    return f'"{mtime_ns:x}-{size:x}"'



def port_number(value: str) -> int:
    """An argparse type: a TCP port number, 0 meaning any free port."""
    if not (value.isascii() and value.isdigit() and 0 <= int(value) <= 65535):
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (0-65535)")
    return int(value)


def entry_point_parser(module: str, description: str, examples: str, *, root_help: str,
                       port_help: str) -> argparse.ArgumentParser:
    """The parser of a stand-in's ``python -m`` entry point, with ROOT (an existing folder)
    and ``--port``; the caller adds its own options."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", metavar="ROOT", type=_folder, help=root_help)
    parser.add_argument("--port", type=port_number, default=0, help=port_help)
    return parser


def _folder(value: str) -> str:
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"ROOT {value!r} is not a directory")
    return value


def serve_until_signalled(open_server: Callable[[], _Served], banner: Callable[[_Served], str],
                          where: str) -> int:
    """The body of a stand-in's ``python -m`` entry point: build the server, print
    ``banner(server)`` (one line, flushed), serve until SIGTERM or SIGINT, stop; returns the
    exit code (1 with a one-line message when ``open_server`` cannot bind ``where``).

    Must run in the main thread: it installs signal handlers (restored on return) before the
    line is printed, so a signal sent after reading it always ends the process cleanly.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server = open_server()
        except OSError as exc:
            print(f"cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        with server:
            print(banner(server), flush=True)
            stop.wait()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
