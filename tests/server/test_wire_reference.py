"""Every statement real BI clients sent to PostgreSQL (shared/reference) succeeds over both protocols."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "pg_client_catalog_queries.txt"
REFERENCE_OID = "16391"  # run_1's oid on the PostgreSQL the reference was captured from


def reference_statements() -> list[str]:
    if not REFERENCE.exists():
        return []
    text = re.sub(r"^(#|-- x).*$", "", REFERENCE.read_text(), flags=re.M)
    return [s.strip() for s in re.split(r";\s*\n", text) if s.strip()]


STATEMENTS = reference_statements()
pytestmark = pytest.mark.skipif(not STATEMENTS, reason=f"reference file {REFERENCE} not found")


def adapt(statement: str, oid: int, run_table: str) -> str:
    """The reference fixture logged epoch_loss into run_1; ours logs loss into run_table."""
    statement = statement.replace(REFERENCE_OID, str(oid)).replace("epoch_loss", "loss")
    return re.sub(r"\brun_1\b", run_table, statement)


@pytest.fixture(scope="module")
def run_oid(server, store) -> int:
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        return c.execute(f"SELECT '{store.run_table}'::regclass::oid").fetchone()[0]


@pytest.mark.parametrize("protocol", ["extended", "simple"])
def test_reference_statements(server, store, run_oid, protocol):
    failures = []
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        cursor = c.cursor() if protocol == "extended" else psycopg.ClientCursor(c)
        for statement in STATEMENTS:
            sql = adapt(statement, run_oid, store.run_table).replace("%", "%%")
            params = (1,) if "$1" in sql else None
            if params:
                sql = sql.replace("$1", "%s")
            try:
                cursor.execute(sql, params)
                if cursor.description:
                    cursor.fetchall()
            except psycopg.Error as e:
                failures.append(f"{sql[:120]!r}: {e}")
                c.rollback() if not c.autocommit else None
    assert not failures, "\n".join(failures)


def test_reference_answers(server, store, run_oid):
    """Spot-check the answers, not just the absence of errors."""
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        tables = c.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind in ('r', 'p', 'v')"
        ).fetchall()
        assert {("runs",), (store.run_table,)} <= set(tables)
        assert c.execute("SELECT setting FROM pg_catalog.pg_settings WHERE name='max_index_keys'").fetchone() == ("32",)
        version = c.execute("select pg_catalog.version()").fetchone()[0]
        assert version.startswith("PostgreSQL 15.")
        columns = c.execute(
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_catalog.pg_attribute a "
            f"WHERE a.attrelid = {run_oid} AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        ).fetchall()
        assert ("loss", "double precision", False) in columns
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] > 0
        assert c.execute("SELECT current_database(), current_user").fetchone() == ("florql", "florql")
        info = c.execute(
            "SELECT data_type FROM information_schema.columns "
            f"WHERE table_name = '{store.run_table}' AND column_name = 'loss'"
        ).fetchone()
        assert info == ("double precision",)
