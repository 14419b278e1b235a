r"""The log store against plain DuckDB on the same data: queries, ingest, bytes per value.

Builds a store holding one large run (epochs x steps x 5 names, written as a trainer writes it: a
segment per epoch) plus `--runs` small ones, and a hand-built DuckDB file holding the same values in
wide tables (`run_1`, and `metrics` with every run). Then, side by side and interleaved (medians
after a warm-up): each query through `florql.connect().sql()`, through `florql serve` + psycopg
(a server process on a local port), and on the hand-built tables; the time BI tools take to list
the tables (psql's \dt, every column from pg_attribute); the first query's ingest in values/s;
bytes per value of the run files and of florql's DuckDB file.

    python benchmarks/bench_store.py                       # 100 x 20,000 x 5 = 10M values, 200 small runs
    python benchmarks/bench_store.py --epochs 10 --runs 20 # smaller
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import psycopg
import pyarrow as pa

import florql
from florql.storage import layout, segment_codec
from florql.storage.layout import locate_store
from florql.storage.manifest import Manifest
from florql.storage.runfiles import RunFiles

NAMES = ("loss", "acc", "gn", "lr", "tok")  # tok is an int, the rest floats
QUERIES = [
    "SELECT epoch, avg(loss), max(gn) FROM run_1 GROUP BY epoch ORDER BY epoch",
    "SELECT step, loss, acc FROM run_1 WHERE epoch = {last} AND step < 5 ORDER BY step",
    "SELECT count(*) FROM run_1",
    "SELECT avg(acc) FROM run_1 WHERE epoch > {late} AND tok % 2 = 0",
    "SELECT run_id, max(acc), avg(loss) FROM metrics GROUP BY run_id ORDER BY run_id",
]


# What BI tools send to list tables: psql's \dt, and every table's columns (pgJDBC, SQLAlchemy).
LISTINGS = {
    "psql \\dt": "SELECT n.nspname, c.relname, CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' END, "
    "pg_catalog.pg_get_userbyid(c.relowner) FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n "
    "ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p','') AND n.nspname <> 'pg_catalog' "
    "AND n.nspname !~ '^pg_toast' AND n.nspname <> 'information_schema' AND pg_catalog.pg_table_is_visible(c.oid) "
    "ORDER BY 1,2",
    "columns of every table": "SELECT c.relname, a.attname, a.atttypid FROM pg_catalog.pg_attribute a "
    "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped ORDER BY c.relname, a.attnum",
}


def epoch_records(epoch: int, steps: int, rng: np.random.Generator) -> tuple[list[tuple], dict]:
    """One epoch's records in the order a training loop logs them (per step, the five names, one
    position tuple per step as `florql.log` shares it)."""
    n = steps * len(NAMES)
    floats = rng.random(n)
    ints = rng.integers(0, 50_000, n)
    tok = NAMES.index("tok")
    positions = [("epoch/step", epoch, step) for step in range(steps)]
    values = [int(ints[i]) if i % len(NAMES) == tok else float(floats[i]) for i in range(n)]
    records = [(NAMES[i % len(NAMES)], values[i], positions[i // len(NAMES)]) for i in range(n)]
    wide = {"epoch": np.full(steps, epoch, np.int64), "step": np.arange(steps, dtype=np.int64)}
    for k, name in enumerate(NAMES):
        wide[name] = (ints if name == "tok" else floats)[k :: len(NAMES)]
    return records, wide


def write_run(files: RunFiles, run_id: int, epochs: int, steps: int, rng: np.random.Generator) -> pa.Table:
    """A finished run's manifest and segments; returns its values as a wide table."""
    now = time.time()
    manifest = Manifest(run_id=run_id, status="finished", started_at=now, ended_at=now, heartbeat_at=now)
    manifest.update(outer_loop="epoch", outer_planned=epochs, outer_completed=epochs, iteration_s=[1.0] * epochs)
    wides = []
    for epoch in range(epochs):
        records, wide = epoch_records(epoch, steps, rng)
        path = layout.segment_path(run_id, layout.MAIN_WRITER, epoch)
        segment_codec.write_segment(files, path, epoch * steps * len(NAMES), records, {})
        wides.append(pa.table({"run_id": pa.array(np.full(steps, run_id, np.int32)), **wide}))
    files.put(layout.manifest_path(run_id), manifest.to_json().encode())
    return pa.concat_tables(wides)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def same(rows: list[tuple], expected: list[tuple]) -> bool:
    return len(rows) == len(expected) and all(
        len(r) == len(e) and all(a == b or math.isclose(a, b, rel_tol=1e-9) for a, b in zip(r, e))
        for r, e in zip(rows, expected)
    )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@contextmanager
