"""Direct HTTP(S) sources: one URL, downloaded by the resumable engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptkit.download import DownloadResult, download
from ckptkit.mirrors import Mirrors


def fetch(url: str, dest: Path, *, mirrors: Mirrors, expected_size: int | None,
          expected_sha256: str | None, connections: int, progress: Any = None) -> DownloadResult:
    """Download ``url`` (after mirror rewriting) to ``dest``; verified and atomic."""
    return download(mirrors.rewrite(url), dest, expected_size=expected_size,
                    expected_sha256=expected_sha256, connections=connections,
                    progress=progress)
