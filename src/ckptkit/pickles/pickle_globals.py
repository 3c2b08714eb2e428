"""The globals a restricted pickle may name, and the inert stand-ins it gets for them.

The names themselves are data (``data/pickle_allowlist.toml``, one kind per name);
:data:`ALLOWED` maps each ``(module, name)`` to what :class:`~ckptkit.pickles.unpickler.InertUnpickler`
hands the pickle instead of importing: torch tensor and storage rebuild functions become
builders of :class:`PendingTensor`, storage classes and dtypes become small markers, data
records become recorders, and a few builtins keep their meaning but are bounded.  Nothing here
imports or calls what a pickle names.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from ckptkit.storage import budget
from ckptkit.model import Opaque

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_NUMPY_CODES = {
    "b1": "bool", "i1": "int8", "u1": "uint8", "i2": "int16", "u2": "uint16", "i4": "int32",
    "u4": "uint32", "i8": "int64", "u8": "uint64", "f2": "float16", "f4": "float32",
    "f8": "float64", "c8": "complex64", "c16": "complex128", "V2": "bfloat16?",
}


def numpy_dtype_name(descr: str) -> str:
    """Map a numpy type string (``'<f4'``, ``'|b1'``, ``'f8'``) to its numpy spelling."""
    code = descr.lstrip("<>|=")
    if code in _NUMPY_CODES:
        return _NUMPY_CODES[code]
    aliases = {"d": "float64", "f": "float32", "e": "float16", "q": "int64", "l": "int64",
               "i": "int32", "h": "int16", "b": "int8", "B": "uint8", "?": "bool",
               "O": "object", "float64": "float64", "float32": "float32", "int64": "int64",
               "int32": "int32", "bool": "bool", "bfloat16": "bfloat16"}
    if code in aliases:
        return aliases[code]
    if code[:1] in "USV" and code[1:].isdigit():
        # numpy's own names carry the width in bits (str64 for <U2), so sizes stay right.
        width = int(code[1:]) * (32 if code[0] == "U" else 8)
        return {"U": "str", "S": "bytes", "V": "void"}[code[0]] + str(width)
    return code


# --- objects that live only while a pickle is being interpreted -------------------------------

class AttrDict(dict):
    """A dict that also accepts attributes (torch pickles set ``_metadata`` via BUILD)."""


@dataclass(eq=False)  # hashable by identity, like the torch object
class StorageType:
    dtype: str


@dataclass(eq=False)  # hashable by identity, like the torch object
class DType:
    name: str


@dataclass
class StorageRef:
    """A storage named by a persistent id; the format reader decides where its bytes are."""

    key: str
    dtype: str
    location: str
    numel: int
    view_offset: int = 0


@dataclass(eq=False)  # hashable by identity, like the torch object
class PendingTensor:
    storage: Any
    offset: Any
    size: Any
    stride: Any
    dtype: str | None = None
    device: str | None = None


def inert_type(qualname: str) -> type:
    def __new__(cls, *args, **kwargs):  # noqa: N807 - the inert stand-in for construction
        return Opaque(qualname, args + ((kwargs,) if kwargs else ()))

    return type(qualname.rpartition(".")[2] or "Inert", (),
                {"__new__": __new__, "qualname": qualname})


def _rebuild_qtensor(storage, storage_offset, size, stride, *rest):
    """A quantized tensor: its storage is typed (QInt8Storage ...), so the dtype is known."""
    return PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *rest):
    return PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=None, hooks=None,
                       dtype=None, *rest):
    return PendingTensor(storage, storage_offset, size, stride,
                          dtype.name if isinstance(dtype, DType) else None)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_meta(dtype, size, stride, *rest):
    name = dtype.name if isinstance(dtype, DType) else "float32"
    return PendingTensor(None, 0, size, stride, name, "meta")


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args) if callable(func) else Opaque("torch._tensor._rebuild_from_type_v2")


def _torch_size(*args: Any) -> tuple[Any, ...]:
    return tuple(args[0]) if args and isinstance(args[0], (list, tuple)) else ()


def _torch_device(*args: Any) -> str:
    return ":".join(_scalar_text(args))


def _torch_layout(*args: Any) -> str:
    return "".join(_scalar_text(args[:1]))


def _identity(value: Any = None, *rest: Any) -> Any:
    return value


def _as_list(value: Any = None, *rest: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


class EmbeddedTorchFile:
    """``torch.storage._load_from_bytes``: ``torch.load(io.BytesIO(data), weights_only=False)``.

    Calling it does not build anything here; the reader sees this marker and reads the
    embedded file the same restricted way, so it is judged by what that file holds."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __repr__(self) -> str:
        return f"<embedded torch file reader {self.qualname}>"


def _codecs_encode(obj, encoding="utf-8", *rest):
    # isinstance(encoding, str): str() of a memo-shared nested list is exponential.
    if isinstance(obj, str) and isinstance(encoding, str) and encoding.lower().replace(
            "_", "-") in ("latin1", "latin-1", "utf-8", "utf8", "iso-8859-1"):
        return obj.encode(encoding)
    return Opaque("_codecs.encode", (obj, encoding))


def _reconstructor(cls: Any = None, base: Any = None, state: Any = None, *rest: Any) -> Any:
    """Protocol 0/1 spelling of "make an instance of cls": the class itself is what gets
    classified (it arrives through find_class like any global), so this only forwards."""
    return cls() if isinstance(cls, type) else Opaque("copyreg._reconstructor", (cls,))


def _scalar_text(args: tuple[Any, ...]) -> list[str]:
    """``str()`` of plain scalar arguments only: ``str()`` of a memo-shared nested list (a
    "billion laughs") is exponential, so containers are never stringified."""
    return [str(a) for a in args if isinstance(a, (str, int, float))]


