"""``http://`` and ``https://`` locations: one ``GET`` with ``Range`` per fetched span.

There is no ``HEAD``: the size comes from the ``Content-Range`` of the first ranged ``GET``,
which also brings the first :data:`~ckptkit.storage.location.PREFETCH` bytes, so inspecting a
safetensors file whose header fits in them costs one request.

Servers that ignore ``Range`` answer 200 with the whole body.  A body of at most
:data:`WHOLE_BODY_LIMIT` bytes is kept (one request, bounded memory); a larger one is refused
after reading nothing of it: never a silent full download.

No credentials are sent (a URL's own ``user:password@`` and query are the user's choice), and
``requests`` drops an ``Authorization`` header when a redirect leaves the host.  Failures map
to ckptkit's errors: 404/410 -> not found (exit 4), 401/403 -> access denied (exit 4), refused
or timed-out connections -> unreachable (exit 4).  A connection reset mid-body is retried
:data:`RETRIES` times, then reported as unreachable.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from ckptkit.errors import AuthError, NotFoundError, SourceError, UsageError
from ckptkit.storage.entries import PREFETCH, Entry
from ckptkit.storage.remote import RemoteLocation, display

#: Largest body kept from a server that ignores ``Range`` (answering 200 with everything).
WHOLE_BODY_LIMIT = 16 << 20
#: Extra attempts after a connection fails mid-body or a 5xx answer.
RETRIES = 2
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_local = threading.local()


def _session() -> Any:
    """One ``requests`` session per thread (connections are kept alive per thread)."""
    session = getattr(_local, "session", None)
    if session is None:
        import requests

        session = requests.Session()
        # An explicit (no-op) auth: requests would otherwise send ~/.netrc credentials to
        # whatever host a URL names.  Proxies and CA bundles from the environment still apply.
        session.auth = _no_credentials
        session.headers["User-Agent"] = "ckptkit"
        session.headers["Accept-Encoding"] = "identity"  # byte offsets of the stored bytes
        _local.session = session
    return session


def _no_credentials(request: Any) -> Any:
    return request


def _timeout() -> float:
    from ckptkit.config import _timeout as configured

    return configured(os.environ.get("CKPTKIT_TIMEOUT"))


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
            data, size, validator, _whole = self._get(0, PREFETCH)
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
        import requests

        last_error: Exception | None = None
        for _attempt in range(RETRIES + 1):
            try:
                with _session().get(self.url, headers={"Range": f"bytes={start}-{stop - 1}"},
                                    stream=True, timeout=_timeout(),
                                    allow_redirects=True) as response:
                    self._count(0)
                    data, size, validator, whole = self._answer(response, start, stop)
                    self._count(len(data), requests=0)
                    return data, size, validator, whole
            except _Retry as exc:
                last_error = exc.__cause__ or exc
            except requests.exceptions.ConnectionError as exc:
                if _refused(exc):
                    raise SourceError(f"{self}: connection refused",
                                      url=str(self), reason="connection refused",
                                      hint="Check the host and port, and that the server runs",
                                      path=str(self)) from None
                last_error = exc
            except requests.exceptions.Timeout as exc:
                last_error = exc
            except requests.exceptions.RequestException as exc:
                last_error = exc
        raise SourceError(f"{self}: unreachable ({_why(last_error)})", url=str(self),
                          reason=_why(last_error), path=str(self),
                          hint="Check the network and the URL, then try again") from None

    def _answer(self, response: Any, start: int,
                stop: int) -> tuple[bytes, int, str | None, bool]:
        status = response.status_code
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
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
            total = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").replace(
                "bytes */", "bytes 0-0/"))
            size = int(total.group(3)) if total and total.group(3) != "*" else 0
            return b"", size, validator, False
        if status >= 500:
            raise _Retry() from SourceError(f"HTTP {status}")
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or match.group(3) == "*" or int(match.group(1)) != start:
                raise SourceError(f"{self}: the server answered a byte range it was not asked "
                                  f"for ({response.headers.get('Content-Range')!r})",
                                  url=str(self), path=str(self),
                                  hint="Download the file and inspect the local copy")
            want = int(match.group(2)) + 1 - start
            return self._body(response, want), int(match.group(3)), validator, False
        if status == 200:
            length = response.headers.get("Content-Length")
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
        import requests

        try:
            data = response.raw.read(want)
        except (requests.exceptions.RequestException, OSError) as exc:
            raise _Retry() from exc
        except Exception as exc:  # urllib3's ProtocolError and friends
            raise _Retry() from exc
        if len(data) < want:
            raise _Retry() from ConnectionError(
                f"connection closed after {len(data)} of {want} bytes")
        return data


class _Retry(Exception):
    """A failure worth one more attempt (the cause says what)."""


def _refused(exc: BaseException) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in str(cause):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__ or (
            cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None)
    return False


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
    if "Name or service not known" in text or "getaddrinfo" in text:
        return "host not found"
    if "IncompleteRead" in text or "incomplete" in text.lower():
        return "connection closed mid-body"
    return type(exc).__name__


__all__ = ["HttpLocation", "WHOLE_BODY_LIMIT", "display"]
