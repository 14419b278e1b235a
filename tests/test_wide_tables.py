"""The wide tables kept at ingest answer exactly what the long form (`logs`) says, whatever order
segments arrive in; every column the catalog lists is selectable; the query side stays torch-free."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from typing import Any

import duckdb
import pytest

import florql
from florql.runinfo import load_runs
from florql.storage import layout, segment_codec, segments
from florql.storage.database import open_store
from florql.storage.manifest import Manifest
from florql.storage.views import grain_for, wide_select
from store_support import Store

PER_EPOCH_ONLY = """
import florql
for epoch in florql.loop("epoch", range(3)):
    for step in florql.loop("step", range(4)):
        pass
    florql.log("val_acc", 0.5 + epoch / 10)
"""


def write_run(store: Store, run_id: int, batches: list[list[tuple[str, Any, tuple]]], status: str = "finished") -> None:
    """A run's manifest and one segment per batch of (name, value, (loop_path, *coords)) records."""
    files = store.files
    now = time.time()
    manifest = Manifest(run_id=run_id, status=status, started_at=now, heartbeat_at=now, outer_loop="epoch")
    manifest.update(outer_completed=3, outer_planned=3)
    seq = 0
    for k, records in enumerate(batches):
        segment_codec.write_segment(files, layout.segment_path(run_id, layout.MAIN_WRITER, k), seq, records, {})
        seq += len(records)
    files.put(layout.manifest_path(run_id), manifest.to_json().encode())


def random_batches(rng: random.Random) -> list[list[tuple[str, Any, tuple]]]:
    """Records at two loop paths with repeats at one coordinate (within and across segments), a
    name whose type changes midway, and a loop (`epoch/eval`) beside `epoch/step`."""
    records: list[tuple[str, Any, tuple]] = []
    for epoch in range(3):
        for step in range(rng.randint(0, 4)):
            at = ("epoch/step", epoch, step)
            for _ in range(rng.randint(1, 2)):
                records.append(("loss", rng.random(), at))
            if rng.random() < 0.5:
                records.append(("tokens", rng.choice([rng.randint(0, 9), rng.random()]) if epoch == 2 else 7, at))
        if rng.random() < 0.7:
            records.append(("val_acc", rng.random(), ("epoch", epoch)))
        if rng.random() < 0.3:
            records.append(("eval_loss", rng.random(), ("epoch/eval", epoch, 0)))
    cuts = sorted(rng.sample(range(len(records) + 1), k=min(3, len(records) + 1)))
    return [records[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)]) if b > a]


def long_form_answer(conn: duckdb.DuckDBPyConnection, run_id: int, grain: tuple[str, ...]) -> list[tuple]:
    """The run at `grain` computed from `logs` alone (the definition the wide tables must match)."""
    info = load_runs(conn, [run_id])[run_id]
    names = sorted((n for n in info.logged.values() if grain[: len(n.loop_path)] == n.loop_path), key=lambda n: n.name)
    sql = wide_select(run_id, grain_for(names, [grain]), names)
    return sorted(conn.execute(sql).fetchall(), key=repr)


@pytest.mark.parametrize("seed", range(12))
def test_wide_tables_equal_the_long_form_with_segments_ingested_one_by_one_or_at_once(store: Store, seed: int):
    batches = random_batches(random.Random(seed))
    write_run(store, 1, batches)
    write_run(store, 2, [], status="running")  # run 2 receives the same segments one sync at a time
    db = florql.connect(store.home, replay="never")
    for k, records in enumerate(batches):
        segment_codec.write_segment(
            store.files, layout.segment_path(2, layout.MAIN_WRITER, k), sum(map(len, batches[:k])), records, {}
        )
        db.sync()
    with open_store(store.location.db_path) as conn:
        for grain in [("epoch",), ("epoch", "step"), ("epoch", "eval")]:
            for run_id in (1, 2):
                info = load_runs(conn, [run_id])[run_id]
                if "/".join(grain) not in info.tables:
                    assert not any(n.loop_path[: len(grain)] == grain for n in info.logged.values())
                    continue
                names = sorted(n for n, i in info.logged.items() if grain[: len(i.loop_path)] == i.loop_path)
                columns = ", ".join([*grain, *names])
                ours = sorted(db.sql(f"SELECT {columns} FROM run_{run_id}").fetchall(), key=repr)
                assert ours == long_form_answer(conn, run_id, grain), (grain, run_id)
    db.close()


