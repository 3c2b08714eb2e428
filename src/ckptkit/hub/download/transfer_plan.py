"""Deciding how a download proceeds: pure functions and frozen data, no I/O.

:mod:`ckptkit.hub.download.download` does the transfer; this module only answers its questions.  How is the
file cut into pieces (:func:`plan_pieces`)?  May the pieces of an earlier run be kept
(:func:`can_resume`)?  How often is a piece's progress made durable
(:func:`checkpoint_interval`)?  What limits bound a transfer (:class:`TransferLimits`)?  What do
``Content-Range`` and ``Retry-After`` say?  How long to back off before a retry
(:func:`backoff_delay`)?  Is this body an HTML page instead of the file (:func:`looks_like_html`)?

The tuning knobs (piece sizes, backoff) are not defined here: they stay in
:mod:`ckptkit.hub.download.download`, where tests patch them, and are passed in as arguments, so one value
governs both the decision and the transfer.
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Callable
from urllib.parse import urlsplit

from ckptkit.config import TransferLimits

SIDECAR_VERSION = 1
SNIFF_BYTES = 512                 # the first bytes of a body that decide whether it is HTML

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of the file, the unit of parallelism and of resume."""

    index: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PiecePlan:
    """How a file of ``size`` bytes is cut, and which pieces still have to be fetched."""

    size: int
    piece_size: int
    pieces: tuple[Piece, ...]
    missing: tuple[Piece, ...]
    workers: int

    @property
    def have(self) -> frozenset[int]:
        """Indices of the pieces already on disk."""
        return frozenset(range(len(self.pieces))) - {piece.index for piece in self.missing}

    @property
    def have_bytes(self) -> int:
        return self.size - sum(piece.size for piece in self.missing)


@dataclass(frozen=True)
class PieceSizing:
    """The limits :func:`choose_piece_size` works within (bytes)."""

    min_size: int
    max_size: int
    parallel_threshold: int       # smaller files are one piece (still resumable)
    align: int                    # piece sizes are rounded up to a multiple of this


@dataclass(frozen=True)
class ContentRange:
    """A parsed ``Content-Range`` header; None fields stand for ``*``."""

    start: int | None
    end: int | None
    total: int | None


