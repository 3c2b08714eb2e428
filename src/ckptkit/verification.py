"""``ckptkit.verify``: is a checkpoint complete?  Every problem, each naming its file.

Formats spread over several files implement a ``verify`` verb (index against shards for
Hugging Face sharded checkpoints; chunk byte ranges and tiling for DCP; manifests for Orbax);
for single files the structural checks of :mod:`ckptkit.formats.completeness` run (what
``ckpt latest`` and ``ckpt cleanup`` check before they trust a checkpoint).  Nothing here reads
tensor bytes, except ``hashes``, which re-hashes files whose sha256 is known.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkit import formats
from ckptkit.errors import CkptkitError, IntegrityError, UnsafeContentError, naming
from ckptkit.formats import completeness
from ckptkit.model import Problem
from ckptkit.storage import budget
from ckptkit.storage.location import Location, is_url, locate


@dataclass(frozen=True)
class Verification:
    """The verdict of :func:`verify`: ``ok`` when ``problems`` is empty."""

    path: str
    format: str | None
    problems: tuple[Problem, ...]
    hashed: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The JSON form printed by ``ckpt verify --json``."""
        return {"path": self.path, "format": self.format, "ok": self.ok,
                "hashes_checked": self.hashed,
                "problems": [p.to_dict() for p in self.problems]}


def verify(path: str | os.PathLike[str], *, hashes: bool = False,
           known_sha256: Mapping[str, tuple[str, str]] | None = None) -> Verification:
    """Check that the checkpoint at ``path`` is complete, from metadata only.

    Args:
        path: any checkpoint ``ckptkit.inspect`` reads (a file, a sharded or DCP directory,
            an index file, a TF prefix).
        hashes: also re-hash files whose sha256 is known: a Hugging Face cache blob's name
            (the Hub's LFS id), or ``known_sha256``.
        known_sha256: file path -> ``(sha256, where it comes from)``, e.g. a catalogue pin.

    Returns:
        The :class:`Verification`; ``.problems`` lists each problem with its file.

    Raises:
        NotFoundError: ``path`` does not exist.
        FormatError: not a checkpoint format ckptkit knows.

    Example:
        >>> ckptkit.verify("step-1000/").ok                  # doctest: +SKIP
        True
    """
    if isinstance(path, str) and is_url(path) and not path.lower().startswith("file://"):
        return _verify_remote(locate(path))
    target = Path(path)
    with naming(target):
        try:
            reader = formats.detect(target)
        except IntegrityError as exc:  # an empty file
            return Verification(str(target), None, (Problem(str(target), "truncated",
                                                            _line(exc, target)),))
    fmt = reader.FORMAT
    check = getattr(reader, "verify", None)
    if check is not None:
        problems = list(check(target, hashes=hashes))
    elif target.is_file() or not target.exists():
        problems = completeness.file_problems(target)
        if hashes and not problems and target.is_file():
            problems = completeness.hash_problems(target)
    else:
        problems = _directory_problems(target, reader)
    if hashes and known_sha256:
        for name, (sha, source) in known_sha256.items():
            if Path(name).is_file() and not any(p.file == name for p in problems):
                problems.extend(completeness.hash_problems(Path(name), sha, source))
    return Verification(str(target), fmt, tuple(problems), hashes)


def _verify_remote(target: Location) -> Verification:
    """A URL, read through its location: hashes are not checked (the expected ones come from
    a local hub cache or catalogue, and re-hashing would download every byte)."""
    with naming(target):
        try:
            reader = formats.detect(target)
        except IntegrityError as exc:  # an empty file
            return Verification(str(target), None, (Problem(str(target), "truncated",
                                                            _line(exc, target)),))
    check = getattr(reader, "verify", None)
    if check is not None:
        problems = list(check(target))
    elif target.is_file():
        problems = completeness.file_problems(target)  # type: ignore[arg-type]
    else:
        problems = _directory_problems(target, reader)  # type: ignore[arg-type]
    return Verification(str(target), reader.FORMAT, tuple(problems), False)


def _directory_problems(path: Path, reader: Any) -> list[Problem]:
    """A directory format without its own verify verb (SavedModel, TF checkpoint folder):
    its reader reads every structure it has."""
    try:
        with budget.reading(path):
            reader.read_info(path)
    except UnsafeContentError:
        return []
    except CkptkitError as exc:
        return [Problem(getattr(exc, "path", None) or str(path), "unreadable", _line(exc, path))]
    return []


def _line(exc: CkptkitError, path: Path | Location) -> str:
    return " ".join(exc.message.removeprefix(f"{path}: ").split())


__all__ = ["Verification", "verify"]
