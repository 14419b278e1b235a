"""A real `florql serve` shared by several users: ceilings, roles, one replay queue, activity, cancel.

The recorded script waits at each step while a gate file exists (the replay worker inherits the
server's environment, which names it), so a test can hold a replay in flight for as long as it
needs and never depends on how fast the machine is.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from serve_process import WAIT_S, florql_command, start_server, stop_server, wait_until

SCRIPT = textwrap.dedent("""
    import os
    import time

    import torch
    import florql

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with florql.checkpointing(model=net, optimizer=opt):
        for epoch in florql.loop("epoch", range(8)):
            for step in florql.loop("step", range(2)):
                while os.environ.get("FLORQL_TEST_GATE") and os.path.exists(os.environ["FLORQL_TEST_GATE"]):
                    time.sleep(0.05)
                opt.zero_grad()
                loss = ((net(x[step * 8:(step + 1) * 8]) - y[step * 8:(step + 1) * 8]) ** 2).mean()
                loss.backward()
                opt.step()
                florql.log("loss", loss.item())
""").lstrip("\n")
LOGGED = '            florql.log("loss", loss.item())\n'
HINDSIGHT = '            florql.log("grad_norm", net.weight.grad.norm().item())\n'
PASSWORDS = {"rita": "pw-reader", "ann": "pw-ann", "bob": "pw-bob", "ada": "pw-admin"}
ROLES = {"rita": "reader", "ann": "analyst", "bob": "analyst", "ada": "admin"}


@dataclass
class Served:
    home: Path
    port: int
    gate: Path
    users: Path

    def dsn(self, user: str) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname=florql user={user} password={PASSWORDS[user]} connect_timeout=10"
        )

    def connect(self, user: str) -> psycopg.Connection:
        return psycopg.connect(self.dsn(user), autocommit=True)

    @contextmanager
    def gate_closed(self) -> Iterator[None]:
        """Replays wait at their next step until the block ends."""
        self.gate.touch()
        try:
            yield
        finally:
            self.gate.unlink(missing_ok=True)

    def activity(self) -> dict[int, dict[str, Any]]:
        with self.connect("ada") as c:
            cur = c.execute("SELECT * FROM florql_activity")
            names = [d.name for d in cur.description]
            return {row[0]: dict(zip(names, row)) for row in cur.fetchall()}

    def state(self, pid: int) -> str | None:
        row = self.activity().get(pid)
        return None if row is None else row["state"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("shared")
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS", "FLORQL_TEST_GATE")}
    env["FLORQL_HOME"] = str(home / "store")
    script = home / "train.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(script)], cwd=home, env=env, check=True, capture_output=True, timeout=300)
    script.write_text(SCRIPT.replace(LOGGED, LOGGED + HINDSIGHT))  # run 1 answers grad_norm by replay
    subprocess.run([sys.executable, str(script)], cwd=home, env=env, check=True, capture_output=True, timeout=300)
    users = home / "users"
    for user, role in ROLES.items():
        subprocess.run(
            florql_command("serve", "--users-file", str(users), "--add-user", user, "--role", role),
            input=PASSWORDS[user] + "\n",
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    gate = home / "gate"
    options = ["--users-file", str(users), "--replay-budget", "300", "--session-budget", "120", "--max-workers", "1"]
    proc, port = start_server(home / "store", *options, env={**env, "FLORQL_TEST_GATE": str(gate)})
    try:
        yield Served(home, port, gate, users)
    finally:
        stop_server(proc)


def grad_norms(conn: psycopg.Connection, run: int, epoch: int) -> list[tuple]:
    return conn.execute(f"SELECT epoch, step, grad_norm FROM run_{run} WHERE epoch = {epoch} ORDER BY step").fetchall()


def truth(served: Served, epoch: int) -> list[tuple]:
    """Run 2 logged grad_norm while training: replayed values must equal these bit for bit."""
    with served.connect("ada") as c:
        rows = grad_norms(c, 2, epoch)
    assert len(rows) == 2 and all(isinstance(r[2], float) for r in rows)
    return rows


class Asking(threading.Thread):
    """A session asking for one epoch's grad_norm in the background."""

    def __init__(self, served: Served, user: str, epoch: int, budget: str | None = None) -> None:
        super().__init__(daemon=True)
        self.conn = served.connect(user)
        self.pid = self.conn.info.backend_pid
        self.notices: list[str] = []
        self.conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        if budget:
            self.conn.execute(f"SET replay_budget = '{budget}'")
        self.epoch = epoch
        self.rows: list[tuple] | None = None
        self.error: psycopg.Error | None = None

    def run(self) -> None:
        try:
            self.rows = grad_norms(self.conn, 1, self.epoch)
        except psycopg.Error as e:
            self.error = e

    def finish(self) -> Asking:
        self.join(WAIT_S)
        assert not self.is_alive(), "the query did not end"
        return self


