"""A static file server on 127.0.0.1, as any web server serves a directory: what
``ckpt mirror serve`` runs to try a mirror tree (``ckpt mirror export``) before a real server
(nginx, Apache, a bucket) takes it over.

``GET`` and ``HEAD`` of ``/<path>`` answer the file ``ROOT/<path>`` with byte ranges and
validators (what ckptkit's downloader uses to resume); the query string is ignored, as static
servers ignore it; anything else (a directory, ``..``, a missing file) is 404.  No listings,
no uploads, no other methods.

For tests and benchmarks of remote reads it is also the range server: every request is
counted (``requests``, ``bytes_sent``) when ``record`` is on, ``latency`` delays each answer,
and ``faults`` (a :class:`~ckptkit.testing.faults.FaultQueue` keyed by the request path,
e.g. ``"/model.safetensors"``) makes it answer a status, ignore ``Range``, or drop or reset
the connection mid-body.
"""

from __future__ import annotations

import email.utils
import os
import urllib.parse
from pathlib import Path

from ckptkit.testing.faults import BODY_KINDS, FaultQueue
from ckptkit.testing.mirror import safe_parts
from ckptkit.testing.server import StubHandler, StubServer, file_etag


class _StaticHandler(StubHandler):
    stub: StaticServer

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        faults = self.stub.faults
        [status] = faults.take(path, ("status",)) or [None]
        if status is not None:
            self._send(status.status, b"refused by a test fault\n")
            return
        ignore = bool(faults.take(path, ("ignore-range",)))
        parts = safe_parts(path)
        target = self.stub.root.joinpath(*parts) if parts else None
        if target is None or not target.is_file():
            self._send(404, b"not found\n")
            return
        try:
            fh = open(target, "rb")
        except PermissionError:
            self._send(403, b"not readable\n")
            return
        with fh:
            stat = target.stat()
            headers = {"Accept-Ranges": "none" if ignore else "bytes",
                       "ETag": file_etag(stat.st_size, stat.st_mtime_ns),
                       "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True)}
            self._send_span(stat.st_size, lambda start, stop: self._chunks(fh, start, stop),
                            headers, ranges=not ignore,
                            faults=lambda start, stop: faults.take(path, BODY_KINDS, start,
                                                                   stop))


class StaticServer(StubServer):
    """Serve the directory ``root`` on ``127.0.0.1:port`` (0: any free port; see ``base``).

    Args:
        verbose: write an access log line per request to stderr.
        record: keep every request in ``requests`` (for tests; off for a long run).

    Raises:
        OSError: the port cannot be bound.
    """

    handler_class = _StaticHandler

    def __init__(self, root: str | os.PathLike[str], *, port: int = 0, verbose: bool = False,
                 record: bool = False, latency: float = 0.0, rate: float | None = None) -> None:
        self.root = Path(root)
        self.verbose = verbose
        self.record = record
        self.latency = latency
        self.faults = FaultQueue()
        super().__init__(port, rate=rate)
