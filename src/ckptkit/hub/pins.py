"""Trust on first use: the sha256 and size of the first verified download of each file.

Files whose catalogue entry has no hash are pinned here when first fetched; every later fetch,
from any source, must produce the same bytes.  The file is small JSON in the config directory,
written atomically; ``ckpt cache rm`` does not touch it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptkit.errors import FormatError
from ckptkit.storage.atomic import write_text


@dataclass(frozen=True)
class Pin:
    sha256: str
    size: int
    source: str
    pinned_at: float


@dataclass(frozen=True)
class PinsSnapshot:
    """The pins file as read once: every pin by file id, or, when it is not valid JSON, no pins
    and the reason (``problem``), for callers that report it rather than stop."""

    pins: Mapping[str, Pin] = field(default_factory=dict)
    problem: str | None = None


class Pins:
    """The pins file at ``path`` (created on first write)."""

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{self.path}: pins file is not valid JSON ({exc})",
                              hint="Fix or delete it (pins are re-learnt on the next fetch)",
                              path=str(self.path)) from exc
        return data.get("files", {}) if isinstance(data, dict) else {}

    def get(self, file_id: str) -> Pin | None:
        return _pin(self._read().get(file_id))

    def snapshot(self) -> PinsSnapshot:
        """Every pin from one read of the file; a file that is not valid JSON is a
        ``problem``, not an error."""
        try:
            files = self._read()
        except FormatError as exc:
            return PinsSnapshot(problem=str(exc))
        return PinsSnapshot({file_id: pin for file_id, entry in files.items()
                             if (pin := _pin(entry)) is not None})

    def ids(self) -> tuple[str, ...]:
        """Every pinned file id, sorted.

        Raises:
            FormatError: the pins file is not valid JSON.
        """
        return tuple(sorted(self._read()))

    def record(self, file_id: str, sha256: str, size: int, source: str) -> Pin:
        """Pin ``file_id`` unless it is pinned already (the first verified download wins).

        Read-modify-write under a cross-process lock: files of one bundle are pinned by
        parallel threads, and several ``ckpt fetch`` processes may pin at once.
        """
        from ckptkit.storage.locks import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path.with_name(self.path.name + ".lock"), poll_interval=0.05,
                      purpose="pinning hashes"):
            return self._record(file_id, sha256, size, source)

    def _record(self, file_id: str, sha256: str, size: int, source: str) -> Pin:
        files = self._read()
        if file_id in files:
            return self.get(file_id)  # type: ignore[return-value]
        pin = Pin(sha256, size, source, time.time())
        files[file_id] = {"sha256": sha256, "size": size, "source": source,
                          "pinned_at": pin.pinned_at}
        write_text(self.path, json.dumps({"schema": 1, "files": files}, indent=2, sort_keys=True))
        return pin


def _pin(entry: object) -> Pin | None:
    if not isinstance(entry, dict):
        return None
    return Pin(str(entry["sha256"]), int(entry["size"]), str(entry.get("source", "")),
               float(entry.get("pinned_at", 0)))
