"""Throughput and latency of the PostgreSQL-wire server.

Rows per second of a large result read through psycopg (server-side cursor and
plain fetchall), against DuckDB's own Python API reading the same table in the same
run, as a ratio; and the latency of a small query. Run: python benchmarks/bench_server.py [--rows N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import duckdb
import psycopg

from florql.server import BackgroundServer, DuckDBBackend, Server


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    rows = fn()
    return time.perf_counter() - start, rows


def best_of(n: int, fn: Callable[[], int]) -> tuple[float, int]:
    return min((timed(fn) for _ in range(n)), key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    con = duckdb.connect()
    con.execute(
        f"CREATE TABLE run_1 AS SELECT i // 100 AS epoch, i % 100 AS step, 1.0 / (1 + i) AS loss, "
        f"0.5 + (i % 7) * 0.01::DOUBLE AS val_acc FROM range({args.rows}) t(i)"
    )
    query = "SELECT * FROM run_1"

    def duckdb_fetchall() -> int:
        return len(con.cursor().execute(query).fetchall())

    with BackgroundServer(Server(lambda: DuckDBBackend(con), port=0)) as running:
        dsn = f"host=127.0.0.1 port={running.port} user=florql dbname=florql"

        def psycopg_fetchall() -> int:
            with psycopg.connect(dsn, autocommit=True) as c:
                return len(c.execute(query).fetchall())

        def psycopg_server_cursor() -> int:
            with psycopg.connect(dsn) as c, c.cursor(name="bench") as cur:
                cur.itersize = 10_000
                cur.execute(query)
                return sum(1 for _ in cur)

        def psycopg_binary() -> int:
            with psycopg.connect(dsn, autocommit=True) as c:
                return len(c.execute(query, binary=True).fetchall())

        base_s, n = best_of(args.repeat, duckdb_fetchall)
        print(f"rows: {n:,}  (epoch int8, step int8, loss float8, val_acc float8)")
        print(f"DuckDB Python API fetchall:          {n / base_s:12,.0f} rows/s  ({base_s:.2f} s)")
        for label, fn in [
            ("psycopg fetchall (text)", psycopg_fetchall),
            ("psycopg fetchall (binary)", psycopg_binary),
            ("psycopg server-side cursor", psycopg_server_cursor),
        ]:
            seconds, rows = best_of(args.repeat, fn)
            assert rows == n
            print(
                f"{label + ':':36s} {rows / seconds:12,.0f} rows/s  ({seconds:.2f} s)  "
                f"ratio to DuckDB: {base_s / seconds:.2f}"
            )

        with psycopg.connect(dsn, autocommit=True) as c:
            small = "SELECT epoch, loss FROM run_1 WHERE epoch = %s AND step = %s"
            for _ in range(20):
                c.execute(small, (3, 4)).fetchall()
            latencies = [timed(lambda: len(c.execute(small, (3, 4)).fetchall()))[0] * 1000 for _ in range(300)]
            catalog = [
                timed(lambda: len(c.execute("SELECT relname FROM pg_class WHERE relkind = 'r'").fetchall()))[0] * 1000
                for _ in range(100)
            ]
        quantiles = statistics.quantiles(latencies, n=20)
        print(
            f"small query latency: median {statistics.median(latencies):.2f} ms, p95 {quantiles[-1]:.2f} ms "
            f"(DuckDB point query underneath: "
            f"{statistics.median(timed(lambda: len(con.cursor().execute('SELECT epoch, loss FROM run_1 WHERE epoch = 3 AND step = 4').fetchall()))[0] * 1000 for _ in range(100)):.2f} ms)"
        )
        print(f"catalog query latency: median {statistics.median(catalog):.2f} ms")


if __name__ == "__main__":
    main()
