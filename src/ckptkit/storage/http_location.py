"""``http://`` and ``https://`` locations: one ``GET`` with ``Range`` per fetched span.

There is no ``HEAD``: the size comes from the ``Content-Range`` of the first ranged ``GET``,
which also brings the first :data:`~ckptkit.storage.remote.HEAD` bytes, so inspecting a
safetensors file whose header fits in them costs one request.

Servers that ignore ``Range`` answer 200 with the whole body.  A body of at most
:data:`WHOLE_BODY_LIMIT` bytes is kept (one request, bounded memory); a larger one is refused
after reading nothing of it: never a silent full download.

No credentials are sent but a URL's own (``user:password@``, as Basic auth, and only to that
URL's host: never after a redirect to another one; a presigned query stays in its URL).
The client is the standard library's, with connections kept alive per thread and host and
the ``http(s)_proxy``/``no_proxy`` variables honoured.  Failures map
to ckptkit's errors: 404/410 -> not found (exit 4), 401/403 -> access denied (exit 4), refused
or timed-out connections -> unreachable (exit 4).  A connection reset mid-body is retried
:data:`RETRIES` times, then reported as unreachable.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import socket
import threading
import urllib.parse
from typing import Any

from ckptkit.errors import AuthError, CkptkitError, NotFoundError, SourceError, UsageError
from ckptkit.storage.entries import Entry
from ckptkit.storage.remote import HEAD, RemoteLocation, display

#: Largest body kept from a server that ignores ``Range`` (answering 200 with everything).
WHOLE_BODY_LIMIT = 16 << 20
#: Extra attempts after a connection fails mid-body or a 5xx answer.
RETRIES = 2
#: Redirects followed before giving up.
MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_local = threading.local()


def _timeout() -> float:
    from ckptkit.config import _timeout as configured

    return configured(os.environ.get("CKPTKIT_TIMEOUT"))


def _connection(parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
    """A kept-alive connection to the URL's host, one per thread and host, through the
    ``http(s)_proxy`` the environment names (``no_proxy`` honoured).  The standard library's
    client: ``ckpt inspect URL`` does not pay for importing a bigger one."""
    pool: dict[tuple[str, str], http.client.HTTPConnection] = _local.__dict__.setdefault(
        "pool", {})
    key = (parts.scheme, parts.netloc.rpartition("@")[2])
    conn = pool.get(key)
    if conn is None:
        import urllib.request

        host, port = parts.hostname or "", parts.port
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and urllib.request.proxy_bypass(host):
            proxy = None
        cls: Any = http.client.HTTPSConnection if parts.scheme == "https" else \
            http.client.HTTPConnection
        if proxy:
            via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            conn = cls(via.hostname, via.port, timeout=_timeout())
            conn.set_tunnel(host, port)
        else:
            conn = cls(host, port, timeout=_timeout())
        pool[key] = conn
    return conn


def _drop(parts: urllib.parse.SplitResult) -> None:
    """Close and forget the connection to the URL's host (after an error or an unread body)."""
    pool = _local.__dict__.get("pool", {})
    conn = pool.pop((parts.scheme, parts.netloc.rpartition("@")[2]), None)
    if conn is not None:
        conn.close()


