"""A dashboard while training runs: concurrent queries never fail, and see new epochs in order.

A real trainer records a new run into a store while client threads poll `metrics`, `run_<id>` and
the catalog, through `florql serve` (psycopg) or through one `florql.connect()` shared by a
notebook's threads. No assertion here is about timing: `benchmarks/bench_dashboard.py` measures it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from dashboard_support import (
    Load,
    NotebookClient,
    Observations,
    WireClient,
    Workspace,
    dashboard,
    dsn,
    poll,
)

import florql
from florql.errors import StoreBusy
from florql.storage.shared import shared_database

FIRST = (2, 3)  # epochs, steps of the run recorded before the dashboard starts
EPOCHS, STEPS, PAUSE = 10, 5, 0.2  # the run recorded under load: ~10 s of training
SOAK_TRAINERS, SOAK_EPOCHS, SOAK_STEPS, SOAK_PAUSE = 4, 30, 5, 0.4  # ~60 s of training each


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Run 1, recorded once for the module (a trainer starts in seconds: it imports torch)."""
    base = tmp_path_factory.mktemp("recorded")
    ws = Workspace(base / "store", base / "work")
    first = ws.train(*FIRST)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    return ws


@pytest.fixture
def workspace(recorded: Workspace, tmp_path: Path) -> Workspace:
    """A store of its own holding a copy of run 1's files (no database yet)."""
    shutil.copytree(recorded.home, tmp_path / "store")
    return Workspace(tmp_path / "store", tmp_path / "work")


def check(load: Load, clients: int) -> None:
    obs = load.obs
    assert load.trainer.returncode == 0, load.trainer.stderr
    failed = obs.failures
    assert not failed, f"{len(failed)} of {len(obs.samples)} queries failed, e.g.:\n" + "\n".join(
        f"  {s.kind}: {s.error}" for s in failed[:10]
    )
    # count(*) counts each run's own rows at its finest loop: a row per step
    total = FIRST[0] * FIRST[1] + load.epochs * load.steps
    final_run = [(e, load.steps, load.steps) for e in range(load.epochs)]
    by_client = defaultdict(list)
    for s in sorted(obs.samples, key=lambda s: s.started):
        by_client[s.client].append(s)
    assert sorted(by_client) == list(range(clients))
    for client, samples in by_client.items():
        counts = [s.value[0] for s in samples if s.kind == "metrics"]
        assert counts == sorted(counts), f"client {client}: metrics went backwards: {counts}"
        complete = 0
        runs = [s for s in samples if s.kind == "run"]
        assert runs, f"client {client} never saw run_{load.run_id} in the catalog"
        for s in runs:
            epochs = [e for e, _, _ in s.value]
            assert epochs == list(range(len(epochs))), f"client {client}: epochs out of order: {s.value}"
            done = [e for e, steps, logged in s.value if logged]
            assert done == list(range(len(done))), f"client {client}: epoch_loss not a prefix: {s.value}"
            assert all(logged in (0, steps) and steps <= load.steps for _, steps, logged in s.value), s.value
            assert all(steps == load.steps for _, steps, _ in s.value[:-1]), s.value
            assert len(done) >= complete, f"client {client}: completed epochs went backwards"
            complete = len(done)
        after = [s for s in samples if s.started > load.trainer_exit]
        last = {s.kind: s.value for s in after}  # each kind's last answer begun after the trainer exited
        assert set(last) == {"catalog", "metrics", "run"}, f"client {client}: no full round after the run ended"
        assert last["metrics"][0] == total
        assert last["run"] == final_run
        assert {"metrics", "runs", "run_1", f"run_{load.run_id}"} <= set(last["catalog"])


def test_dashboard_over_florql_serve_while_training(workspace: Workspace) -> None:
    pytest.importorskip("psycopg")
    with workspace.serve() as port:
        clients = [WireClient(dsn(port)) for _ in range(8)]
        load = dashboard(workspace, clients, run_id=2, epochs=EPOCHS, steps=STEPS, pause=PAUSE)
    check(load, 8)
    assert "internal error" not in workspace.server_log
    assert "Traceback" not in workspace.server_log, workspace.server_log[-3000:]


def test_dashboard_in_a_notebook_with_threads_while_training(workspace: Workspace) -> None:
    db = florql.connect(workspace.home)
    try:
        load = dashboard(workspace, [NotebookClient(db) for _ in range(4)], 2, EPOCHS, STEPS, PAUSE)
    finally:
        db.close()
    check(load, 4)


