"""Replay jobs forked from the warm fork server: one process per job, nothing shared between jobs,
failures reported as from a fresh interpreter, answers bit-exact."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import florql
from florql.errors import ReplayFailed
from florql.replay import warm
from florql.replay.executor import LocalExecutor
from florql.replay.jobs import JobSpec
from florql.replay.launcher import base_env
from florql.replay.warm import (
    ForkServer,
    ServerPaths,
    process_alive,
    running_servers,
    runtime_folder,
    stop_servers,
)
from florql.runinfo import measured_costs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fork server runs on Linux")

SCRIPT = """
import os
import torch
import florql
import counter  # a project module: imported afresh by every job

counter.imports += 1
torch.manual_seed(0)
net = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
data = torch.randn(8, 4)
with florql.checkpointing(model=net, optimizer=opt):
    for epoch in florql.loop("epoch", range(4)):
        for step in florql.loop("step", range(2)):
            opt.zero_grad()
            loss = net(data[step * 4 : step * 4 + 4]).pow(2).mean()
            loss.backward()
            opt.step()
            florql.log("loss", loss.item())
        if os.environ.get("CRASH_AT") == str(epoch):  # set by a test, never while recording
            print("crashing now", flush=True)
            os.kill(os.getpid(), 9)
        #HINDSIGHT
"""
HINDSIGHT = """florql.log("w", float(net.weight.detach().sum()))
        florql.log("pid", os.getpid())
        florql.log("imports", counter.imports)"""


def _record(work: Path, source: str) -> Path:
    work.mkdir()
    (work / "counter.py").write_text("imports = 0\n")
    (work / "train.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS", "FLORQL_REPLAY_JOB")}
    env["FLORQL_HOME"] = str(work / ".florql")
    proc = subprocess.run([sys.executable, "train.py"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return work / ".florql"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("warm")
    full = SCRIPT.replace("#HINDSIGHT", HINDSIGHT)
    truth = _record(base / "truth", full)
    recorded = _record(base / "recorded", SCRIPT)
    (base / "recorded" / "train.py").write_text(full)
    shutil.copytree(base / "recorded", base / "pristine", symlinks=True)  # the tests below copy it unreplayed
    return recorded, truth


def _fresh_copy(stores: tuple[Path, Path], to: Path) -> Path:
    """A copy of the recorded store as recorded (no replay yet), at `to`."""
    shutil.copytree(stores[0].parent.parent / "pristine" / ".florql", to, symlinks=True)
    return to


def test_each_job_is_a_fresh_fork_of_the_warm_server(stores: tuple[Path, Path]):
    recorded, truth = stores
    executor = LocalExecutor(1, warm=True)
    try:
        assert executor.fork_server is not None and executor.fork_server.ready()
        server_pid = executor.fork_server.pid
        db = florql.connect(recorded, progress=False, executor=executor)
        for epoch in (1, 3):  # one job each
            db.sql(f"SELECT w, pid, imports FROM run_1 WHERE epoch = {epoch}").fetchall()
            [(_, result)] = db.last_jobs
            assert result.ok and result.summary is not None and result.summary["timings"]["warm"] is True
        rows = db.sql("SELECT epoch, w, pid, imports FROM run_1 WHERE epoch IN (1, 3) ORDER BY epoch").fetchall()
        pids = {r[2] for r in rows}
        assert len(pids) == 2 and server_pid not in pids and os.getpid() not in pids
        assert [r[3] for r in rows] == [1, 1]  # the project's module state never leaks from job to job
        expected = florql.connect(truth, progress=False).sql(
            "SELECT epoch, w FROM run_1 WHERE epoch IN (1, 3) ORDER BY epoch"
        )
        assert [(r[0], r[1]) for r in rows] == expected.fetchall()
        assert len(os.listdir(f"/proc/{server_pid}/task")) == 1  # still single-threaded: forks stay safe
        with db._open() as conn:  # what the jobs cost is stored, and the next plan uses it
            rows = conn.execute("SELECT warm, startup_s, setup_s, work_s FROM _replay_costs").fetchall()
            costs = measured_costs(conn, 1, warm=True)
        assert len(rows) == 2 and all(r[0] and r[1] > 0 and r[2] > 0 and r[3] >= 0 for r in rows)
        assert (
            costs.measured_jobs == 2
            and costs.start_s == sorted(r[1] for r in rows)[0] / 2 + sorted(r[1] for r in rows)[1] / 2
        )
    finally:
        executor.close()


def test_a_job_killed_by_a_signal_fails_with_its_output_and_the_server_keeps_serving(
    stores: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    recorded, _ = stores
    copy = tmp_path / "store"
    subprocess.run(["cp", "-r", str(recorded), str(copy)], check=True)
    monkeypatch.setenv("CRASH_AT", "2")
    executor = LocalExecutor(1, warm=True)
    try:
        db = florql.connect(copy, progress=False, executor=executor)
        with pytest.raises(ReplayFailed, match="(?s)died.*crashing now"):
            db.sql("SELECT w FROM run_1 WHERE epoch = 2").fetchall()
        monkeypatch.delenv("CRASH_AT")
        executor.fork_server.ready()  # type: ignore[union-attr]
        assert len(db.sql("SELECT w FROM run_1 WHERE epoch = 0").fetchall()) == 1
    finally:
        executor.close()


class StartingServer:
    """A fork server still importing torch when the job comes: `serving()` says no, waiting says yes."""

    def __init__(self) -> None:
        self.launched: list[tuple[bool, float]] = []

    def ready(self, timeout: float = 60.0) -> bool:
        return timeout != 0

    def serving(self) -> bool:
        return False

    def launch(self, spec, env):
        self.launched.append((spec.warm, spec.launched_at))
        return "forked"


def test_a_job_that_waits_for_the_server_to_start_is_measured_as_a_cold_start(monkeypatch: pytest.MonkeyPatch):
    """Its wait counts in its start-up and it is stored as not warm, so a new session's plan
    estimates the server's start from what such starts took, not from warm forks."""
    executor = LocalExecutor(1, warm=False)
    server = StartingServer()
    executor.fork_server = server  # type: ignore[assignment]
    spec = JobSpec("j", 1, "file:///x", "v", "train.py", ".", [], {}, ["w"], [], 0, 1, 0)
    monkeypatch.setattr("florql.replay.executor.worker_env", lambda spec, extra=None: {})
    before = time.time()
    assert executor._run_one(spec, 0) == "forked"
    [(warm, launched_at)] = server.launched
    assert warm is False and launched_at >= before