class HttpLocation(RemoteLocation):
    """A file behind an ``http(s)://`` URL (no listings: HTTP has none)."""

    def _quotes(self) -> bool:
        return True

    def _make(self, url: str) -> HttpLocation:
        return HttpLocation(url)

    def _is_dir(self) -> bool:
        return False

    def _list(self) -> list[Entry]:
        raise UsageError(f"{self}: HTTP has no directory listings",
                         hint="Name a file, or use an object store URL (s3://, gs://, hf://)")

    def _stat(self) -> tuple[int, str | None] | None:
        # The first ranged GET tells the size and brings the head: no HEAD request.
        try:
            data, size, validator, _whole = self._get(0, HEAD)
        except NotFoundError:
            return None
        with self._lock:
            self._keep(0, data)
        return size, validator

    def _fetch(self, start: int, stop: int) -> bytes:
        data, _size, _validator, whole = self._get(start, stop)
        if whole:  # the whole body, from a server ignoring Range: keep it all
            with self._lock:
                self._keep(0, data)
            return data[start:stop]
        return data

    def _get(self, start: int, stop: int) -> tuple[bytes, int, str | None, bool]:
        """The bytes ``[start, stop)`` (or the whole body, flagged), the file's size and its
        validator."""
        last_error: BaseException | None = None
        for _attempt in range(RETRIES + 1):
            try:
                return self._request(start, stop)
            except _Retry as exc:
                last_error = exc.__cause__ or exc
            except CkptkitError:
                raise  # an answer (404, 403, Range ignored): no retry
            except ConnectionRefusedError:
                raise SourceError(f"{self}: connection refused", url=str(self),
                                  reason="connection refused", path=str(self),
                                  hint="Check the host and port, and that the server runs"
                                  ) from None
            except socket.gaierror:
                raise SourceError(f"{self}: host not found", url=str(self),
                                  reason="host not found", path=str(self),
                                  hint="Check the host name and the network") from None
            except (OSError, http.client.HTTPException) as exc:
                last_error = exc
        raise SourceError(f"{self}: unreachable ({_why(last_error)})", url=str(self),
                          reason=_why(last_error), path=str(self),
                          hint="Check the network and the URL, then try again") from None

    def _request(self, start: int, stop: int) -> tuple[bytes, int, str | None, bool]:
        """One ranged GET, following redirects; credentials in the URL go only to its host."""
        url = self.url
        first = urllib.parse.urlsplit(url)
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            headers = {"Range": f"bytes={start}-{stop - 1}", "User-Agent": "ckptkit",
                       "Accept-Encoding": "identity"}
            if parts.username is not None and parts.netloc == first.netloc:
                secret = f"{urllib.parse.unquote(parts.username)}:" \
                         f"{urllib.parse.unquote(parts.password or '')}"
                headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            conn = _connection(parts)
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException):
                _drop(parts)
                raise
            self._count(0)
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                _drop(parts)  # its body is not worth reading
                continue
            try:
                data, size, validator, whole = self._answer(response, start, stop)
            except BaseException:
                _drop(parts)
                raise
            if response.will_close:
                _drop(parts)
            self._count(len(data), requests=0)
            return data, size, validator, whole
        raise SourceError(f"{self}: more than {MAX_REDIRECTS} redirects", url=str(self),
                          path=str(self), hint="Check the URL")

    def _answer(self, response: Any, start: int,
                stop: int) -> tuple[bytes, int, str | None, bool]:
        status = response.status
        validator = response.getheader("ETag") or response.getheader("Last-Modified")
        if status in (404, 410):
            raise NotFoundError(f"{self}: no such file (HTTP {status})", path=str(self),
                                hint="Check the URL")
        if status in (401, 403):
            raise AuthError(f"{self}: access denied (HTTP {status})", url=str(self),
                            status=status, path=str(self), reason=f"HTTP {status}",
                            hint="ckptkit sends no credentials over plain HTTP(S): use a "
                                 "presigned URL, or an s3://, gs:// or hf:// URL, which use "
                                 "their own credential chains (docs/remote.md)")
        if status == 416:
            total = _CONTENT_RANGE.match((response.getheader("Content-Range") or "").replace(
                "bytes */", "bytes 0-0/"))
            size = int(total.group(3)) if total and total.group(3) != "*" else 0
            return b"", size, validator, False
        if status >= 500:
            raise _Retry() from SourceError(f"HTTP {status}")
        if status == 206:
            match = _CONTENT_RANGE.match(response.getheader("Content-Range") or "")
            if not match or match.group(3) == "*" or int(match.group(1)) != start:
                raise SourceError(f"{self}: the server answered a byte range it was not asked "
                                  f"for ({response.getheader('Content-Range')!r})",
                                  url=str(self), path=str(self),
                                  hint="Download the file and inspect the local copy")
            want = int(match.group(2)) + 1 - start
            return self._body(response, want), int(match.group(3)), validator, False
        if status == 200:
            length = response.getheader("Content-Length")
            if length is None or int(length) > WHOLE_BODY_LIMIT:
                what = f"all {int(length):,} bytes" if length else "a body of unknown size"
                raise SourceError(
                    f"{self}: the server ignores byte ranges and would send {what}",
                    url=str(self), path=str(self), reason="byte ranges not supported",
                    hint="ckptkit reads remote files by ranges and does not download them "
                         "whole; download it (`ckpt fetch` or curl) and use the local copy")
            body = self._body(response, int(length))
            return body, len(body), validator, True
        raise SourceError(f"{self}: HTTP {status}", url=str(self), status=status,
                          path=str(self), reason=f"HTTP {status}",
                          hint="Check the URL, or try again later")

    def _body(self, response: Any, want: int) -> bytes:
        try:
            data = response.read(want)
        except http.client.IncompleteRead as exc:
            raise _Retry() from ConnectionError(
                f"connection closed after {len(exc.partial)} of {want} bytes")
        except (OSError, http.client.HTTPException) as exc:
            raise _Retry() from exc
        if len(data) < want:
            raise _Retry() from ConnectionError(
                f"connection closed after {len(data)} of {want} bytes")
        return data


class _Retry(Exception):
    """A failure worth one more attempt (the cause says what)."""


def _why(exc: BaseException | None) -> str:
    """A few words on a transport failure, without the URL (which may carry secrets)."""
    if exc is None:
        return "no answer"
    text = str(exc)
    if "reset" in text.lower():
        return "connection reset"
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "timed out"
    if "closed after" in text:
        return text
    return type(exc).__name__


__all__ = ["HttpLocation", "WHOLE_BODY_LIMIT", "display"]
