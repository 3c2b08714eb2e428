"""The HTTP side of one download: requests, failures, retries, the probe.

A :class:`Transport` belongs to one transfer in :mod:`ckptkit.hub.download.download`.  It opens streamed
requests with the transfer's headers and timeouts and keeps track of them, so a failing piece
can wake the threads blocked on stalled sockets (:meth:`Transport.abort_active`).  It sorts
every failure into one of two kinds: :class:`Transient` (a dropped connection, a timeout,
HTTP 429/5xx, a short body), which a :class:`Retrier` retries with backoff, and a final
:class:`~ckptkit.errors.CkptkitError` (404, 401/403, a redirect loop, an HTML page instead of
the file, headers past the deadline of :mod:`ckptkit.hub.download.stalls`), raised at once.  Every final
error carries a short ``reason`` (:mod:`ckptkit.hub.reasons`).  :meth:`Transport.probe` is the
first request of a transfer.

Backoff is a function the transfer passes in, so its knobs stay in :mod:`ckptkit.hub.download.download`.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Literal

from urllib.parse import urlsplit

import requests
import urllib3

from ckptkit import __version__
from ckptkit.errors import AuthError, CkptkitError, IntegrityError, NotFoundError, SourceError
from ckptkit.hub.reasons import http_reason, network_reason
from ckptkit.hub.download.stalls import HeaderTimeout, deadline_session
from ckptkit.hub.download.transfer_plan import Probe, html_expected, parse_content_range, parse_retry_after

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

_NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError,
                   http.client.HTTPException, OSError)
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


class Transient(Exception):
    """A failure worth retrying; ``kind`` decides the error raised once retries run out."""

    def __init__(self, kind: Literal["connect", "timeout", "status", "body"], detail: str, *,
                 status: int | None = None, retry_after: float | None = None,
                 reason: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after = retry_after
        self.reason = reason or detail  # the words for a person, once retries run out


class Aborted(Exception):
    """Another piece failed; this one stops quietly."""


class Restart(Exception):
    """The server answered a range request with the whole file: start over."""

    def __init__(self, changed: bool) -> None:
        super().__init__("file changed" if changed else "range ignored")
        self.changed = changed


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port (the default one when not written)."""
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {
        "http": 80, "https": 443}.get(parts.scheme)


def new_session(connections: int, max_redirects: int,
                header_timeout: float | None = None) -> requests.Session:
    """A session pooling enough connections for ``connections`` concurrent pieces, whose
    answers must have their headers within ``header_timeout`` seconds (None: no deadline)."""
    return deadline_session(connections, max_redirects, header_timeout)


