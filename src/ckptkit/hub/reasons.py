"""Why a request failed, in a few words a person can act on.

``requests`` reports a refused connection as ``ConnectionError(MaxRetryError("HTTPConnectionPool
(host='…', port=443): Max retries exceeded with url: … (Caused by NewConnectionError(…))"))``:
hundreds of characters around the two words that matter.  :func:`network_reason` walks the
exception chain to the cause and names it the way a person would ("host not found",
"connection refused", "timed out after 30 s"); ``ckpt fetch`` prints it per failed source and
``ckpt doctor`` per probe, so both say the same thing for the same failure.

``requests`` and ``urllib3`` are imported only when an exception is described.
"""

from __future__ import annotations

import errno
import http.client
import socket
import ssl
from collections.abc import Iterator

#: Longest reason kept from an exception's own text (when no known cause matches).
MAX_REASON = 100


def network_reason(exc: BaseException, timeout: float | None = None) -> str:
    """A few words on why ``exc`` (from requests, urllib3 or a socket) ended a request.

    Args:
        exc: the exception, usually a ``requests.RequestException``.
        timeout: the seconds the request was allowed, named in "timed out after N s".

    Example:
        >>> network_reason(ConnectionRefusedError(111, "Connection refused"))
        'connection refused'
    """
    import requests
    import urllib3

    chain = list(_causes(exc))
    kinds = tuple(type(e) for e in chain)

    def has(*types: type[BaseException]) -> bool:
        return any(issubclass(kind, types) for kind in kinds)

    from ckptkit.hub.download.stalls import HeaderTimeout

    header_timeout = next((e for e in chain if isinstance(e, HeaderTimeout)), None)
    if header_timeout is not None:
        return str(header_timeout)
    if has(requests.TooManyRedirects):
        return "redirect loop"
    if has(urllib3.exceptions.NameResolutionError, socket.gaierror):
        return "host not found"
    if has(requests.exceptions.ProxyError, urllib3.exceptions.ProxyError):
        return "the proxy refused or is down"
    if has(ssl.SSLError, requests.exceptions.SSLError, urllib3.exceptions.SSLError):
        return "TLS failed (certificate or clock?)"
    if has(ConnectionRefusedError):
        return "connection refused"
    if has(requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
        return f"timed out after {timeout:g} s" if timeout else "timed out"
    codes = {getattr(e, "errno", None) for e in chain}
    if errno.ENETUNREACH in codes:
        return "network unreachable"
    if errno.EHOSTUNREACH in codes:
        return "host unreachable"
    if has(http.client.RemoteDisconnected):
        return "connection closed without an answer"
    if has(http.client.IncompleteRead) or any("IncompleteRead" in str(e) for e in chain):
        return "connection broke mid-body"
    if has(ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return "connection reset"
    innermost = chain[-1]
    return shorten(str(innermost).splitlines()[0] if str(innermost) else type(innermost).__name__)


def http_reason(status: int) -> str:
    """``HTTP 404``: the status is what a person searches for; the URL is shown beside it."""
    return f"HTTP {status}"


def too_large(limit: int) -> str:
    """The reason for a body refused at the size ceiling."""
    return f"too large (over {limit:,} bytes)"


def stalled(min_speed: int, window: float) -> str:
    """The reason for a body slower than the low-speed limit over its window."""
    return f"stalled (below {min_speed:,} B/s for {window:g} s)"


def sha256_mismatch(actual: str, expected: str, origin: str | None = None) -> str:
    """The reason for bytes whose sha256 is not the expected one; 12 hex digits of each
    tell them apart (the error message keeps both in full)."""
    against = f" the {origin}" if origin else ""
    return f"sha256 {actual[:12]}… differs from{against} {expected[:12]}…"


def shorten(text: str, limit: int = MAX_REASON) -> str:
    """``text`` on one line, at most ``limit`` characters, cut between words (``…`` marks it)."""
    words = " ".join(text.split())
    if len(words) <= limit:
        return words
    cut = words[:limit - 1]
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:(") + "…"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: causes, contexts, exceptions in ``args`` and
    urllib3's ``.reason`` (MaxRetryError), outermost first, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = [current.__cause__, current.__context__, getattr(current, "reason", None),
                  *current.args]
        todo.extend(e for e in nested if isinstance(e, BaseException))
