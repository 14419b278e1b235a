"""Replay jobs as Ray tasks, on an existing cluster or on a local one florql starts.

Each job is one task declaring what it needs (`threads` CPUs, and one GPU when asked), so Ray
places it; inside the task the job runs as `python -m florql.replay.worker` in a fresh process, exactly
as with the local pool. That subprocess (rather than running the worker in the Ray worker with
`max_calls=1`) keeps the script's global state, `chdir` and `os._exit` away from Ray's worker, lets
the task report a script's failure with its stderr, and tells a killed job (a signal) apart
from a failing one: only the former is retried.

Everything the worker needs comes through the run files (`spec.runs_url`): the checkpoints and
the recorded code version. The spec itself travels as the task's argument.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from typing import Any

from florql.replay.executor import Executor, ProgressFn, StartFn
from florql.replay.jobs import JobResult, JobSpec
from florql.replay.launcher import launch_worker, worker_env
from florql.storage.errors import UsageError

# Configuration (never credentials) that replay workers need to reach the run files.
FORWARDED_ENV = (
    "FLORQL_STORAGE_OPTIONS",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


class WorkerDied(RuntimeError):
    """The job's process was killed (OOM killer, preemption…): worth another attempt."""


class RayExecutor(Executor):
    def __init__(
        self,
        workers: int | None = None,
        ray_address: str | None = None,
        gpus: int = 0,
        max_retries: int = 2,
        threads: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError("the Ray executor needs Ray: pip install 'florql[ray]'") from None
        self.ray = ray
        self.gpus = gpus
        self.max_retries = max_retries
        self.started = False  # whether close() has a connection or a cluster of ours to end
        address = ray_address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            if address:
                ray.init(address=address, runtime_env={"py_modules": _packages()})
            else:
                # Explicit counts: never let Ray guess from a container's host CPUs.
                ray.init(num_cpus=os.cpu_count() or 1, num_gpus=_local_gpus(), include_dashboard=False)
            self.started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, workers or (int(ray.cluster_resources().get("GPU", 0)) if gpus else cpus) or cpus)
        self.threads = threads or max(1, cpus // self.workers)

    def run(
        self, jobs: list[JobSpec], on_done: ProgressFn | None = None, on_start: StartFn | None = None
    ) -> list[JobResult]:
        for spec in jobs:
            spec.threads = spec.threads or self.threads
        unfit = self._unschedulable(jobs)
        if unfit:
            return [self._finish(spec, JobResult(spec.job_id, ok=False, error=unfit), on_done) for spec in jobs]
        task = self.ray.remote(_run_job)
        forwarded = _forwarded_env()
        # A task-level runtime_env gets its own worker pool, so ask for one only when needed.
        runtime_env = {"runtime_env": {"env_vars": forwarded}} if forwarded else {}
        pending = {
            task.options(
                num_cpus=spec.threads,
                num_gpus=self.gpus,
                max_retries=self.max_retries,
                retry_exceptions=[WorkerDied],
                name=f"florql-replay-{spec.job_id}",
                **runtime_env,
            ).remote(spec.to_json()): spec
            for spec in jobs
        }
        for spec in jobs:  # handed to the cluster, which starts each when it has room
            if on_start:
                on_start(spec)
        results: dict[str, JobResult] = {}
        waiting = list(pending)
        while waiting:
            done, waiting = self.ray.wait(waiting, num_returns=1)
            spec = pending[done[0]]
            results[spec.job_id] = self._finish(spec, self._outcome(done[0], spec), on_done)
        return [results[spec.job_id] for spec in jobs]

    def _outcome(self, ref: Any, spec: JobSpec) -> JobResult:
        try:
            return JobResult(**self.ray.get(ref))
        except self.ray.exceptions.RayError as exc:
            return JobResult(
                spec.job_id, ok=False, error=f"the Ray task failed after {self.max_retries} retries: {exc}"[-4000:]
            )

    @staticmethod
    def _finish(spec: JobSpec, result: JobResult, on_done: ProgressFn | None) -> JobResult:
        if on_done:
            on_done(spec, result)
        return result

    def _unschedulable(self, jobs: list[JobSpec]) -> str | None:
        """Why no node of the cluster could ever run these jobs (Ray would queue them forever)."""
        threads = max(spec.threads for spec in jobs) if jobs else 0
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        if any(r.get("CPU", 0) >= threads and r.get("GPU", 0) >= self.gpus for r in nodes):
            return None
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no live nodes"
        return (
            f"no node of the Ray cluster can run a replay job needing {threads} CPU(s) and {self.gpus} GPU(s) "
            f"(nodes: {have}); add such a node, or ask for fewer threads/GPUs"
        )

    def close(self) -> None:
        # Ends our connection, and the cluster too when we started it; never a user's session.
        if self.started:
            self.ray.shutdown()
            self.started = False


def _run_job(spec_json: str) -> dict[str, Any]:
    """The Ray task: one replay job in a fresh interpreter on whichever node Ray picked."""
    spec = JobSpec.from_json(spec_json)
    from florql.storage import layout
    from florql.storage.runfiles import open_run_files

    files = open_run_files(spec.runs_url)
    committed = layout.replay_commit_path(spec.run_id, spec.job_id)
    if files.exists(committed):  # an earlier attempt committed, then died before reporting
        summary = json.loads(files.get(committed))
        return JobResult(spec.job_id, ok=True, summary=summary).__dict__
    return launch_worker(spec, worker_env(spec), killed=WorkerDied).__dict__


def _forwarded_env() -> dict[str, str]:
    names = [n for n in os.environ if n in FORWARDED_ENV or n.startswith("FSSPEC_")]
    return {n: os.environ[n] for n in names}


def _packages() -> list[str]:
    """florql as one folder with its layers inside, shipped to nodes that may not have it installed.

    Installed, the layers already sit inside the package; in a source checkout they sit beside it
    (storage/, replay/) and are staged into a copy.
    """
    import florql
    from florql import replay, storage

    package = os.path.dirname(os.path.abspath(florql.__file__))
    layers = [os.path.dirname(os.path.abspath(inspect.getfile(m))) for m in (storage, replay)]
    if all(os.path.dirname(layer) == package for layer in layers):
        return [package]
    staged = os.path.join(tempfile.mkdtemp(prefix="florql-ship-"), "florql")
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(package, staged, ignore=skip)
    for layer, name in zip(layers, ("storage", "replay")):
        shutil.copytree(layer, os.path.join(staged, name), ignore=skip)
    return [staged]


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
