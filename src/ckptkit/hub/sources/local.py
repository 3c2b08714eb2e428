"""Local sources: files already on disk (an origin tool's cache, a shared drive, a USB stick).

A file is looked for at the catalogue's explicit local paths, then in every ``--local-dir`` /
``CKPTKIT_LOCAL_PATH`` folder under its id, its dest path and its aliases.  Candidates are
verified like downloads before they are used; the cache gets a hardlink where possible.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ckptkit.hub.catalogue import FileSpec


def candidates(spec: FileSpec, explicit: str | None, local_dirs: tuple[Path, ...]) -> list[Path]:
    """Existing paths that may hold ``spec``, most specific first, without duplicates."""
    paths: list[Path] = []
    if explicit:
        paths.append(Path(explicit).expanduser())
    else:
        for folder in local_dirs:
            for rel in (spec.id, spec.dest, *spec.aliases):
                paths.append(folder / rel)
    seen: set[Path] = set()
    found = []
    for path in paths:
        if path.exists() and path.resolve() not in seen:
            seen.add(path.resolve())
            found.append(path)
    return found


def place(source: Path, target: Path) -> None:
    """Hardlink (or copy, across file systems) ``source`` to ``target``; directories too."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(source), str(target))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