def test_a_per_epoch_only_run_binds_every_column_the_catalog_lists(store: Store):
    store.run(PER_EPOCH_ONLY)
    db = florql.connect(store.home, replay="never")
    table = next(t for t in db.tables() if t.name == "run_1")
    assert [c.name for c in table.columns] == ["epoch", "step", "val_acc"]
    for column in table.columns:  # each alone, as a BI tool's column browser asks
        assert len(db.sql(f'SELECT "{column.name}" FROM run_1').fetchall()) == 3
    rows = db.sql("SELECT * FROM run_1 ORDER BY epoch").fetchall()
    assert rows == [(0, None, 0.5), (1, None, 0.6), (2, None, 0.7)]
    assert db.sql("SELECT count(*), count(step) FROM run_1").fetchall() == [(3, 0)]
    db.close()


def test_a_run_without_rows_yet_answers_no_rows_with_every_column(store: Store):
    """A run that just started: its code's loops and names are columns, and there are no rows."""
    store.run(PER_EPOCH_ONLY)
    manifest = Manifest.from_json(store.files.get(layout.manifest_path(1)))
    manifest.update(run_id=2, status="running", outer_completed=0, heartbeat_at=time.time())  # same code as run 1
    store.files.put(layout.manifest_path(2), manifest.to_json().encode())
    db = florql.connect(store.home, replay="never")
    result = db.sql("SELECT epoch, step, val_acc FROM run_2")
    assert result.schema.names == ["epoch", "step", "val_acc"] and result.fetchall() == []
    assert db.sql("SELECT count(*) FROM metrics").fetchall() == [(3,)]
    db.close()


def test_a_store_without_wide_tables_gets_them_when_opened(store: Store):
    """A store written by an older florql (no catalog, no wide tables) is upgraded in place."""
    batches = [[r for r in records if r[2][0] != "epoch/eval"] for records in random_batches(random.Random(3))]
    write_run(store, 1, batches)
    db = florql.connect(store.home, replay="never")
    before = sorted(db.sql("SELECT * FROM run_1").fetchall(), key=repr)
    db.close()
    conn = duckdb.connect(store.location.db_path)  # then, `logs` was a table holding every record
    conn.execute("CREATE TABLE _old_logs AS SELECT * FROM logs")
    conn.execute("DROP VIEW logs")
    for (table,) in conn.execute("SELECT DISTINCT table_name FROM _grains").fetchall():
        conn.execute(f'DROP TABLE "{table}"')
    conn.execute("DELETE FROM _grains")
    conn.execute("DELETE FROM _names")
    conn.execute("DROP TABLE _log_records")
    conn.execute("DROP TABLE _log_strings")
    conn.execute("ALTER TABLE _old_logs RENAME TO logs")
    conn.close()
    db = florql.connect(store.home, replay="never")
    assert sorted(db.sql("SELECT * FROM run_1").fetchall(), key=repr) == before
    db.close()


def test_a_large_answer_streams_and_a_small_one_is_held(store: Store, monkeypatch: pytest.MonkeyPatch):
    from florql import api

    write_run(store, 1, [[("loss", float(s), ("epoch/step", e, s)) for e in range(3) for s in range(500)]])
    db = florql.connect(store.home)
    monkeypatch.setattr(api, "HELD_BYTES", 1)
    monkeypatch.setattr(api, "BATCH_ROWS", 100)
    streamed = db.sql("SELECT epoch, step, loss FROM run_1 ORDER BY epoch, step")
    assert streamed.schema.names == ["epoch", "step", "loss"]
    assert [b.num_rows for b in streamed.batches()][:2] == [100, 100]
    with pytest.raises(florql.UsageError, match="streamed already"):
        list(streamed.batches())
    assert db.database.close(wait_s=0)  # the stream gave its lease back: the file can close
    monkeypatch.setattr(api, "HELD_BYTES", 4 << 20)
    held = db.sql("SELECT epoch, step, loss FROM run_1 ORDER BY epoch, step")
    assert held.arrow().num_rows == held.arrow().num_rows == 1500
    db.close()