# ---- the store's server outlives the process that started it -------------------------------------
def _query_in_new_process(store: Path, sql: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, FLORQL_QUIET="1", **env)
    command = [sys.executable, "-m", "florql.cli", "--store", str(store), "query", sql, "--format", "csv"]
    proc = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _jobs_started_warm(store: Path) -> list[bool]:
    db = florql.connect(store, progress=False, replay="never")
    with db._open() as conn:
        rows = conn.execute("SELECT warm FROM _replay_costs ORDER BY rowid").fetchall()
    db.close()
    return [r[0] for r in rows]


def _wait_until(condition, what: str, limit_s: float = 120.0) -> None:
    """Poll for an outcome (a generous limit, never a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit_s} s"
        time.sleep(0.1)


def test_a_second_new_process_forks_from_the_server_the_first_one_started(stores: tuple[Path, Path], tmp_path: Path):
    _, truth = stores
    store = _fresh_copy(stores, tmp_path / "store")
    try:
        first = _query_in_new_process(store, "SELECT epoch, w FROM run_1 WHERE epoch = 1")
        [server] = running_servers(str(store))
        second = _query_in_new_process(store, "SELECT epoch, w FROM run_1 WHERE epoch = 3")
        assert [s["pid"] for s in running_servers(str(store))] == [server["pid"]]
        assert _jobs_started_warm(store)[1] is True  # forked from the server the first process started
        expected = florql.connect(truth, progress=False).sql("SELECT epoch, w FROM run_1 WHERE epoch IN (1, 3)")
        answers = [first.stdout.splitlines()[1], second.stdout.splitlines()[1]]
        assert answers == [f"{epoch},{w!r}" for epoch, w in expected.fetchall()]  # bit-exact
        assert not any(
            os.path.realpath(store / "florql.duckdb") in os.readlink(f"/proc/{server['pid']}/fd/{fd}")
            for fd in os.listdir(f"/proc/{server['pid']}/fd")
        )  # the server never holds the DuckDB file
    finally:
        stop_servers(str(store))


def test_a_killed_server_is_replaced(stores: tuple[Path, Path], tmp_path: Path):
    store = _fresh_copy(stores, tmp_path / "store")
    try:
        _query_in_new_process(store, "SELECT w FROM run_1 WHERE epoch = 0")
        [killed] = running_servers(str(store))
        os.kill(killed["pid"], signal.SIGKILL)
        _wait_until(lambda: not process_alive(killed["pid"]), "the server's death")
        _query_in_new_process(store, "SELECT w FROM run_1 WHERE epoch = 2")
        [replacement] = running_servers(str(store))
        assert replacement["pid"] != killed["pid"] and len(_jobs_started_warm(store)) == 2
    finally:
        stop_servers(str(store))


def test_an_idle_server_stops_and_so_does_one_whose_store_is_removed(stores: tuple[Path, Path], tmp_path: Path):
    idle = _fresh_copy(stores, tmp_path / "idle")
    _query_in_new_process(idle, "SELECT w FROM run_1 WHERE epoch = 0", FLORQL_REPLAY_SERVER_IDLE_S="1")
    [server] = running_servers(str(idle))
    _wait_until(lambda: not process_alive(server["pid"]), "the idle server's exit")
    assert running_servers(str(idle)) == [] and not os.path.exists(server["socket"])
    assert not os.path.exists(server["socket"].removesuffix("sock") + "lock")  # runtime files do not pile up

    removed = _fresh_copy(stores, tmp_path / "removed")
    _query_in_new_process(removed, "SELECT w FROM run_1 WHERE epoch = 0")
    [server] = running_servers(str(removed))
    shutil.rmtree(removed)
    _wait_until(lambda: not process_alive(server["pid"]), "the exit of the server of a removed store")


STARTER = """
import sys, time
from florql.replay.launcher import base_env
from florql.replay.warm import ForkServer
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both processes ask at the same moment
server = ForkServer(sys.argv[1], base_env())
assert server.ready(), server.failure
print(server.pid)
"""


def test_processes_racing_to_start_the_server_start_one(tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    at = str(time.time() + 1.0)
    try:
        racers = [
            subprocess.Popen([sys.executable, "-c", STARTER, str(store), at], stdout=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        pids = {int(racer.communicate(timeout=300)[0]) for racer in racers}
        assert all(racer.returncode == 0 for racer in racers)
        assert len(pids) == 1 and [s["pid"] for s in running_servers(str(store))] == list(pids)
    finally:
        stop_servers(str(store))


def test_a_server_is_never_reused_across_stores_or_software(tmp_path: Path):
    key = "from florql.replay.warm import ServerPaths; import sys; print(ServerPaths.of(sys.argv[1]).key)"

    def key_of(store: Path, **env: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", key, str(store)], env=dict(os.environ, **env), capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert key_of(tmp_path / "a") == key_of(tmp_path / "a")
    assert key_of(tmp_path / "a") != key_of(tmp_path / "b")
    assert key_of(tmp_path / "a") != key_of(tmp_path / "a", PYTHONPATH=str(tmp_path))  # imports would differ


def test_a_runtime_folder_others_can_reach_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / f"florql-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"florql-{os.getuid()}", 0o777)
    with pytest.raises(PermissionError, match="0700"):
        runtime_folder()


def test_the_cli_shows_and_stops_the_stores_server(tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()

    def cli(*args: str) -> str:
        command = [sys.executable, "-m", "florql.cli", "--store", str(store), "replay-server", *args]
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert "no replay server is running" in cli()
    server = ForkServer(str(store), base_env())
    assert server.ready(), server.failure
    assert f"pid {server.pid}: store {os.path.realpath(store)}" in cli("status")
    assert cli("stop") == "stopped 1 replay server(s)\n"
    assert not process_alive(server.pid) and "no replay server is running" in cli()  # type: ignore[arg-type]


def test_a_process_whose_server_stopped_since_gets_a_new_one(tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    try:
        first = LocalExecutor(1, warm=True, store=str(store)).fork_server
        assert first is not None and first.ready() and first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        _wait_until(lambda: not process_alive(first.pid), "the server's death")  # type: ignore[arg-type]
        assert not first.serving()
        second = LocalExecutor(1, warm=True, store=str(store)).fork_server
        assert second is not None and second.ready() and second.serving() and second.pid != first.pid
    finally:
        stop_servers(str(store))


def test_a_server_started_by_a_process_that_exits_at_once_serves_the_next_one(
    stores: tuple[Path, Path], tmp_path: Path
):
    """`florql explain` starts the server for the query that follows and exits before it is up."""
    store = _fresh_copy(stores, tmp_path / "store")
    try:
        command = [sys.executable, "-m", "florql.cli", "--store", str(store), "explain", "SELECT w FROM run_1"]
        explained = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert explained.returncode == 0 and "skip" in explained.stdout, explained.stderr
        _wait_until(lambda: len(running_servers(str(store))) == 1, "the server's start")
        _query_in_new_process(store, "SELECT w FROM run_1 WHERE epoch = 2")
        assert _jobs_started_warm(store) == [True]
    finally:
        stop_servers(str(store))


def test_a_new_stores_server_is_forked_from_the_template(tmp_path: Path):
    """The user's template server (same software, no store) forks each store's server: a new
    store's first replay does not import torch again."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        for name in ("a", "b"):
            assert ForkServer(str(tmp_path / name), base_env()).ready()
        [template] = running_servers("", current_only=True)  # another checkout's template may be up too
        for name in ("a", "b"):
            [server] = running_servers(str(tmp_path / name))
            with open(f"/proc/{server['pid']}/stat") as f:
                assert int(f.read().rsplit(") ", 1)[1].split()[1]) == template["pid"]  # its parent
    finally:
        stop_servers(str(tmp_path / "a"))
        stop_servers(str(tmp_path / "b"))


