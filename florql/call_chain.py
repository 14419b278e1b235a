"""Skipping an inner loop that runs in a helper function (the pytorch/examples layout).

In `for epoch in florql.loop(...): train(...)` with the batch loop inside `train`, the checkpoint
at the inner loop's end also holds the locals of every function frame between that loop and the
outer loop (the *call chain*). A replay that restores the checkpoint in place of the loop puts them
back, so `train` goes on as it did originally and returns what it returned (an averaged loss).

That is exact only when
- every caller in the chain is paused in a plain call statement (`f(...)`, `x = f(...)`,
  `return f(...)`): nothing else it evaluated before the call (a bound `append`, a left operand)
  waits on its stack for the result, holding an object the restore would replace;
- every local is plain data, a generator, a data set or loader, a registered object (or one of its
  parameters), or the very object an outer-scope variable or a caller's local holds (restored as
  that object: `train(model, loader, history)` keeps its arguments' identity);
- no mutable container a local holds is shared with another variable (copies would split them).
Otherwise `capture_chain` names the blockers and the run checkpoints at the end of the outer
iteration instead: epoch-level names then re-execute the helper's loop, and `explain` says why.
"""

from __future__ import annotations

import argparse
import ast
import collections
import inspect
import linecache
import os
import site
import sys
import sysconfig
import types
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from florql.errors import ReplayFailed
from florql.scope import _PLAIN_ATOMS, _should_skip, capture_variables, restored_values, scope_of, write_scope

MAX_DEPTH = 8  # frames between the inner loop and the outer loop that we follow
_MAX_WALK = 100_000  # container items walked per variable when looking for shared containers
_CONTAINERS = (list, dict, set, collections.deque, torch.Tensor, np.ndarray)
_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def call_chain(inner: types.FrameType, outer: types.FrameType | None) -> list[types.FrameType] | None:
    """The frames from the one running the inner loop up to the outer loop's (excluded), innermost
    first: [] when the inner loop runs in the outer loop's frame, None when it is not called from there."""
    chain: list[types.FrameType] = []
    frame: types.FrameType | None = inner
    while frame is not None and frame is not outer and len(chain) <= MAX_DEPTH:
        chain.append(frame)
        frame = frame.f_back
    return chain if frame is outer and outer is not None else None


def describe(chain: list[types.FrameType]) -> list[str]:
    """The functions of the chain, outermost first: what a restore checks it restores into."""
    return [f.f_code.co_name for f in reversed(chain)]


def capture_chain(
    chain: list[types.FrameType], outer: types.FrameType, objects: dict[str, Any], warned: set[str]
) -> dict[str, Any]:
    """Copies of the chain's locals (outermost frame first), or `blockers` saying why they would not be exact."""
    blockers: list[str] = []
    for frame in chain:
        if frame.f_code.co_flags & _GENERATOR_FLAGS:
            blockers.append(f"{frame.f_code.co_name}() is a generator or coroutine")
    for caller in [*chain[1:], outer]:
        if not _paused_in_plain_call(caller):
            blockers.append(
                f"{_where(caller)} calls {chain[0].f_code.co_name if caller is chain[-1] else 'the helper'}() "
                "inside a larger expression; call it as a statement of its own (`x = f(...)` or `f(...)`)"
            )
    owners = _Owners(registered_ids(objects))
    owners.add_scope(scope_of(outer))
    frames: list[dict[str, Any]] = []
    for depth, frame in enumerate(reversed(chain)):
        variables, aliases = owners.split(depth, frame)
        captured = capture_variables(variables, owners.registered, warned, {})
        captured["aliases"] = aliases
        frames.append(captured)
        who = frame.f_code.co_name
        blockers += [f"{who}() holds '{n}', which no checkpoint captures" for n in captured["uncaptured"]]
        blockers += [f"{who}() holds '{n}', which shares a container with '{o}'" for n, o in owners.shared(depth)]
    return {"functions": describe(chain), "frames": frames, "blockers": blockers}


def restore_chain(chain: list[types.FrameType], outer: types.FrameType, captured: dict[str, Any], name: str) -> None:
    """Bind the chain's locals as `capture_chain` captured them (after the outer scope is restored)."""
    if captured.get("functions", []) != describe(chain):
        raise ReplayFailed(
            f"checkpoint {name} was taken at the end of an inner loop called through "
            f"{_path(captured.get('functions', []))}, but the replayed code reaches its first inner loop through "
            f"{_path(describe(chain))}; the recorded code and the replay disagree, so this checkpoint cannot stand "
            "in for the loop"
        )
    bound: list[dict[str, Any]] = []
    for frame, frame_captured in zip(reversed(chain), captured["frames"]):
        updates = restored_values(frame.f_locals, frame_captured)
        for local, (depth, owner) in frame_captured["aliases"].items():
            updates[local] = scope_of(outer)[owner] if depth < 0 else bound[depth][owner]
        write_scope(frame, updates)
        bound.append(dict(frame.f_locals))


