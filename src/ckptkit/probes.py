"""Reachability probes: the first request a source's client would send, and nothing more.

* URL and TF Hub sources: ``GET`` with ``Range: bytes=0-0``, redirects followed — the probe the
  downloader itself starts with (:mod:`ckptkit.transport`).  For TF Hub the URL is the handle
  with ``tf-hub-format=compressed`` (:func:`ckptkit.sources.tfhub.compressed_url`), which
  redirects to the archive.  At most one byte is asked for and the body is never read, so no
  model is downloaded.
* Kaggle sources: the ``ListModelInstanceVersionFiles`` RPC kagglehub sends first for a pinned
  version that is not in its cache: a small JSON listing, never the files.

:func:`send` never raises for network trouble: a probe that gets no answer says why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import requests

from ckptkit import __version__
from ckptkit.errors import MissingDependencyError, UsageError

MAX_REDIRECTS = 10
KAGGLE_RPC = "/v1/models.ModelApiService/ListModelInstanceVersionFiles"
KAGGLE_PAGE_SIZE = 25  # what kagglehub asks for (MAX_NUM_FILES_DIRECT_DOWNLOAD)
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


@dataclass(frozen=True)
class ProbeRequest:
    """One request to send; ``body`` is JSON text (POST only)."""

    method: Literal["GET", "POST"]
    url: str
    body: str | None = None


@dataclass(frozen=True)
class ProbeResult:
    """What a probe learnt.

    Attributes:
        url: the URL asked.
        status: the HTTP status of the final answer (for Kaggle, the ``code`` of a JSON error
            body when there is one); None when no answer came.
        error: why no answer came (refused, timed out, host not found, …), else None.
        seconds: how long it took.
        size: the size the server announced for the file, when it did.
        html: the answer was an HTML page (a login or error page), not a file.
    """

    url: str
    status: int | None
    error: str | None
    seconds: float
    size: int | None = None
    html: bool = False


def download_probe(url: str) -> ProbeRequest:
    """The downloader's first request for ``url`` (already rewritten by any mirror)."""
    return ProbeRequest("GET", url)


def kaggle_probe(handle: str, base: str) -> ProbeRequest:
    """kagglehub's first request for the pinned Kaggle ``handle``, sent to the API ``base``.

    Raises:
        MissingDependencyError: kagglehub is not installed (it names the framework enum).
        UsageError: the handle's framework is not one Kaggle knows.
    """
    try:
        from kagglehub.handle import parse_model_handle
    except ImportError as exc:
        raise MissingDependencyError("kagglehub", "kaggle", "Using Kaggle sources") from exc
    parsed = parse_model_handle(handle)
    try:
        framework = parsed.framework_enum().name
    except ValueError as exc:
        raise UsageError(f"Kaggle handle {handle!r} names an unknown framework "
                         f"{parsed.framework!r}") from exc
    body = {"ownerSlug": parsed.owner, "modelSlug": parsed.model, "framework": framework,
            "instanceSlug": parsed.variation, "versionNumber": parsed.version,
            "pageSize": KAGGLE_PAGE_SIZE}
    return ProbeRequest("POST", base.rstrip("/") + KAGGLE_RPC, json.dumps(body))


def send(request: ProbeRequest, *, timeout: float,
         headers: Mapping[str, str] | None = None) -> ProbeResult:
    """Send ``request``; ``timeout`` bounds the connection and each wait for data.

    Example:
        >>> send(download_probe("http://127.0.0.1:9/x"), timeout=1).error  # doctest: +SKIP
        'connection refused'
    """
    sent = {"User-Agent": f"ckptkit/{__version__}", "Accept-Encoding": "identity",
            **(headers or {})}
    if request.method == "GET":
        sent["Range"] = "bytes=0-0"
    else:
        sent["Content-Type"] = "application/json"
    start = time.monotonic()
    with requests.Session() as session:
        session.max_redirects = MAX_REDIRECTS
        try:
            resp = session.request(request.method, request.url, headers=sent, data=request.body,
                                   stream=request.method == "GET", timeout=(timeout, timeout))
        except requests.RequestException as exc:
            return ProbeResult(request.url, None, _reason(exc, timeout),
                               time.monotonic() - start)
        with resp:
            status = resp.status_code
            if request.method == "POST":
                status = _rpc_status(resp)
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            return ProbeResult(request.url, status, None, time.monotonic() - start,
                               size=_announced_size(resp), html=ctype in _HTML_TYPES)


def _announced_size(resp: requests.Response) -> int | None:
    from ckptkit.transfer_plan import parse_content_range

    if resp.status_code == 206:
        found = parse_content_range(resp.headers.get("Content-Range"))
        return found.total if found else None
    if resp.status_code == 200 and resp.request.method == "GET":
        length = resp.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else None
    return None


def _rpc_status(resp: requests.Response) -> int:
    """The status, or the ``code`` of a JSON error body kagglesdk would raise on."""
    if resp.status_code < 400:
        try:
            code = resp.json().get("code")
        except (ValueError, AttributeError):
            return resp.status_code
        if isinstance(code, int) and code >= 400:
            return code
    return resp.status_code


def _reason(exc: requests.RequestException, timeout: float) -> str:
    """A few words on why no answer came."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, requests.TooManyRedirects):
        return f"more than {MAX_REDIRECTS} redirects"
    if isinstance(exc, requests.exceptions.ProxyError):
        return "the proxy refused or is down"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error (certificate?)"
    text = str(exc)
    for needle, words in (("Connection refused", "connection refused"),
                          ("Name or service not known", "host not found"),
                          ("nodename nor servname", "host not found"),
                          ("Temporary failure in name resolution", "host not found (DNS)"),
                          ("Network is unreachable", "network unreachable"),
                          ("RemoteDisconnected", "connection closed without an answer"),
                          ("Connection reset", "connection reset"),
                          ("Connection aborted", "connection closed without an answer")):
        if needle in text:
            return words
    return type(exc).__name__
