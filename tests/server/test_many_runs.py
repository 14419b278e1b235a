"""A store of 200 runs through a real `florql serve` and psycopg: BI tools' catalog queries list
every run table with its columns, and a cross-run query over `metrics` answers exactly."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from serve_process import start_server, stop_server

from florql.storage.layout import locate_store
from store_support import write_synthetic_run

RUN_TABLE = re.compile(r"run_\d+")
RUNS = 200
EPOCHS, STEPS = 2, 3

# What psql's \dt sends (PostgreSQL 16), and what SQLAlchemy's inspector reads for a table's columns.
PSQL_DT = """
SELECT n.nspname as "Schema", c.relname as "Name",
  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
  WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table'
  WHEN 'p' THEN 'partitioned table' WHEN 'I' THEN 'partitioned index' END as "Type",
  pg_catalog.pg_get_userbyid(c.relowner) as "Owner"
FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r','p','')
  AND n.nspname <> 'pg_catalog' AND n.nspname !~ '^pg_toast' AND n.nspname <> 'information_schema'
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 1,2
"""
COLUMNS = """
SELECT c.relname, a.attname FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY c.relname, a.attnum
"""


@pytest.fixture(scope="module")
def many_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, list[float]]]]:
    home = tmp_path_factory.mktemp("many") / "store"
    files = locate_store(home).run_files()
    logged = {run_id: write_synthetic_run(files, run_id, EPOCHS, STEPS) for run_id in range(1, RUNS + 1)}
    return home, logged


@pytest.fixture(scope="module")
def server(many_runs: tuple[Path, dict]) -> Iterator[int]:
    home, _ = many_runs
    proc, port = start_server(home, env={**os.environ, "FLORQL_QUIET": "1"})
    try:
        yield port
    finally:
        stop_server(proc)


def connect(port: int) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user="analyst", dbname="florql", autocommit=True)


def test_psql_and_the_column_catalog_list_every_run_table(server: int):
    with connect(server) as conn:
        listed = [row[1] for row in conn.execute(PSQL_DT).fetchall()]
        assert [n for n in listed if RUN_TABLE.fullmatch(n)] == sorted(f"run_{r}" for r in range(1, RUNS + 1))
        assert {"runs", "logs", "metrics"} <= set(listed)
        columns: dict[str, list[str]] = {}
        for table, column in conn.execute(COLUMNS).fetchall():
            if RUN_TABLE.fullmatch(table):
                columns.setdefault(table, []).append(column)
        assert len(columns) == RUNS
        assert all(cols == ["epoch", "step", "loss", "acc"] for cols in columns.values()), columns["run_1"]
        tables = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        assert sum(1 for (name,) in tables.fetchall() if RUN_TABLE.fullmatch(name)) == RUNS


def test_a_cross_run_query_over_metrics_answers_exactly(
    server: int, many_runs: tuple[Path, dict[int, dict[str, list[float]]]]
):
    _, logged = many_runs
    with connect(server) as conn:
        rows = conn.execute(
            "SELECT run_id, count(*), max(loss), min(loss), max(acc) FROM metrics GROUP BY run_id ORDER BY run_id"
        ).fetchall()
        expected = [
            (r, EPOCHS * STEPS, max(v["loss"]), min(v["loss"]), max(v["acc"])) for r, v in sorted(logged.items())
        ]
        assert rows == expected  # bit for bit: max and min are exact
        best = conn.execute("SELECT run_id FROM metrics WHERE epoch = 1 ORDER BY acc DESC LIMIT 1").fetchall()
        assert best == [(max(logged, key=lambda r: logged[r]["acc"][1]),)]
        # Each run table answers on its own too, through the same server.
        assert conn.execute("SELECT loss FROM run_137 ORDER BY epoch, step").fetchall() == [
            (v,) for v in logged[137]["loss"]
        ]
