"""Run one peer scanner over a list of paths, in the peer's own venv, and say per path what it
found: ``detected`` (a dangerous finding), ``error`` (it could not scan it, and found nothing),
or ``clean``.

    <peer venv>/bin/python scan_peer_driver.py TOOL PATHS_JSON RESULT_JSON

Each tool is called through its documented Python API, as its own CLI would call it, one path
at a time; a directory (a DCP or Orbax checkpoint, a SavedModel) is given to the tool's
directory scan where it has one, file by file otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any


def picklescan(path: Path) -> str:
    from picklescan.scanner import scan_directory_path, scan_file_path

    result = scan_directory_path(str(path)) if path.is_dir() else scan_file_path(str(path))
    if result.infected_files or result.issues_count:
        return "detected"
    return "error" if result.scan_err else "clean"


def modelscan(path: Path) -> str:
    from modelscan.modelscan import ModelScan

    scanner = ModelScan()
    report = scanner.scan(str(path))
    if scanner.issues.all_issues:
        return "detected"
    return "error" if report.get("errors") else "clean"


def fickling(path: Path) -> str:
    import fickling as tool

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    outcome = "clean"
    for file in files:
        if zipfile.is_zipfile(file):
            results = list(tool.scan_zip_archive(str(file), graceful=True).values())
        else:
            results = [tool.scan_file(str(file), graceful=True)]
        if any(not r.is_safe for r in results):
            return "detected"
        if any(r.errors for r in results):
            outcome = "error"
    return outcome


TOOLS = {"picklescan": picklescan, "modelscan": modelscan, "fickling": fickling}


def main() -> None:
    tool, paths_json, result_json = sys.argv[1:4]
    scan = TOOLS[tool]
    __import__(tool)  # a tool that cannot even be imported is a broken install, not errors
    found: dict[str, Any] = {}
    devnull = open(os.devnull, "w")
    for raw in json.loads(Path(paths_json).read_text()):
        stdout, sys.stdout = sys.stdout, devnull  # modelscan prints a report per scan
        try:
            found[raw] = scan(Path(raw))
        except Exception as exc:  # noqa: BLE001 - a crash on a file is that tool's error
            found[raw] = "error"
            print(f"{tool}: {raw}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
        finally:
            sys.stdout = stdout
    Path(result_json).write_text(json.dumps(found))


if __name__ == "__main__":
    main()
