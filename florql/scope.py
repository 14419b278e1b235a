"""Plain state kept in the scope that runs the outer loop: capture at a checkpoint, restore at replay.

Scripts keep training state outside any registered object: a float learning rate, `best_val_loss`,
a `global_step`, explicit RNG generators. The variables of the frame running the outer
`florql.loop` (module globals for a script, locals for a function) are captured when they hold
plain data: None, bool, int, float, complex, str, bytes, tuples/lists/dicts/sets of plain data,
tensors and NumPy arrays. `random.Random`, `numpy.random.Generator` and `torch.Generator` objects are
restored in place (other objects may hold them), and so are those a DataLoader of the scope shuffles
with (its `generator`, its sampler's, generator attributes of a custom sampler). Everything else
(modules, functions, classes, datasets, loaders, models) is not captured: a model, optimizer, scheduler or GradScaler that is not
registered with `florql.checkpointing` gets a warning because replay would start from a wrong state.
"""

from __future__ import annotations

import collections
import copy
import ctypes
import random
import sys
import types
import warnings
from typing import Any

import numpy as np
import torch

from florql.storage.trees import tree_map

_PLAIN_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.device, torch.dtype)
_MAX_ITEMS = 100_000
_STATEFUL_TYPES: tuple[type, ...] = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)


class ScopeWarning(UserWarning):
    pass


def _is_plain(value: Any, budget: list[int]) -> bool:
    budget[0] -= 1
    if budget[0] < 0:
        return False
    if isinstance(value, (*_PLAIN_ATOMS, torch.Tensor, np.ndarray, np.generic)):
        return True
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return all(_is_plain(v, budget) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k, budget) and _is_plain(v, budget) for k, v in value.items())
    return False


def _copy_plain(value: Any) -> Any:
    """A copy of plain data of the same types (a deque keeps its maxlen, a defaultdict its factory)."""
    return tree_map(_copy_plain_leaf, value)


def _copy_plain_leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return copy.copy(value) if isinstance(value, np.ndarray) else value


def _snapshot_plain(value: Any, previous: Any = None) -> Any:
    """A copy for a checkpoint: arrays read-only (no one writes to a snapshot, so the persist may
    recognise one it already hashed), and `previous`, the last snapshot, when it holds the same bytes."""
    if isinstance(value, np.ndarray) and _same_bytes(value, previous):
        return previous
    return tree_map(_snapshot_leaf, value)


def _snapshot_leaf(value: Any) -> Any:
    snapshot = _copy_plain_leaf(value)
    if isinstance(snapshot, np.ndarray):
        snapshot.setflags(write=False)
    return snapshot


def _same_bytes(value: np.ndarray, snapshot: Any) -> bool:
    """Whether `value` holds exactly the bytes of the read-only `snapshot` (compared, not hashed: cheaper than a copy)."""
    if not (
        type(snapshot) is type(value)
        and snapshot.dtype == value.dtype
        and snapshot.shape == value.shape
        and not snapshot.flags.writeable
        and value.flags.c_contiguous
        and snapshot.flags.c_contiguous
        and not value.dtype.hasobject
    ):
        return False
    # As unsigned integers: float equality would call -0.0 and 0.0 equal, and NaN unequal to itself.
    width = value.dtype.itemsize if value.dtype.itemsize in (1, 2, 4, 8) else 1
    as_bits = np.dtype(f"u{width}")
    return bool(np.array_equal(value.reshape(-1).view(as_bits), snapshot.reshape(-1).view(as_bits)))


def _generator_state(value: Any) -> tuple[str, Any] | None:
    if isinstance(value, random.Random):
        return ("random", value.getstate())
    if isinstance(value, np.random.Generator):
        return ("numpy", copy.deepcopy(value.bit_generator.state))
    if isinstance(value, np.random.RandomState):
        return ("numpy_legacy", value.get_state())
    if isinstance(value, torch.Generator):
        return ("torch", value.get_state())
    return None


def _should_skip(name: str, value: Any) -> bool:
    return name.startswith("__") or isinstance(
        value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, types.MethodType)
    )


