"""The Ray executor, on one local Ray cluster (2 CPUs, no GPU) shared by this module's tests.

The `ray_cluster` fixture (conftest.py) is module-scoped so the idle cluster does not compete for
CI's 2 cores with later modules.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

import florql
from florql.replay.executor import make_executor
from florql.replay.jobs import JobResult, JobSpec

ray = pytest.importorskip("ray", reason="the Ray executor tests need Ray: pip install 'florql[ray]'")

from florql.replay.ray_executor import RayExecutor  # noqa: E402
from store_support import GRAD_NORM_QUERY, TRAIN, record_then_add_grad_norm  # noqa: E402


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(florql.UsageError, match=r"pip install 'florql\[ray\]'"):
        make_executor("ray")


def test_gpu_job_on_gpu_less_cluster_fails_fast(ray_cluster: None) -> None:
    executor = make_executor("ray", workers=1, gpus=1)
    spec = JobSpec(
        job_id="1-gpu",
        run_id=1,
        runs_url="/nonexistent",
        code_version="v",
        script_rel="t.py",
        cwd_rel=".",
        argv=[],
        args={},
        names=["x"],
        audit_names=[],
        start=0,
        stop=1,
        log_from=0,
    )
    seen: list[JobResult] = []
    started = time.monotonic()
    [result] = executor.run([spec], on_done=lambda s, r: seen.append(r))
    assert time.monotonic() - started < 10
    assert not result.ok and "1 GPU(s)" in result.error and "0 GPU" in result.error
    assert seen == [result]
    executor.close()
    assert ray.is_initialized()  # the session's cluster is not florql's to shut down


# ---- end to end: hindsight queries through Ray equal the local pool's ----------------------------
# store_support.TRAIN, whose first replay attempt puts a segment per epoch on storage, then dies in
# epoch 1 (when a marker path is given and the marker file is not there yet).
KILL_ONCE = """
    if KILL_MARKER and os.environ.get("FLORQL_REPLAY_JOB") and not os.path.exists(KILL_MARKER):
        florql._session.writer.flush()
        if epoch == 1:
            open(KILL_MARKER, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
"""
ROWS = "SELECT count(*) FROM logs WHERE name = 'grad_norm'"


def train_source(kill_marker: str) -> str:
    kill_once = textwrap.indent(textwrap.dedent(KILL_ONCE).lstrip("\n"), " " * 8)  # in the epoch loop's body
    return f"import os\nimport signal\n\nKILL_MARKER = {kill_marker!r}\n\n{TRAIN}{kill_once}"


def ask(work: Path, executor, kill_marker: str = "") -> tuple[list[tuple], int]:
    """Record the script into a fresh store, add a hindsight statement, ask for it through `executor`."""
    home = work / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_RUNS", "FLORQL_ARGS")}
    env["FLORQL_HOME"] = str(home)
    record_then_add_grad_norm(work, env, train_source(kill_marker))
    old = os.getcwd()
    os.chdir(work)
    try:
        with florql.connect(home, executor=executor, workers=1, progress=False) as db:
            return db.sql(GRAD_NORM_QUERY).fetchall(), db.sql(ROWS).fetchall()[0][0]
    finally:
        os.chdir(old)


def test_hindsight_query_through_ray_equals_local(
    tmp_path: Path, ray_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLORQL_RUNS", raising=False)
    local, _ = ask(tmp_path / "local", "local")
    through_ray, _ = ask(tmp_path / "ray", "ray")
    assert len(local) == 12 and all(row[2] is not None for row in local)
    assert through_ray == local


def test_killed_job_is_retried_and_rows_land_once(
    tmp_path: Path, ray_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLORQL_RUNS", raising=False)
    marker = tmp_path / "killed-once"
    executor = RayExecutor(workers=1, max_retries=1)
    through_ray, rows = ask(tmp_path / "ray", executor, kill_marker=str(marker))
    assert marker.exists()  # the first attempt did die
    # The marker now exists, so this reference replay runs straight through.
    local, _ = ask(tmp_path / "local", "local", kill_marker=str(marker))
    assert through_ray == local and rows == 12


def test_retries_are_bounded(tmp_path: Path, ray_cluster: None) -> None:
    # A job whose process is killed on every attempt runs 1 + max_retries times, then fails with why.
    from florql.storage import layout
    from florql.storage.code_versions import save_code_version
    from florql.storage.manifest import Manifest
    from florql.storage.runfiles import LocalRunFiles

    attempts = tmp_path / "attempts"
    script = f"import os, signal\nwith open({str(attempts)!r}, 'a') as f:\n    f.write('x')\nos.kill(os.getpid(), signal.SIGKILL)\n"
    files = LocalRunFiles(tmp_path / "runs")
    version = save_code_version(files, {"t.py": script.encode()})
    # the worker lays out the sandbox from the run's manifest
    manifest = Manifest(run_id=1, script_rel="t.py", cwd_rel=".", project_root=str(tmp_path), code_version=version)
    files.put(layout.manifest_path(1), manifest.to_json().encode())
    spec = JobSpec(
        job_id="1-doomed",
        run_id=1,
        runs_url=files.url,
        code_version=version,
        script_rel="t.py",
        cwd_rel=".",
        argv=[],
        args={},
        names=["x"],
        audit_names=[],
        start=0,
        stop=1,
        log_from=0,
    )
    [result] = RayExecutor(workers=1, max_retries=1).run([spec])
    assert not result.ok and "killed by signal 9" in result.error and "after 1 retries" in result.error
    assert attempts.read_text() == "xx"