TORCH_FREE = """
import sys
from florql.cli import main
for argv in (["runs"], ["query", "SELECT epoch, val_acc FROM run_1"], ["show", "1"]):
    assert main(argv) == 0, argv
import psycopg
from florql.server import BackgroundServer, Server
import florql
server = Server(lambda: florql.connect(replay="never"), port=0)
with BackgroundServer(server) as running:
    dsn = f"host=127.0.0.1 port={running.port} dbname=florql user=florql connect_timeout=10"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM run_1").fetchone() == (3,)
        conn.execute("SELECT table_name FROM information_schema.tables").fetchall()
print(sorted(m for m in ("torch", "florql.session", "florql.recording") if m in sys.modules))
"""


def fresh_python(store: Store, code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter on the store: what it imports is what a user's process would."""
    return subprocess.run(
        [sys.executable, "-c", code], env=store.env(), cwd=store.workdir, capture_output=True, text=True, timeout=120
    )


def test_the_cli_and_the_server_answer_without_importing_torch(store: Store):
    pytest.importorskip("psycopg")
    store.run(PER_EPOCH_ONLY)
    out = fresh_python(store, TORCH_FREE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


LEAN_RUNS = """
import sys
from florql.cli import main
assert main(["runs"]) == 0
print(sorted(m for m in ("torch", "sqlglot", "florql.api", "florql.binder", "florql.replay.planner") if m in sys.modules))
"""


def test_florql_runs_lists_runs_without_loading_the_query_machinery(store: Store):
    """`florql runs` is a fixed SQL over the `runs` view: it ingests, then reads, and imports no
    parser, binder or planner (which is what keeps it within a few tens of ms of DuckDB's import)."""
    write_run(store, 1, [[("val_acc", 0.5, ("epoch", 0))]])
    out = fresh_python(store, LEAN_RUNS)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["run_id", "status"] and lines[2].split()[:2] == ["1", "finished"]
    assert lines[-1] == "[]"


def test_a_store_whose_long_form_is_a_table_is_compacted_when_opened(store: Store):
    """An older florql kept `logs` as a table of strings; opening the store moves its rows into the
    compact long form, and `logs` (now a view) and the run tables answer as before."""
    batches = [[r for r in records if r[2][0] != "epoch/eval"] for records in random_batches(random.Random(5))]
    write_run(store, 1, batches)
    db = florql.connect(store.home, replay="never")
    logs_before = db.sql("SELECT * FROM logs ORDER BY run_id, seq").fetchall()
    run_before = sorted(db.sql("SELECT * FROM run_1").fetchall(), key=repr)
    db.close()
    conn = duckdb.connect(store.location.db_path)
    conn.execute("CREATE TABLE _old_logs AS SELECT * FROM logs")
    conn.execute("DROP VIEW logs")
    conn.execute("DROP TABLE _log_records")
    conn.execute("DROP TABLE _log_strings")
    conn.execute("ALTER TABLE _old_logs RENAME TO logs")
    conn.close()
    db = florql.connect(store.home, replay="never")
    assert db.sql("SELECT * FROM logs ORDER BY run_id, seq").fetchall() == logs_before
    assert sorted(db.sql("SELECT * FROM run_1").fetchall(), key=repr) == run_before
    db.close()
    conn = duckdb.connect(store.location.db_path)
    assert conn.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'logs'").fetchall() == [
        ("VIEW",)
    ]
    conn.close()


def regular_batches(rng: random.Random) -> list[list[tuple[str, Any, tuple]]]:
    """Every step logs the same four names (one of each value type) in the same order; each epoch
    logs `val_acc`; segments are cut anywhere, mid-iteration too."""
    records: list[tuple[str, Any, tuple]] = []
    for epoch in range(3):
        for step in range(5):
            at = ("epoch/step", epoch, step)
            records += [("loss", rng.random(), at), ("tokens", rng.randint(-9, 9), at)]
            records += [("ok", rng.random() < 0.5, at), ("phase", rng.choice(["a", "bb"]), at)]
        records.append(("val_acc", rng.random(), ("epoch", epoch)))
    cuts = sorted(rng.sample(range(1, len(records)), 3))
    return [records[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)])]


