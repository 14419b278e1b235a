"""Adaptive two-phase checkpoints: snapshot into reused CPU buffers, persist in the background.

Three separate parts, as in torch.distributed.checkpoint:
- `AdaptivePolicy` decides *when*: only while the total cost (stall, plus the persist's CPU time
  where training has no core to spare, plus a final persist the run must wait for at exit) stays
  within the budget ε of training time, and never while the previous persist is still in flight.
- `Stager` decides *how to snapshot*: state_dict tensors are copied into CPU buffers that are
  allocated once and reused (pinned, with an asynchronous copy on a side stream, for CUDA tensors).
- `Persister` decides *where*: one background thread writes through `storage.checkpoints`, which
  stores large tensors and arrays as content-addressed chunks: unchanged state is written once.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from florql.errors import UsageError
from florql.storage import layout
from florql.storage.checkpoints import CheckpointRecord, ChunkCache, checkpoint_name, write_checkpoint
from florql.storage.runfiles import RunFiles
from florql.storage.trees import tree_map

ASSUMED_COPY_BYTES_PER_S = 1.0e9  # stall estimate until a checkpoint after the first is measured
# A replay starts from the nearest checkpoint before what a query asks for, so checkpoints T seconds
# of training apart cost a query up to T of re-execution beyond it. They are no closer than a warm
# replay job's start (~0.1-0.4 s: fork, the script's own set-up, the restore), which a closer one
# saves less than, nor than 1 % of the run's expected training: a query then re-executes at most
# 1 % of retraining beyond its range. (At 0.25 s alone, the short workload's 0.1 s epochs took 223
# checkpoints in a 60 s run, ~1.5 % of its training; at 1 %, 92-99.)
MIN_SPACING_S = 0.25
SPACING_SHARE = 0.01
# A run's planned length is trusted up to this many times the training so far: one cut short by
# early stopping (`range(10**5)`, stopped after 4 s) would otherwise have its checkpoints spaced by
# a length it never reaches. So no spacing exceeds 10 % of what the run has trained.
TRUSTED_HORIZON = 10.0
# Nor are they further apart than this: at 10 s, even a ~40 ms checkpoint costs 0.4 %.
MAX_SPACING_S = 10.0
# But an iteration at least this long may always have one: a replay for an epoch-level name skips
# the inner loop only of the iterations that have a checkpoint and re-executes the others (with
# checkpoints 0.5 s apart, half of the mnist layout's ~0.5 s epochs had none, and its query ran 128
# training batches instead of 0: 0.32x of retraining instead of 0.07x). A shorter iteration costs
# such a query less to re-execute than a replay job's start.
LONG_ITERATION_S = 0.25


@dataclass
class AdaptivePolicy:
    """Checkpoint whenever doing so keeps the total cost ≤ budget × training time.

    The cost of a checkpoint is its snapshot stall plus its *interference*: the background
    persist competes with training for cores, memory bandwidth and the GIL, which shows up as
    iterations that overlap a persist taking longer than those that do not. Both are estimated
    robustly (medians of recent samples), so one noisy iteration neither stops checkpointing for
    good nor hides a real cost; an estimate resting on few samples is re-measured now and then.

    Where training already uses every core (`contended`: 2 cores, 2 torch threads), each second
    of CPU the persist spends (hashing, pickling, the kernel's copy) is a second taken from
    training, and that CPU time is what is charged, with the log writer's (`background_cpu_s`):
    the budget bounds all of florql's background work, so a run that logs much checkpoints less.
    The threads measure their CPU time exactly, while iteration times, on a machine this busy,
    vary by more than a small persist costs (on a 2-core VM, ±10 % per 0.6 s epoch against 7 ms
    of persist CPU).

    The first checkpoint is charged but does not predict the next: it carries one-time costs (the
    staging buffers' allocation, the chunks of state that never changes, such as a data set). On
    the demo its 16 ms against 2 ms for each later one once left room for no other checkpoint in
    the run's 2 %. Until a later one is measured, the next is estimated as the first one was.

    Checkpoints are at least `spacing_s` of training apart (`spacing_share` of the run's expected
    training, `planned` opportunities at the pace so far, between `min_spacing_s` and
    `max_spacing_s`), unless the opportunity ends an iteration of at least `long_iteration_s`: on
    a workload of 0.1 s epochs the budget alone bought one every other epoch, each saving a replay
    0.1 s.
    """

    budget: float = 0.02
    train_s: float = 0.0
    stall_s: float = 0.0
    taken: int = 0
    considered: int = 0
    skipped_in_flight: int = 0
    skipped_close: int = 0  # opportunities declined as closer than `spacing_s` to the last checkpoint
    min_spacing_s: float = MIN_SPACING_S
    spacing_share: float = SPACING_SHARE
    max_spacing_s: float = MAX_SPACING_S
    long_iteration_s: float = LONG_ITERATION_S
    planned: int | None = None  # opportunities the run will have (its outer loop's length), if known
    gaps: list[int] = field(default_factory=list)
    overlapped: int = 0  # iterations that ran while a persist was in flight
    _since_last: int = 0
    _train_at_last: float = 0.0  # `train_s` when the last checkpoint was taken
    _train_at_opportunity: float = 0.0  # `train_s` at the previous opportunity
    _quiet: list[float] = field(default_factory=list)  # recent iteration times with no persist running
    _extras: list[float] = field(default_factory=list)  # recent (overlapped time − quiet median)
    _stalls: list[float] = field(default_factory=list)
    contended: bool = False  # training uses every core: the persist's CPU time is training's
    persist_cpu_s: float = 0.0
    background_cpu_s: float = 0.0  # CPU of florql's other threads (the log writer) since training began
    _persist_cpus: list[float] = field(default_factory=list)  # recent persists' CPU seconds
    _persist_walls: list[float] = field(default_factory=list)  # recent persists' wall seconds
    _persists: int = 0
    _first_wall_s: float = 0.0  # the first persist's wall time: a final persist's cost, until another is measured

    REPROBE_AFTER = 10  # opportunities without a checkpoint before an uncertain estimate is re-measured
    SAMPLES = 9

    def observe(self, seconds: float) -> None:
        """Training time between two checkpoint opportunities (stall excluded)."""
        self.train_s += seconds

    def iteration(self, seconds: float, overlapped: bool) -> None:
        """A whole outer iteration's time, and whether a persist ran during it."""
        if not overlapped:
            self._quiet = (self._quiet + [seconds])[-self.SAMPLES :]
            return
        self.overlapped += 1
        if self._quiet:
            self._extras = (self._extras + [seconds - _median(self._quiet)])[-self.SAMPLES :]

    def persisted(self, cpu_s: float, wall_s: float) -> None:
        """A persist finished (called from the persist thread): what it cost in CPU and wall time."""
        self.persist_cpu_s += cpu_s
        self._persists += 1
        if self._persists == 1:
            self._first_wall_s = wall_s
            return
        self._persist_cpus = (self._persist_cpus + [cpu_s])[-self.SAMPLES :]
        self._persist_walls = (self._persist_walls + [wall_s])[-self.SAMPLES :]

    @property
    def _extra_s(self) -> float:
        """How much longer an iteration overlapping a persist takes. At most a persist's wall time:
        a persist cannot hold training up longer than it runs, and a larger difference is the
        timings' own noise (a 30 ms persist once "cost" a 0.6 s epoch 0.12 s, and stopped its run's
        checkpoints)."""
        if not self._extras:
            return 0.0
        extra = max(0.0, _median(self._extras))
        return min(extra, _median(self._persist_walls)) if self._persist_walls else extra

    @property
    def interference_s(self) -> float:
        if self.contended:  # every CPU second of florql's threads is one training did not get
            return self.persist_cpu_s + self.background_cpu_s
        return self.overlapped * self._extra_s

    @property
    def last_cost_s(self) -> float | None:
        if not self._stalls:
            return None
        cpu = _median(self._persist_cpus) if self._persist_cpus else 0.0
        return _median(self._stalls) + (cpu if self.contended else self._extra_s)

    def should_checkpoint(
        self, estimated_stall_s: float, persist_in_flight: bool, final: bool = False, overlap_s: float = 0.0
    ) -> bool:
        """`final`: the run's last opportunity: the run waits for its persist at exit, so the part of
        the persist's wall time that the rest of the run (`overlap_s`: what is left of the last
        iteration after an inner loop's end) does not cover is a cost."""
        self.considered += 1
        self._since_last += 1
        iteration_s, self._train_at_opportunity = self.train_s - self._train_at_opportunity, self.train_s
        if persist_in_flight:
            self.skipped_in_flight += 1
            return False
        if self._too_close(iteration_s):
            self.skipped_close += 1
            return False
        cost = self.last_cost_s if self.last_cost_s is not None else estimated_stall_s
        if final:
            wall = _median(self._persist_walls) if self._persist_walls else self._first_wall_s
            cost += max(wall - overlap_s, 0.0)
        allowed = self.budget * self.train_s
        if self.stall_s + self.interference_s + cost <= allowed:
            return True
        # Blocked only by an interference estimate resting on one or two samples: measure again.
        stalls_fit = self.stall_s + (_median(self._stalls) if self._stalls else estimated_stall_s) <= allowed
        return 0 < len(self._extras) < 3 and stalls_fit and self._since_last > self.REPROBE_AFTER

    @property
    def spacing_s(self) -> float:
        """The least training between two checkpoints: `spacing_share` of the run's expected training
        (of the training so far where the run's length is not known; at most `TRUSTED_HORIZON`
        times it where it is), within `min_spacing_s` and `max_spacing_s`."""
        expected = self.train_s
        if self.planned and self.considered:
            planned_s = self.train_s / self.considered * self.planned
            expected = max(expected, min(planned_s, TRUSTED_HORIZON * self.train_s))
        return max(self.min_spacing_s, min(self.spacing_share * expected, self.max_spacing_s))

    def _too_close(self, iteration_s: float) -> bool:
        """Closer than `spacing_s` to the last checkpoint, after an iteration shorter than `long_iteration_s`."""
        if not self.taken or iteration_s >= self.long_iteration_s:
            return False
        return self.train_s - self._train_at_last < self.spacing_s

    def record(self, stall_s: float) -> None:
        self.stall_s += stall_s
        if self.taken:
            self._stalls = (self._stalls + [stall_s])[-self.SAMPLES :]
        self.taken += 1
        self.gaps.append(self._since_last)
        self._since_last = 0
        self._train_at_last = self.train_s

    @property
    def period(self) -> float:
        """Mean number of opportunities between checkpoints so far."""
        return sum(self.gaps) / len(self.gaps) if self.gaps else float("inf")

    @property
    def overhead(self) -> float:
        return (self.stall_s + self.interference_s) / self.train_s if self.train_s else 0.0


class EveryOpportunity(AdaptivePolicy):
    """A checkpoint at every opportunity; the next one waits for the previous persist to finish.

    Chosen with `FLORQL_CHECKPOINTS=every`: which checkpoints a run holds then depends on its code
    alone, never on the machine's load (tests, and runs where fast replays matter more than overhead).
    """

    def should_checkpoint(
        self, estimated_stall_s: float, persist_in_flight: bool, final: bool = False, overlap_s: float = 0.0
    ) -> bool:
        self.considered += 1
        self._since_last += 1
        return True


POLICY_ENV = "FLORQL_CHECKPOINTS"
POLICIES: dict[str, type[AdaptivePolicy]] = {"adaptive": AdaptivePolicy, "every": EveryOpportunity}


def make_policy(budget: float) -> AdaptivePolicy:
    """The policy `$FLORQL_CHECKPOINTS` names: `adaptive` (the default) or `every`."""
    name = os.environ.get(POLICY_ENV, "").strip().lower() or "adaptive"
    if name not in POLICIES:
        raise UsageError(f"{POLICY_ENV}={name!r}: use 'adaptive' (the default) or 'every'")
    return POLICIES[name](
        budget=budget,
        contended=training_uses_every_core(),
        min_spacing_s=MIN_SPACING_S,
        spacing_share=SPACING_SHARE,
        max_spacing_s=MAX_SPACING_S,
        long_iteration_s=LONG_ITERATION_S,
    )


def training_uses_every_core() -> bool:
    """Whether torch's threads occupy every core this process may run on (no core left for a persist)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() >= cores


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


class Stager:
    """Copies state_dicts into CPU buffers allocated on first use and reused after."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._stream: Any = None
        self.pending_event: Any = None  # set when a CUDA copy is in flight
        self._nbytes: int | None = None

    def nbytes(self, objects: dict[str, Any]) -> int:
        """Bytes of tensor state a snapshot copies: summed once, and again after each snapshot
        (an optimizer's state appears with its first step). A walk of the state_dicts at every
        declined opportunity cost a small model's run 0.2 % of its training."""
        if self._nbytes is None:
            self._nbytes = sum(t.numel() * t.element_size() for o in objects.values() for t in _tensors(o.state_dict()))
        return self._nbytes

    def stage(self, objects: dict[str, Any]) -> dict[str, Any]:
        self._nbytes = None
        cuda_used = False
        staged: dict[str, Any] = {}
        for name, obj in objects.items():
            staged[name] = self._copy(f"{name}", obj.state_dict())
        for t in self._buffers.values():
            cuda_used = cuda_used or t.is_pinned()
        if self._stream is not None and cuda_used:
            # The persister waits on this; training kernels wait on the GPU, not on the CPU.
            self.pending_event = torch.cuda.Event()
            self.pending_event.record(self._stream)
            torch.cuda.current_stream().wait_event(self.pending_event)
        return staged

    def _copy(self, path: str, value: Any) -> Any:
        # Buffers are keyed by where the tensor sits in the state_dict ("model.layers.0.weight").
        return tree_map(self._copy_leaf, value, path)

    def _copy_leaf(self, value: Any, path: str) -> Any:
        return self._copy_tensor(path, value) if isinstance(value, torch.Tensor) else copy.deepcopy(value)

    def _copy_tensor(self, path: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            self._buffers[path] = buf
        if t.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=t.device)
            self._stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self._stream):
                buf.copy_(t, non_blocking=True)
        else:
            buf.copy_(t)
        return buf


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def collect(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        return leaf  # unchanged: containers such as torch.Size rebuild only from their own items

    tree_map(collect, value)
    return found


class Persister:
    """One background thread; at most one checkpoint in flight.

    `on_cost(cpu_s, wall_s)` hears what each persist cost (CPU time of its thread, wall time).
    `folder`: where checkpoints go, the run's folder unless a replay job names its own.
    """

    def __init__(
        self,
        files: RunFiles,
        run_id: int,
        on_done: Callable[[CheckpointRecord], None],
        on_cost: Callable[[float, float], None] | None = None,
        folder: str | None = None,
    ) -> None:
        self.files, self.run_id, self.on_done, self.on_cost = files, run_id, on_done, on_cost
        self.folder = folder
        # Tests of the policy inject their own clocks, so what it decides does not depend on the load.
        self.cpu_clock: Callable[[], float] = time.thread_time
        self.wall_clock: Callable[[], float] = time.perf_counter
        self._thread: threading.Thread | None = None  # started with the first checkpoint, kept for the next
        self._cond = threading.Condition()
        self._job: tuple | None = None  # the checkpoint handed over, until the thread takes it
        self._busy = False  # a checkpoint handed over and not yet written
        self.error: BaseException | None = None  # the last failure
        self.failed = 0  # checkpoints that could not be written (nothing of them is visible)
        self.chunks = ChunkCache()  # only the persist thread touches it
        self._unsynced = False  # checkpoints written whose names `finish` has not yet made durable

    @property
    def in_flight(self) -> bool:
        return self._busy

    def submit(
        self, outer_index: int, kind: str, coords: dict[str, int], payload: dict[str, Any], stall_s: float, event: Any
    ) -> None:
        """Hand a snapshot to the persist thread. One thread serves every checkpoint: a thread
        started for each held training up ~0.75 ms longer and cost ~1.6 ms more CPU (a small MLP)."""
        self.wait()
        with self._cond:
            self._job = (outer_index, kind, coords, payload, stall_s, event)
            self._busy = True
            if self._thread is None or not self._thread.is_alive():  # not yet, or not in a forked child
                self._thread = threading.Thread(target=self._serve, name="florql-checkpoint-persist", daemon=True)
                self._thread.start()
            self._cond.notify()

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)

    def finish(self) -> None:
        """Wait for the last persist, then make the names of every checkpoint written durable: one
        folder sync for the run instead of two per checkpoint (see `write_checkpoint`)."""
        self.wait()
        if self._unsynced:
            self._unsynced = False
            self.files.sync_folder(self.folder or layout.checkpoints_dir(self.run_id))

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._job is not None)
                job, self._job = self._job, None
            assert job is not None
            try:
                self._persist(*job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _persist(self, outer_index, kind, coords, payload, stall_s, event) -> None:
        cpu_began, began = self.cpu_clock(), self.wall_clock()
        try:
            if event is not None:
                event.synchronize()
            self._unsynced = True
            record = write_checkpoint(
                self.files, self.run_id, outer_index, kind, coords, payload, stall_s, self.folder, self.chunks
            )
            self.on_done(record)
            if self.on_cost is not None:
                self.on_cost(self.cpu_clock() - cpu_began, self.wall_clock() - began)
        except BaseException as exc:  # a failed checkpoint must not kill training
            if self.error is None or str(exc) != str(self.error):
                print(
                    f"florql: run {self.run_id}: checkpoint {checkpoint_name(outer_index, kind)} could not be "
                    f"written ({exc}); nothing of it is visible, training goes on and later checkpoints are tried",
                    file=sys.stderr,
                    flush=True,
                )
            self.error = exc
            self.failed += 1
