"""What florql says on stderr: the run id when a run starts, replay jobs as they start and end.

Lines are printed whether or not stderr is a terminal; FLORQL_QUIET=1 silences them.
"""

from __future__ import annotations

import io
import json

import florql
from florql.progress import ReplayProgress
from florql.replay.jobs import JobResult, JobSpec
from florql.storage import layout

SCRIPT = """
import florql
for epoch in florql.loop("epoch", range(3)):
    florql.log("x", epoch)
    # +florql.log("y", epoch * 2)
"""


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def spec(job_id: str, est_s: float, start: int, stop: int) -> JobSpec:
    return JobSpec(job_id, 7, "", "v", "train.py", ".", [], {}, ["y"], [], start, stop, start, est_s=est_s)


def test_job_lines_and_an_eta_corrected_by_the_finished_jobs():
    out, clock = io.StringIO(), Clock()
    jobs = [spec("a", 10.0, 0, 4), spec("b", 10.0, 4, 8), spec("c", 20.0, 8, 12)]
    progress = ReplayProgress(jobs, workers=1, stream=out, clock=clock)
    progress.begin()
    progress.job_started(jobs[0])
    clock.t = 20.0  # the first job took twice its estimate: the rest are expected to, too
    progress.job_done(jobs[0], JobResult("a", ok=True))
    progress.job_started(jobs[1])
    clock.t = 30.0
    progress.job_done(jobs[1], JobResult("b", ok=False, error="boom"))
    progress.job_started(jobs[2])
    clock.t = 70.0
    progress.job_done(jobs[2], JobResult("c", ok=True))
    assert out.getvalue().splitlines() == [
        "florql: replaying 3 job(s) on 1 worker(s), estimated ~40 s",
        "florql: job 1/3 started: run 7, iterations 0..3 (re-execute, ~10 s)",
        "florql: job 1/3 done in 20.0 s; 2 left, about 60 s to go",
        "florql: job 2/3 started: run 7, iterations 4..7 (re-execute, ~10 s)",
        "florql: job 2/3 FAILED in 10.0 s; 1 left, about 30 s to go",
        "florql: job 3/3 started: run 7, iterations 8..11 (re-execute, ~20 s)",
        "florql: job 3/3 done in 40.0 s; all done in 70.0 s",
    ]


def test_a_short_estimate_is_said_in_tenths_not_as_zero_seconds():
    out, clock = io.StringIO(), Clock()
    job = spec("a", 0.37, 36, 40)
    progress = ReplayProgress([job], workers=1, stream=out, clock=clock)
    progress.begin()
    progress.job_started(job)
    assert out.getvalue().splitlines() == [
        "florql: replaying 1 job(s) on 1 worker(s), estimated ~0.4 s",
        "florql: job 1/1 started: run 7, iterations 36..39 (re-execute, ~0.4 s)",
    ]


def test_run_id_at_start_job_lines_without_a_terminal_and_quiet(store, capfd, monkeypatch):
    run = store.run(SCRIPT)
    assert f"florql: recording run {run.run_id} in " in run.proc.stderr
    quiet = store.run(SCRIPT, env=dict(store.env(), FLORQL_QUIET="1"))
    assert quiet.proc.stderr == ""
    store.write_script(SCRIPT.replace("# +", ""))
    capfd.readouterr()
    db = florql.connect(store.home, workers=1)  # stderr is captured here: not a terminal
    assert db.sql(f"SELECT epoch, y FROM run_{run.run_id} ORDER BY epoch").fetchall() == [(0, 0), (1, 2), (2, 4)]
    lines = capfd.readouterr().err.splitlines()
    assert lines[0].startswith("florql: replaying 1 job(s) on 1 worker(s)")
    assert lines[1].startswith("florql: job 1/1 started: run 1, iterations 0..2")
    assert lines[-1].startswith("florql: job 1/1 done in ") and "all done in" in lines[-1]
    monkeypatch.setenv("FLORQL_QUIET", "1")
    db = florql.connect(store.home, workers=1)
    db.sql(f"SELECT epoch, y FROM run_{quiet.run_id}").fetchall()
    assert capfd.readouterr().err == ""


def test_a_network_connection_is_named_as_not_recorded(store):
    """What a run fetched over the network is not recorded: the run says so, and its manifest too."""
    run = store.run(
        """
        import socket
        import florql
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        for epoch in florql.loop("epoch", range(2)):
            florql.log("x", epoch)
        """
    )
    assert "used a network connection to 127.0.0.1:" in run.proc.stderr
    manifest = json.loads(store.files.get(layout.manifest_path(run.run_id)))
    assert [n.startswith("a network connection to 127.0.0.1:") for n in manifest["unrecorded"]] == [True]