@pytest.mark.parametrize("seed", range(4))
def test_regular_batches_pivoted_by_reshaping_equal_the_long_form(
    store: Store, seed: int, monkeypatch: pytest.MonkeyPatch
):
    from florql.storage import wide

    reshaped = []
    pivot = wide.regular_pivot
    monkeypatch.setattr(wide, "regular_pivot", lambda *a: reshaped.append(pivot(*a)) or reshaped[-1])
    monkeypatch.setattr(wide, "PIVOT_BLOCK", 2)  # iterations checked two at a time: blocks meet often
    batches = regular_batches(random.Random(seed))
    write_run(store, 1, batches)
    write_run(store, 2, [], status="running")  # one segment a sync: iterations cut across syncs
    db = florql.connect(store.home, replay="never")
    for k, records in enumerate(batches):
        segment_codec.write_segment(
            store.files, layout.segment_path(2, layout.MAIN_WRITER, k), sum(map(len, batches[:k])), records, {}
        )
        db.sync()
    assert any(p is not None for p in reshaped) and any(p is None for p in reshaped)
    with open_store(store.location.db_path) as conn:
        for run_id in (1, 2):
            for grain, columns in [
                (("epoch",), "epoch, val_acc"),
                (("epoch", "step"), "epoch, step, loss, ok, phase, tokens, val_acc"),
            ]:
                ours = sorted(db.sql(f"SELECT {columns} FROM run_{run_id}").fetchall(), key=repr)
                assert ours == long_form_answer(conn, run_id, grain), (grain, run_id)
    db.close()


LOGS_COLUMNS = [
    "run_id",
    "seq",
    "name",
    "loop_path",
    "value_type",
    "value_float",
    "value_int",
    "value_bool",
    "value_str",
    "source",
    "job_id",
    "version",
    "segment",
] + ["epoch", "step", "eval"]


def shown_records(store: Store, run_id: int) -> list[tuple]:
    """The run's rows of `logs` (LOGS_COLUMNS; a loop no record of the store is in: NULL)."""
    with open_store(store.location.db_path) as conn:
        result = conn.execute("SELECT * FROM logs WHERE run_id = ? ORDER BY seq", [run_id])
        names = [d[0] for d in result.description]
        return [tuple(dict(zip(names, row)).get(c) for c in LOGS_COLUMNS) for row in result.fetchall()]


def written_records(store: Store, run_id: int) -> list[tuple]:
    """Every record in the run's segments, as `logs` must show it (LOGS_COLUMNS)."""
    rows = []
    for path in store.files.list(f"{layout.segments_dir(run_id)}/{layout.MAIN_WRITER}"):
        for r in segments.read_segment(store.files, path).to_pylist():
            at = dict(zip(r["loop_path"].split("/"), r["coords"]))
            values = (r["value_float"], r["value_int"], r["value_bool"], r["value_str"])
            rows.append(
                (run_id, r["seq"], r["name"], r["loop_path"], r["value_type"], *values, "logged", None, None, path)
                + tuple(at.get(loop) for loop in ("epoch", "step", "eval"))
            )
    return sorted(rows)


