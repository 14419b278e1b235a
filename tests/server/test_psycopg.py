"""psycopg 3: simple and parameterised queries, prepared statements, server-side cursors, types."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest


@pytest.fixture
def conn(server):
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        yield c


def test_simple_query(conn, store):
    rows = psycopg.ClientCursor(conn).execute(f"SELECT * FROM {store.run_table}").fetchall()
    assert len(rows) == store.rows


def test_parameterised_query(conn, store):
    rows = conn.execute(
        f"SELECT epoch, step FROM {store.run_table} WHERE epoch = %s AND step < %s ORDER BY step", (1, 3)
    ).fetchall()
    assert rows == [(1, 0), (1, 1), (1, 2)]


def test_parameter_types_round_trip(conn):
    row = conn.execute(
        "SELECT %s::text AS s, %s AS f, %s AS b, %s AS i, %s AS n", ("it's", 2.5, True, -7, None)
    ).fetchone()
    assert row == ("it's", 2.5, True, -7, None)


def test_binary_results(conn, store):
    text = conn.execute(f"SELECT * FROM {store.run_table} ORDER BY epoch, step").fetchall()
    binary = conn.execute(f"SELECT * FROM {store.run_table} ORDER BY epoch, step", binary=True).fetchall()
    assert text == binary


def test_server_side_prepared_statement(conn, store):
    query = f"SELECT count(*) FROM {store.run_table} WHERE epoch = %s"
    counts = [conn.execute(query, (epoch,), prepare=True).fetchone()[0] for epoch in (0, 1, 2, 0)]
    assert counts == [4, 4, 4, 4]
    prepared = conn.execute("SELECT 1").fetchone()
    assert prepared == (1,)


def test_multiple_statements_in_one_query(conn):
    cur = psycopg.ClientCursor(conn)
    cur.execute("SELECT 1 AS a; SELECT 2 AS b, 3 AS c")
    assert cur.fetchall() == [(1,)]
    assert cur.nextset() and cur.fetchall() == [(2, 3)]


def test_error_keeps_session_usable(conn):
    with pytest.raises(psycopg.errors.UndefinedTable) as err:
        conn.execute("SELECT * FROM no_such_table")
    assert err.value.sqlstate == "42P01"
    with pytest.raises(psycopg.errors.SyntaxError):
        conn.execute("SELEC 1")
    assert conn.execute("SELECT 42").fetchone() == (42,)


def test_text_output_formats(conn):
    """float8 as PostgreSQL prints it (shortest round-trip), bool as t/f, int8 in full."""
    values = ["0.1", "1e-05", "1e+20", "123456789012.5", "1e+15", "100", "-0.25", "0.30000000000000004"]
    columns = ", ".join(f"CAST('{v}' AS DOUBLE PRECISION)" for v in values)
    raw = conn.pgconn.exec_(f"SELECT {columns}, true, false, 12345678901234".encode())
    got = [raw.get_value(0, i).decode() for i in range(raw.nfields)]
    assert got == values + ["t", "f", "12345678901234"]


def test_show_and_set(conn):
    assert conn.execute("SHOW transaction isolation level").fetchone() == ("read committed",)
    assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
    conn.execute("SET application_name = 'dashboard'")
    assert conn.info.parameter_status("application_name") == "dashboard"
    assert conn.execute("SHOW application_name").fetchone() == ("dashboard",)
    conn.execute('SET search_path = "public"')
    assert conn.execute("SELECT current_schema()").fetchone() == ("public",)
    assert conn.info.parameter_status("server_version").startswith("15.")
    assert conn.info.parameter_status("integer_datetimes") == "on"


def test_transaction_status(server):
    with psycopg.connect(server.dsn()) as c:  # not autocommit: BEGIN ... ROLLBACK like psycopg2/Superset
        c.execute("SELECT 1")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        with pytest.raises(psycopg.errors.UndefinedTable):
            c.execute("SELECT * FROM nope")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        c.rollback()
        assert c.execute("SELECT 2").fetchone() == (2,)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_million_rows_stream_with_bounded_memory(server):
    """A 1M-row result (~110 MB as text) through a server-side cursor; memory stays flat."""
    query = "SELECT i, i * 0.5 AS x, repeat('x', 100) AS pad FROM generate_series(1, 1000000) AS t(i)"
    peak, stop = [_rss_bytes()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(_rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    with psycopg.connect(server.dsn()) as c, c.cursor(name="big") as cur:
        cur.itersize = 20_000
        base = _rss_bytes()
        sampler.start()
        cur.execute(query)
        count, last = 0, None
        for row in cur:
            count, last = count + 1, row
        stop.set()
        sampler.join()
    assert count == 1_000_000 and last[0] == 1_000_000
    assert max(peak) - base < 80 * 2**20, f"memory grew by {(max(peak) - base) / 2**20:.0f} MiB"


def test_many_clients_at_once(server, store):
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with psycopg.connect(server.dsn(), autocommit=True) as c:
                for _ in range(5):
                    n = c.execute(f"SELECT count(*) FROM {store.run_table} WHERE step >= %s", (i % 4,)).fetchone()[0]
                    assert n == 3 * (4 - i % 4)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]


def test_warnings_become_notices(store):
    from florql.server import BackgroundServer, Server

    class WarningBackend:
        def __init__(self, inner):
            self.inner, self.settings = inner, {}

        def sql(self, query, params=None, *, dialect="duckdb"):
            result = self.inner.sql(query, params, dialect=dialect)
            result.warnings = ["replay='never': 3 cells were not replayed"]
            return result

        def tables(self):
            return self.inner.tables()

    with BackgroundServer(Server(lambda: WarningBackend(store.factory()), port=0)) as running:
        with psycopg.connect(f"host=127.0.0.1 port={running.port} user=florql dbname=florql", autocommit=True) as c:
            notices: list[str] = []
            c.add_notice_handler(lambda d: notices.append(d.message_primary))
            assert c.execute(f"SELECT count(*) FROM {store.run_table}").fetchone() == (store.rows,)
    assert notices == ["replay='never': 3 cells were not replayed"]


def test_a_serialization_failure_is_retried_before_the_client_hears(store):
    from florql.errors import StoreConflict
    from florql.server import BackgroundServer, Server

    class ConflictOnce:
        """Fails each statement's first attempt as a concurrent change to the store would."""

        def __init__(self, inner):
            self.inner, self.settings, self.failed = inner, {}, set()

        def sql(self, query, params=None, *, dialect="duckdb"):
            if query not in self.failed:
                self.failed.add(query)
                raise StoreConflict("the store changed under the query (TransactionException); try again")
            return self.inner.sql(query, params, dialect=dialect)

        def tables(self):
            return self.inner.tables()

    with BackgroundServer(Server(lambda: ConflictOnce(store.factory()), port=0)) as running:
        with psycopg.connect(f"host=127.0.0.1 port={running.port} user=florql dbname=florql", autocommit=True) as c:
            assert c.execute(f"SELECT count(*) FROM {store.run_table}").fetchone() == (store.rows,)


