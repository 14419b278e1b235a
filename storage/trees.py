"""State trees: nested dicts, lists, tuples, sets and deques whose leaves are tensors and values.

One walker for every layer that copies or rewrites such trees (checkpoint staging, the checkpoint
file's skeleton, the plain scope variables). It never imports torch: the query side uses the
storage layer without loading it.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable
from typing import Any


def tree_map(fn: Callable[..., Any], tree: Any, path: str | None = None) -> Any:
    """`tree` with every leaf replaced by `fn(leaf)`, each container rebuilt as the same type.

    Dicts keep their class, instance attributes and a defaultdict's default factory (keys are not
    mapped); lists, tuples, namedtuples, sets and frozensets keep their type; a deque keeps its
    maxlen. Anything else is a leaf. Leaves are visited in iteration order.

    With `path` (the root's name), `fn(leaf, leaf_path)` also gets where the leaf sits: the root's
    name followed by `.key` or `.index` for each level (`"model.layers.0.weight"`).
    """

    def walk(value: Any, at: str | None) -> Any:
        if isinstance(value, dict):
            items = {k: walk(v, None if at is None else f"{at}.{k}") for k, v in value.items()}
            if type(value) is dict:
                return items
            out = copy.copy(value)  # keeps the class, its attributes and a defaultdict's default_factory
            out.clear()
            out.update(items)
            return out
        if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
            mapped = [walk(v, None if at is None else f"{at}.{i}") for i, v in enumerate(value)]
            if isinstance(value, collections.deque):
                return type(value)(mapped, value.maxlen)
            if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
                return type(value)(*mapped)
            return type(value)(mapped)
        return fn(value) if at is None else fn(value, at)

    return walk(tree, path)
