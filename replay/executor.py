"""Executors run replay jobs. The local one runs each job in a process of its own.

A fresh process per job matters: training scripts keep global state (RNGs, CUDA context,
module-level variables) that must not leak from one job into the next. On Linux the local executor
forks each job from a warm fork server (`florql.replay.warm`) that has already imported torch;
`FLORQL_WARM_START=0`, or a server that cannot start, means a fresh interpreter per job.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from florql.replay.jobs import JobResult, JobSpec
from florql.replay.launcher import base_env, launch_worker, worker_env
from florql.replay.warm import shared_fork_server

ProgressFn = Callable[[JobSpec, JobResult], None]
StartFn = Callable[[JobSpec], None]


class Executor(ABC):
    """Runs independent replay jobs; each job commits its own rows through the run files."""

    workers: int

    @abstractmethod
    def run(
        self, jobs: list[JobSpec], on_done: ProgressFn | None = None, on_start: StartFn | None = None
    ) -> list[JobResult]: ...

    def close(self) -> None:  # noqa: B027  (optional: most executors hold nothing)
        """Release what the executor started."""


def default_workers() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, os.cpu_count() or 1)


class LocalExecutor(Executor):
    """A pool of worker slots on this machine; slot i is pinned to GPU i when there are GPUs."""

    def __init__(self, workers: int | None = None, warm: bool | None = None) -> None:
        self.workers = max(1, workers or default_workers())
        import torch

        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if warm is None:
            warm = sys.platform == "linux" and os.environ.get("FLORQL_WARM_START", "1") != "0"
        # Started now, so that its imports overlap with planning the query.
        self.fork_server = shared_fork_server(base_env()) if warm else None

    def threads_per_job(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.workers)

    def run(
        self, jobs: list[JobSpec], on_done: ProgressFn | None = None, on_start: StartFn | None = None
    ) -> list[JobResult]:
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            slots.put(slot)

        def one(spec: JobSpec) -> JobResult:
            slot = slots.get()
            if on_start:
                on_start(spec)
            try:
                result = self._run_one(spec, slot)
            finally:
                slots.put(slot)
            if on_done:
                on_done(spec, result)
            return result

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, jobs))

    def _run_one(self, spec: JobSpec, slot: int) -> JobResult:
        # The recorded thread count keeps float reductions bit-identical; else a fair share.
        spec.threads = spec.threads or self.threads_per_job()
        env = worker_env(spec, {"CUDA_VISIBLE_DEVICES": str(slot % self.gpus)} if self.gpus else None)
        server = self.fork_server
        spec.launched_at = time.time()
        # A job that waits for the server to finish starting pays a cold start: it is measured as
        # one (the wait counts in its start-up), so the planner learns what a new session costs.
        spec.warm = server is not None and server.ready(timeout=0)
        if server is not None and (spec.warm or server.ready()):
            return server.launch(spec, env)
        return launch_worker(spec, env)

    def close(self) -> None:
        self.fork_server = None  # the process's shared server lives on for other executors


def make_executor(kind: str | None = None, workers: int | None = None, **options) -> Executor:
    kind = kind or os.environ.get("FLORQL_EXECUTOR", "local")
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        from florql.replay.ray_executor import RayExecutor

        return RayExecutor(workers=workers, **options)
    raise ValueError(f"unknown executor {kind!r}; use 'local' or 'ray'")