@pytest.mark.parametrize(
    "error, sqlstate",
    [
        ("TransactionException", "40001"),  # retried first, then reported as serialization_failure
        ("ConstraintException", "40001"),
        ("IOException", "58030"),
        ("OutOfMemoryException", "53200"),
        ("BinderException", "42703"),
    ],
)
def test_duckdb_errors_reach_clients_as_sqlstates_never_as_internal_errors(store, error, sqlstate):
    import duckdb

    from florql.server import BackgroundServer, Server

    class Failing:
        def __init__(self, inner):
            self.inner, self.settings, self.calls = inner, {}, 0

        def sql(self, query, params=None, *, dialect="duckdb"):
            self.calls += 1
            raise getattr(duckdb, error)(f"{error} raised by the test")

        def tables(self):
            return self.inner.tables()

    backends: list[Failing] = []

    def factory():
        backends.append(Failing(store.factory()))
        return backends[-1]

    with BackgroundServer(Server(factory, port=0)) as running:
        with psycopg.connect(f"host=127.0.0.1 port={running.port} user=florql dbname=florql", autocommit=True) as c:
            with pytest.raises(psycopg.Error) as caught:
                c.execute(f"SELECT count(*) FROM {store.run_table}")
    assert caught.value.sqlstate == sqlstate
    assert "internal error" not in str(caught.value)
    assert backends[-1].calls == (3 if sqlstate == "40001" else 1)