def committed_jobs(served: Served, epoch: int) -> int:
    with served.connect("ada") as c:
        return c.execute(f"SELECT count(*) FROM replay_jobs WHERE run_id = 1 AND log_from = {epoch}").fetchone()[0]


# -- users and roles -------------------------------------------------------------------------------


def test_users_file_keeps_verifiers_not_passwords(served):
    text = served.users.read_text()
    assert not any(pw in text for pw in PASSWORDS.values())
    assert re.search(r"^ann analyst SCRAM-SHA-256\$4096:\S+\$\S+:\S+$", text, re.M)
    assert oct(served.users.stat().st_mode & 0o777) == "0o600"
    for dsn in (served.dsn("ann").replace("pw-ann", "wrong"), served.dsn("ann").replace("user=ann", "user=nobody")):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(dsn)


def test_reader_reads_stored_values_but_hindsight_is_refused(served):
    with served.connect("rita") as c:
        assert c.execute("SELECT count(*) FROM run_1 WHERE loss IS NOT NULL").fetchone() == (16,)
        with pytest.raises(psycopg.Error) as err:
            grad_norms(c, 1, 0)
        assert err.value.sqlstate == "42501"
        message = str(err.value)
        assert "role reader" in message and "never logged" in message and "grad_norm" in message
        assert committed_jobs(served, 0) == 0


# -- ceilings --------------------------------------------------------------------------------------


