"""psql, Debian's postgresql-client, against the server."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql (postgresql-client) is not installed")


def psql(server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", server.dsn(), "-X", "-v", "ON_ERROR_STOP=0", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_query(server, store):
    out = psql(server, "-A", "-t", "-c", f"SELECT count(*) FROM {store.run_table}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(store.rows)


def test_list_tables(server, store):
    out = psql(server, "-c", r"\dt")
    assert out.returncode == 0, out.stderr
    assert "List of relations" in out.stdout and " runs " in out.stdout


def test_describe_run_table(server, store):
    out = psql(server, "-c", rf"\d {store.run_table}")
    assert out.returncode == 0, out.stderr
    assert f'"public.{store.run_table}"' in out.stdout
    assert "loss" in out.stdout and "double precision" in out.stdout


def test_list_databases(server):
    out = psql(server, "-c", r"\l")
    assert out.returncode == 0, out.stderr
    assert "florql" in out.stdout and "UTF8" in out.stdout


def test_error_then_query_on_same_connection(server, store):
    script = "SELECT * FROM no_such_table;\nSELECT 40 + 2 AS answer;\n\\dt\n"
    out = psql(server, "-A", "-t", stdin=script)
    assert "ERROR" in out.stderr and "no_such_table" in out.stderr
    assert "42" in out.stdout.split() and "runs" in out.stdout


def test_error_inside_transaction_then_rollback(server):
    script = "BEGIN;\nSELECT * FROM missing;\nSELECT 1;\nROLLBACK;\nSELECT 7;\n"
    out = psql(server, "-A", "-t", stdin=script)
    assert "current transaction is aborted" in out.stderr
    assert out.stdout.split()[-1] == "7"


def test_a_server_without_a_served_store_lists_no_server_tables(server):
    """`florql_activity` and `florql_replay_accounting` exist only under `florql serve` (test_shared_server)."""
    listed = psql(server, "-c", r"\dt")
    assert listed.returncode == 0, listed.stderr
    assert "florql_activity" not in listed.stdout