def scope_of(frame: types.FrameType) -> dict[str, Any]:
    """The variables of the frame: its globals at module level, its locals in a function."""
    return frame.f_globals if frame.f_code.co_name == "<module>" else frame.f_locals


def baseline_of(frame: types.FrameType) -> dict[str, tuple[int, int]]:
    """Identity (and tensor version) of each variable when the outer loop starts."""
    return {name: (id(v), _version(v)) for name, v in list(scope_of(frame).items())}


def _version(value: Any) -> int:
    return value._version if isinstance(value, torch.Tensor) else 0


def _unchanged(name: str, value: Any, baseline: dict[str, tuple[int, int]]) -> bool:
    # Replay re-runs the code before the loop, so a variable still bound to the same immutable
    # object (or to a tensor never modified in place) needs no copy: the large data tensors.
    seen = baseline.get(name)
    if seen is None or seen[0] != id(value):
        return False
    return isinstance(value, _PLAIN_ATOMS) or (isinstance(value, torch.Tensor) and value._version == seen[1])


def capture_scope(
    frame: types.FrameType,
    registered: set[int],
    warned: set[str],
    baseline: dict[str, tuple[int, int]],
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copies of the plain variables and generator states of `frame`'s scope that may have changed.

    `previous`: the plain values of the last capture; an array holding the same bytes is that same
    snapshot again, neither copied nor (see `storage.checkpoints.ChunkCache`) hashed or written.
    """
    return capture_variables(scope_of(frame), registered, warned, baseline, previous)


def capture_variables(
    variables: dict[str, Any],
    registered: set[int],
    warned: set[str],
    baseline: dict[str, tuple[int, int]],
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copies of the plain values and generator states among `variables` that may have changed."""
    previous = previous or {}
    captured: dict[str, Any] = {"plain": {}, "generators": {}, "original_devices": {}, "objects": {}, "uncaptured": []}
    for name, value in list(variables.items()):
        if id(value) in registered or _should_skip(name, value) or _unchanged(name, value, baseline):
            continue
        gen = _generator_state(value)
        if gen is not None:
            captured["generators"][name] = gen
        elif isinstance(value, torch.utils.data.DataLoader):
            # Not captured itself (replay re-creates it), but the generators it shuffles with are
            # restored in place: `DataLoader(..., generator=torch.Generator().manual_seed(0))`.
            for path, held in _loader_generators(name, value):
                captured["generators"][path] = _generator_state(held)
            if value.num_workers > 0 and getattr(value, "persistent_workers", False) and name not in warned:
                warned.add(name)
                warnings.warn(
                    f"florql: the DataLoader '{name}' has persistent_workers=True; its worker processes keep RNG "
                    "state a checkpoint cannot capture, so replays from checkpoints may diverge. "
                    "Use persistent_workers=False.",
                    ScopeWarning,
                    stacklevel=4,
                )
        elif _is_plain(value, [_MAX_ITEMS]):
            captured["plain"][name] = _snapshot_plain(value, previous.get(name))
            if isinstance(value, torch.Tensor):
                captured["original_devices"][name] = str(value.device)
        elif _is_plain_object(value):
            captured["objects"][name] = _snapshot_plain(dict(vars(value)))
        elif _stateless(value):
            continue
        else:
            # A replay from this checkpoint sees the object as the script's set-up left it:
            # statements that read it cannot skip the inner loop.
            captured["uncaptured"].append(name)
            if not _holds_state(value) or name in warned:
                continue
            warned.add(name)
            warnings.warn(
                f"florql: '{name}' ({type(value).__name__}) holds training state but is not registered with "
                f"florql.checkpointing(...); replays from checkpoints will not restore it and may diverge. "
                f"Pass it as florql.checkpointing({name}={name}, ...).",
                ScopeWarning,
                stacklevel=4,
            )
    return captured


def _is_plain_object(value: Any) -> bool:
    """An instance of the script's own class holding only plain data (an early-stopping tracker)."""
    module = type(value).__module__.split(".")[0]
    if module in _LIBRARY_MODULES or not hasattr(value, "__dict__") or isinstance(value, type):
        return False
    return bool(vars(value)) and _is_plain(dict(vars(value)), [_MAX_ITEMS])


_LIBRARY_MODULES = frozenset({"builtins", "torch", "numpy", "florql", "pandas", "pyarrow"})


def _loader_generators(name: str, loader: Any) -> list[tuple[str, Any]]:
    """Generators a DataLoader draws from: its own, its sampler's, a custom sampler's attributes."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def add(path: str, obj: Any) -> None:
        if id(obj) not in seen and _generator_state(obj) is not None:
            seen.add(id(obj))
            found.append((path, obj))

    add(f"{name}.generator", getattr(loader, "generator", None))
    for attr in ("sampler", "batch_sampler"):
        sampler = getattr(loader, attr, None)
        for prefix, obj in ((f"{name}.{attr}", sampler), (f"{name}.{attr}.sampler", getattr(sampler, "sampler", None))):
            for key, held in list(getattr(obj, "__dict__", {}).items()):
                if key.isidentifier():
                    add(f"{prefix}.{key}", held)
    return found


def _stateless(value: Any) -> bool:
    """Objects a replay's own set-up re-creates as they were: data sets, stateless modules."""
    if isinstance(value, torch.utils.data.Dataset):
        return True
    return isinstance(value, torch.nn.Module) and not _holds_state(value)


def _holds_state(value: Any) -> bool:
    # A module without parameters or buffers (a loss, an activation) has nothing to restore.
    if isinstance(value, torch.nn.Module):
        return next(value.parameters(), None) is not None or next(value.buffers(), None) is not None
    return isinstance(value, _STATEFUL_TYPES) or _is_grad_scaler(value)


def _is_grad_scaler(value: Any) -> bool:
    return type(value).__name__ == "GradScaler" and hasattr(value, "state_dict")


def restore_scope(frame: types.FrameType, captured: dict[str, Any]) -> None:
    """Put the captured values back into `frame`'s scope (generators are restored in place)."""
    write_scope(frame, restored_values(scope_of(frame), captured))


def restored_values(scope: dict[str, Any], captured: dict[str, Any]) -> dict[str, Any]:
    """The variables to bind again; generators and plain objects of `scope` are restored in place."""
    updates: dict[str, Any] = {}
    for name, value in captured["plain"].items():
        device = captured["original_devices"].get(name)
        if isinstance(value, torch.Tensor) and device and device != "cpu":
            value = value.to(device)
        updates[name] = _copy_plain(value) if not isinstance(value, torch.Tensor) else value
    for name, (kind, state) in captured["generators"].items():
        # A dotted name is a generator held by an object of the scope (a DataLoader's, its sampler's).
        first, *attrs = name.split(".")
        target = scope.get(first)
        for attr in attrs:
            target = getattr(target, attr, None)
        if target is None or _generator_state(target) is None:
            continue
        _set_generator_state(target, kind, state)
    for name, attrs in captured.get("objects", {}).items():
        target = scope.get(name)
        if target is not None and hasattr(target, "__dict__"):
            target.__dict__.update(_copy_plain(attrs))  # in place: other objects may hold it
    return updates


def write_scope(frame: types.FrameType, updates: dict[str, Any]) -> None:
    """Bind `updates` in `frame`: its globals at module level, its locals in a function."""
    if frame.f_code.co_name == "<module>":
        frame.f_globals.update(updates)
    else:
        _write_locals(frame, updates)


def _set_generator_state(target: Any, kind: str, state: Any) -> None:
    if kind == "random":
        target.setstate(state)
    elif kind == "numpy":
        target.bit_generator.state = state
    elif kind == "numpy_legacy":
        target.set_state(state)
    else:
        target.set_state(state)


def _write_locals(frame: types.FrameType, updates: dict[str, Any]) -> None:
    if sys.version_info >= (3, 13):
        for name, value in updates.items():
            frame.f_locals[name] = value  # PEP 667: a write-through proxy
        return
    local_map = frame.f_locals
    local_map.update(updates)
    # Before 3.13 the dict is a snapshot: copy it back into the frame's fast locals.
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
