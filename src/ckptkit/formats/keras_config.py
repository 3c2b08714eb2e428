"""A Keras model config (``config.json`` of a ``.keras`` archive, ``model_config`` of a legacy
``.h5``), read as JSON and judged by Keras' own safe-mode rules (``data/keras_safe_mode.toml``).

Nothing is deserialized: the config is walked as plain JSON.  What it yields:

- a summary: the model's class and name, its layers (count, classes, names);
- unsafe objects: what safe-mode Keras refuses because loading it runs or loads code
  (serialized lambdas, ``TFSMLayer``, pickled torch modules, vocabulary files outside the
  archive), each with where it is (``layer 'double'``);
- custom objects: classes or functions from modules outside Keras' packages, which Keras
  loads only from user-supplied code (reported like the unknown classes of a pickle).
"""

from __future__ import annotations

import functools
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ckptkit.errors import IntegrityError
from ckptkit.pickles.danger import is_dangerous
from ckptkit.storage import budget


@dataclass(frozen=True)
class Rule:
    class_names: tuple[str, ...]
    why: str
    key: str | None = None
    equals: Any = None
    is_string: bool = False

    def matches(self, obj: dict[str, Any]) -> bool:
        if obj.get("class_name") not in self.class_names:
            return False
        if self.key is None:
            return True
        config = obj.get("config")
        if not isinstance(config, dict) or self.key not in config:
            return False
        value = config[self.key]
        if self.is_string:
            return isinstance(value, str)
        return self.equals is None or value == self.equals


@dataclass(frozen=True)
class Rules:
    unsafe: tuple[Rule, ...]
    keras_packages: frozenset[str]
    builtin_modules: frozenset[str]


@functools.cache
def rules() -> Rules:
    """The safe-mode rules, ``data/keras_safe_mode.toml``."""
    data = tomllib.loads((resources.files("ckptkit") / "data" / "keras_safe_mode.toml")
                         .read_text())
    unsafe = []
    for entry in data["unsafe"]:
        names = entry["class_name"]
        unsafe.append(Rule(tuple(names) if isinstance(names, list) else (names,), entry["why"],
                           entry.get("key"), entry.get("equals"), entry.get("is_string", False)))
    return Rules(tuple(unsafe), frozenset(data["modules"]["keras"]),
                 frozenset(data["modules"]["builtins"]))


@dataclass
class ConfigReport:
    """What a config says, and what loading it would run."""

    model_class: str = ""
    name: str = ""
    layers: list[tuple[str, str]] = field(default_factory=list)  # (class, name)
    unsafe: dict[str, str] = field(default_factory=dict)   # shown name -> why
    where: dict[str, str] = field(default_factory=dict)    # shown name -> which layer
    custom: set[str] = field(default_factory=set)

    def summary(self) -> dict[str, Any]:
        classes: dict[str, int] = {}
        for cls, _name in self.layers:
            classes[cls] = classes.get(cls, 0) + 1
        return {"model_class": self.model_class, "name": self.name,
                "layers": len(self.layers), "layer_classes": classes,
                "layer_names": [n for _c, n in self.layers[:200]]}


def parse(raw: bytes | str, what: str) -> Any:
    """``raw`` as JSON, its containers charged to the reading budget first."""
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    account = budget.current()
    account.check("header", len(data), what)
    account.charge("nodes", data.count(b"{") + data.count(b"["), what)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{what} is not valid JSON ({str(exc)[:120]})",
                             hint="The file is corrupt") from None


def analyse(config: Any) -> ConfigReport:
    """Walk ``config`` (parsed JSON) and report on it (see the module docstring)."""
    report = ConfigReport()
    if isinstance(config, dict):
        report.model_class = str(config.get("class_name", ""))
        inner = config.get("config")
        if isinstance(inner, dict):
            report.name = str(inner.get("name", ""))
            layers = inner.get("layers")
            if isinstance(layers, list):
                for layer in layers:
                    if isinstance(layer, dict):
                        cfg = layer.get("config")
                        name = cfg.get("name") if isinstance(cfg, dict) else layer.get("name")
                        report.layers.append((str(layer.get("class_name", "?")),
                                              str(name or "?")))
    _walk(config, report, "the model", 0)
    return report


def _walk(node: Any, report: ConfigReport, where: str, depth: int) -> None:
    if depth > budget.current().limit("depth"):
        raise IntegrityError(f"Keras config nested more than {depth} levels",
                             hint="The file is corrupt or crafted; do not load it")
    if isinstance(node, list):
        for item in node:
            _walk(item, report, where, depth + 1)
        return
    if not isinstance(node, dict):
        return
    class_name = node.get("class_name")
    if isinstance(class_name, str):
        config = node.get("config")
        if isinstance(config, dict) and isinstance(config.get("name"), str) \
                and class_name not in ("__lambda__", "function"):
            where = f"{'layer' if 'trainable' in config else class_name} {config['name']!r}"
        _judge(node, class_name, report, where)
    for value in node.values():
        _walk(value, report, where, depth + 1)


def _judge(node: dict[str, Any], class_name: str, report: ConfigReport, where: str) -> None:
    module = node.get("module")
    qualname = f"{module}.{class_name}" if isinstance(module, str) and module else class_name
    for rule in rules().unsafe:
        if rule.matches(node):
            shown = qualname if class_name != "__lambda__" else "serialized Python lambda"
            report.unsafe.setdefault(shown, rule.why)
            report.where.setdefault(shown, where)
            return
    if not isinstance(module, str) or not module:
        return
    package = module.split(".", 1)[0]
    if package in rules().keras_packages or module in rules().builtin_modules \
            or class_name.startswith("__"):
        return
    if is_dangerous(module, class_name):
        report.unsafe.setdefault(qualname, "a callable that runs code, named by module "
                                           "(imported by Keras before 3.9)")
        report.where.setdefault(qualname, where)
    else:
        report.custom.add(qualname)
