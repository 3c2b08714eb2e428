"""Reachability probes: the first request a source's client would send, and nothing more.

* URL and TF Hub sources: ``GET`` with ``Range: bytes=0-0``, redirects followed — the probe the
  downloader itself starts with (:mod:`ckptkit.hub.download.transport`).  For TF Hub the URL is the handle
  with ``tf-hub-format=compressed`` (:func:`ckptkit.hub.sources.tfhub.compressed_url`), which
  redirects to the archive.  At most one byte is asked for and the body is never read, so no
  model is downloaded.
* Kaggle sources: the ``ListModelInstanceVersionFiles`` RPC kagglehub sends first for a pinned
  version that is not in its cache: a small JSON listing, never the files.  Through a static
  mirror (a rule for the version's archive URL), the archive probe as for a URL.
* ``file:`` URLs (a mirror on disk): whether the file is there (200) or not (404), and its size.

:func:`send` never raises for network trouble: a probe that gets no answer says why, in the
words ``ckpt fetch`` uses (:func:`ckptkit.hub.reasons.network_reason`).  What an answer means is
decided by the code the fetch itself runs (:mod:`ckptkit.hub.download.transport` for sizes and HTML pages,
:mod:`ckptkit.hub.sources.kaggle` for Kaggle statuses), so doctor and fetch agree.  A server that
trickles its headers is cut off after ``timeout`` too (:mod:`ckptkit.hub.download.stalls`).
``requests`` is imported only when a request is sent: planning, and ``ckpt doctor --offline``,
never pay for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ckptkit import __version__
from ckptkit.errors import MissingDependencyError

if TYPE_CHECKING:
    import requests

MAX_REDIRECTS = 10
KAGGLE_RPC = "/v1/models.ModelApiService/ListModelInstanceVersionFiles"
KAGGLE_PAGE_SIZE = 25  # what kagglehub asks for (MAX_NUM_FILES_DIRECT_DOWNLOAD)


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
        error: why no answer came ("connection refused", "timed out after 5 s", "host not
            found", …), else None.
        seconds: how long it took.
        size: the size the server announced for the file, when it did (GET only).
        html: the answer was an HTML page (a login or error page) where a file was expected:
            what a fetch refuses (:func:`ckptkit.hub.download.transport.unexpected_html`).
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
    from ckptkit.hub.sources.kaggle import check_framework

    try:
        from kagglehub.handle import parse_model_handle
    except ImportError as exc:
        raise MissingDependencyError("kagglehub", "kaggle", "Using Kaggle sources") from exc
    check_framework(handle)
    parsed = parse_model_handle(handle)
    body = {"ownerSlug": parsed.owner, "modelSlug": parsed.model,
            "framework": parsed.framework_enum().name,
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
    import requests

    from ckptkit.hub.download import file_urls
    from ckptkit.hub.reasons import network_reason
    from ckptkit.hub.sources.kaggle import rpc_status
    from ckptkit.hub.download.stalls import deadline_session
    from ckptkit.hub.download.transport import announced_size, unexpected_html

    get = request.method == "GET"
    if get and file_urls.is_file_url(request.url):  # a mirror on disk: there, or not
        size = file_urls.size_of(request.url)
        return ProbeResult(request.url, 404 if size is None else 200, None, 0.0, size=size)
    sent = {"User-Agent": f"ckptkit/{__version__}", "Accept-Encoding": "identity",
            **(headers or {})}
    if get:
        sent["Range"] = "bytes=0-0"
    else:
        sent["Content-Type"] = "application/json"
    start = time.monotonic()
    with deadline_session(1, MAX_REDIRECTS, header_timeout=timeout) as session:
        try:
            resp = session.request(request.method, request.url, headers=sent, data=request.body,
                                   stream=get, timeout=(timeout, timeout))
        except requests.RequestException as exc:
            # Silence and trickled headers both used up the probe's time: the same words.
            error = (f"timed out after {timeout:g} s" if isinstance(exc, requests.Timeout)
                     else network_reason(exc, timeout))
            return ProbeResult(request.url, None, error, time.monotonic() - start)
        with resp:
            return ProbeResult(request.url, resp.status_code if get else rpc_status(resp), None,
                               time.monotonic() - start,
                               size=announced_size(resp) if get else None,
                               html=unexpected_html(resp, request.url) is not None)

