"""The `florql` command, run as a real process against real stores: its output and its exit codes.

A module-scoped store holds run 1 (store_support.TRAIN, finished, logging `loss`; the current code
logs `grad_norm` too, so asking for it needs a replay) and run 2 (a script that raises in epoch 1).
Tests that write to a store work on their own copy of it.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from store_support import EXAMPLES, TRAIN, Store, record_then_add_grad_norm

CRASH = """
import florql

for epoch in florql.loop("epoch", range(3)):
    florql.log("x", float(epoch))
    if epoch == 1:
        raise RuntimeError("boom in epoch 1")
"""
LOSSES = "SELECT epoch, step, loss FROM run_1 WHERE epoch = 0 ORDER BY step"
HINDSIGHT = "SELECT epoch, step, grad_norm FROM run_1 WHERE epoch = 1 ORDER BY step"


def florql_cli(store: Store, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`florql ARGS` as its own process, with FLORQL_HOME naming the store."""
    return subprocess.run(
        [sys.executable, "-m", "florql", *args],
        cwd=cwd or store.workdir,
        env=store.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def refused(proc: subprocess.CompletedProcess) -> str:
    """A usage error: exit code 2, one `florql: …` message on stderr, nothing on stdout, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    return proc.stderr


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Store:
    base = tmp_path_factory.mktemp("cli")
    origin = Store(base / "store", base / "work")
    record_then_add_grad_norm(origin.workdir, origin.env(), TRAIN)
    crashed = origin.run(origin.write_script(CRASH, "crash.py"), check=False)
    assert crashed.proc.returncode != 0 and crashed.run_id == 2
    return origin


@pytest.fixture
def copied(recorded: Store, store: Store) -> Store:
    """A copy of the recorded store (same run files, same database), for tests that write to it."""
    shutil.copytree(recorded.home, store.home)
    return Store(store.home, recorded.workdir)  # the runs' scripts are where they were recorded


def expected(store: Store, query: str = LOSSES, names: tuple[str, ...] = ("epoch", "step", "loss")) -> list[dict]:
    """The answer to `query` straight from the database, one dict a row."""
    return [dict(zip(names, row)) for row in store.sql(query)]


# ---- florql runs / show -------------------------------------------------------------------------
def test_runs_lists_every_run_with_its_status(recorded: Store) -> None:
    lines = ok(florql_cli(recorded, "runs")).splitlines()
    assert lines[0].split()[:3] == ["run_id", "status", "script"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split() and line.split()[0].isdigit()}
    assert rows["1"][1:3] == ["finished", "train.py"]
    assert rows["2"][1:3] == ["failed", "crash.py"]
    assert lines[-1] == "(2 rows)"


def test_runs_with_store_flag(recorded: Store, tmp_path: Path) -> None:
    env_less = Store(tmp_path / "no-store-here", tmp_path)
    out = ok(florql_cli(env_less, "--store", str(recorded.home), "runs"))
    assert "finished" in out and "failed" in out and out.rstrip().endswith("(2 rows)")


def test_show_prints_the_manifest_columns_and_checkpoints(recorded: Store) -> None:
    out = ok(florql_cli(recorded, "show", "1"))
    fields = dict(line.strip().split(": ", 1) for line in out.split("\n\n")[0].splitlines())
    assert fields["run_id"] == "1" and fields["status"] == "finished" and fields["script_rel"] == "train.py"
    assert fields["outer_loop"] == "epoch" and fields["outer_completed"] == "3"
    assert "columns of run_1:" in out
    columns = {
        line.split()[0]: line.split(None, 1)[1]
        for line in out.split("columns of run_1:")[1].split("checkpoints:")[0].strip().splitlines()
    }
    assert columns == {
        "epoch": "loop coordinate",
        "step": "loop coordinate",
        "loss": "logged",
        "grad_norm": "loggable: replayed on demand",
    }
    taken = int(fields["checkpoints_taken"])
    assert taken >= 1 and f"({taken} row{'s' if taken != 1 else ''})" in out.split("checkpoints:")[1]


def test_show_of_a_failed_run_names_the_error(recorded: Store) -> None:
    out = ok(florql_cli(recorded, "show", "2"))
    assert "status: failed" in out and "boom in epoch 1" in out


def test_show_of_an_unknown_run_exits_2_naming_it(recorded: Store) -> None:
    err = refused(florql_cli(recorded, "show", "7"))
    assert "no run 7" in err


def test_show_needs_a_run_number(recorded: Store) -> None:
    proc = florql_cli(recorded, "show", "one")
    assert proc.returncode == 2 and "invalid int value: 'one'" in proc.stderr  # argparse's usage error


# ---- florql query ---------------------------------------------------------------------------------
def test_query_prints_a_table(recorded: Store) -> None:
    out = ok(florql_cli(recorded, "query", LOSSES))
    lines = out.splitlines()
    assert lines[0].split() == ["epoch", "step", "loss"] and lines[-1] == "(4 rows)"
    assert [line.split()[:2] for line in lines[2:-1]] == [["0", str(step)] for step in range(4)]


def test_query_max_rows(recorded: Store) -> None:
    # (Not SELECT *: that asks for grad_norm too, which replays.)
    out = ok(florql_cli(recorded, "query", "SELECT epoch, step, loss FROM run_1 ORDER BY ALL", "--max-rows", "5"))
    lines = out.splitlines()
    assert len(lines) == 2 + 5 + 1 and lines[-1] == "… 7 more rows (12 in all)"


def test_query_as_csv(recorded: Store) -> None:
    out = ok(florql_cli(recorded, "query", LOSSES, "--format", "csv"))
    rows = list(csv.DictReader(io.StringIO(out)))
    want = expected(recorded, LOSSES)
    assert [{k: float(v) if k == "loss" else int(v) for k, v in row.items()} for row in rows] == want


def test_lists_go_to_csv_as_json_text(recorded: Store) -> None:
    sql = "SELECT epoch, list(step ORDER BY step) AS steps FROM run_1 GROUP BY epoch ORDER BY epoch"
    rows = list(csv.DictReader(io.StringIO(ok(florql_cli(recorded, "query", sql, "--format", "csv")))))
    assert [(int(r["epoch"]), json.loads(r["steps"])) for r in rows] == [(e, [0, 1, 2, 3]) for e in range(3)]


def test_query_as_json(recorded: Store) -> None:
    out = ok(florql_cli(recorded, "query", LOSSES, "--format", "json"))
    assert [json.loads(line) for line in out.splitlines()] == expected(recorded, LOSSES)


@pytest.mark.parametrize(
    "name, flags", [("out.csv", []), ("out.json", []), ("out.txt", ["--format", "json"]), ("out.parquet", [])]
)
def test_query_to_a_file(recorded: Store, tmp_path: Path, name: str, flags: list[str]) -> None:
    path = tmp_path / name
    proc = florql_cli(recorded, "query", LOSSES, "-o", str(path), *flags)
    assert ok(proc) == ""  # the rows go to the file, not to stdout
    assert f"wrote 4 rows to {path}" in proc.stderr
    want = expected(recorded, LOSSES)
    if name.endswith(".parquet"):
        assert pq.read_table(path).to_pylist() == want
    elif name.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        assert [{k: float(v) if k == "loss" else int(v) for k, v in r.items()} for r in rows] == want
    else:
        assert [json.loads(line) for line in path.read_text().splitlines()] == want


def test_query_file_of_unknown_format_is_refused(recorded: Store, tmp_path: Path) -> None:
    err = refused(florql_cli(recorded, "query", LOSSES, "-o", str(tmp_path / "out.txt")))
    assert "out.txt" in err and "--format" in err
    assert not (tmp_path / "out.txt").exists()


def test_parquet_needs_a_file(recorded: Store) -> None:
    assert "-o FILE" in refused(florql_cli(recorded, "query", LOSSES, "--format", "parquet"))


def test_bad_sql_exits_2_with_a_message(recorded: Store) -> None:
    err = refused(florql_cli(recorded, "query", "SELEC epoch FROM run_1"))
    assert err.startswith("florql: ") and "syntax error" in err


def test_unknown_table_exits_2_naming_it(recorded: Store) -> None:
    err = refused(florql_cli(recorded, "query", "SELECT * FROM run_9"))
    assert err.startswith("florql: ") and "run_9" in err and "run_1" in err  # what there is, too


@pytest.mark.parametrize(
    "statement", ["DROP TABLE logs", "DELETE FROM logs", "CREATE TABLE t AS SELECT 1", "SELECT 1; DROP TABLE logs"]
)
def test_forbidden_statements_exit_2_and_change_nothing(copied: Store, statement: str) -> None:
    before = copied.sql("SELECT count(*) FROM logs")
    err = refused(florql_cli(copied, "query", statement))
    assert err.startswith("florql: ") and "read-only" in err
    assert copied.sql("SELECT count(*) FROM logs") == before
    assert {r[0] for r in copied.sql("SELECT table_name FROM information_schema.tables")} >= {"logs"}


# ---- florql explain ------------------------------------------------------------------------------
def test_explain_of_a_hindsight_query_prints_the_plan_and_replays_nothing(copied: Store) -> None:
    out = ok(florql_cli(copied, "explain", HINDSIGHT, "--workers", "1"))
    lines = [line for line in out.splitlines() if line.strip()]
    header, total, as_command = lines[0], _starting(lines, "total:"), _starting(lines, "as a command:")
    jobs = lines[1 : lines.index(total)]  # after the total: a warning when slower than retraining
    assert header.split()[:3] == ["job", "run", "range"] and "names" in header
    assert len(jobs) >= 1 and all("grad_norm" in job and job.split()[1] == "1" for job in jobs)
    assert total.startswith(f"total: {len(jobs)} job(s)") and "1 worker(s)" in total
    # What `florql query` will take as a command: its own start and planning, then the jobs.
    jobs_s = float(re.search(r"~([\d.]+) s", total).group(1))  # type: ignore[union-attr]
    command = re.fullmatch(r"as a command: ~([\d.]+) s \(`florql query` first spends ~([\d.]+) s .*\)", as_command)
    assert command is not None, as_command
    whole_s, before_jobs_s = map(float, command.groups())
    assert before_jobs_s > 0 and whole_s == pytest.approx(jobs_s + before_jobs_s, abs=0.11)  # each rounded to 0.1
    # Nothing ran: no job record, no grad_norm value, and the query still has everything to replay.
    assert copied.sql("SELECT count(*) FROM replay_jobs") == [(0,)]
    assert copied.sql("SELECT count(*) FROM logs WHERE name = 'grad_norm'") == [(0,)]
    # The same jobs again; their estimates may differ: the first explain started the store's fork
    # server for the query that would follow, so the second plans jobs that start warm.
    again = ok(florql_cli(copied, "explain", HINDSIGHT, "--workers", "1"))
    assert _without_estimates(again) == _without_estimates(out)


def _starting(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, lines
    return found[0]


def _without_estimates(plan: str) -> list[str]:
    estimates = ("total:", "as a command:", "warning:")  # what the estimates say, which may differ
    return [re.sub(r"\s[\d.]+s\s", " ", line) for line in plan.splitlines() if not line.startswith(estimates)]


def test_explain_of_a_stored_query(recorded: Store) -> None:
    out = ok(florql_cli(recorded, "explain", LOSSES))
    assert "no replay needed" in out and "as a command" not in out


def test_process_age_counts_from_the_process_start() -> None:
    """The age `explain` adds and a run's `launch_s` records: from the process's start, to a tick."""
    code = "import time; time.sleep(0.5); from florql.uptime import process_age_s; print(process_age_s())"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    elapsed = time.monotonic() - started
    assert 0.5 <= float(out) <= elapsed + 0.02  # the start is kept in 10 ms ticks


def test_launch_cost_leaves_out_waiting() -> None:
    """A run's recorded launch is what starting cost, not how long the process waited (for busy
    cores, here a sleep): a cold replay's estimate must not carry the recording's machine load."""
    code = (
        "import time; time.sleep(1.0); from florql.uptime import launch_cost_s, process_age_s; "
        "print(launch_cost_s(), process_age_s(), time.process_time())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    cost, age, cpu = map(float, out.split())
    assert age >= 1.0 and cost <= age - 0.9  # the second asleep is not part of it
    assert cost == pytest.approx(cpu, abs=0.01)


def test_explain_refuses_what_query_refuses(recorded: Store) -> None:
    assert "read-only" in refused(florql_cli(recorded, "explain", "DROP TABLE logs"))
    assert "syntax error" in refused(florql_cli(recorded, "explain", "SELEC 1"))


# ---- florql rebuild ------------------------------------------------------------------------------
def test_rebuild_answers_the_same(copied: Store) -> None:
    questions = [
        ("runs",),
        ("show", "1"),
        ("query", "SELECT * FROM logs ORDER BY ALL", "--format", "json"),
        ("query", "SELECT epoch, step, loss FROM run_1 ORDER BY epoch, step", "--format", "csv"),
    ]
    before = [ok(florql_cli(copied, *q)) for q in questions]
    out = ok(florql_cli(copied, "rebuild"))
    assert out.startswith(f"rebuilt {copied.location.db_path}")
    assert [ok(florql_cli(copied, *q)) for q in questions] == before
    # Also from nothing: without the database file at all.
    Path(copied.location.db_path).unlink()
    ok(florql_cli(copied, "rebuild"))
    assert Path(copied.location.db_path).exists()
    assert [ok(florql_cli(copied, *q)) for q in questions] == before


# ---- florql check --------------------------------------------------------------------------------
def test_check_of_a_clean_script(recorded: Store) -> None:
    out = ok(florql_cli(recorded, "check", "train.py"))
    assert out == "train.py: no patterns found that replay cannot restore\n"
    demo = str(EXAMPLES / "train.py")
    assert ok(florql_cli(recorded, "check", demo)) == f"{demo}: no patterns found that replay cannot restore\n"


def test_check_reports_findings_with_line_numbers_and_exits_1(store: Store) -> None:
    store.write_script(
        """
        import torch, florql
        net = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with florql.checkpointing(model=net):
            for epoch in florql.loop("epoch", range(3)):
                florql.log("x", 1.0)
        florql.log("final", 2.0)
    """,
        "bad.py",
    )
    proc = florql_cli(store, "check", "bad.py")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("bad.py:3: 'opt' (optimizer)") and "florql.checkpointing" in lines[0]
    assert lines[1].startswith("bad.py:7: florql.log('final') runs outside any florql.loop")
    assert not (store.home / "runs").exists()  # a static pass: nothing ran, nothing was recorded


def test_check_of_a_missing_script_exits_2(store: Store) -> None:
    err = refused(florql_cli(store, "check", "nowhere.py"))
    assert err.startswith("florql: ") and "nowhere.py" in err


def test_the_demo_answers_its_hindsight_query_from_a_warm_replay_server_bit_exactly(tmp_path):
    """`florql demo`, the README's main job: it starts the store's replay server before training,
    its query's replay forks from it, and the values equal a run that logged grad_norm from the start."""
    import os

    import florql
    from florql.demo import EPOCHS, FIRST, SAMPLES
    from florql.replay.warm import TEMPLATE, server_is_up, stop_servers

    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS", "FLORQL_HOME")}
    # The server starts before training and must outlive it: with the suite's 20 s idle limit it
    # stopped while training ran on a loaded machine, and the query's job started cold.
    env["FLORQL_REPLAY_SERVER_IDLE_S"] = "600"
    template_was_up = server_is_up(TEMPLATE)
    folder = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "florql", "demo", "--dir", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stop_servers(str(folder / ".florql"))
    if not template_was_up:
        stop_servers(TEMPLATE, current_only=True)  # started by the demo with its long idle limit: not left behind
    out = ok(proc)
    assert re.search(r"replay server for this store, which keeps torch imported for replays: up in [\d.]+ s", out)
    assert re.search(r"answered in [\d.]+ s by replaying only epochs", out)
    db = florql.connect(str(folder / ".florql"), progress=False)
    with db._open() as conn:
        assert conn.execute("SELECT bool_and(warm), count(*) FROM _replay_costs").fetchall() == [(True, 1)]
    asked = f"SELECT epoch, step, grad_norm FROM run_1 WHERE epoch >= {FIRST} ORDER BY epoch, step"
    replayed = db.sql(asked).fetchall()

    truth = tmp_path / "truth"  # the demo's script now logs grad_norm: a run of it logs every value
    truth.mkdir()
    shutil.copy(folder / "train.py", truth / "train.py")
    subprocess.run(
        [sys.executable, "train.py", "--florql-args", f"epochs={EPOCHS}", f"samples={SAMPLES}"],
        cwd=truth,
        env={**env, "FLORQL_HOME": str(truth / ".florql"), "FLORQL_QUIET": "1"},
        check=True,
        timeout=600,
    )
    expected = florql.connect(str(truth / ".florql"), progress=False).sql(asked).fetchall()
    steps = -(-(SAMPLES - SAMPLES // 5) // 64)  # the training set (4/5 of the samples) in batches of 64
    assert len(replayed) == (EPOCHS - FIRST) * steps and replayed == expected