@pytest.mark.parametrize("seed", range(8))
def test_logs_shows_every_record_written_exactly_once(store: Store, seed: int):
    """`logs` reads most values from the wide tables and the rest from the long form: values
    overwritten at their coordinates, a name whose type changes, names outside every loop. Each
    record shows once, bit for bit, with its segment, ingested at once or a segment a sync."""
    rng = random.Random(seed)
    batches = random_batches(rng)
    batches[0] = [("seed", 7, ("",)), ("loss", 0.125, ("epoch/step", 0, 0)), *batches[0], ("note", "x", ("",))]
    batches[-1].append(("loss", 0.25, ("epoch/step", 0, 0)))  # overwrites a stored value, a segment later
    batches[-1].append(("tokens", 1.5, ("epoch/step", 0, 0)))  # and in another type
    write_run(store, 1, batches)
    write_run(store, 2, [], status="running")
    db = florql.connect(store.home, replay="never")
    for k, records in enumerate(batches):
        segment_codec.write_segment(
            store.files, layout.segment_path(2, layout.MAIN_WRITER, k), sum(map(len, batches[:k])), records, {}
        )
        db.sync()
        assert shown_records(store, 2) == written_records(store, 2)
    assert shown_records(store, 1) == written_records(store, 1)
    db.close()


def test_logs_reads_values_stored_in_the_wide_tables(store: Store):
    """A regular run's values are stored once, in its wide table: the long form holds none of them."""
    records = [(n, float(e * 10 + s), ("epoch/step", e, s)) for e in range(3) for s in range(4) for n in ("a", "b")]
    write_run(store, 1, [records[:10], records[10:]])
    florql.connect(store.home, replay="never").sync()
    assert shown_records(store, 1) == written_records(store, 1)
    with open_store(store.location.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM _log_records").fetchall() == [(0,)]


def test_a_store_with_a_table_per_run_gets_shared_tables_when_opened(store: Store):
    """The florql before kept every record in `_log_records` and a wide table per run and loop path
    (no `run_id` column); opening such a store builds the shared tables, and nothing changes."""
    from florql.storage import wide

    for run_id in (1, 2):
        batches = [[r for r in b if r[2][0] != "epoch/eval"] for b in random_batches(random.Random(run_id))]
        write_run(store, run_id, batches)
    db = florql.connect(store.home, replay="never")
    logs_before = db.sql("SELECT * FROM logs ORDER BY run_id, seq").fetchall()
    runs_before = [sorted(db.sql(f"SELECT * FROM run_{r}").fetchall(), key=repr) for r in (1, 2)]
    db.close()
    conn = duckdb.connect(store.location.db_path)  # the older layout, made from this one
    grains = conn.execute("SELECT run_id, loop_path, table_name FROM _grains ORDER BY ALL").fetchall()
    for run_id, path, table in grains:
        wide.spill(conn, run_id, path, list(wide._column_types(conn, table)))
    for k, (run_id, path, table) in enumerate(grains):
        kept = [f'"{c}"' for c in wide._column_types(conn, table) if c != "run_id" and not c.startswith("__seq__")]
        conn.execute(f"CREATE TABLE _w{run_id}_{k} AS SELECT {', '.join(kept)} FROM {table} WHERE run_id = {run_id}")
        conn.execute(
            "UPDATE _grains SET table_name = ? WHERE run_id = ? AND loop_path = ?", [f"_w{run_id}_{k}", run_id, path]
        )
    for table in {t for _, _, t in grains}:
        conn.execute(f"DROP TABLE {table}")
    conn.execute("DELETE FROM _views WHERE name = 'logs'")
    conn.execute("CREATE OR REPLACE VIEW logs AS SELECT 1")  # rewritten when opened
    conn.close()
    db = florql.connect(store.home, replay="never")
    assert db.sql("SELECT * FROM logs ORDER BY run_id, seq").fetchall() == logs_before
    assert [sorted(db.sql(f"SELECT * FROM run_{r}").fetchall(), key=repr) for r in (1, 2)] == runs_before
    db.close()
    with open_store(store.location.db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT DISTINCT table_name FROM _grains").fetchall()}
        assert all(t.startswith("_w_") for t in tables) and len(tables) <= 3  # one per loop path