@dataclass(frozen=True)
class Probe:
    """What the first request learned about the file."""

    final_url: str
    size: int | None
    ranges: bool
    etag: str | None
    last_modified: str | None

    @property
    def validator(self) -> str | None:
        """The value to send in ``If-Range``: a strong ETag, else Last-Modified (RFC 9110)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


@dataclass(frozen=True)
class Sidecar:
    """The state of an interrupted download, stored as ``<dest>.part.json``."""

    url: str
    final_url: str
    size: int
    etag: str | None
    last_modified: str | None
    piece_size: int
    done: frozenset[int]
    #: piece index -> bytes already on disk from the piece's start (pieces not yet done)
    partial: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"version": SIDECAR_VERSION, "url": self.url,
                           "final_url": self.final_url, "size": self.size, "etag": self.etag,
                           "last_modified": self.last_modified, "piece_size": self.piece_size,
                           "done": sorted(self.done),
                           "partial": {str(i): n for i, n in sorted(self.partial)}})

    @classmethod
    def from_json(cls, text: str) -> Sidecar | None:
        """The sidecar in ``text``, or None if it is corrupt or from another version."""
        try:
            data = json.loads(text)
            if data.get("version") != SIDECAR_VERSION:
                return None
            done = frozenset(int(i) for i in data["done"])
            partial = tuple(sorted((int(i), int(n)) for i, n in
                                   (data.get("partial") or {}).items()
                                   if int(n) > 0 and int(i) not in done))
            return cls(url=str(data["url"]), final_url=str(data["final_url"]),
                       size=int(data["size"]), etag=data["etag"],
                       last_modified=data["last_modified"], piece_size=int(data["piece_size"]),
                       done=done, partial=partial)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def choose_piece_size(size: int, connections: int, sizing: PieceSizing) -> int:
    """Pieces between ``sizing.min_size`` and ``max_size``, at least ``connections`` of them
    when possible; a file below ``sizing.parallel_threshold`` is one piece."""
    if size < sizing.parallel_threshold:
        return max(size, 1)
    per_connection = -(-size // connections)
    piece = min(max(per_connection, sizing.min_size), sizing.max_size)
    return -(-piece // sizing.align) * sizing.align


def plan_pieces(size: int, have: frozenset[int], piece_size: int | None, connections: int,
                sizing: PieceSizing, partial: tuple[tuple[int, int], ...] = ()) -> PiecePlan:
    """Cut ``size`` bytes into pieces and list those not in ``have`` (indices already on disk).

    ``piece_size=None`` chooses one within ``sizing`` (:func:`choose_piece_size`); a resumed
    download passes the size its sidecar recorded, because piece indices only mean something
    for one layout.  ``partial`` (index, bytes) gives pieces whose first bytes are on disk: the
    missing piece then starts after them (a prefix that covers the piece makes it done).

    Example::

        plan = plan_pieces(64 << 20, frozenset(), None, 8,
                           PieceSizing(8 << 20, 16 << 20, 8 << 20, 1 << 16))
        # 8 pieces of 8 MiB, all missing, 8 workers
    """
    step = piece_size if piece_size is not None else choose_piece_size(size, connections, sizing)
    pieces = tuple(Piece(i, start, min(start + step, size))
                   for i, start in enumerate(range(0, size, step)))
    started = dict(partial)
    missing = tuple(Piece(p.index, p.start + max(0, started.get(p.index, 0)), p.end)
                    for p in pieces if p.index not in have)
    missing = tuple(p for p in missing if p.start < p.end)
    return PiecePlan(size=size, piece_size=step, pieces=pieces, missing=missing,
                     workers=min(connections, len(missing)))


def checkpoint_interval(piece: Piece, floor: int, cap: int) -> int:
    """Bytes of a piece received between two durable records of its progress.

    A sixteenth of the piece, within ``[floor, cap]``: a ``kill -9`` loses at most that much per
    piece in flight, which is at most a sixteenth of what is in flight (plus ``floor`` per
    small piece), while a large piece is not fsynced more than 16 times.
    """
    return min(cap, max(floor, piece.size // 16))


def can_resume(saved: Sidecar | None, probe: Probe, url: str, part_size: int | None) -> bool:
    """True when the pieces of an earlier run are the same file the server serves now."""
    if saved is None or probe.size is None or not probe.ranges:
        return False
    if saved.url != url or saved.size != probe.size or part_size != probe.size:
        return False
    if probe.etag:
        return saved.etag == probe.etag
    # Without any validator we cannot tell an updated file from the old one: start over.
    return probe.last_modified is not None and saved.last_modified == probe.last_modified


def parse_content_range(value: str | None) -> ContentRange | None:
    """``bytes 0-99/1000`` -> ContentRange(0, 99, 1000); None if absent or malformed."""
    match = _CONTENT_RANGE.fullmatch(value or "")
    if match is None:
        return None
    start, end, total = match.groups()
    return ContentRange(start=None if start is None else int(start),
                        end=None if end is None else int(end),
                        total=None if total == "*" else int(total))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random, *, base: float, cap: float,
                  retry_after_cap: float) -> float:
    """Seconds to sleep after failed attempt number ``attempt`` (1-based).

    The server's ``Retry-After`` wins, capped at ``retry_after_cap``; otherwise exponential
    backoff from ``base`` capped at ``cap``, with equal jitter so that parallel pieces do not
    retry in lockstep.
    """
    if retry_after is not None:
        return min(retry_after, retry_after_cap)
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + rand() / 2)


def looks_like_html(head: bytes) -> bool:
    """True if the first bytes of a body are an HTML document (error and login pages)."""
    text = head[:SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<") and (b"<!doctype html" in text or b"<html" in text)


def html_expected(url: str) -> bool:
    """Only URLs of HTML documents may answer with HTML."""
    return urlsplit(url).path.lower().endswith((".html", ".htm"))