def test_set_cannot_raise_a_ceiling(served):
    with served.connect("ann") as c:
        assert c.execute("SHOW replay_budget").fetchone() == ("120.0",)
        for setting, limit in [
            ("replay_budget = 'unlimited'", "120 s"),
            ("replay_budget = '10 min'", "120 s"),
            ("workers = 64", "--max-workers 1"),
        ]:
            with pytest.raises(psycopg.Error) as err:
                c.execute(f"SET {setting}")
            assert err.value.sqlstate == "42501" and limit in str(err.value), setting
        assert c.execute("SHOW replay_budget").fetchone() == ("120.0",)
        c.execute("SET replay_budget = '10 s'")  # lowering is fine
        assert c.execute("SHOW replay_budget").fetchone() == ("10.0",)
        c.execute("SET replay_budget = '120 s'")  # and back up to the session's limit
        c.execute("SET workers = 1")
    with served.connect("ada") as c:  # an admin may go up to the server's ceiling, not beyond
        c.execute("SET replay_budget = '5 min'")
        assert c.execute("SHOW replay_budget").fetchone() == ("300.0",)
        with pytest.raises(psycopg.Error) as err:
            c.execute("SET replay_budget = 'unlimited'")
        assert err.value.sqlstate == "42501" and "--replay-budget" in str(err.value)


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (postgresql-client) is not installed")
def test_psql_set_above_ceiling(served):
    out = subprocess.run(
        ["psql", served.dsn("bob"), "-X", "-c", "SET replay_budget = 'unlimited'"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "ERROR" in out.stderr and "limit of 120 s" in out.stderr


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (postgresql-client) is not installed")
def test_the_servers_own_tables_are_listed_and_described_like_the_runs(served):
    """BI tools browse what the catalog lists: the server's tables are there, with their columns."""

    def psql(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["psql", served.dsn("ada"), "-X", *args], capture_output=True, text=True, timeout=60)

    listed = psql("-c", r"\dt")
    assert listed.returncode == 0, listed.stderr
    assert " florql_activity " in listed.stdout and " florql_replay_accounting " in listed.stdout
    described = psql("-c", r"\d florql_replay_accounting")
    assert described.returncode == 0, described.stderr
    assert "outcome" in described.stdout and "wait_s" in described.stdout and "double precision" in described.stdout
    with served.connect("ann") as c:
        columns = c.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'florql_activity' "
            "ORDER BY ordinal_position"
        ).fetchall()
        assert [name for (name,) in columns[:3]] == ["pid", "usename", "role"]
        assert c.execute("SELECT count(*) >= 1 FROM florql_activity").fetchone() == (True,)  # this very session


def test_analyst_over_budget_gets_53400_with_the_plan(served):
    with served.connect("ann") as c:
        c.execute("SET replay_budget = '1 ms'")
        with pytest.raises(psycopg.Error) as err:
            grad_norms(c, 1, 0)
        assert err.value.sqlstate == "53400"
        assert (
            "over the budget" in str(err.value) and "grad_norm" in str(err.value) and "total: 1 job" in str(err.value)
        )
    assert committed_jobs(served, 0) == 0


# -- admission -------------------------------------------------------------------------------------


def test_two_sessions_asking_the_same_cells_share_one_replay(served):
    expected = truth(served, 1)
    with served.gate_closed():
        first = Asking(served, "ann", 1)
        first.start()
        wait_until(lambda: served.state(first.pid) == "replaying", "the first session to replay")
        second = Asking(served, "bob", 1)
        second.start()
        wait_until(
            lambda: served.activity()[second.pid]["jobs_total"] == 1 and served.state(second.pid) == "replaying",
            "the second session to wait on the same job",
        )
    first.finish(), second.finish()
    assert first.error is None and second.error is None, (first.error, second.error)
    assert first.rows == second.rows == expected
    assert committed_jobs(served, 1) == 1
    assert any("already under way for another session" in n for n in second.notices)
    with served.connect("ada") as c:
        jobs = c.execute(
            "SELECT asked_by, outcome, run_s >= 0, started_at >= queued_at, slot "
            "FROM florql_replay_accounting WHERE first_iteration = 1"
        ).fetchall()
    assert jobs == [("ann,bob", "committed", True, True, 0)]
    with served.connect("rita") as c:  # others see only the jobs they asked for
        assert c.execute("SELECT count(*) FROM florql_replay_accounting").fetchone() == (0,)


def test_queue_wait_counts_against_the_budget(served):
    with served.gate_closed():
        holder = Asking(served, "ann", 2)  # takes the only replay slot
        holder.start()
        wait_until(lambda: served.state(holder.pid) == "replaying", "the slot to be taken")
        with served.connect("bob") as c:
            c.execute("SET replay_budget = '1 ms'")
            with pytest.raises(psycopg.Error) as err:
                grad_norms(c, 1, 3)
            estimate = float(re.search(r"needs ~([0-9.]+) s", str(err.value)).group(1))
        late = Asking(served, "bob", 3, budget=f"{estimate + 1.5} s")  # 1.5 s left to wait in the queue
        late.start()
        late.finish()
        assert late.error is not None and late.error.sqlstate == "53400", late.error
        assert "in the shared replay queue" in str(late.error)
        waiting = Asking(served, "bob", 3)  # 120 s: enough to wait until the gate opens
        waiting.start()
        wait_until(lambda: served.state(waiting.pid) == "queued", "the second query to queue")
    holder.finish(), waiting.finish()
    assert holder.error is None and waiting.error is None, (holder.error, waiting.error)
    assert holder.rows == truth(served, 2) and waiting.rows == truth(served, 3)
    assert any("waited" in n and "counts against replay_budget" in n for n in waiting.notices)
    assert committed_jobs(served, 3) == 1  # the query that gave up never ran its job
    with served.connect("ada") as c:  # forked from the store's fork server, which the job before started
        assert c.execute("SELECT warm FROM florql_replay_accounting WHERE first_iteration = 3").fetchall() == [(True,)]


# -- cancel ----------------------------------------------------------------------------------------


def cancel_during_replay(served: Served, epoch: int, cancel: Callable[[Asking], None]) -> None:
    expected = truth(served, epoch)
    with served.gate_closed():
        asking = Asking(served, "ann", epoch)
        asking.start()
        wait_until(lambda: served.state(asking.pid) == "replaying", "the replay to start")
        cancel(asking)
        asking.finish()
        assert asking.error is not None and asking.error.sqlstate == "57014", asking.error
        row = wait_until(lambda: served.activity()[asking.pid], "the session's activity")
        assert row["state"] == "idle"
        with served.connect("ada") as c:
            accounted = f"SELECT outcome FROM florql_replay_accounting WHERE first_iteration = {epoch}"
            wait_until(lambda: c.execute(accounted).fetchall() == [("cancelled",)], "the job to be accounted cancelled")
            c.execute("SET replay = 'never'")  # nothing partial is visible
            assert [r[2] for r in grad_norms(c, 1, epoch)] == [None, None]
    assert committed_jobs(served, epoch) == 0
    assert grad_norms(asking.conn, 1, epoch) == expected  # the next ask finishes the work
    asking.conn.close()


def test_cancel_request_stops_the_replay(served):
    cancel_during_replay(served, 4, lambda asking: asking.conn.cancel())


def test_pg_cancel_backend_by_the_same_user_stops_the_replay(served):
    def cancel(asking: Asking) -> None:
        with served.connect("bob") as other:
            with pytest.raises(psycopg.Error) as err:
                other.execute(f"SELECT pg_cancel_backend({asking.pid})")
            assert err.value.sqlstate == "42501"
        assert served.state(asking.pid) == "replaying"
        with served.connect("ann") as same:
            assert same.execute(f"SELECT pg_cancel_backend({asking.pid})").fetchone() == (True,)

    cancel_during_replay(served, 5, cancel)


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (postgresql-client) is not installed")
def test_psql_ctrl_c_stops_the_replay(served):
    query = "SELECT epoch, step, grad_norm FROM run_1 WHERE epoch = 6 ORDER BY step;"
    with served.gate_closed():
        psql = subprocess.Popen(
            ["psql", served.dsn("ann"), "-X", "-A", "-t", "-c", query],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        pid = wait_until(
            lambda: next((p for p, a in served.activity().items() if a["state"] == "replaying"), None),
            "psql's query to replay",
        )
        psql.send_signal(signal.SIGINT)  # psql sends a cancel request
        _, err = psql.communicate(timeout=WAIT_S)
        assert "canceling statement due to user request" in err
        assert pid not in served.activity() or served.state(pid) == "idle"
    assert committed_jobs(served, 6) == 0
    out = subprocess.run(["psql", served.dsn("ann"), "-X", "-A", "-t", "-c", query], capture_output=True, text=True)
    rows = [line.split("|") for line in out.stdout.split()]
    assert [(int(e), int(s), float(g)) for e, s, g in rows] == truth(served, 6)


# -- a server that never replays -------------------------------------------------------------------


def test_no_replay_serves_stored_values_and_names_the_replay(served, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_RUNS", "FLORQL_TEST_GATE")}
    proc, port = start_server(served.home / "store", "--no-replay", env=env)
    try:
        notices: list[str] = []
        with psycopg.connect(f"host=127.0.0.1 port={port} dbname=florql user=x", autocommit=True) as c:
            c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            rows = grad_norms(c, 1, 7)
            assert [r[2] for r in rows] == [None, None]
            assert any("a replay would run" in n and "grad_norm" in n for n in notices)
            with pytest.raises(psycopg.Error) as err:
                c.execute("SET replay = 'auto'")
            assert err.value.sqlstate == "42501" and "--no-replay" in str(err.value)
    finally:
        stop_server(proc)
    assert committed_jobs(served, 7) == 0


# -- time and connection limits (kept last: they replay epoch 0, which the role tests need unreplayed,
# and ask for epoch 7, which the --no-replay test needs unreplayed)


def test_statement_timeout_stops_the_replay_and_the_next_ask_answers(served):
    expected = truth(served, 0)
    with served.gate_closed(), served.connect("ann") as c:
        with pytest.raises(psycopg.Error) as err:
            c.execute("SET statement_timeout = 'soon'")
        assert err.value.sqlstate == "22023"
        c.execute("SET statement_timeout = '2s'")
        with pytest.raises(psycopg.errors.QueryCanceled) as err:
            grad_norms(c, 1, 0)  # the gate holds the replay: the limit must end it
        assert "statement timeout" in str(err.value)
        c.execute("SET statement_timeout = 0")
        assert c.execute("SELECT 1").fetchone() == (1,)  # the session goes on
        wait_until(lambda: served.state(c.info.backend_pid) == "idle", "the session to be idle")
        with served.connect("ada") as admin:
            # the limit may strike while the query plans (no job queued) or while its job runs
            accounted = "SELECT outcome FROM florql_replay_accounting WHERE first_iteration = 0"
            assert {r[0] for r in admin.execute(accounted).fetchall()} <= {"cancelled"}
    assert committed_jobs(served, 0) == 0
    with served.connect("ann") as c:
        assert grad_norms(c, 1, 0) == expected


def test_server_limits_a_client_cannot_lift(served):
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_RUNS",)}
    env["FLORQL_TEST_GATE"] = str(served.gate)
    # a ceiling long enough for any plain query on a busy machine (the gate makes the replay longer)
    proc, port = start_server(served.home / "store", "--max-connections", "2", "--statement-timeout", "30s", env=env)
    dsn = f"host=127.0.0.1 port={port} dbname=florql user=x connect_timeout=10"
    try:
        first, second = psycopg.connect(dsn, autocommit=True), psycopg.connect(dsn, autocommit=True)
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(dsn, autocommit=True)
        second.close()
        with psycopg.connect(dsn, autocommit=True) as again:  # a freed slot is taken again
            assert again.execute("SELECT 1").fetchone() == (1,)
        first.execute("SET statement_timeout = 0")  # 0 means "no limit" to PostgreSQL: not past the server's
        with served.gate_closed(), pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            grad_norms(first, 1, 7)  # no other test replays epoch 7
        first.close()
    finally:
        stop_server(proc)