def served(home: Path) -> Iterator[psycopg.Connection]:
    """`florql serve` on the store, as a separate process on a free local port, and a psycopg connection to it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "florql.cli", "serve", "--store", str(home), "--port", str(port)],
        env={**os.environ, "FLORQL_QUIET": "1"},
    )
    try:
        while True:
            assert server.poll() is None, "florql serve exited"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        with psycopg.connect(host="127.0.0.1", port=port, user="bench", dbname="florql", autocommit=True) as conn:
            yield conn
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def cli_runs_time(home: Path) -> tuple[float, float]:
    """`florql runs` against importing duckdb, pyarrow and sqlglot alone, each a fresh process.

    `florql runs` runs as installed (the console script); a first run compiles florql's modules to
    bytecode even where PYTHONDONTWRITEBYTECODE is set, as a user's install would have them.
    """
    env = {**os.environ, "FLORQL_HOME": str(home)}
    script = Path(sys.executable).with_name("florql")
    runs = [str(script), "runs"] if script.exists() else [sys.executable, "-m", "florql.cli", "runs"]
    compiling = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(runs, env=compiling, check=True, capture_output=True)
    imports = [sys.executable, "-c", "import duckdb, pyarrow, sqlglot"]
    pairs = [
        (
            timed(lambda: subprocess.run(runs, env=env, check=True, capture_output=True)),
            timed(lambda: subprocess.run(imports, check=True, capture_output=True)),
        )
        for _ in range(5)
    ]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def ingest_alone(work: Path, run_dir: Path, wide: pa.Table, name: str = "alone") -> tuple[float, float, int]:
    """One run's ingest into a fresh store, against DuckDB loading the same values from Arrow into a
    wide table of a fresh file; returns (florql s, DuckDB s, florql's DuckDB file bytes)."""
    home = work / name
    shutil.copytree(run_dir, home / "runs" / run_dir.name)
    db = florql.connect(home)
    ours = timed(db.sync)
    db.close()
    plain = duckdb.connect(str(work / f"{name}-plain.duckdb"))
    plain.register("_wide", wide)
    theirs = timed(lambda: (plain.execute("CREATE TABLE run_1 AS SELECT * FROM _wide"), plain.execute("CHECKPOINT")))
    plain.close()
    return ours, theirs, os.path.getsize(locate_store(home).db_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=200, help="small runs besides the large one")
    parser.add_argument("--small-steps", type=int, default=1_000, help="steps per epoch of a small run (20 epochs)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ingest-only", action="store_true", help="only the large run's ingest, --repeat times")
    opts = parser.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="florql-bench-store-"))
    home = work / "store"
    files = locate_store(home).run_files()
    print(f"building the store in {work} ...", file=sys.stderr)
    wide = [write_run(files, 1, opts.epochs, opts.steps, rng)]
    big_values = opts.epochs * opts.steps * len(NAMES)
    big_run_bytes = dir_bytes(home / "runs" / "1")
    alone_s, alone_duckdb_s, alone_bytes = ingest_alone(work, home / "runs" / "1", wide[0])
    if opts.ingest_only:
        ingests = [(alone_s, alone_duckdb_s)]
        ingests += [ingest_alone(work, home / "runs" / "1", wide[0], f"alone-{k}")[:2] for k in range(opts.repeat - 1)]
        for k, (ours, theirs) in enumerate(ingests):
            print(
                f"ingest {k + 1} of run_1 ({big_values:,} values): {big_values / ours / 1e6:.2f}M values/s ({ours:.2f} s); "
                f"DuckDB loading a wide table: {big_values / theirs / 1e6:.2f}M values/s ({theirs:.2f} s)"
            )
        return
    wide += [write_run(files, 2 + k, 20, opts.small_steps, rng) for k in range(opts.runs)]
    values = big_values + opts.runs * 20 * opts.small_steps * len(NAMES)

    plain = duckdb.connect(str(work / "plain.duckdb"))
    plain.register("_wide", pa.concat_tables(wide))
    plain.execute("CREATE TABLE metrics AS SELECT * FROM _wide")
    plain.execute("CREATE TABLE run_1 AS SELECT * EXCLUDE (run_id) FROM metrics WHERE run_id = 1")
    plain.unregister("_wide")
    plain.execute("CHECKPOINT")

    db = florql.connect(home)
    ingest_s = timed(db.sync)
    db.close()
    db_bytes = os.path.getsize(locate_store(home).db_path)

    queries = [q.format(last=opts.epochs - 1, late=int(opts.epochs * 0.9)) for q in QUERIES]
    times: dict[str, list[tuple[float, float]]] = {q: [] for q in queries}
    for round_ in range(opts.repeat + 1):
        for q in queries:
            ours = timed(lambda q=q: db.sql(q).arrow())
            theirs = timed(lambda q=q: plain.sql(q).to_arrow_table())
            if round_:  # the first round warms both up
                times[q].append((ours, theirs))
        for q in queries:  # the same answers (float sums may differ in the last bits: summation order)
            assert same(db.sql(q).fetchall(), plain.sql(q).fetchall()), q
    db.close()  # the server's process takes the store's file

    wire: dict[str, list[tuple[float, float]]] = {q: [] for q in queries}
    listing: dict[str, list[float]] = {name: [] for name in LISTINGS}
    with served(home) as conn:
        for round_ in range(opts.repeat + 1):
            for q in queries:
                ours = timed(lambda q=q: conn.execute(q).fetchall())
                theirs = timed(lambda q=q: plain.sql(q).fetchall())
                if round_:
                    wire[q].append((ours, theirs))
            for name, sql in LISTINGS.items():
                seconds = timed(lambda sql=sql: conn.execute(sql).fetchall())
                if round_:
                    listing[name].append(seconds)
        for q in queries:
            assert same(conn.execute(q).fetchall(), plain.sql(q).fetchall()), q
        tables = len(conn.execute(LISTINGS["psql \\dt"]).fetchall())
    runs_s, import_s = cli_runs_time(home)

    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, DuckDB {duckdb.__version__}, pyarrow {pa.__version__}"
    )
    print(
        f"run_1: {opts.epochs} epochs x {opts.steps} steps x {len(NAMES)} names = {big_values:,} values; "
        f"{opts.runs} more runs of 20 x {opts.small_steps} x {len(NAMES)}; {values:,} values in all\n"
    )
    print(
        "| query | florql.connect().sql() ms | florql serve + psycopg ms | DuckDB wide table ms | target (2x + 20 ms) |"
    )
    print("|---|---|---|---|---|")
    for q in queries:
        ours = statistics.median(t[0] for t in times[q]) * 1e3
        served_ms = statistics.median(t[0] for t in wire[q]) * 1e3
        theirs = statistics.median(t[1] for t in times[q] + wire[q]) * 1e3
        verdict = "/".join("met" if t <= 2 * theirs + 20 else "missed" for t in (ours, served_ms))
        print(f"| `{q}` | {ours:.1f} | {served_ms:.1f} | {theirs:.1f} | {verdict} |")
    for name, seconds in listing.items():
        print(
            f"\nlisting through the server ({tables} tables), {name}: {statistics.median(seconds) * 1e3:.0f} ms", end=""
        )
    print()
    print(
        f"\ningest of run_1 alone: {big_values / alone_s / 1e6:.2f}M values/s ({alone_s:.2f} s); DuckDB loading the "
        f"same values from Arrow into a wide table: {big_values / alone_duckdb_s / 1e6:.2f}M values/s "
        f"({alone_duckdb_s:.2f} s; florql takes {alone_s / alone_duckdb_s:.1f}x as long)"
    )
    print(f"ingest (first query, all runs): {values / ingest_s / 1e6:.2f}M values/s ({ingest_s:.2f} s)")
    print(f"run files of run_1: {big_run_bytes / big_values:.1f} bytes/value ({big_run_bytes / 1e6:.0f} MB)")
    print(f"florql's DuckDB file, run_1 alone: {alone_bytes / big_values:.1f} bytes/value ({alone_bytes / 1e6:.0f} MB)")
    print(
        f"florql's DuckDB file: {db_bytes / values:.1f} bytes/value ({db_bytes / 1e6:.0f} MB); "
        f"hand-built wide tables: {os.path.getsize(work / 'plain.duckdb') / values:.1f} bytes/value"
    )
    print(
        f"`florql runs`: {runs_s:.2f} s; importing duckdb+pyarrow+sqlglot: {import_s:.2f} s "
        f"(difference {runs_s - import_s:.2f} s)"
    )
    print(json.dumps({"work": str(work)}), file=sys.stderr)


if __name__ == "__main__":
    main()
