"""Figures for docs/security.md, counted by the tests that earn them.

A test calls :func:`count` only after its assertions passed, so every figure is a number of
inputs (hostile files, fuzzed files, kills, faults) that ckptkit demonstrably survived.  When
``CKPTKIT_FIGURES`` names a file, the session writes the counts there as JSON (merged with what
is already in it); ``scripts/fuzz`` turns that file into the table of docs/security.md.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

ENV = "CKPTKIT_FIGURES"

#: Figure name -> what the table calls it (the order is the table's).
LABELS: dict[str, str] = {
    "hostile-files": "Hostile files (techniques x containers) reported unsafe, payload not run",
    "hostile-techniques": "Distinct hostile techniques in the corpus",
    "benign-objects": "Benign files with custom classes reported unknown-objects, not unsafe",
    "benign-files": "Benign files written by torch, DCP, Orbax, numpy, joblib: none unsafe",
    "dos-inputs": "Denial-of-service pickles ended quickly with a clean error",
    "archive-attacks": "Hostile archive entries refused (traversal, links, devices, bombs)",
    "budget-inputs": "Adversarial inputs (bombs, floods, broadcast views) stopped within budget",
    "fuzz-inputs": "Fuzzed inputs (truncated, bit-flipped, spliced) with a clean outcome",
    "catalogue-inputs": "Fuzzed user catalogues (any value in any field, damaged TOML) loaded "
                        "or refused in one line",
    "network-faults": "Network faults survived (right file or clean error, nothing partial)",
    "kills": "kill -9 at random points survived (rerun succeeded, no truncated final file)",
    "disk-full": "Disk-full runs ending in a clean error with no partial output",
    "concurrent-fetches": "Concurrent processes fetching one bundle (each file downloaded once)",
}

_counts: collections.Counter[str] = collections.Counter()


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to figure ``name`` (one of :data:`LABELS`)."""
    if name not in LABELS:
        raise KeyError(f"unknown figure {name!r}; add it to tests/figures.py LABELS")
    _counts[name] += n


def write() -> None:
    """Merge this session's counts into the file ``CKPTKIT_FIGURES`` names, if any."""
    target = os.environ.get(ENV)
    if not target or not _counts:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.is_file() else {}
    for name, n in _counts.items():
        data[name] = data.get(name, 0) + n
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