def test_four_trainers_a_server_with_eight_clients_and_a_notebook(workspace: Workspace) -> None:
    """About a minute of everything at once: four trainers record into the store while eight
    psycopg clients of `florql serve` and two threads of a notebook's `florql.connect()` refresh
    their panels, each client watching one of the new runs. Nothing fails, no count goes back,
    and every client's last round sees all four runs whole."""
    pytest.importorskip("psycopg")
    runs = list(range(2, 2 + SOAK_TRAINERS))
    obs = Observations()
    ended: list[float] = []
    db = florql.connect(workspace.home)
    try:
        with workspace.serve() as port:
            clients = [WireClient(dsn(port)) for _ in range(8)] + [NotebookClient(db) for _ in range(2)]
            trainers = [workspace.train(SOAK_EPOCHS, SOAK_STEPS, SOAK_PAUSE) for _ in runs]
            threads = [
                threading.Thread(
                    target=poll,
                    args=(i, c, runs[i % len(runs)], obs, lambda: ended[0] if ended else None, 1.0),
                    daemon=True,
                )
                for i, c in enumerate(clients)
            ]
            for t in threads:
                t.start()
            outcomes = [t.communicate(timeout=900) for t in trainers]
            ended.append(time.time())
            for t in threads:
                t.join(timeout=300)
            for c in clients:
                c.close()
        server_log = workspace.server_log
    finally:
        db.close()
    for trainer, (_, err) in zip(trainers, outcomes):
        assert trainer.returncode == 0, err
    assert not obs.failures, f"{len(obs.failures)} of {len(obs.samples)} queries failed, e.g.:\n" + "\n".join(
        f"  {s.kind}: {s.error}" for s in obs.failures[:10]
    )
    assert "Traceback" not in server_log, server_log[-3000:]
    total = FIRST[0] * FIRST[1] + SOAK_TRAINERS * SOAK_EPOCHS * SOAK_STEPS
    whole = [(e, SOAK_STEPS, SOAK_STEPS) for e in range(SOAK_EPOCHS)]
    by_client = defaultdict(list)
    for s in sorted(obs.samples, key=lambda s: s.started):
        by_client[s.client].append(s)
    assert sorted(by_client) == list(range(len(clients)))
    for client, samples in by_client.items():
        counts = [s.value[0] for s in samples if s.kind == "metrics"]
        assert counts == sorted(counts), f"client {client}: metrics went backwards: {counts}"
        last = {s.kind: s.value for s in samples if s.started > ended[0]}
        assert set(last) == {"catalog", "metrics", "run"}, f"client {client}: no full round after the runs ended"
        assert last["metrics"][0] == total
        assert last["run"] == whole, f"client {client} watching run_{runs[client % len(runs)]}"
        assert {f"run_{r}" for r in [1, *runs]} <= set(last["catalog"])


def test_threads_share_one_ingest(workspace: Workspace) -> None:
    """Many threads asking at once: every segment lands once, and each sees what was complete."""
    db = florql.connect(workspace.home)
    errors: list[BaseException] = []
    answers: list[int] = []
    gate = threading.Barrier(16)

    def ask() -> None:
        try:
            gate.wait()
            answers.append(db.sql("SELECT count(*) FROM logs").fetchall()[0][0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = FIRST[0] * FIRST[1] + FIRST[0]  # every loss and epoch_loss
    assert answers == [rows] * 16
    with shared_database(db.location.db_path).lease() as conn:
        segments = conn.execute("SELECT count(*), count(DISTINCT path) FROM segments_ingested").fetchall()[0]
    assert segments[0] == segments[1] > 0


def test_a_query_sees_every_segment_complete_when_it_started(workspace: Workspace) -> None:
    """While another thread's ingest runs, a query asked after a new run ended waits for a new sync."""
    db = florql.connect(workspace.home)
    db.sql("SELECT 1").fetchall()
    second = workspace.train(1, 2)
    second.communicate(timeout=300)
    assert second.returncode == 0
    assert db.sql("SELECT count(*) FROM metrics WHERE run_id = 2").fetchall() == [(2,)]


def test_another_process_gets_the_store_while_a_server_is_busy(workspace: Workspace) -> None:
    """The server process, polled without pause, hands the file over to a CLI query."""
    pytest.importorskip("psycopg")
    with workspace.serve() as port:
        stop = threading.Event()
        clients = [WireClient(dsn(port)) for _ in range(4)]

        def hammer(client: WireClient) -> None:
            while not stop.is_set():
                client.metrics()

        threads = [threading.Thread(target=hammer, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            cli = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "florql.cli",
                    "--store",
                    str(workspace.home),
                    "query",
                    "SELECT count(*) FROM logs",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=workspace.env(),
            )
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
            for c in clients:
                c.close()
    assert cli.returncode == 0, cli.stderr
    assert str(FIRST[0] * FIRST[1] + FIRST[0]) in cli.stdout


def test_a_store_held_too_long_says_by_whom(workspace: Workspace) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import duckdb, sys, time
                con = duckdb.connect({str(workspace.home / "florql.duckdb")!r})
                print("held", flush=True)
                time.sleep(60)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        db = florql.connect(workspace.home, busy_timeout=0.5)
        shared_database(db.location.db_path).close()
        with pytest.raises(StoreBusy) as caught:
            db.sql("SELECT count(*) FROM logs").fetchall()
    finally:
        holder.kill()
        holder.wait()
    message = str(caught.value)
    assert f"PID {holder.pid}" in message and "duckdb.connect" in message, message
    assert caught.value.sqlstate == "55006"
    assert db.sql("SELECT count(*) FROM logs").fetchall()  # free again: the next query works