class Transport:
    """The requests of one download of ``url`` into ``dest`` (``dest`` only names errors).

    Args:
        http: the session whose connections are used.
        headers: sent with every request, after ``User-Agent`` and before
            ``Accept-Encoding: identity`` (byte ranges are of the file, not of a gzip).
        timeout: seconds to connect, and seconds without data before a read fails.
        retries: further attempts per request after a :class:`Transient` failure.
        backoff: ``backoff(attempt, retry_after)`` -> seconds to wait before retrying.

    A session from :func:`new_session` also bounds the wait for headers: a
    :class:`~ckptkit.hub.download.stalls.HeaderTimeout` fails the download at once.
    """

    def __init__(self, url: str, dest: Path, *, http: requests.Session, headers: dict[str, str],
                 timeout: float, retries: int,
                 backoff: Callable[[int, float | None], float]) -> None:
        self.url = url
        self.dest = dest
        self.http = http
        self.headers = {"User-Agent": f"ckptkit/{__version__}", **headers,
                        "Accept-Encoding": "identity"}
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.html_ok = html_expected(url)
        self.html_seen = False  # an HTML page came instead of the file: its bytes are worthless
        self.stop = threading.Event()  # set when one piece failed: the others give up
        self._active: set[requests.Response] = set()
        self._active_lock = threading.Lock()

    def retrier(self) -> Retrier:
        """A fresh attempt counter for one request."""
        return Retrier(self)

    def probe(self) -> tuple[Probe, requests.Response | None]:
        """Learn size, range support and validators.  A server that ignores Range answers 200
        with the whole body: that response is returned open, to be streamed, not thrown away."""
        retrier = self.retrier()
        while True:
            try:
                return self._probe_once()
            except Transient as err:
                retrier.failed(err)

    def _probe_once(self) -> tuple[Probe, requests.Response | None]:
        resp = self.open(self.url, {"Range": "bytes=0-0"})
        keep = False
        try:
            status = resp.status_code
            etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
            if status == 206:
                self.check_content_type(resp)
                total = announced_size(resp)
                return Probe(resp.url, total, total is not None, etag, modified), None
            if status == 200:
                self.check_content_type(resp)
                keep = True
                return Probe(resp.url, announced_size(resp), False, etag, modified), resp
            if status == 416:
                span = parse_content_range(resp.headers.get("Content-Range"))
                if span is not None and span.total == 0:  # bytes=0-0 of an empty file
                    return Probe(resp.url, 0, True, etag, modified), None
                return Probe(resp.url, None, False, etag, modified), None
            raise self.status_error(resp)
        finally:
            if not keep:
                self.close(resp, drain=True)

    def open(self, url: str, extra: dict[str, str]) -> requests.Response:
        """GET ``url`` streamed, with ``extra`` headers; the caller must :meth:`close` it.

        Credentials go only to the origin of the URL the download was asked for: pieces
        fetched straight from where it redirected (a CDN) are sent without them, as requests
        drops them on the redirect itself.
        """
        headers = {**self.headers, **extra}
        if _origin(url) != _origin(self.url):
            headers = {k: v for k, v in headers.items()
                       if k.lower() not in _CREDENTIAL_HEADERS}
        try:
            resp = self.http.get(url, headers=headers, stream=True,
                                 timeout=(self.timeout, self.timeout), allow_redirects=True)
        except HeaderTimeout as exc:
            # Not retried: a server that trickles its headers would do it again.
            raise SourceError(f"{self.url}: {exc}", hint="The server is too slow; try another "
                              "source or raise CKPTKIT_HEADER_TIMEOUT", url=self.url,
                              reason=str(exc), path=str(self.dest)) from exc
        except requests.TooManyRedirects as exc:
            raise SourceError(f"{self.url} redirects in a loop (more than "
                              f"{self.http.max_redirects} redirects)",
                              hint="The server is misconfigured; try another source",
                              url=self.url, reason=f"redirect loop (over "
                                                   f"{self.http.max_redirects} redirects)"
                              ) from exc
        except requests.exceptions.SSLError as exc:
            reason = network_reason(exc)
            raise SourceError(f"{self.url}: {reason}",
                              hint="Check the system clock and CA certificates "
                                   "(REQUESTS_CA_BUNDLE)", url=self.url, reason=reason) from exc
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise SourceError(f"{url} is not a valid http(s) URL ({network_reason(exc)})",
                              hint="Fix the URL in the catalogue or the command line",
                              url=url, reason="not a valid http(s) URL") from exc
        except _NETWORK_ERRORS as exc:
            kind = "timeout" if _is_timeout(exc) else "connect"
            reason = network_reason(exc, self.timeout)
            raise Transient(kind, reason, reason=reason) from exc
        with self._active_lock:
            self._active.add(resp)
        return resp

    @contextmanager
    def opened(self, url: str, extra: dict[str, str]) -> Iterator[requests.Response]:
        resp = self.open(url, extra)
        try:
            yield resp
        finally:
            self.close(resp)

    @contextmanager
    def opened_range(self, url: str, start: int, end: int, size: int | None,
                     validator: str | None) -> Iterator[requests.Response]:
        """An open 206 answer for bytes ``[start, end)`` of the file of ``size`` bytes.

        The request carries ``If-Range: validator`` (when known).  Raises :class:`Restart` when
        the server sends the whole file instead (it changed, or it ignores ranges), and
        :class:`Transient` when the answer is not exactly the range asked for.
        """
        asked = f"bytes={start}-{end - 1}"
        extra = {"Range": asked} | ({"If-Range": validator} if validator else {})
        with self.opened(url, extra) as resp:
            if resp.status_code == 200:
                raise Restart(changed=validator is not None)
            if resp.status_code != 206:
                raise self.status_error(resp)
            self.check_content_type(resp)
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None or (span.start, span.end) != (start, end - 1) \
                    or span.total not in (None, size):
                raise Transient("body", f"asked for {asked} of {size:,}, got Content-Range "
                                        f"{resp.headers.get('Content-Range')!r}",
                                reason="wrong Content-Range")
            length = content_length(resp)
            if length is not None and length != end - start:
                raise Transient("body", f"Content-Length {length:,} for {asked} "
                                        f"({end - start:,} bytes)",
                                reason=f"wrong Content-Length ({length:,} for {end - start:,} "
                                       "bytes)")
            yield resp

    def close(self, resp: requests.Response, drain: bool = False) -> None:
        with self._active_lock:
            self._active.discard(resp)
        raw = resp.raw
        if drain:  # the probe's one byte (or a short error page) is read to reuse the socket
            try:
                raw.read(64 << 10, decode_content=False)
            except _NETWORK_ERRORS:
                pass
        if getattr(raw, "length_remaining", None) == 0:
            raw.release_conn()  # body fully read: keep the connection for the next piece
        else:
            resp.close()

    def chunks(self, resp: requests.Response, chunk_size: int) -> Iterator[bytes]:
        """The raw body of ``resp``, at most ``chunk_size`` bytes at a time, until it ends or
        :attr:`stop` is set."""
        raw = resp.raw
        while True:
            if self.stop.is_set():
                raise Aborted()
            try:
                data = raw.read1(chunk_size, decode_content=False)
            except _NETWORK_ERRORS as exc:
                if self.stop.is_set():
                    raise Aborted() from exc
                if _is_timeout(exc):
                    reason = network_reason(exc, self.timeout)
                    raise Transient("timeout", f"the connection broke mid-body ({reason})",
                                    reason=reason) from exc
                raise Transient("body", "the connection broke mid-body",
                                reason="connection broke mid-body") from exc
            if not data:
                return
            yield data

    def abort_active(self) -> None:
        """Wake threads blocked reading a stalled socket, so stopping takes no ``timeout``."""
        with self._active_lock:
            responses = list(self._active)
        for resp in responses:
            try:
                resp.raw.shutdown()  # urllib3 >= 2.3
                continue
            except (AttributeError, ValueError, RuntimeError, OSError):
                pass
            sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def status_error(self, resp: requests.Response) -> Exception:
        """The error for an unexpected status: :class:`Transient` if worth retrying."""
        status = resp.status_code
        if status in (404, 410):
            return NotFoundError(f"{self.url} does not exist (HTTP {status})",
                                 hint="Check the URL, or use another source", path=str(self.dest),
                                 reason=f"{http_reason(status)} (not found)")
        if status in (401, 403):
            return AuthError(f"{self.url} refused access (HTTP {status})",
                             hint="Provide credentials (a token or login for this source) or "
                                  "accept its terms, or use another source",
                             url=self.url, status=status, path=str(self.dest),
                             reason=f"{http_reason(status)} (access refused)")
        if status in RETRY_STATUSES:
            return Transient("status", http_reason(status), status=status,
                             retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        return SourceError(f"{self.url} answered HTTP {status} {resp.reason or ''}".rstrip(),
                           hint="Try another source", url=self.url, status=status,
                           path=str(self.dest), reason=http_reason(status))

    def final_error(self, err: Transient, attempts: int) -> CkptkitError:
        """The error for ``err`` once every retry failed."""
        tries = f"after {attempts} attempts"
        if err.kind == "body":
            return IntegrityError(f"{self.url}: {err.detail} ({tries})",
                                  hint="The server keeps sending incomplete data; try again "
                                       "later or use another source", path=str(self.dest),
                                  reason=f"{err.reason} ({tries})")
        return SourceError(f"{self.url} is unreachable: {err.detail} ({tries})",
                           hint="Check the network, try again later, or use another source",
                           url=self.url, status=err.status, path=str(self.dest),
                           reason=f"{err.reason} ({tries})")

    def check_content_type(self, resp: requests.Response) -> None:
        ctype = unexpected_html(resp, self.url)
        if ctype is not None:
            raise self.html_error(f"Content-Type {ctype}")

    def html_error(self, why: str) -> SourceError:
        """The error for an HTML page instead of the file; sets :attr:`html_seen`."""
        self.html_seen = True
        return SourceError(f"{self.url} returned an HTML page instead of the file ({why})",
                           hint="The link may need a login or a confirmation page, or has "
                                "moved; try another source", url=self.url, path=str(self.dest),
                           reason="an HTML page instead of the file")


class Retrier:
    """Counts failed attempts of one request and sleeps between them."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._attempts = 0

    def reset(self) -> None:
        self._attempts = 0

    def failed(self, err: Transient) -> None:
        """Sleep before the next attempt, or raise the final error when none is left."""
        self._attempts += 1
        if self._attempts > self._transport.retries:
            raise self._transport.final_error(err, self._attempts) from err
        if self._transport.stop.wait(self._transport.backoff(self._attempts, err.retry_after)):
            raise Aborted()


def content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def announced_size(resp: requests.Response) -> int | None:
    """The file size announced by the answer to a ``Range: bytes=0-0`` probe: the total of a
    206's ``Content-Range``, the ``Content-Length`` of a 200 (a server that ignores ranges), else
    None.  Shared by the downloader, ``fetch --dry-run`` and ``ckpt doctor``."""
    if resp.status_code == 206:
        span = parse_content_range(resp.headers.get("Content-Range"))
        return span.total if span is not None else None
    if resp.status_code == 200:
        return content_length(resp)
    return None


def unexpected_html(resp: requests.Response, url: str) -> str | None:
    """The Content-Type of ``resp`` when it is an HTML page although ``url`` names a file (a
    login, error or confirmation page), else None.  URLs of HTML documents may answer with HTML
    (:func:`~ckptkit.hub.download.transfer_plan.html_expected`).  The downloader refuses such an answer;
    ``ckpt doctor`` reports it, so the two never disagree."""
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return ctype if ctype in _HTML_TYPES and not html_expected(url) else None


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError))

