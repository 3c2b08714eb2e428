"""Direct HTTP(S) sources: one URL, downloaded by the resumable engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptkit.hub.download.download import DownloadResult, download
from ckptkit.storage.mirrors import Mirrors
from ckptkit.hub.download.transfer_plan import TransferLimits


def fetch(url: str, dest: Path, *, mirrors: Mirrors, expected_size: int | None,
          expected_sha256: str | None, connections: int, timeout: float = 30.0,
          progress: Any = None, limits: TransferLimits | None = None) -> DownloadResult:
    """Download ``url`` (after mirror rewriting) to ``dest``; verified and atomic, within
    ``limits`` (size ceiling when ``expected_size`` is None, header deadline, low speed)."""
    return download(mirrors.rewrite(url), dest, expected_size=expected_size,
                    expected_sha256=expected_sha256, connections=connections,
                    timeout=timeout, progress=progress, limits=limits)


def probe_size(url: str, *, mirrors: Mirrors, timeout: float = 10.0) -> int | None:
    """The size a server announces for ``url`` (one ranged GET of a single byte), or None.

    Used by ``--dry-run`` to show what a fetch would transfer; never raises for network
    trouble, since a plan should still print when a source is down.  It is ``ckpt doctor``'s
    probe, so a server that trickles its headers cannot hold the plan up either, and a
    ``file:`` URL (a mirror on disk) is measured on disk.
    """
    from ckptkit.hub.probes import download_probe, send

    return send(download_probe(mirrors.rewrite(url)), timeout=timeout).size
