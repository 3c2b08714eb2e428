"""The layout's import rules (docs/architecture.md), checked by parsing every module's imports.

Every ``import`` counts, including those inside functions: a lazy import still ties two
modules together.  Only names under ``TYPE_CHECKING`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ckptkit"

BASE = {"ckptkit.errors", "ckptkit.config", "ckptkit.model", "ckptkit.tree"}
READ_VERBS = {"ckptkit.inspection", "ckptkit.summary", "ckptkit.loading", "ckptkit.name_rules"}
WINGS = ("scan", "hub", "runs", "convert")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str) -> str:
    """The module ``name`` lands in: itself if it is a module, else its closest parent."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    """ckptkit modules (and third-party top-level names) ``module`` imports."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_resolve(alias.name) if alias.name.startswith("ckptkit") else alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("ckptkit"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    found.add(target if target in MODULES else _resolve(node.module))
            else:
                found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def layer_of(module: str) -> str:
    if module in BASE or module.startswith("ckptkit.storage"):
        return "base"
    for name in ("pickles", "formats", "cli", "testing", *WINGS):
        if module == f"ckptkit.{name}" or module.startswith(f"ckptkit.{name}."):
            return name
    if module in READ_VERBS:
        return "read"
    return "root"


ALLOWED = {
    "base": {"base"},
    "pickles": {"base", "pickles"},
    "formats": {"base", "pickles", "formats"},
    "read": {"base", "pickles", "formats", "read"},
    **{wing: {"base", "pickles", "formats", "read", wing} for wing in WINGS},
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_layer_imports_only_the_layers_below_it(module: str) -> None:
    layer = layer_of(module)
    if layer not in ALLOWED:  # cli, testing and the package root may use every layer
        return
    bad = sorted(target for target in imports_of(module)
                 if target.startswith("ckptkit.") and layer_of(target) not in ALLOWED[layer])
    # The package root only for its lazily computed version string.
    assert not bad, f"{module} ({layer}) imports {bad}"


def test_only_the_cli_imports_click() -> None:
    users = sorted(m for m in MODULES if "click" in imports_of(m) and layer_of(m) != "cli")
    assert users == []


def test_there_are_no_import_cycles() -> None:
    graph = {m: {t for t in imports_of(m) if t in MODULES and t != "ckptkit"} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm, components of more than one module
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            strongconnect(module)
    assert cycles == [], "\n".join(" <-> ".join(c) for c in cycles)


def test_the_rules_see_real_imports() -> None:
    """The parser is not vacuous: a known import and a lazy one are both found."""
    assert "ckptkit.pickles.pickle_globals" in imports_of("ckptkit.pickles.unpickler")
    assert "ckptkit.hub.sources.tfhub" in imports_of("ckptkit.hub.fetch_files")  # in a function
    assert layer_of("ckptkit.hub.download.transfer") == "hub"


# --- readers get their bytes through storage/location.py ---------------------------------------

#: Modules that read checkpoints: every byte they read comes through a Location.
READERS = sorted(m for m in MODULES if m.startswith(("ckptkit.formats", "ckptkit.pickles",
                                                     "ckptkit.scan"))
                 or m in READ_VERBS or m == "ckptkit.runs.integrity")
#: Reads that are not of a checkpoint, each with why it may open its file directly.
NOT_A_CHECKPOINT = {
    ("ckptkit.pickles.pickle_globals", "read_text"): "the allowlist shipped in ckptkit/data",
    ("ckptkit.scan.checkpoint_dirs", "zipfile.ZipFile"): "a window over a Location's open file",
    ("ckptkit.formats.ziparchive", "zipfile.ZipFile"): "a window over a Location's open file",
    ("ckptkit.formats.gguf_header", "read_text"): "the GGML type table shipped in ckptkit/data",
    ("ckptkit.formats.keras_config", "read_text"): "the safe-mode rules shipped in ckptkit/data",
}
_WRITE_MODES = set("wax+")


def _mode(call: ast.Call, position: int) -> str | None:
    node = call.args[position] if len(call.args) > position else next(
        (k.value for k in call.keywords if k.arg == "mode"), None)
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def direct_reads(module: str) -> list[str]:
    """``open()`` (for reading), ``Path.read_bytes``/``read_text``, ``tarfile.open(name)`` and
    ``zipfile.ZipFile(...)`` (for reading) calls in ``module``: ways around a Location."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = None
        if isinstance(func, ast.Name) and func.id == "open":
            mode = _mode(node, 1)
            if mode is None or not _WRITE_MODES & set(mode):
                name = "open"
        elif isinstance(func, ast.Attribute) and func.attr in ("read_bytes", "read_text"):
            name = func.attr
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            dotted = f"{func.value.id}.{func.attr}"
            if dotted == "io.open":
                name = dotted
            elif dotted == "tarfile.open" and (node.args or any(k.arg == "name"
                                                                for k in node.keywords)):
                name = dotted
            elif dotted == "zipfile.ZipFile":
                mode = _mode(node, 1)
                if mode is None or not _WRITE_MODES & set(mode):
                    name = dotted
        if name and (module, name) not in NOT_A_CHECKPOINT:
            found.append(f"{name} at line {node.lineno}")
    return found


@pytest.mark.parametrize("module", READERS)
def test_readers_open_no_checkpoint_themselves(module: str) -> None:
    """Only storage/ opens files for reading: readers ask ``locate(path)`` for bytes, so a
    remote backend registered in ``location.OPENERS`` serves every reader unchanged."""
    assert direct_reads(module) == [], f"{module} reads around storage.location"


def test_the_direct_read_check_is_not_vacuous() -> None:
    """The check finds what it looks for: storage/location.py itself opens files."""
    assert any(r.startswith("open") for r in direct_reads("ckptkit.storage.location"))
    assert direct_reads("ckptkit.storage.archives")  # tarfile.is_tarfile aside, it opens zips
    assert "ckptkit.formats.safetensors" in READERS and "ckptkit.scan.scanning" in READERS
