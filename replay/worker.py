"""A replay worker process: `python -m florql.replay.worker SPEC.json`.

It lays the run's recorded code version (with the hindsight statements propagated into it) and
the files the run read out in a sandbox folder (`florql.replay.sandbox`), so the script's own
side effects never touch the user's files, and runs the script there as `__main__` under a
`ReplaySession`.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import time
import traceback

from florql.replay.jobs import JobResult, JobSpec, ReplayDiverged, ReplayFinished
from florql.replay.launcher import result_path
from florql.replay.sandbox import lay_out
from florql.storage import layout
from florql.storage.errors import FlorqlError
from florql.storage.manifest import Manifest
from florql.storage.runfiles import open_run_files

EXIT_DIVERGED = 3
SCRIPT_STARTED_ENV = "FLORQL_SCRIPT_STARTED_AT"


def run(spec_path: str) -> JobResult:
    with open(spec_path) as f:
        spec = JobSpec.from_json(f.read())
    import torch

    torch.set_num_threads(max(1, spec.threads))
    os.environ["FLORQL_REPLAY_JOB"] = spec_path  # the script's first florql call starts a replay session
    files = open_run_files(spec.runs_url)
    committed = layout.replay_commit_path(spec.run_id, spec.job_id)
    manifest = Manifest.from_json(files.get(layout.manifest_path(spec.run_id)))
    with tempfile.TemporaryDirectory(prefix=f"florql-replay-{spec.run_id}-") as sandbox:
        try:
            script, workdir = lay_out(files, spec, manifest, sandbox)
        except FlorqlError as exc:  # a data file changed: say which
            return JobResult(spec.job_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        os.chdir(workdir)
        sys.argv = [script, *spec.argv]
        sys.path.insert(0, os.path.dirname(script))
        os.environ[SCRIPT_STARTED_ENV] = repr(time.time())  # the job's start-up ends here, its set-up begins
        try:
            runpy.run_path(script, run_name="__main__")
        except ReplayFinished:
            pass
        except ReplayDiverged as exc:
            return JobResult(spec.job_id, ok=False, divergence=exc.detail, error="diverged")
        except FlorqlError as exc:  # florql's own (a corrupt checkpoint, a full disk…): its message says it all
            if not files.exists(committed):
                return JobResult(spec.job_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # the script failed: report it with the job, unless it failed after the commit
            if not files.exists(committed):
                return JobResult(spec.job_id, ok=False, error="".join(traceback.format_exception(exc))[-4000:])
        if not files.exists(committed):
            return JobResult(
                spec.job_id,
                ok=False,
                error="the script ended without reaching the job's iterations "
                f"[{spec.start}, {spec.stop}) of its outer florql.loop",
            )
        return JobResult(spec.job_id, ok=True, summary=json.loads(files.get(committed)))


def run_and_report(spec_path: str) -> int:
    """Run the job, write its result beside the spec, and return the worker's exit status."""
    result = run(spec_path)
    with open(result_path(spec_path), "w") as f:
        json.dump(result.__dict__, f, default=repr)
    sys.stdout.flush()
    return 0 if result.ok else (EXIT_DIVERGED if result.divergence else 1)


def main() -> None:
    # os._exit skips interpreter teardown of the user's script (atexit hooks, open loaders).
    os._exit(run_and_report(sys.argv[1]))


if __name__ == "__main__":
    main()
