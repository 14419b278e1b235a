"""The florql session inside a replay worker: the recorded script runs, florql steers it.

The outer loop passes over iterations before the job's range and ends the script after it;
the first inner loop of an iteration is replaced by restoring its 'inner_end' checkpoint where the
plan says so; only the requested names are logged, and values the run logged originally are
compared with what it logged then (a difference stops the replay: it would not be exact).

Iterations the job executes that the run has no checkpoint of get one, as recording would have
taken it and under the same overhead budget; they land with the job's commit, so the next query
over that range restores instead of re-executing.
"""

from __future__ import annotations

import json
import math
import os
import time
import types
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

from florql.call_chain import capture_chain, restore_chain
from florql.checkpoint_engine import ASSUMED_COPY_BYTES_PER_S, AdaptivePolicy, Persister, Stager, make_policy
from florql.replay.jobs import JobSpec, ReplayDiverged, ReplayFinished
from florql.replay.worker import SCRIPT_STARTED_ENV
from florql.rng import capture_rng, restore_rng
from florql.scope import baseline_of, capture_scope, restore_scope
from florql.session import LoopFrame, TrainingSession
from florql.storage import layout, segments
from florql.storage.checkpoints import CheckpointRecord, read_checkpoint, read_record
from florql.storage.runfiles import open_run_files
from florql.storage.segment_writer import SegmentWriter


