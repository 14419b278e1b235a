"""Query errors a user can act on, the read-only guard, and the query API over logged values.

One small store (three quick runs of `hindsight_scripts/tiny.py`, no replay needed) is shared by
the whole module: nothing here writes to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import florql
from florql import dialect
from florql.errors import (
    FlorqlError,
    ForbiddenAccess,
    ForbiddenStatement,
    ParameterError,
    QueryFailed,
    QuerySyntaxError,
    UnknownColumn,
    UnknownTable,
)

SCRIPTS = Path(__file__).resolve().parent / "hindsight_scripts"

# The current code of the project can log two more names than the recorded runs did.
HINDSIGHT = {
    '        florql.log("loss",': '        florql.log("grad_norm", 0.5 * step)\n        florql.log("loss",',
    '    florql.log("val_acc",': '    florql.log("val_loss", 0.25 * epoch)\n    florql.log("val_acc",',
}
RUNS = [{"lr": 0.1, "seed": 0}, {"lr": 0.2, "seed": 1}, {"lr": 0.2, "seed": 2}]


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("errors")
    home = work / ".florql"
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS")}
    env["FLORQL_HOME"] = str(home)
    script = work / "train.py"
    source = (SCRIPTS / "tiny.py").read_text()
    script.write_text(source)
    for args in RUNS:
        flags = [f"{k}={v}" for k, v in args.items()]
        subprocess.run(
            [sys.executable, str(script), "--florql-args", *flags],
            cwd=work,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    for anchor, replacement in HINDSIGHT.items():
        assert anchor in source
        source = source.replace(anchor, replacement)
    script.write_text(source)
    (work / "secret.csv").write_text("secret\nTOP-SECRET-VALUE\n")
    conn = florql.connect(home, workers=1, progress=False)
    conn.workdir = work
    yield conn
    conn.close()


# ---- syntax ---------------------------------------------------------------------------------------
def test_syntax_error_reports_line_and_column(db):
    with pytest.raises(QuerySyntaxError) as err:
        db.sql("SELECT epoch,\n       loss\nFROM run_1 WHERE (")
    assert err.value.line == 3
    assert err.value.column is not None and err.value.column > 0
    assert "line 3" in str(err.value) and f"column {err.value.column}" in str(err.value)


def test_syntax_error_on_first_line(db):
    with pytest.raises(QuerySyntaxError) as err:
        db.sql("SELECT epoch loss loss FROM run_1")
    assert err.value.line == 1
    assert "line 1" in str(err.value)


def test_an_incomplete_clause_is_named_in_sql_words(db):
    with pytest.raises(QuerySyntaxError) as err:
        db.sql("SELECT loss FROM run_1 WHERE")
    assert "WHERE is incomplete" in str(err.value)
    assert "<class" not in str(err.value) and "sqlglot" not in str(err.value)


def test_an_unexpected_token_is_quoted(db):
    with pytest.raises(QuerySyntaxError) as err:
        db.sql("SELECT loss FROM run_1 WHERE epoch > 1 GROUP")
    assert "unexpected 'GROUP'" in str(err.value)


@pytest.mark.parametrize(
    ("sql", "culprit", "column"),
    [
        ("SELECT loss FROM run_1 WHERE epoch > 'abc'", "'abc'", 38),
        ("SELECT loss + 'x' FROM run_1", "'x'", 15),
        ("SELECT epoch,\n  loss FROM run_1 WHERE loss > 'y'", "'y'", 32),
    ],
)
def test_engine_errors_point_into_the_users_sql_not_the_rewrite(db, sql, culprit, column):
    with pytest.raises(QueryFailed) as err:
        db.sql(sql).fetchall()
    message = str(err.value)
    assert err.value.sqlstate == "22P02", message
    assert f"column {column}:" in message and culprit in message
    assert ("line 2," in message) == ("\n" in sql)
    # florql's rewrite of the query (its subqueries and aliases) never shows
    assert "t0." not in message and "LINE " not in message and "SELECT *" not in message
    assert isinstance(err.value.__cause__, duckdb.Error)


def test_empty_query_is_a_syntax_error(db):
    with pytest.raises(QuerySyntaxError):
        db.sql("   ")


# ---- unknown tables and columns ---------------------------------------------------------------------
def test_unknown_run_names_existing_runs(db):
    with pytest.raises(UnknownTable) as err:
        db.sql("SELECT epoch, loss FROM run_42")
    message = str(err.value)
    assert "42" in message
    for run_id in (1, 2, 3):
        assert f"run_{run_id}" in message


def test_unknown_table_lists_florql_tables(db):
    with pytest.raises(UnknownTable) as err:
        db.sql("SELECT * FROM metricz")
    for name in ("runs", "logs", "metrics", "run_1"):
        assert name in str(err.value)


def test_unknown_column_lists_logged_and_loggable_names_nearest_first(db):
    with pytest.raises(UnknownColumn) as err:
        db.sql("SELECT epoch, val_los FROM run_1")
    message = str(err.value)
    assert "val_los" in message
    for name in ("loss", "val_acc", "grad_norm", "val_loss"):
        assert name in message
    suggestion = message.split("Did you mean", 1)[1]
    assert suggestion.strip().startswith("val_loss")
    # logged and loggable names are told apart
    logged = message.split("logged:", 1)[1].split(";", 1)[0]
    loggable = message.split("loggable", 1)[1]
    assert "loss" in logged and "val_acc" in logged and "grad_norm" not in logged
    assert "grad_norm" in loggable and "val_loss" in loggable


def test_unknown_column_typo_of_a_loggable_name(db):
    with pytest.raises(UnknownColumn) as err:
        db.sql("SELECT step, grad_nrom FROM run_2")
    assert err.value.args[0].split("Did you mean", 1)[1].strip().startswith("grad_norm")


def test_error_sqlstates(db):
    cases = [
        ("SELECT FROM WHERE (", QuerySyntaxError, "42601"),
        ("SELECT 1 FROM run_99", UnknownTable, "42P01"),
        ("SELECT nope FROM run_1", UnknownColumn, "42703"),
        ("DROP TABLE logs", ForbiddenStatement, "25006"),
    ]
    for sql, kind, state in cases:
        with pytest.raises(kind) as err:
            db.sql(sql)
        assert err.value.sqlstate == state


# ---- read-only guard --------------------------------------------------------------------------------
REFUSED = [
    "INSERT INTO logs (run_id, name, loop_path, source) VALUES (1, 'x', 'epoch', 'logged')",
    "UPDATE logs SET value_float = 0",
    "DELETE FROM logs",
    "CREATE TABLE t AS SELECT * FROM logs",
    "CREATE VIEW v AS SELECT 1",
    "DROP TABLE logs",
    "DROP VIEW runs",
    "ALTER TABLE logs ADD COLUMN x INTEGER",
    "ATTACH 'other.duckdb' AS other",
    "DETACH other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "COPY logs TO 'out.csv'",
    "COPY (SELECT * FROM logs) TO 'out.parquet' (FORMAT parquet)",
    "PRAGMA database_list",
    "PRAGMA enable_profiling",
    "SET threads = 1",
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "CHECKPOINT",
    "SELECT * FROM read_csv('secret.csv')",
    "SELECT * FROM read_csv_auto('secret.csv')",
    "SELECT * FROM read_parquet('x.parquet')",
    "SELECT * FROM read_json('x.json')",
    "SELECT * FROM read_text('secret.csv')",
    "SELECT * FROM glob('*')",
    "SELECT getenv('HOME')",
    "WITH f AS (SELECT * FROM read_csv('secret.csv')) SELECT * FROM f",
    "SELECT * FROM runs WHERE run_id IN (SELECT 1 FROM read_csv('secret.csv'))",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_writes_ddl_and_file_access_are_refused(db, sql):
    with pytest.raises(ForbiddenStatement):
        db.sql(sql)
    assert not (db.workdir / "out.csv").exists() and not (db.workdir / "out.parquet").exists()


@pytest.mark.parametrize("sql", ["SELECT * FROM 'secret.csv'", "FROM 'secret.csv'", 'SELECT * FROM "secret.csv"'])
def test_reading_a_file_by_name_is_refused(db, sql, monkeypatch):
    monkeypatch.chdir(db.workdir)
    with pytest.raises((ForbiddenStatement, UnknownTable)) as err:
        db.sql(sql)
    assert "TOP-SECRET-VALUE" not in str(err.value)


def test_export_database_is_refused(db):
    with pytest.raises(FlorqlError):
        db.sql("EXPORT DATABASE 'dump'")
    assert not (db.workdir / "dump").exists()


def test_export_database_is_refused_as_forbidden(db):
    with pytest.raises(ForbiddenStatement):
        db.sql("EXPORT DATABASE 'dump'")


def test_explain_refuses_writes(db):
    with pytest.raises(ForbiddenStatement):
        db.explain("DELETE FROM logs")


def test_store_unchanged_after_refusals(db):
    rows = db.sql("SELECT count(*) FROM logs").fetchall()[0][0]
    assert rows == len(RUNS) * (4 * 3 + 4)
    assert db.sql("SELECT count(*) FROM runs").fetchall() == [(len(RUNS),)]


@pytest.mark.parametrize(
    "sql, sqlstate",
    [
        ("SELECT getenv('HOME')", "42501"),
        ("SELECT * FROM read_csv('x.csv')", "42501"),
        ("SELECT * FROM 'x.csv'", "42501"),
        ("SELECT * FROM pg_ls_dir('.')", "42501"),
        ("SELECT sqlite_attach('x')", "42501"),
        ("SELECT * FROM glob('*')", "42501"),
        ("COPY logs TO 'x'", "25006"),
        ("INSERT INTO logs VALUES (1)", "25006"),
        ("SELECT * INTO t FROM logs", "25006"),
    ],
)
def test_one_guard_refuses_the_union_of_both_deny_lists(sql, sqlstate):
    """The guard the Python API and the wire server share: writes → 25006, files/environment → 42501."""
    with pytest.raises(ForbiddenStatement) as err:
        dialect.ensure_read_only(dialect.parse(sql)[0])
    assert err.value.sqlstate == sqlstate
    assert isinstance(err.value, ForbiddenAccess) == (sqlstate == "42501")


def test_bind_parameters_positional_and_numbered():
    # `?` are numbered in the order of the text (the tree keeps LIMIT before WHERE)
    bound = dialect.bind_parameters(
        dialect.parse("SELECT ? AS a FROM logs WHERE epoch > ? LIMIT ?")[0], ["x'y", -2.5, 3]
    )
    assert bound.sql("duckdb") == "SELECT 'x''y' AS a FROM logs WHERE epoch > CAST((-2.5) AS DOUBLE) LIMIT 3"
    numbered = dialect.bind_parameters(dialect.parse("SELECT $2, $1")[0], [True, b"\x01"])
    assert numbered.sql("duckdb") == "SELECT UNHEX('01'), TRUE"
    with pytest.raises(ParameterError, match=r"\$3") as err:
        dialect.bind_parameters(dialect.parse("SELECT $3")[0], [1, 2])
    assert err.value.sqlstate == "08P01"
    with pytest.raises(ParameterError, match="2nd"):
        dialect.bind_parameters(dialect.parse("SELECT ?, ?")[0], [1])


# ---- results and the cross-run views ------------------------------------------------------------------
def test_result_formats_agree(db):
    result = db.sql("SELECT epoch, step, loss, val_acc FROM run_2 WHERE epoch >= ? ORDER BY epoch, step", [2])
    table = result.arrow()
    assert isinstance(table, pa.Table)
    assert table.column_names == ["epoch", "step", "loss", "val_acc"]
    assert table.num_rows == 2 * 3
    rows = result.fetchall()
    assert rows == list(zip(*[c.to_pylist() for c in table.columns]))
    frame = result.df()
    assert list(frame.columns) == table.column_names
    assert frame.values.tolist() == [list(r) for r in rows]
    # val_acc is logged per epoch: repeated on each step of its epoch
    assert len({(r[0], r[3]) for r in rows}) == 2


def test_grain_follows_the_columns(db):
    assert db.sql("SELECT epoch, val_acc FROM run_1").arrow().num_rows == 4
    assert db.sql("SELECT epoch, step, loss FROM run_1").arrow().num_rows == 12
    assert db.sql("SELECT epoch, loss, val_acc FROM run_1").arrow().num_rows == 12


def test_params_bind_like_literals(db):
    a = db.sql("SELECT epoch, val_acc FROM run_3 WHERE epoch > ? AND epoch <= ? ORDER BY epoch", [0, 2]).arrow()
    b = db.sql("SELECT epoch, val_acc FROM run_3 WHERE epoch > 0 AND epoch <= 2 ORDER BY epoch").arrow()
    assert a.equals(b) and a.num_rows == 2


def test_metrics_best_val_acc_per_lr(db):
    best = db.sql(
        "SELECT r.lr, max(m.val_acc) AS best, arg_max(m.run_id, m.val_acc) AS best_run "
        "FROM metrics m JOIN runs r USING (run_id) GROUP BY r.lr ORDER BY r.lr"
    ).fetchall()
    # the same answer from the long-form logs, computed in Python
    logged = db.sql("SELECT run_id, value_float FROM logs WHERE name = 'val_acc' AND source = 'logged'").fetchall()
    lrs = dict(db.sql("SELECT run_id, lr FROM runs").fetchall())
    expected: dict[float, tuple[float, int]] = {}
    for run_id, value in logged:
        lr = lrs[run_id]
        if lr not in expected or value > expected[lr][0]:
            expected[lr] = (value, run_id)
    assert best == [(lr, v, r) for lr, (v, r) in sorted(expected.items())]
    assert [b[0] for b in best] == [0.1, 0.2]


def test_metrics_has_run_id_and_every_run(db):
    rows = db.sql("SELECT run_id, count(*) FROM metrics GROUP BY run_id ORDER BY run_id").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]


def test_logs_long_form(db):
    rows = db.sql("SELECT name, source, count(*) FROM logs WHERE run_id = 1 GROUP BY ALL ORDER BY name").fetchall()
    assert rows == [("loss", "logged", 12), ("val_acc", "logged", 4)]


def test_set_of_an_unknown_florql_value_is_an_error(db):
    with pytest.raises(FlorqlError):
        db.sql("SET replay = 'sometimes'")
    with pytest.raises(FlorqlError):
        db.sql("SET replay_budget = 'soon'")


def test_threads_opening_the_store_at_once_all_answer(db):
    """A fresh database instance has its configuration locked by the first query that opens it;
    threads racing to do that must all answer (a check-then-set race the many-clients server
    test ran into). Concurrent ingest is another matter: the store is synced first."""
    import threading

    home = db.location.home
    db.sync()

    def client(barrier: threading.Barrier, errors: list[BaseException]) -> None:
        conn = florql.connect(home, progress=False)
        barrier.wait(timeout=60)
        try:
            assert conn.sql("SELECT count(*) FROM runs").fetchall() == [(len(RUNS),)]
        except BaseException as err:  # reported below
            errors.append(err)

    for _ in range(10):  # each round opens a fresh instance: every connection closes between rounds
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=client, args=(barrier, errors)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:3]
