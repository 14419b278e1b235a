"""The whole query path under hypothesis-generated SQL: every error is a FlorqlError, nothing is written.

`Connection.sql(...)` and reading its result run parse → read-only guard → parameters → bind →
missing cells → plan → rewrite → DuckDB on a real store (two runs whose current code can log a
name they never logged, so the hindsight binder and planner take part). Whatever the SQL, the
caller gets rows or a `FlorqlError` subclass with a SQLSTATE (an error that wraps another keeps it
as `__cause__`), and the run files, the DuckDB tables and the working folder stay as they were.
Replay is off (`replay='never'`): a replay would write run files, legitimately.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import florql
from florql.errors import FlorqlError
from florql.storage.database import open_store

SCRIPTS = Path(__file__).resolve().parent / "hindsight_scripts"
TABLES = [
    "run_1",
    "run_2",
    "run_9",
    "metrics",
    "logs",
    "runs",
    "checkpoints",
    "iterations",
    "replay_jobs",
    "replay_coverage",
    "run_args",
    "nope",
    "'secret.csv'",
    '"secret.csv"',
    "read_csv('secret.csv')",
    "range(3)",
    "pg_catalog.pg_class",
    "information_schema.tables",
    "duckdb_settings()",
    "(SELECT 1 AS a)",
]
COLUMNS = [
    "*",
    "epoch",
    "step",
    "loss",
    "val_acc",
    "grad_norm",
    "run_id",
    "name",
    "value_float",
    "seq",
    "lr",
    "status",
    "manifest",
    "missing_col",
    "t.epoch",
    "rowid",
]
LITERALS = [
    "0",
    "1",
    "-1",
    "2.5",
    "1e308",
    "-9223372036854775808",
    "99999999999999999999999",
    "NULL",
    "TRUE",
    "'x'",
    "'it''s'",
    "''",
    "'2024-01-01'",
    "?",
    "$1",
    "$2",
    ":name",
    "[1, 2]",
    "{'a': 1}",
    "INTERVAL 1 DAY",
]
FUNCTIONS = [
    "avg",
    "sum",
    "count",
    "max",
    "abs",
    "sqrt",
    "ln",
    "exp",
    "lower",
    "length",
    "getenv",
    "read_text",
    "current_setting",
    "nextval",
    "setseed",
    "random",
    "list_value",
    "unnest",
    "to_timestamp",
    "epoch_ms",
    "regexp_matches",
    "error",
    "query",
    "range",
    "pg_sleep",
    "json_extract",
]
KEYWORDS = [
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP BY",
    "ORDER BY",
    "LIMIT",
    "OFFSET",
    "HAVING",
    "JOIN",
    "USING",
    "ON",
    "UNION",
    "ALL",
    "WITH",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "BETWEEN",
    "IS",
    "CASE",
    "WHEN",
    "THEN",
    "END",
    "CAST",
    "::",
    "(",
    ")",
    ",",
    ";",
    "*",
    "/",
    "+",
    "-",
    "=",
    "<",
    ">=",
    "||",
    "INSERT INTO",
    "VALUES",
    "DELETE",
    "UPDATE",
    "SET",
    "DROP TABLE",
    "CREATE TABLE",
    "ATTACH",
    "COPY",
    "TO",
    "PRAGMA",
    "EXPORT DATABASE",
    "INSTALL",
    "LOAD",
    "CALL",
    "DESCRIBE",
    "SUMMARIZE",
    "EXPLAIN",
    "SHOW",
    "USE",
    "replay",
    "replay_budget",
    "workers",
    "threads",
    "'never'",
    "'10 min'",
    "'lots'",
    "--",
    "/*",
    "*/",
    '"',
    "'",
    "$$",
    "\\",
]


@st.composite
def expressions(draw, depth: int = 0) -> str:
    kind = draw(st.integers(0, 6 if depth < 3 else 1))
    if kind == 0:
        return draw(st.sampled_from(COLUMNS[1:]))
    if kind == 1:
        return draw(st.sampled_from(LITERALS))
    left, right = draw(expressions(depth + 1)), draw(expressions(depth + 1))
    if kind == 2:
        return f"{left} {draw(st.sampled_from(['+', '-', '*', '/', '%', '//', '=', '<', '>=', '<>', 'AND', 'OR', '||', 'LIKE', 'IS DISTINCT FROM']))} {right}"
    if kind == 3:
        args = ", ".join(draw(st.lists(expressions(depth + 1), max_size=3)))
        return f"{draw(st.sampled_from(FUNCTIONS))}({args})"
    if kind == 4:
        return f"CAST({left} AS {draw(st.sampled_from(['INTEGER', 'BIGINT', 'DOUBLE', 'DATE', 'VARCHAR', 'BOOLEAN', 'HUGEINT', 'UTINYINT', 'INTEGER[]', 'STRUCT(a INT)', 'BLOB']))})"
    if kind == 5:
        return f"CASE WHEN {left} THEN {right} ELSE {draw(expressions(depth + 1))} END"
    return f"({left}) {draw(st.sampled_from(['IN', 'NOT IN']))} (SELECT {right} FROM {draw(st.sampled_from(TABLES))})"


@st.composite
def selects(draw) -> str:
    items = draw(st.lists(st.one_of(st.sampled_from(COLUMNS), expressions()), min_size=1, max_size=4))
    sql = f"SELECT {', '.join(items)} FROM {draw(st.sampled_from(TABLES))} t"
    if draw(st.booleans()):
        sql += f" JOIN {draw(st.sampled_from(TABLES))} u USING ({draw(st.sampled_from(['run_id', 'epoch', 'x']))})"
    if draw(st.booleans()):
        sql += f" WHERE {draw(expressions())}"
    if draw(st.booleans()):
        sql += f" GROUP BY {draw(st.sampled_from(['ALL', 'epoch', '1', 'name', 'nope']))}"
    if draw(st.booleans()):
        sql += f" ORDER BY {draw(st.sampled_from(['ALL', '1', 'epoch DESC', 'nope', '9']))}"
    if draw(st.booleans()):
        sql += f" LIMIT {draw(st.sampled_from(['0', '3', '-1', 'NULL', '?', '1e3', 'epoch']))}"
    if draw(st.booleans()):
        sql = f"WITH {draw(st.sampled_from(['run_1', 'q', 'metrics']))} AS ({sql}) SELECT * FROM q"
    return sql


def mutated(sql: str) -> st.SearchStrategy[str]:
    """`sql` with a few characters deleted, replaced or inserted."""

    @st.composite
    def mutate(draw) -> str:
        text = sql
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            edit = draw(st.sampled_from(["delete", "insert", "replace"]))
            piece = draw(
                st.sampled_from(["(", ")", "'", '"', ",", ";", " ", "*", "-", "0", "x", "FROM", "?", "\x00", "é"])
            )
            if edit == "delete":
                text = text[:at] + text[at + draw(st.integers(1, 5)) :]
            elif edit == "insert":
                text = text[:at] + piece + text[at:]
            else:
                text = text[:at] + piece + text[at + 1 :]
        return text

    return mutate()


SQL = st.one_of(
    selects(),
    selects().flatmap(mutated),
    st.lists(st.sampled_from(KEYWORDS + TABLES + COLUMNS + LITERALS + FUNCTIONS), max_size=12).map(" ".join),
    st.text(max_size=40),
    st.sampled_from(
        [
            "SET workers = 'many'",
            "SET replay_budget = -1",
            "SET replay = never",
            "SET threads = 1",
            "SELECT 1; DROP TABLE logs",
            "SELECT grad_norm FROM run_1",
            "SELECT * FROM metrics WHERE run_id = 2",
            "EXPLAIN SELECT 1",
            "SELECT 1/0",
            "SELECT 'a'::INTEGER",
            "SELECT epoch FROM run_1 WHERE epoch = 'x'",
            "SELECT error('boom')",
            "SELECT CAST(99999999999 AS INTEGER)",
            "SELECT [1][5]",
            "SELECT repeat('x', -1)",
            "SELECT (SELECT 1 UNION ALL SELECT 2)",
        ]
    ),
)
PARAMS = st.one_of(
    st.none(),
    st.lists(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(),
            st.text(max_size=10),
            st.binary(max_size=4),
            st.lists(st.integers(), max_size=2),
            st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
            st.builds(object),
        ),
        max_size=3,
    ),
)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("fuzz")
    home = work / ".florql"
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS")}
    env["FLORQL_HOME"] = str(home)
    source = (SCRIPTS / "tiny.py").read_text()
    (work / "train.py").write_text(source)
    for seed in (0, 1):
        subprocess.run(
            [sys.executable, "train.py", "--florql-args", f"seed={seed}"],
            cwd=work,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    anchor = '        florql.log("loss",'
    (work / "train.py").write_text(source.replace(anchor, '        florql.log("grad_norm", 0.5 * step)\n' + anchor))
    (work / "secret.csv").write_text("secret\nTOP-SECRET-VALUE\n")
    conn = florql.connect(home, workers=1, progress=False, replay="never")
    conn.sync()
    conn.work = work
    conn.initial = _state(conn)
    yield conn
    conn.close()


def _state(db) -> tuple:
    """Everything a query could write: run files, DuckDB tables, the working folder."""
    with open_store(db.location.db_path) as conn:
        tables = {
            name: conn.execute(f"SELECT count(*), sum(hash(COLUMNS(*))) FROM {name}").fetchall()
            for (name,) in conn.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()
        }
        # DuckDB re-serializes a view's SQL when it reopens the file, listing an EXCLUDE set in any order
        views = [
            (name, re.sub(r"EXCLUDE \(([^)]*)\)", lambda m: "EXCLUDE " + ",".join(sorted(m.group(1).split(", "))), sql))
            for name, sql in conn.execute(
                "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal ORDER BY 1"
            ).fetchall()
        ]
    work = sorted(str(p.relative_to(db.work)) for p in db.work.rglob("*") if not p.name.startswith("florql.duckdb"))
    return tables, views, db.files.list("runs"), db.files.list("code"), work


@settings(max_examples=200)
@given(sql=SQL, params=PARAMS)
def test_any_sql_gives_rows_or_a_florql_error_and_writes_nothing(db, sql, params):
    before = db.files.list("runs")
    settings_before = dict(db.settings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            db.sql(sql, params).fetchall()
    except FlorqlError as err:
        assert isinstance(err.sqlstate, str) and len(err.sqlstate) == 5
        assert str(err)
    finally:
        db.settings.update(settings_before)  # a SET that succeeded must not steer later examples
        db._executor = None
    assert db.files.list("runs") == before


# ---- the same over the PostgreSQL wire -------------------------------------------------------------
@pytest.fixture(scope="module")
def wire(db):
    """One client session of a real server over the fuzzed store: errors must leave it usable."""
    psycopg = pytest.importorskip("psycopg")
    from florql.server import BackgroundServer, Server

    home = db.location.home
    server = Server(lambda: florql.connect(home, workers=1, progress=False, replay="never"), port=0)
    with BackgroundServer(server) as running:
        dsn = f"host=127.0.0.1 port={running.port} dbname=florql user=florql connect_timeout=10"
        with psycopg.connect(dsn, autocommit=True) as conn:
            yield conn


@settings(max_examples=60)
@given(sql=SQL)
def test_any_sql_over_the_wire_gets_rows_or_an_error_response_with_its_sqlstate(db, wire, sql):
    import psycopg

    before = db.files.list("runs")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cursor = wire.execute(sql.replace("\x00", " "), prepare=False)
            while True:  # every statement's rows
                if cursor.description is not None:
                    cursor.fetchall()
                if not cursor.nextset():
                    break
    except psycopg.errors.ProgrammingError as err:
        if err.sqlstate is not None:
            assert not str(err).startswith("internal error"), err
        # else refused by the client library itself (e.g. a %-placeholder): not the server's doing
    except psycopg.Error as err:
        assert err.sqlstate and len(err.sqlstate) == 5, err
        assert not str(err).startswith("internal error"), err  # the server's word for a bug
    assert wire.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    assert db.files.list("runs") == before


def test_the_fuzzed_store_is_unchanged(db):
    """After every fuzzed query of this module (same store): tables, views and files as recorded."""
    assert _state(db) == db.initial
    assert db.sql("SELECT count(*) FROM logs").fetchall() == [(2 * 16,)]