class ReplaySession(TrainingSession):
    def __init__(self, spec: JobSpec) -> None:
        super().__init__()
        self.spec = spec
        self.files = open_run_files(spec.runs_url)
        self.run_id = spec.run_id
        self.names = set(spec.names)
        self.audit_names = set(spec.audit_names)
        self.expected = self._load_expected()
        self.executed: list[int] = []
        self.restored: list[int] = []
        self.inner_iterations = 0  # inner-loop iterations executed (training batches, typically)
        self.produced: dict[str, set[int]] = {}  # name → outer iterations it was logged in
        self.mismatches: list[dict[str, Any]] = []
        self.started = time.time()
        self.first_iteration_at: float | None = None
        self.restore_s = 0.0
        self.restored_bytes = 0
        self.committed = False
        self.checkpoint_at = set(spec.checkpoint_at)
        self.policy: AdaptivePolicy | None = None
        self.stager = Stager()
        self.checkpoints_left: list[CheckpointRecord] = []
        self.persister = Persister(
            self.files,
            self.run_id,
            self.checkpoints_left.append,
            on_cost=self._persist_cost,
            folder=layout.replay_checkpoints_dir(self.run_id, spec.job_id),
        )
        self.unobserved_from = 0.0  # when the training time not yet reported to the policy began
        self.scope_warned: set[str] = set()
        attempt = uuid.uuid4().hex[:8]
        self.writer = SegmentWriter(
            self.files,
            lambda seq: layout.replay_segment_path(spec.run_id, spec.job_id, seq, attempt),
            {"run_id": str(spec.run_id), "writer": spec.job_id, "source": "replayed"},
        )

    @classmethod
    def from_env(cls) -> ReplaySession:
        with open(os.environ["FLORQL_REPLAY_JOB"]) as f:
            return cls(JobSpec.from_json(f.read()))

    # ---- args and logging -----------------------------------------------------------------------
    def arg(self, name: str, default: Any) -> Any:
        value = self.spec.args.get(name, default)
        self.args[name] = value
        return value

    def log(self, name: str, value: Any) -> None:
        if self.outer.index < self.spec.log_from:
            return
        if name in self.names:
            self.produced.setdefault(name, set()).add(self.outer.index)
            super().log(name, value)
        elif name in self.audit_names:
            self._audit(name, value)

    def _persist_cost(self, cpu_s: float, wall_s: float) -> None:
        if self.policy is not None:  # charged as recording charges it: the replay runs under the same budget
            self.policy.persisted(cpu_s, wall_s)

    def _audit(self, name: str, value: Any) -> None:
        t = type(value)
        if t is not float and t is not int and t is not bool and t is not str:
            value = self._convert(name, value)
            if hasattr(value, "resolve"):
                value = value.resolve()
        key = (name, self.position)
        queue = self.expected.get(key)
        if not queue:
            return
        original = queue.pop(0)
        if _same(original, value):
            return
        diff = abs(value - original) if isinstance(value, (int, float)) and isinstance(original, (int, float)) else None
        self.mismatches.append(
            {
                "name": name,
                "loop_path": self.position[0],
                "coords": list(self.position[1:]),
                "logged": original,
                "replayed": value,
                "abs_diff": diff,
            }
        )

    def _load_expected(self) -> dict[tuple, list[Any]]:
        if not self.spec.expected_path:
            return {}
        table = segments.read_segment(self.files, self.spec.expected_path)
        expected: dict[tuple, list[Any]] = {}
        for row in table.to_pylist():
            value = row["value_" + row["value_type"]]
            position = (row["loop_path"], *row["coords"])
            expected.setdefault((row["name"], position), []).append(value)
        return expected

    def register(self, objects: dict[str, Any], budget: float | None) -> None:
        super().register(objects, budget)
        if self.checkpoint_at:
            self.policy = make_policy(self.budget)

    # ---- loops ------------------------------------------------------------------------------
    def outer_loop(self, lf: LoopFrame, iterable: Iterable[Any], frame: types.FrameType) -> Iterator[Any]:
        spec = self.spec
        self.outer.frame = frame
        self.outer.baseline = baseline_of(frame)
        for index, item in enumerate(iterable):
            if index < spec.start:
                continue
            if index >= spec.stop:
                break
            self.outer.index = index
            self.outer.inner_point_done = False
            if self.first_iteration_at is None:
                self.first_iteration_at = time.time()
            if spec.restore_before and spec.restore_before[0] == index:
                self._restore(spec.restore_before[1])
            self.enter_iteration(lf, index)
            self.unobserved_from = self.clock()
            try:
                yield item
            except GeneratorExit:
                # The script left the loop with `break` (early stopping) in its last iteration.
                if index == spec.stop - 1:
                    self._end_iteration(index)
                    self.commit()
                raise
            self._end_iteration(index)
        self.commit()
        raise ReplayFinished()

    def _end_iteration(self, index: int) -> None:
        if index not in self.restored:
            self.executed.append(index)
            if not self.outer.inner_point_done:
                self._maybe_checkpoint("iter_end", None)
        if self.mismatches:
            worst = max(self.mismatches, key=lambda m: m["abs_diff"] if m["abs_diff"] is not None else math.inf)
            detail = dict(
                self.mismatches[0],
                mismatches=len(self.mismatches),
                largest=worst,
                detected_at=time.time(),
                job_id=self.spec.job_id,
                run_id=self.run_id,
            )
            self.files.put(
                layout.replay_divergence_path(self.run_id, self.spec.job_id), json.dumps(detail, default=repr).encode()
            )
            raise ReplayDiverged(detail)

    def inner_loop(self, lf: LoopFrame, iterable: Iterable[Any], frame: types.FrameType) -> Iterator[Any]:
        chain = self.checkpoint_chain(lf, frame)
        if chain is not None and self.outer.index in self.spec.restore_inner:
            self.outer.inner_point_done = True
            self._restore(self.spec.restore_inner[self.outer.index], chain)
            self.restored.append(self.outer.index)
            return
        prefix = self.inner_prefix()
        for index, item in enumerate(iterable):
            lf.index = index
            self.position = prefix + (index,)
            self.inner_iterations += 1
            yield item
        if chain is not None:
            self._end_first_inner_loop(chain)

    def _end_first_inner_loop(self, chain: list[types.FrameType]) -> None:
        """As recording does: the 'inner_end' point, unless the helper frames cannot be captured
        exactly (then the iteration's end is the point)."""
        frames = None
        if chain and self._wants_checkpoint() and self.outer.frame is not None:
            frames = capture_chain(chain, self.outer.frame, self.objects, self.scope_warned)
            if frames["blockers"]:
                return
        self.outer.inner_point_done = True
        self._maybe_checkpoint("inner_end", frames)

    # ---- checkpoints the replay leaves --------------------------------------------------------
    def _wants_checkpoint(self) -> bool:
        return self.policy is not None and self.checkpointing_active and self.outer.index in self.checkpoint_at

    def _maybe_checkpoint(self, kind: str, frames: dict | None) -> None:
        """Take a checkpoint of an iteration the run has none of, if the overhead budget allows it."""
        if not self._wants_checkpoint():
            return
        assert self.policy is not None
        self.checkpoint_at.discard(self.outer.index)
        self.policy.observe(max(self.clock() - self.unobserved_from, 0.0))
        unmeasured = self.policy.last_cost_s is None  # before the second checkpoint: the first is not typical
        estimate = self.stager.nbytes(self.objects) / ASSUMED_COPY_BYTES_PER_S if unmeasured else 0.0
        if self.policy.should_checkpoint(estimate, self.persister.in_flight):
            started = self.clock()
            self.persister.wait()  # the staging buffers are reused
            payload = self._snapshot(kind, frames)
            stall = self.clock() - started
            self.policy.record(stall)
            coords = {f.name: f.index for f in self.stack[:1]}
            self.persister.submit(self.outer.index, kind, coords, payload, stall, self.stager.pending_event)
        self.unobserved_from = self.clock()

    def _snapshot(self, kind: str, frames: dict | None) -> dict[str, Any]:
        """The payload recording takes at this point (`RecordSession.maybe_checkpoint`)."""
        registered = {id(o) for o in self.objects.values()}
        return {
            "objects": self.stager.stage(self.objects),
            "rng": capture_rng(),
            "modes": self.module_modes(),
            "scope": capture_scope(self.outer.frame, registered, self.scope_warned, self.outer.baseline)
            if self.outer.frame
            else None,
            "position": {"outer_index": self.outer.index, "kind": kind},
            "frames": frames,
            "args": dict(self.args),
        }

    def _restore(self, name: str, chain: list | None = None) -> None:
        """Restore checkpoint `name`; `chain`: the helper frames of an 'inner_end' point it stands in for."""
        started = time.perf_counter()
        folder, file_name = layout.checkpoint_location(self.run_id, name)
        record = read_record(self.files, f"{folder}/{file_name}.json")
        payload = read_checkpoint(self.files, record, folder)
        self.restored_bytes += record.bytes
        for key, obj in self.objects.items():
            obj.load_state_dict(payload["objects"][key])
        restore_rng(payload["rng"])
        self.restore_module_modes(payload.get("modes", {}))
        if payload.get("scope") and self.outer.frame is not None:
            restore_scope(self.outer.frame, payload["scope"])
        if chain is not None and self.outer.frame is not None and (chain or payload.get("frames")):
            restore_chain(chain, self.outer.frame, payload.get("frames") or {}, name)
        self.restore_s += time.perf_counter() - started

    # ---- the end ----------------------------------------------------------------------------
    def _coverage(self) -> dict[str, list[int]]:
        """Per name, the iterations whose cells this job produced.

        An executed iteration ran the statement (whatever it logged, that is the answer); in a
        restored iteration only what was actually logged counts: a statement that logged nothing
        there may depend on state the checkpoint lacks, so those cells are re-executed.
        """
        span = [i for i in self.executed if self.spec.log_from <= i < self.spec.stop]
        return {
            n: sorted(set(span) | {i for i in self.produced.get(n, ()) if i >= self.spec.log_from})
            for n in sorted(self.names)
        }

    def _timings(self) -> dict[str, Any]:
        """What this job cost, by phase (UNIX times and seconds), for the planner's cost model."""
        script_started = float(os.environ.get(SCRIPT_STARTED_ENV) or self.started)
        return {
            "launched_at": self.spec.launched_at or None,
            "warm": self.spec.warm,
            "script_started_at": script_started,
            "first_iteration_at": self.first_iteration_at,
            "finished_at": time.time(),
            "restore_s": self.restore_s,
            "restored_bytes": self.restored_bytes,
            "est_s": self.spec.est_s,
            "est_work_s": self.spec.est_work_s,
            "recorded_exec_s": self.spec.recorded_exec_s,
            "recorded_skip_s": self.spec.recorded_skip_s,
        }

    def commit(self) -> None:
        """Make the job's rows visible, all together."""
        if self.committed:
            return
        self.persister.finish()
        self.writer.close()
        summary = {
            "job_id": self.spec.job_id,
            "run_id": self.run_id,
            "names": sorted(self.names),
            "start": self.spec.start,
            "stop": self.spec.stop,
            "log_from": self.spec.log_from,
            "executed": self.executed,
            "restored": self.restored,
            "inner_iterations": self.inner_iterations,
            "timings": self._timings(),
            "checkpoint": (self.spec.restore_before or [None, None])[1]
            or next(iter(self.spec.restore_inner.values()), None),
            "seconds": time.time() - self.started,
            "committed_at": time.time(),
            "logged_names": sorted(self.produced),
            "records": self.writer.records_written,
            "versions": {n: v for n, v in self.spec.versions.items() if n in self.names},
            "coverage": self._coverage(),
            "segments": self.writer.paths,  # exactly this attempt's files land
            "checkpoints": [asdict(r) for r in self.checkpoints_left],
            "checkpoint_version": self.spec.checkpoint_version,
        }
        # create(), not put(): should two attempts of one job both finish, the first commit wins.
        self.files.create(layout.replay_commit_path(self.run_id, self.spec.job_id), json.dumps(summary).encode())
        self.committed = True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return (type(a) is type(b) and a == b) or (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and a == b
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    )
