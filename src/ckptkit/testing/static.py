"""A static file server on 127.0.0.1, as any web server serves a directory: what
``ckpt mirror serve`` runs to try a mirror tree (``ckpt mirror export``) before a real server
(nginx, Apache, a bucket) takes it over.

``GET`` and ``HEAD`` of ``/<path>`` answer the file ``ROOT/<path>`` with byte ranges and
validators (what ckptkit's downloader uses to resume); the query string is ignored, as static
servers ignore it; anything else (a directory, ``..``, a missing file) is 404.  No listings,
no uploads, no other methods.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from ckptkit.testing.mirror import safe_parts
from ckptkit.testing.server import StubHandler, StubServer


class _StaticHandler(StubHandler):
    stub: StaticServer

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self._send_under(self.stub.root, safe_parts(path))


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
                 record: bool = False) -> None:
        self.root = Path(root)
        self.verbose = verbose
        self.record = record
        super().__init__(port)