def _bounded(ctor: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A builtin whose arguments must already be plain data (no allocation by count)."""

    def build(*args):
        if any(isinstance(a, int) and not isinstance(a, bool) for a in args) and name in (
                "bytearray", "bytes"):
            return Opaque(f"builtins.{name}", args)
        if name in ("set", "frozenset") and args and isinstance(args[0], (list, tuple)):
            check_keys(args[0])  # set members are hashed
        try:
            return ctor(*args)
        except (TypeError, ValueError):
            return Opaque(f"builtins.{name}", args)

    return build


def _new_defaultdict(*args: Any) -> AttrDict:
    return AttrDict()


def _new_dict(*args, **kwargs):
    result = AttrDict()
    if args and isinstance(args[0], (dict, list)):
        if isinstance(args[0], list):
            check_keys([p[0] for p in args[0] if isinstance(p, tuple) and p])
        try:
            result.update(args[0])
        except (TypeError, ValueError):
            pass
    return result


#: What each kind of the allowlist (data/pickle_allowlist.toml) stands in with.
_KINDS: dict[str, Callable[[str], Any]] = {
    "dict": lambda _q: _new_dict,
    "defaultdict": lambda _q: _new_defaultdict,
    "set": lambda _q: _bounded(set, "set"),
    "frozenset": lambda _q: _bounded(frozenset, "frozenset"),
    "bytearray": lambda _q: _bounded(bytearray, "bytearray"),
    "bytes": lambda _q: _bounded(bytes, "bytes"),
    "complex": lambda _q: _bounded(complex, "complex"),
    "slice": lambda _q: _bounded(slice, "slice"),
    "tensor": lambda _q: _rebuild_tensor,
    "tensor-v2": lambda _q: _rebuild_tensor_v2,
    "tensor-v3": lambda _q: _rebuild_tensor_v3,
    "qtensor": lambda _q: _rebuild_qtensor,
    "parameter": lambda _q: _rebuild_parameter,
    "meta-tensor": lambda _q: _rebuild_meta,
    "from-type-v2": lambda _q: _rebuild_from_type_v2,
    "size": lambda _q: _torch_size,
    "device": lambda _q: _torch_device,
    "layout": lambda _q: _torch_layout,
    "name": lambda qualname: qualname,  # quantizer schemes: plain names
    "codecs-encode": lambda _q: _codecs_encode,
    "reconstructor": lambda _q: _reconstructor,
    "object": inert_type,
    "numpy": inert_type,
    "record": inert_type,
    "embedded-torch-file": lambda qualname: EmbeddedTorchFile(qualname),
    "identity": lambda _q: _identity,
    "list": lambda _q: _as_list,
}
ALLOWLIST = Path(str(resources.files("ckptkit") / "data" / "pickle_allowlist.toml"))


def allowlist_kinds(section: str = "everywhere") -> dict[tuple[str, str], str]:
    """``(module, name) -> kind`` for one section of data/pickle_allowlist.toml."""
    table = _allowlist_data()[section]
    return {tuple(key.split(":", 1)): kind for key, kind in table.items()}  # type: ignore[misc]


@functools.lru_cache(maxsize=1)
def _allowlist_data() -> dict[str, dict[str, str]]:
    return tomllib.loads(ALLOWLIST.read_text(encoding="utf-8"))


def stand_in(kind: str, qualname: str) -> Any:
    """The stand-in a restricted read hands a pickle for an allowlisted global of ``kind``."""
    word, _, dtype = kind.partition(" ")
    if word == "storage":
        return StorageType(dtype)
    if word == "dtype":
        return DType(dtype)
    return _KINDS[word](qualname)


def allowed(section: str = "everywhere") -> dict[tuple[str, str], Any]:
    """``(module, name) -> stand-in`` for one section of the allowlist."""
    return {key: stand_in(kind, f"{key[0]}.{key[1]}")
            for key, kind in allowlist_kinds(section).items()}


ALLOWED = allowed()
#: Stand-ins that call (or keep to call later) the arguments at these positions: a value
#: computed at load time there is a call the real loader makes on it.
CALLS_ARGUMENTS: dict[int, tuple[int, ...]] = {
    id(_rebuild_from_type_v2): (0,), id(_reconstructor): (0, 1), id(_new_defaultdict): (0,)}


def check_keys(keys: Any, sizes: dict[int, tuple[Any, int]] | None = None,
               account: budget.Budget | None = None, what: str = "") -> None:
    """Refuse any of ``keys`` that is a tuple whose nested tuples expand past the budget's
    ``key`` limit, and charge hashing the tuple keys (which walks them, every time) to its
    ``opcodes``.

    Counts with a memo by id, so a memo-shared tower of tuples costs at most the limit in
    steps here, while hashing it would cost the full exponential expansion.  ``sizes`` (kept
    by the caller across calls, holding each tuple so that its id stays its own) makes a key
    used again cost no new check.  ``account`` is the open budget unless given.

    Raises:
        BudgetError: a key too large, or hashing past the opcode budget.
    """
    account = account or budget.current()
    sizes = {} if sizes is None else sizes
    walked = 0
    for key in keys:
        if type(key) is not tuple:
            continue
        stack: list[tuple[Any, bool]] = [(key, False)]
        while stack:
            node, done = stack.pop()
            if id(node) in sizes:
                continue
            if done:
                size = 1 + sum(sizes[id(c)][1] if id(c) in sizes else 1 for c in node)
                account.check("key", size, what)
                sizes[id(node)] = (node, size)
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in node if type(c) is tuple and id(c) not in sizes)
            account.check("key", len(stack), what)
        walked += sizes[id(key)][1]
    if walked:
        account.charge("opcodes", walked, what)
