"""Progress of a query's replay jobs: a line on stderr as each starts and finishes, with an ETA.

Plain lines, whether stderr is a terminal or a log file (a 50-second query piped into a file must
say what it is doing too). The ETA starts from the planner's estimates and is corrected by how
long the finished jobs really took compared with theirs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from florql.replay.jobs import JobResult, JobSpec


class ReplayProgress:
    def __init__(
        self,
        specs: list[JobSpec],
        workers: int,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.specs = specs
        self.number = {spec.job_id: i + 1 for i, spec in enumerate(specs)}
        self.workers = max(1, min(workers, len(specs)))
        self.stream = stream or sys.stderr
        self.clock = clock
        self.began = clock()
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}  # job → seconds it took
        self._lock = threading.Lock()

    def begin(self) -> None:
        total = sum(s.est_s for s in self.specs)
        self._say(
            f"replaying {len(self.specs)} job(s) on {self.workers} worker(s), estimated ~{_seconds(total / self.workers)}"
        )

    def job_started(self, spec: JobSpec) -> None:
        with self._lock:
            self.started[spec.job_id] = self.clock()
        self._say(
            f"job {self._of(spec)} started: run {spec.run_id}, iterations {spec.log_from}..{spec.stop - 1} "
            f"({spec.mode}, ~{_seconds(spec.est_s)})"
        )

    def job_done(self, spec: JobSpec, result: JobResult) -> None:
        with self._lock:
            now = self.clock()
            took = now - self.started.get(spec.job_id, self.began)
            self.finished[spec.job_id] = took
            left = len(self.specs) - len(self.finished)
            eta = self._eta(now)
        outcome = "done" if result.ok else "FAILED"
        tail = f"{left} left, about {_seconds(eta)} to go" if left else f"all done in {now - self.began:.1f} s"
        self._say(f"job {self._of(spec)} {outcome} in {took:.1f} s; {tail}")

    def _eta(self, now: float) -> float:
        """Seconds until the last job ends: the estimates of what is left, scaled by how the
        finished jobs compared with theirs, spread over the workers."""
        done_est = sum(s.est_s for s in self.specs if s.job_id in self.finished)
        scale = sum(self.finished.values()) / done_est if done_est > 0 else 1.0
        remaining = 0.0
        for spec in self.specs:
            if spec.job_id in self.finished:
                continue
            running = now - self.started[spec.job_id] if spec.job_id in self.started else 0.0
            remaining += max(0.0, spec.est_s * scale - running)
        return remaining / self.workers

    def _of(self, spec: JobSpec) -> str:
        return f"{self.number[spec.job_id]}/{len(self.specs)}"

    def _say(self, line: str) -> None:
        print(f"florql: {line}", file=self.stream, flush=True)


def _seconds(value: float) -> str:
    """Whole seconds, but tenths under 10 s: a 0.4 s estimate is not "~0 s"."""
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"
