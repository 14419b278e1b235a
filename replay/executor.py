"""Executors run replay jobs. The local one runs each job in a process of its own.

A fresh process per job matters: training scripts keep global state (RNGs, CUDA context,
module-level variables) that must not leak from one job into the next. On Linux the local executor
forks each job from a warm fork server (`florql.replay.warm`) that has already imported torch;
the server belongs to the store and outlives the process (a later `florql query` forks from it).
`FLORQL_WARM_START=0`, or a server that cannot start, means a fresh interpreter per job.
"""

from __future__ import annotations

import glob
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


def gpu_count() -> int:
    """The GPUs replay jobs can use. torch is imported only on a machine with GPU device files: on
    a CPU machine the query side never pays for importing it."""
    if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def warm_start_enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("FLORQL_WARM_START", "1") != "0"


def default_workers() -> int:
    return gpu_count() or max(1, os.cpu_count() or 1)


class LocalExecutor(Executor):
    """A pool of worker slots on this machine; slot i is pinned to GPU i when there are GPUs."""

    def __init__(self, workers: int | None = None, warm: bool | None = None, store: str | None = None) -> None:
        """`store`: the store folder whose fork server jobs fork from (it outlives this process);
        without one, a server private to this process."""
        self.workers = max(1, workers or default_workers())
        self.gpus = gpu_count()
        if warm is None:
            warm = warm_start_enabled()
        # Reached (or started) now, so that a start's imports overlap with planning the query.
        self.fork_server = shared_fork_server(base_env(), store) if warm else None

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
        spec.warm = server is not None and server.serving()
        if server is not None and (spec.warm or server.ready()):
            result = server.launch(spec, env)
            if result is not None:
                return result
        spec.warm = False
        return launch_worker(spec, env)

    def close(self) -> None:
        self.fork_server = None  # the process's shared server lives on for other executors


def make_executor(kind: str | None = None, workers: int | None = None, store: str | None = None, **options) -> Executor:
    """`store`: the store folder the jobs replay runs of (the local executor's fork server is its)."""
    kind = kind or os.environ.get("FLORQL_EXECUTOR", "local")
    if kind == "local":
        return LocalExecutor(workers, store=store)
    if kind == "ray":
        from florql.replay.ray_executor import RayExecutor

        return RayExecutor(workers=workers, **options)
    raise ValueError(f"unknown executor {kind!r}; use 'local' or 'ray'")
