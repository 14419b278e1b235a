"""The per-process training session shared by recording and replay.

A session owns the loop stack (the coordinates every record carries), the registered
checkpoint objects and the segment writer. `RecordSession` writes a new run;
`florql.replaying.ReplaySession` re-executes part of an old one.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from florql.call_chain import call_chain
from florql.errors import UsageError
from florql.names import check_name
from florql.storage.segment_writer import SOFT_LIMIT, Deferred, SegmentWriter

# Checkpoints may cost training at most this fraction of its time: within the whole-process target
# of 2 % once logging and the run's start and exit are counted.
DEFAULT_BUDGET = 0.02


@dataclass
class LoopFrame:
    name: str
    depth: int
    index: int = -1


@dataclass
class OuterState:
    """Book-keeping for the current outer-loop iteration."""

    index: int = -1
    started: float = 0.0
    inner_point_done: bool = False
    inner_seen: bool = False  # a depth-1 loop ran in this iteration: later ones are no checkpoint point
    stall_s: float = 0.0
    inner_s: float = 0.0
    observed_s: float = 0.0  # training time already reported to the checkpoint policy
    overlapped: bool = False  # a checkpoint persist ran during this iteration
    frame: types.FrameType | None = None
    baseline: dict[str, tuple[int, int]] = field(default_factory=dict)


class TrainingSession:
    writer: SegmentWriter

    def __init__(self) -> None:
        self.stack: list[LoopFrame] = []
        self.position: tuple = ("",)
        self.objects: dict[str, Any] = {}
        self.checkpointing_active = False
        self.budget = DEFAULT_BUDGET
        self.outer = OuterState()
        self._names: set[str] = set()
        self.args: dict[str, Any] = {}
        # Where iteration, stall and training times come from; tests inject a clock of their own.
        self.clock: Callable[[], float] = now

    # ---- logging (the hot path) -------------------------------------------------------------
    def log(self, name: str, value: Any) -> None:
        t = type(value)
        if t is not float and t is not bool and (t is not str or not value.isascii()):
            value = _int64(name, value) if t is int else self._convert(name, value)
        if name not in self._names:
            self._admit_name(name)
        buf = self.writer.buffer
        buf.append((name, value, self.position))
        if len(buf) >= SOFT_LIMIT:
            self.writer.pressure()

    def _admit_name(self, name: str) -> None:
        check_name("log", name)
        if any(f.name == name for f in self.stack):
            raise UsageError(
                f"florql.log({name!r}): '{name}' is the name of an enclosing florql.loop; pick another name"
            )
        self._names.add(name)

    def _convert(self, name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dim() > 1:
                raise UsageError(
                    f"florql.log({name!r}, …): got a tensor of shape {tuple(value.shape)}; log a 0-d tensor "
                    "(e.g. loss, or t.mean()) or a Python number"
                )
            value = value.detach().reshape(())
            if value.is_cuda:
                # No synchronisation here: an asynchronous copy into pinned host memory is queued
                # behind the work that computes the value; the writer thread waits on the event
                # (releasing the GIL) and reads the host copy.
                host = value.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self.writer.has_deferred = True
                return Deferred(host, event)
            return value.item()
        if isinstance(value, np.generic) and isinstance(value.item(), (float, int, bool, str)):
            value = value.item()
        if isinstance(value, (float, int, bool, str)):  # subclasses (e.g. IntEnum): store the plain value
            for base in (bool, int, float, str):
                if isinstance(value, base):
                    if base is int:
                        return _int64(name, int(value))
                    return _utf8(name, str(value)) if base is str else base(value)
        raise UsageError(
            f"florql.log({name!r}, …): cannot log a value of type {type(value).__name__}; "
            "log a float, int, bool, str, NumPy scalar or a 0-d tensor"
        )

    # ---- loops ------------------------------------------------------------------------------
    def loop(self, name: str, iterable: Iterable[Any], frame: types.FrameType) -> Iterator[Any]:
        check_name("loop", name)
        if any(f.name == name for f in self.stack):
            raise UsageError(
                f"florql.loop({name!r}): a loop named '{name}' is already running around this one; "
                "nested loops need different names"
            )
        if name in self._names:
            raise UsageError(f"florql.loop({name!r}): '{name}' is already used as a log name; pick another loop name")
        return self._loop(LoopFrame(name, len(self.stack)), iterable, frame)

    def _loop(self, lf: LoopFrame, iterable: Iterable[Any], frame: types.FrameType) -> Iterator[Any]:
        self.stack.append(lf)
        try:
            if lf.depth == 0:
                yield from self.outer_loop(lf, iterable, frame)
            else:
                yield from self.inner_loop(lf, iterable, frame)
        finally:
            self.stack.pop()
            self._reposition()

    def _reposition(self) -> None:
        self.position = ("/".join(f.name for f in self.stack), *(f.index for f in self.stack))

    def enter_iteration(self, lf: LoopFrame, index: int) -> None:
        lf.index = index
        if lf.depth == 0:
            self.outer.inner_seen = False
        self._reposition()

    def inner_prefix(self) -> tuple:
        """`position` without the innermost loop's index, for an inner loop as it starts: a step
        then costs one tuple (`prefix + (index,)`). The enclosing loops' coordinates cannot change
        while it runs, and a loop nested in it restores `position` as it ends."""
        return ("/".join(f.name for f in self.stack), *(f.index for f in self.stack[:-1]))

    def outer_loop(self, lf: LoopFrame, iterable: Iterable[Any], frame: types.FrameType) -> Iterator[Any]:
        raise NotImplementedError

    def inner_loop(self, lf: LoopFrame, iterable: Iterable[Any], frame: types.FrameType) -> Iterator[Any]:
        raise NotImplementedError

    def checkpoint_chain(self, lf: LoopFrame, frame: types.FrameType) -> list[types.FrameType] | None:
        """The call chain (see `florql.call_chain`) when this loop's end is the iteration's 'inner_end'
        checkpoint point, else None.

        The point is the first depth-1 loop of an outer iteration, run in the outer loop's frame
        ([]) or in a helper it calls (the frames in between, whose locals the checkpoint holds).
        """
        if lf.depth != 1 or self.outer.inner_seen:
            return None
        self.outer.inner_seen = True
        if self.outer.inner_point_done or not self.stack or self.stack[0].index < 0:
            return None
        return call_chain(frame, self.outer.frame)

    # ---- args and checkpointing ---------------------------------------------------------------
    def arg(self, name: str, default: Any) -> Any:
        raise NotImplementedError

    def register(self, objects: dict[str, Any], budget: float | None) -> None:
        if self.checkpointing_active:
            raise UsageError("florql.checkpointing(...) is already active; use a single checkpointing block")
        if not objects:
            raise UsageError(
                "florql.checkpointing(...) needs the objects to checkpoint, e.g. checkpointing(model=net, optimizer=opt)"
            )
        for key, obj in objects.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise UsageError(
                    f"florql.checkpointing({key}=…): a {type(obj).__name__} has no state_dict()/load_state_dict(); "
                    "register models, optimizers, schedulers, GradScalers or objects that implement both"
                )
        if budget is not None and not 0 < budget < 1:
            raise UsageError(
                f"florql.checkpointing(budget={budget!r}): the overhead budget is a fraction in (0, 1), e.g. 0.02 for 2 %"
            )
        self.objects = dict(objects)
        self.budget = DEFAULT_BUDGET if budget is None else budget
        self.checkpointing_active = True

    def unregister(self) -> None:
        self.checkpointing_active = False

    def module_modes(self) -> dict[str, list[bool]]:
        return {k: [m.training for m in o.modules()] for k, o in self.objects.items() if isinstance(o, torch.nn.Module)}

    def restore_module_modes(self, modes: dict[str, list[bool]]) -> None:
        for key, flags in modes.items():
            obj = self.objects.get(key)
            if isinstance(obj, torch.nn.Module):
                for module, flag in zip(obj.modules(), flags):
                    module.training = flag

    def finish(self) -> None:
        """Called at interpreter exit."""


def _int64(name: str, value: int) -> int:
    """Integers are stored as 64-bit: a larger one would fail the whole segment it is written in."""
    if -(2**63) <= value < 2**63:
        return int(value)
    raise UsageError(
        f"florql.log({name!r}, {value}): the integer does not fit in 64 bits; log it as a float "
        "(float(x)) or as a string (str(x))"
    )


def _utf8(name: str, value: str) -> str:
    """Strings are stored as UTF-8: one that cannot be encoded would fail its whole segment."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"florql.log({name!r}, …): the string cannot be stored as UTF-8 ({exc.reason} at position "
            f"{exc.start}); log value.encode('utf-8', 'replace').decode() or repr(value)"
        ) from None
    return value


def now() -> float:
    return time.perf_counter()


def caller_frame(depth: int = 2) -> types.FrameType:
    return sys._getframe(depth)
