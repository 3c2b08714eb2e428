"""Conversion recipes as data: which module to take, how to rename it, how to lay it out.

A recipe is a TOML file (built-in ones live in ``ckptkit/data/recipes/NAME.toml``)::

    name = "loftr"                       # default: the file name
    description = "LoFTR coarse/fine transformer -> Flax (IFViT layout)"
    layout = "flax"                      # output layout: flax | torch (omit: follow --to)
    select = "loftr_coarse"              # module prefix taken by default (--prefix overrides)
    strip = ["module.", "_orig_mod.", "matcher."]   # wrappers removed when every name has one
    layers = '^layers\\.(\\d+)\\.'         # group 1 = layer index, for --layers
    fallback = "none"                    # names no rule matches: "generic" rules or "none"
    style = "nested"                     # generic naming: nested | linen | dotted
    collections = true                   # generic naming: params/ and batch_stats/ roots

    [kinds]                              # module-name regex -> kind, where inference guesses wrong
    'proj$' = "linear"

    [[rules]]                            # first match wins; the whole name must match
    from = '^layers\\.(\\d+)\\.(q_proj|k_proj|v_proj|merge)\\.weight$'
    to = 'layers.\\1/\\2/kernel'          # re.Match.expand template; a list writes several
    transform = "T"                      # none | T | conv | unconv | permute(i,j,...) | drop

Rules see names after the container (``state_dict``), the wrappers and the selected prefix
have been removed.  A recipe that breaks the schema is a :class:`~ckptkit.errors.UsageError`
naming the file, the key and, for rules, the rule's number.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ckptkit.name_rules import (KINDS, STYLES, WRAPPERS, Kind, Style, Transform,
                                   parse_transform)
from ckptkit.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Layout = Literal["flax", "torch"]
Fallback = Literal["generic", "none"]
#: Layer index in a name: ``layers.3.``, ``blocks.3.``, ``h.3.`` (GPT-2), linen ``layers_3/``.
DEFAULT_LAYERS = r"(?:^|[./])(?:layers|layer|blocks|block|h|resblocks)[._](\d+)(?=[./]|$)"
_KEYS = {"name", "description", "layout", "select", "strip", "layers", "fallback", "style",
         "collections", "kinds", "rules"}
_RULE_KEYS = {"from", "to", "transform"}
_GROUP_REF = re.compile(r"\\(\d+)|\\g<(\w+)>")


@dataclass(frozen=True)
class Rule:
    """One rename: a regex over the source name, output template(s) and a transform.

    An empty ``to`` (or ``transform = "drop"``) leaves matching tensors out on purpose.
    """

    number: int  # 1-based position in the recipe, for messages
    pattern: re.Pattern[str]
    to: tuple[str, ...]
    transform: Transform

    def names(self, match: re.Match[str]) -> tuple[str, ...]:
        return tuple(match.expand(t) for t in self.to)


@dataclass(frozen=True)
class Recipe:
    """How to convert: selection, renaming rules, kinds and naming (see the module docs)."""

    name: str = "default"
    description: str = "generic PyTorch <-> Flax rules"
    origin: str = "built-in"
    layout: Layout | None = None
    select: str | None = None
    strip: tuple[str, ...] = WRAPPERS
    layers: re.Pattern[str] = re.compile(DEFAULT_LAYERS)
    fallback: Fallback = "generic"
    style: Style = "nested"
    collections: bool = True
    kinds: tuple[tuple[re.Pattern[str], Kind], ...] = ()
    rules: tuple[Rule, ...] = ()

    def match(self, name: str) -> tuple[Rule, re.Match[str]] | None:
        """The first rule whose pattern matches all of ``name``, with its match."""
        for rule in self.rules:
            found = rule.pattern.fullmatch(name)
            if found:
                return rule, found
        return None


DEFAULT = Recipe()


def recipes_dir() -> Path:
    return Path(str(resources.files("ckptkit") / "data" / "recipes"))


def builtin_names() -> list[str]:
    """Names of the built-in recipes (``default`` plus one per ``data/recipes/*.toml``)."""
    return ["default", *sorted(p.stem for p in recipes_dir().glob("*.toml"))]


def load_recipe(spec: str | Path | Recipe | None) -> Recipe:
    """The recipe called ``spec`` (built-in name), read from file ``spec``, or the default.

    Raises:
        UsageError: an unknown name, a missing file, or a file that breaks the schema.
    """
    if isinstance(spec, Recipe):
        return spec
    if spec is None or str(spec) == "default":
        return DEFAULT
    text = str(spec)
    builtin = recipes_dir() / f"{text}.toml"
    if "/" not in text and not text.endswith(".toml") and builtin.is_file():
        return parse_recipe(builtin.read_text(encoding="utf-8"), origin="built-in",
                            default_name=text)
    path = Path(text).expanduser()
    if path.is_file():
        return parse_recipe(path.read_text(encoding="utf-8"), origin=str(path),
                            default_name=path.stem)
    raise UsageError(f"--recipe {text!r} is neither a built-in recipe nor a file",
                     hint=f"Built-in recipes: {', '.join(builtin_names())}; or pass a .toml "
                          "file (see docs/convert.md)")


def parse_recipe(text: str, *, origin: str, default_name: str = "recipe") -> Recipe:
    """Parse and validate recipe TOML; ``origin`` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _bad(origin, "", f"not valid TOML ({exc})") from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise _bad(origin, unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")
    layout = _choice(data, "layout", ("flax", "torch", None), origin)
    fallback = _choice(data, "fallback", ("generic", "none"), origin, "generic")
    style = _choice(data, "style", STYLES, origin, "nested")
    select = data.get("select")
    if select is not None and (not isinstance(select, str) or not select.strip(" ./")):
        raise _bad(origin, "select", "must be a non-empty module prefix such as 'encoder'")
    strip = data.get("strip", list(WRAPPERS))
    if not isinstance(strip, list) or not all(isinstance(s, str) and s for s in strip):
        raise _bad(origin, "strip", "must be a list of prefixes such as ['module.']")
    collections = data.get("collections", True)
    if not isinstance(collections, bool):
        raise _bad(origin, "collections", "must be true or false")
    return Recipe(
        name=_text(data, "name", origin) or default_name,
        description=_text(data, "description", origin) or "",
        origin=origin, layout=layout, select=select.strip(" ./") if select else None,
        strip=tuple(strip), layers=_layers(data.get("layers"), origin), fallback=fallback,
        style=style, collections=collections, kinds=_kinds(data.get("kinds", {}), origin),
        rules=tuple(_rule(i, entry, origin) for i, entry in
                    enumerate(_rule_list(data.get("rules", []), origin), start=1)))


def _bad(origin: str, where: str, problem: str) -> UsageError:
    place = f"recipe {origin}" + (f": {where}" if where else "")
    return UsageError(f"{place}: {problem}", hint="See docs/convert.md for the recipe format",
                      path=None if origin == "built-in" else origin)


def _text(data: dict[str, Any], key: str, origin: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(origin, key, "must be a string")
    return value


def _choice(data: dict[str, Any], key: str, allowed: tuple[Any, ...], origin: str,
            default: Any = None) -> Any:
    value = data.get(key, default)
    if value not in allowed:
        raise _bad(origin, key, f"{value!r} is not one of "
                   f"{', '.join(repr(a) for a in allowed if a is not None)}")
    return value


def _regex(text: Any, origin: str, where: str) -> re.Pattern[str]:
    if not isinstance(text, str):
        raise _bad(origin, where, "must be a regular expression string")
    try:
        return re.compile(text)
    except re.error as exc:
        raise _bad(origin, where, f"{text!r} is not a valid regular expression ({exc})") from None


def _layers(value: Any, origin: str) -> re.Pattern[str]:
    if value is None:
        return re.compile(DEFAULT_LAYERS)
    pattern = _regex(value, origin, "layers")
    if pattern.groups < 1:
        raise _bad(origin, "layers", "needs a group capturing the layer index, e.g. "
                   r"'^layers\.(\d+)\.'")
    return pattern


def _kinds(value: Any, origin: str) -> tuple[tuple[re.Pattern[str], Kind], ...]:
    if not isinstance(value, dict):
        raise _bad(origin, "kinds", "must be a table of 'module regex' = \"kind\"")
    result = []
    for regex, kind in value.items():
        if kind not in KINDS:
            raise _bad(origin, f"kinds.{regex}", f"{kind!r} is not one of {', '.join(KINDS)}")
        result.append((_regex(regex, origin, f"kinds.{regex}"), kind))
    return tuple(result)


def _rule_list(value: Any, origin: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _bad(origin, "rules", "must be an array of tables ([[rules]])")
    return value


def _rule(number: int, entry: dict[str, Any], origin: str) -> Rule:
    where = f"rule {number}"
    unknown = sorted(set(entry) - _RULE_KEYS)
    if unknown:
        raise _bad(origin, where, f"unknown key {unknown[0]!r} (known: from, to, transform)")
    if "from" not in entry or "to" not in entry:
        raise _bad(origin, where, "needs both 'from' (regex) and 'to' (output name)")
    pattern = _regex(entry["from"], origin, f"{where} 'from'")
    to = entry["to"]
    targets = [to] if isinstance(to, str) else to
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _bad(origin, where, "'to' must be a string or a list of strings")
    targets = [t for t in targets if t]
    for template in targets:
        _check_template(template, pattern, origin, where)
    raw_transform = entry.get("transform", "none")
    if not isinstance(raw_transform, str):
        raise _bad(origin, where, "'transform' must be a string")
    if raw_transform == "drop":
        return Rule(number, pattern, (), Transform())
    try:
        transform = parse_transform(raw_transform)
    except ValueError as exc:
        raise _bad(origin, where, str(exc)) from None
    return Rule(number, pattern, tuple(targets), transform)


def _check_template(template: str, pattern: re.Pattern[str], origin: str, where: str) -> None:
    for number, name in _GROUP_REF.findall(template):
        if number and int(number) > pattern.groups:
            raise _bad(origin, where, f"'to' refers to group \\{number} but 'from' has "
                       f"{pattern.groups} group(s)")
        if name and not name.isdigit() and name not in pattern.groupindex:
            raise _bad(origin, where, f"'to' refers to group <{name}>, which 'from' lacks")
