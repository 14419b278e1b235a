"""Starting one replay job as `python -m florql.replay.worker SPEC.json` in a fresh interpreter.

Every executor launches jobs through `launch_worker`, wherever it runs it (a slot of the local
pool, a Ray task on some node): the spec goes in as a file, the `JobResult` comes back as the file
`result_path(spec)` beside it, and a worker that died before writing one is reported with the
tail of its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from florql.replay.jobs import JobResult, JobSpec

SPEC_FILE = "spec.json"
OUTPUT_TAIL = 4000  # characters of a dead worker's stderr kept in its job's error


def result_path(spec_path: str) -> str:
    """Where the worker writes the job's result (JSON of a `JobResult`) for `spec_path`."""
    return spec_path + ".result.json"


def package_root() -> str:
    """The folder holding the `florql` package, for a worker's PYTHONPATH."""
    import florql

    return os.path.dirname(os.path.dirname(os.path.abspath(florql.__file__)))


def base_env() -> dict[str, str]:
    """This process's environment for a process that imports florql's worker."""
    env = dict(os.environ)
    env.pop("FLORQL_REPLAY_JOB", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root(), env.get("PYTHONPATH")]))
    return env


def worker_env(spec: JobSpec, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a worker running `spec` with `spec.threads` threads."""
    env = base_env()
    env["OMP_NUM_THREADS"] = str(spec.threads)
    env.update(extra or {})
    return env


def launch_worker(spec: JobSpec, env: dict[str, str], killed: type[BaseException] | None = None) -> JobResult:
    """Run `spec` in a fresh worker process with environment `env` (see `worker_env`) and wait for it.

    With `killed`, a worker ended by a signal (OOM killer, preemption…) raises that exception
    instead of returning a failed result, so that a caller able to retry the job can.
    """
    with tempfile.TemporaryDirectory(prefix="florql-job-") as tmp:
        spec_path = os.path.join(tmp, SPEC_FILE)
        with open(spec_path, "w") as f:
            f.write(spec.to_json())
        proc = subprocess.run(
            [sys.executable, "-m", "florql.replay.worker", spec_path], env=env, capture_output=True, text=True
        )
        if killed is not None and proc.returncode < 0:
            raise killed(f"replay job {spec.job_id} was killed by signal {-proc.returncode}")
        try:
            with open(result_path(spec_path)) as f:
                return JobResult(**json.load(f))
        except FileNotFoundError:
            tail = (proc.stderr or proc.stdout or "")[-OUTPUT_TAIL:]
            return JobResult(spec.job_id, ok=False, error=f"worker exited with {proc.returncode}: {tail}")
