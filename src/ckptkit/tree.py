"""Walking checkpoint trees: where the tensors are and what the plain values say."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

from ckptkit.storage import budget
from ckptkit.model import Opaque, TensorRef

Path = tuple[Any, ...]


def iter_tensors(tree: Any, path: Path = ()) -> Iterator[tuple[Path, TensorRef]]:
    """Yield ``(path, tensor)`` for every tensor in ``tree``, in insertion order.

    Descends into dicts, lists, tuples and the recorded state of opaque objects (TorchScript
    modules and custom classes keep their tensors there).  Shared subtrees are visited once.
    Paths are built only for tensors, and their lengths are charged to the budget's ``tree``
    (depth x width: a list nested 399 deep holding a million tensors would otherwise cost
    gigabytes of path tuples, here and in every consumer that prints names).
    """
    account = budget.current()
    if isinstance(tree, TensorRef):
        account.charge("tree", len(path), "tensor paths")
        yield path, tree
        return
    seen: set[int] = set()
    root = _children(tree, seen)
    if root is None:
        return
    frames: list[Iterator[tuple[Path, Any]]] = [root]
    keys: list[Path] = []  # the key of each open frame below the root
    while frames:
        for key, child in frames[-1]:
            if isinstance(child, TensorRef):
                where = path + tuple(part for k in keys for part in k) + key
                account.charge("tree", len(where), "tensor paths")
                yield where, child
                continue
            below = _children(child, seen)
            if below is not None:
                keys.append(key)
                frames.append(below)
                break
        else:
            frames.pop()
            if keys and len(keys) == len(frames):
                keys.pop()


def _children(node: Any, seen: set[int]) -> Iterator[tuple[Path, Any]] | None:
    """``(key, child)`` pairs of a container not visited yet (keys are path pieces)."""
    if not isinstance(node, (dict, list, tuple, Opaque)) or id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, dict):
        return (((k,), v) for k, v in node.items())
    if isinstance(node, (list, tuple)):
        return (((i,), v) for i, v in enumerate(node))
    state: Iterator[tuple[Path, Any]] = iter(())
    if isinstance(node.state, dict):
        state = (((k,), v) for k, v in node.state.items())
    elif node.state is not None:
        state = iter(((("__state__",), node.state),))
    args = ((("__args__", i), v) for i, v in enumerate(node.args))
    return itertools.chain(state, args)


def join(path: Path, separator: str = ".") -> str:
    """Display name of a tree path: components joined with ``separator``."""
    return separator.join(str(p) for p in path)


def is_scalar(value: Any) -> bool:
    """Plain values worth showing as metadata (step, epoch, losses, version strings)."""
    return value is None or isinstance(value, (bool, int, float, str))
