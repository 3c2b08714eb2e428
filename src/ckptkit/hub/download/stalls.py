"""Noticing a server that answers too slowly to ever finish: a header deadline and a low-speed
limit.

A read timeout only fires on complete silence: a server that sends one byte every ten seconds,
in its headers or in its body, resets it every time and holds a download forever.  Two limits
close that gap (the second as curl's ``--speed-limit``/``--speed-time``):

* **Header deadline.**  The answer's status line and headers must be complete within N seconds
  of the request being sent.  Sessions made by :func:`deadline_session` (or given the limit by
  :func:`bound`) arm a timer while a connection waits for headers; when it fires, the socket is
  shut down and the request raises :class:`HeaderTimeout`, not a dropped-connection error.
* **Low speed.**  :class:`SpeedWatch` is fed the bytes of one body as they arrive; once a window
  of ``window`` seconds has passed with fewer than ``min_speed × window`` bytes, the body is
  stalled.  It is checked when data arrives; complete silence is the read timeout's job.

Both limits come from :class:`~ckptkit.hub.download.transfer_plan.TransferLimits` (``CKPTKIT_HEADER_TIMEOUT``,
``CKPTKIT_LOW_SPEED_LIMIT``, ``CKPTKIT_LOW_SPEED_TIME``).
"""

from __future__ import annotations

import contextvars
import socket
import threading
import time
from typing import Any, Callable

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class SpeedWatch:
    """The average speed of one body, over windows of ``window`` seconds.

    ``min_speed`` of 0 turns the watch off.  ``clock`` is injectable for tests of the
    arithmetic; transfers use :func:`time.monotonic`.
    """

    def __init__(self, min_speed: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_speed = min_speed
        self.window = window
        self._clock = clock
        self._start = clock()
        self._bytes = 0

    def add(self, n: int) -> bool:
        """Count ``n`` more bytes; True when a whole window went by below the limit."""
        if self.min_speed <= 0:
            return False
        self._bytes += n
        now = self._clock()
        elapsed = now - self._start
        if elapsed < self.window:
            return False
        if self._bytes < self.min_speed * elapsed:
            return True
        self._start, self._bytes = now, 0  # fast enough: judge the next window afresh
        return False


class HeaderTimeout(requests.Timeout):
    """The answer's status line and headers did not all come within the deadline."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no complete headers within {seconds:g} s")
        self.seconds = seconds


class _Deadline:
    """The header deadline of one request, armed by :meth:`_DeadlineMixin.getresponse`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False

    def expire(self, sock: socket.socket) -> None:
        """Called by the timer: wake the reader blocked on ``sock`` by shutting it down."""
        self.expired = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the request ended as the timer fired


_DEADLINE: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "ckptkit_header_deadline", default=None)


class _DeadlineMixin:
    """A urllib3 connection whose wait for the answer's headers is bounded by the deadline
    the adapter set for this request (in this thread)."""

    sock: socket.socket | None

    def getresponse(self) -> Any:
        deadline = _DEADLINE.get()
        sock = self.sock
        if deadline is None or sock is None:
            return super().getresponse()  # type: ignore[misc]
        timer = threading.Timer(deadline.seconds, deadline.expire, args=(sock,))
        timer.daemon = True
        timer.start()
        try:
            return super().getresponse()  # type: ignore[misc]
        finally:
            timer.cancel()


class _HTTPConnection(_DeadlineMixin, HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _DeadlineAdapter(HTTPAdapter):
    """An adapter whose requests (direct or through a proxy) must have their headers within
    ``header_timeout`` seconds; ``default_timeout`` applies when a caller gives none."""

    def __init__(self, *, header_timeout: float | None, default_timeout: float | None = None,
                 **kwargs: Any) -> None:
        self.header_timeout = header_timeout
        self.default_timeout = default_timeout
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, **kwargs: Any) -> requests.Response:
        if timeout is None and self.default_timeout is not None:
            timeout = (self.default_timeout, self.default_timeout)
        if not self.header_timeout:
            return super().send(request, stream=stream, timeout=timeout, **kwargs)
        deadline = _Deadline(self.header_timeout)
        token = _DEADLINE.set(deadline)
        try:
            response = super().send(request, stream=stream, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            if deadline.expired:
                raise HeaderTimeout(deadline.seconds) from exc
            raise
        finally:
            _DEADLINE.reset(token)
        if deadline.expired:  # the headers were cut short when the timer shut the socket
            response.close()
            raise HeaderTimeout(deadline.seconds)
        return response


def deadline_session(pool_size: int, max_redirects: int, header_timeout: float | None,
                     default_timeout: float | None = None) -> requests.Session:
    """A session pooling ``pool_size`` connections whose requests raise
    :class:`HeaderTimeout` when an answer's headers take over ``header_timeout`` seconds."""
    session = requests.Session()
    bound(session, header_timeout, default_timeout, pool_size)
    session.max_redirects = max_redirects
    return session


def bound(session: requests.Session, header_timeout: float | None,
          default_timeout: float | None = None, pool_size: int = 10) -> None:
    """Give an existing ``session`` (a library's own) the header deadline and, for requests
    sent without one, ``default_timeout``."""
    adapter = _DeadlineAdapter(header_timeout=header_timeout, default_timeout=default_timeout,
                               pool_connections=4, pool_maxsize=max(10, pool_size))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