def test_a_lock_file_removed_while_a_starter_waits_is_locked_afresh(tmp_path: Path):
    """A stopping server removes its lock file under the lock; a process that was waiting for the old
    file must not trust it (another process would lock the new one): it locks the file there now."""
    paths = ServerPaths(str(tmp_path), "key", str(tmp_path))
    path = paths.file("lock")
    holder = open(path, "a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    inside, release = threading.Event(), threading.Event()

    def starter() -> None:
        with warm._start_lock(paths):
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=starter)
    thread.start()
    try:
        assert not inside.wait(0.3)  # waiting for the holder
        os.unlink(path)  # what `_remove_lock` does while it holds the lock
        holder.close()
        assert inside.wait(30)
        probe = open(path, "a")
        with probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release.set()
        thread.join()


def test_a_stopping_server_leaves_a_lock_file_someone_holds(tmp_path: Path):
    path = str(tmp_path / "key.lock")
    with open(path, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        warm._remove_lock(path)
        assert os.path.exists(path)
    warm._remove_lock(path)
    assert not os.path.exists(path)


def test_a_connection_plans_warm_before_its_own_executor_has_reached_the_server(
    stores: tuple[Path, Path], tmp_path: Path
):
    """`explain` makes the executor, which reaches the server only with its first job: a query's
    plan after that must still count on the template server another process left up (it said
    1.9 s where explain had said 0.3 s, for the same warm job)."""
    store = _fresh_copy(stores, tmp_path / "store")
    sql = "SELECT epoch, w FROM run_1 WHERE epoch = 3"
    try:
        _query_in_new_process(store, "SELECT epoch, w FROM run_1 WHERE epoch = 1")  # the template is up now
        stop_servers(str(store))  # the store's own is not: the first job forks it from the template
        db = florql.connect(store, progress=False)
        explained = db.replay_plan(sql)
        assert db._executor is not None  # made by the plan; its fork server not reached yet
        replanned = db.replay_plan(sql)
        assert replanned.est_s == explained.est_s
        assert db._warm()
        assert db.sql(sql).plan.est_s == explained.est_s
    finally:
        stop_servers(str(store))