class _Owners:
    """Who holds which object: outer-scope variables and the locals of the frames seen so far."""

    def __init__(self, registered: set[int]) -> None:
        self.registered = registered
        self.holder: dict[int, tuple[int, str]] = {}  # id of a top-level value → (depth, name); -1: outer scope
        self.inside: dict[int, str] = {}  # id of a container somewhere inside a variable → that variable
        self.conflicts: dict[int, list[tuple[str, str]]] = {}

    def add_scope(self, scope: dict[str, Any]) -> None:
        for name, value in list(scope.items()):
            if not _should_skip(name, value) and id(value) not in self.registered:
                self.holder.setdefault(id(value), (-1, name))
                self._walk(name, value, -1)

    def split(self, depth: int, frame: types.FrameType) -> tuple[dict[str, Any], dict[str, tuple[int, str]]]:
        """A frame's locals to capture, and those that are another variable's very object (aliases)."""
        variables: dict[str, Any] = {}
        aliases: dict[str, tuple[int, str]] = {}
        for name, value in list(frame.f_locals.items()):
            if _should_skip(name, value) or id(value) in self.registered:
                continue
            held = self.holder.get(id(value))
            if held is not None and not isinstance(value, _PLAIN_ATOMS):
                aliases[name] = held
                continue
            variables[name] = value
            self.holder.setdefault(id(value), (depth, name))
            self._walk(f"{frame.f_code.co_name}.{name}", value, depth)
        return variables, aliases

    def shared(self, depth: int) -> list[tuple[str, str]]:
        return self.conflicts.pop(depth, [])

    def _walk(self, owner: str, value: Any, depth: int) -> None:
        budget = [_MAX_WALK]
        for found in _containers(value, budget):
            if found in self.registered and depth >= 0:
                self.conflicts.setdefault(depth, []).append((owner.split(".")[-1], "a registered object"))
                continue
            other = self.inside.setdefault(found, owner)
            if other != owner and depth >= 0:
                self.conflicts.setdefault(depth, []).append((owner.split(".")[-1], other))


def _containers(value: Any, budget: list[int]) -> list[int]:
    """Ids of the mutable containers in `value` (itself included), walking plain data and plain objects."""
    found: list[int] = []
    stack = [value]
    while stack and budget[0] > 0:
        item = stack.pop()
        budget[0] -= 1
        if isinstance(item, _CONTAINERS):
            found.append(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, collections.deque)):
            stack.extend(item)
        elif _walkable_object(item):
            stack.extend(vars(item).values())
    return found


def _walkable_object(item: Any) -> bool:
    """An instance of the script's own class (a tracker), or a namespace of plain values: its
    attributes may hold shared containers. Objects of Python's or installed packages' classes are
    not walked: an `argparse.ArgumentParser` alone reaches ~100k objects, walked at every checkpoint."""
    if not hasattr(item, "__dict__") or isinstance(item, (type, types.ModuleType, torch.nn.Module)):
        return False
    return isinstance(item, (argparse.Namespace, types.SimpleNamespace)) or _users_class(type(item))


def _users_class(cls: type) -> bool:
    """Defined in the script or its project's modules, not in Python's library or an installed package."""
    known = _USERS_CLASSES.get(cls)
    if known is None:
        path = getattr(sys.modules.get(cls.__module__), "__file__", None)
        known = cls.__module__ == "__main__" or (path is not None and not os.path.realpath(path).startswith(_INSTALLED))
        _USERS_CLASSES[cls] = known
    return known


_USERS_CLASSES: dict[type, bool] = {}


_INSTALLED = tuple(
    os.path.realpath(p) + os.sep
    for p in {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["stdlib"]}
)


def registered_ids(objects: dict[str, Any]) -> set[int]:
    """The registered objects and their modules' parameters and buffers: a restore loads them in
    place, so a local holding one already holds the right object."""
    ids = {id(o) for o in objects.values()}
    for obj in objects.values():
        if isinstance(obj, torch.nn.Module):
            ids.update(id(t) for t in (*obj.parameters(), *obj.buffers()))
    return ids


def _paused_in_plain_call(frame: types.FrameType) -> bool:
    positions = list(frame.f_code.co_positions())
    index = frame.f_lasti // 2
    return 0 <= index < len(positions) and positions[index] in _plain_call_spans(frame.f_code.co_filename)


def _plain_call_spans(filename: str) -> frozenset[tuple[int | None, ...]]:
    return _spans_of("".join(linecache.getlines(filename)))


@lru_cache(maxsize=64)
def _spans_of(source: str) -> frozenset[tuple[int | None, ...]]:
    """Source spans of the calls that are a whole statement: `f(...)`, `x = f(...)`, `return f(...)`."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return frozenset()
    spans = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expr, ast.Assign, ast.AnnAssign, ast.Return)) and isinstance(node.value, ast.Call):
            call = node.value
            spans.add((call.lineno, call.end_lineno, call.col_offset, call.end_col_offset))
    return frozenset(spans)


def _where(frame: types.FrameType) -> str:
    name = frame.f_code.co_name
    return f"line {frame.f_lineno} of {'the script' if name == '<module>' else name + '()'}"


def _path(functions: list[str]) -> str:
    return " → ".join(f"{f}()" for f in functions) if functions else "no helper"
