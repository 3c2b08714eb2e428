"""Walking checkpoint trees: where the tensors are and what the plain values say."""

from __future__ import annotations

from typing import Any, Iterator

from ckptkit.model import Opaque, TensorRef

Path = tuple[Any, ...]


def iter_tensors(tree: Any, path: Path = ()) -> Iterator[tuple[Path, TensorRef]]:
    """Yield ``(path, tensor)`` for every tensor in ``tree``, in insertion order.

    Descends into dicts, lists, tuples and the recorded state of opaque objects (TorchScript
    modules and custom classes keep their tensors there).  Shared subtrees are visited once.
    """
    seen: set[int] = set()
    stack: list[tuple[Path, Any]] = [(path, tree)]
    while stack:
        here, node = stack.pop()
        if isinstance(node, TensorRef):
            yield here, node
            continue
        if isinstance(node, (dict, list, tuple, Opaque)):
            if id(node) in seen:
                continue
            seen.add(id(node))
        children: list[tuple[Path, Any]] = []
        if isinstance(node, dict):
            children = [(here + (k,), v) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            children = [(here + (i,), v) for i, v in enumerate(node)]
        elif isinstance(node, Opaque):
            if isinstance(node.state, dict):
                children = [(here + (k,), v) for k, v in node.state.items()]
            elif node.state is not None:
                children = [(here + ("__state__",), node.state)]
            if node.args:
                children += [(here + ("__args__", i), v) for i, v in enumerate(node.args)]
        stack.extend(reversed(children))


def join(path: Path, separator: str = ".") -> str:
    """Display name of a tree path: components joined with ``separator``."""
    return separator.join(str(p) for p in path)


def is_scalar(value: Any) -> bool:
    """Plain values worth showing as metadata (step, epoch, losses, version strings)."""
    return value is None or isinstance(value, (bool, int, float, str))
