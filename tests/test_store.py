"""The DuckDB store: ingest is idempotent (also across processes), rebuild reproduces it, the demo lands."""

from __future__ import annotations

import shutil
import time

import pytest

from florql.storage import layout
from florql.storage.code_versions import load_code_version
from florql.storage.database import open_file, open_store, rebuild, sync
from store_support import EXAMPLES, Store

SMALL_RUN = """
import time, torch, florql
net = torch.nn.Linear(4, 2)
with florql.checkpointing(budget=0.5, model=net):
    for epoch in florql.loop("epoch", range(florql.arg("epochs", 4))):
        for step in florql.loop("step", range(20)):
            florql.log("loss", epoch + step / 100)
        time.sleep(0.05)
        florql.log("acc", 0.5 + epoch / 10)
"""

# Every table a sync writes, with the columns that do not depend on when it ran.
TABLES = {
    "_runs": "*",
    "run_args": "*",
    "iterations": "*",
    "logs": "*",
    "checkpoints": "*",
    "code_versions": "*",
    "segments_ingested": "path, run_id, rows",
}


def snapshot(conn) -> dict[str, list[tuple]]:
    return {t: sorted(conn.execute(f"SELECT {cols} FROM {t}").fetchall(), key=repr) for t, cols in TABLES.items()}


def segment_files(store) -> list[str]:
    return [p for r in store.run_ids() for p in store.files.list(layout.segments_dir(r))]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Store:
    """Run files of two finished runs, recorded once for the module."""
    base = tmp_path_factory.mktemp("recorded")
    (base / "work").mkdir()
    origin = Store(base / "store", base / "work")
    origin.run(SMALL_RUN)
    origin.run(SMALL_RUN, "--florql-args", "epochs=2")
    return origin


@pytest.fixture
def two_runs(recorded, store):
    """A fresh store (no database yet) holding a copy of the recorded run files."""
    shutil.copytree(recorded.home, store.home)
    return store


def test_sync_twice_changes_nothing(two_runs):
    store = two_runs
    with open_store(store.location.db_path) as conn:
        sync(conn, store.files)
        first = snapshot(conn)
        sync(conn, store.files)
        assert snapshot(conn) == first
    assert len(first["logs"]) == 4 * 21 + 2 * 21
    assert len(first["segments_ingested"]) == len(segment_files(store)) >= 2


def test_a_store_whose_checkpoints_carry_sha256_is_brought_up_to_the_digest_column(two_runs, tmp_path):
    db_path = str(tmp_path / "older.duckdb")
    conn = open_file(db_path)
    sync(conn, two_runs.files)
    rows = conn.execute("SELECT * FROM checkpoints ORDER BY run_id, name").fetchall()
    assert rows and all(
        digest.startswith("xxh3-") for (digest,) in conn.execute("SELECT digest FROM checkpoints").fetchall()
    )
    conn.execute("ALTER TABLE checkpoints RENAME COLUMN digest TO sha256")  # as an older florql left it
    conn.close()
    conn = open_file(db_path)
    try:
        assert conn.execute("SELECT * FROM checkpoints ORDER BY run_id, name").fetchall() == rows
        columns = [
            c
            for (c,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'checkpoints'"
            ).fetchall()
        ]
        assert "digest" in columns and "sha256" not in columns
        sync(conn, two_runs.files)  # and ingests as before
        assert conn.execute("SELECT * FROM checkpoints ORDER BY run_id, name").fetchall() == rows
    finally:
        conn.close()


def test_two_processes_syncing_at_once_ingest_each_segment_once(two_runs):
    store = two_runs
    script = store.write_script(
        """
        import os, sys, time
        from florql.storage.database import open_store, sync
        from florql.storage.layout import locate_store
        open(sys.argv[1] + sys.argv[2], "w").close()
        while not os.path.exists(sys.argv[1]):  # start together
            time.sleep(0.001)
        location = locate_store()
        with open_store(location.db_path) as conn:
            sync(conn, location.run_files())
    """,
        name="ingest.py",
    )
    gate = store.workdir / "go"
    procs = [store.popen(script, str(gate), f".ready{i}") for i in range(2)]
    deadline = time.monotonic() + 30
    while not all((store.workdir / f"go.ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert store.sql("SELECT count(*), count(DISTINCT path) FROM segments_ingested") == [
        (len(segment_files(store)),) * 2
    ]
    assert store.sql("SELECT run_id, count(*) FROM logs GROUP BY run_id ORDER BY run_id") == [(1, 84), (2, 42)]
    assert store.sql("SELECT count(*) FROM (SELECT DISTINCT run_id, seq FROM logs)") == [(126,)]


def test_a_running_run_is_ingested_as_it_goes_and_sealed_when_it_ends(store):
    gate = store.workdir / "go"
    script = store.write_script(f"""
        import os, time, florql
        for epoch in florql.loop("epoch", range(2)):
            florql.log("x", float(epoch))
            while epoch == 0 and not os.path.exists({str(gate)!r}):
                time.sleep(0.01)
    """)
    proc = store.popen(script)
    try:
        deadline = time.monotonic() + 30
        while not store.files.list(layout.segments_dir(1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.sql("SELECT status FROM runs") == [("running",)]
        assert store.sql("SELECT epoch, value_float FROM logs") == [(0, 0.0)]
        gate.touch()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert store.sql("SELECT status, outer_completed FROM runs") == [("finished", 2)]
    assert store.sql("SELECT epoch, value_float FROM logs ORDER BY epoch") == [(0, 0.0), (1, 1.0)]
    assert store.sql("SELECT sealed FROM _runs") == [(True,)]


def test_rebuild_gives_the_same_tables_and_views(two_runs):
    store = two_runs
    db = store.location.db_path
    with open_store(db) as conn:
        sync(conn, store.files)
        before = snapshot(conn)
        view = conn.execute("SELECT * FROM run_1 ORDER BY epoch, step").fetchall()
        runs = conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall()
    rebuild(db, store.files)
    with open_store(db) as conn:
        assert snapshot(conn) == before
        assert conn.execute("SELECT * FROM run_1 ORDER BY epoch, step").fetchall() == view
        assert conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall() == runs
    assert len(before["checkpoints"]) >= 2 and len(before["code_versions"]) >= 1


def test_rebuild_ignores_a_deleted_database(two_runs):
    store = two_runs
    store.sql("SELECT 1")
    with open_store(store.location.db_path) as conn:
        before = snapshot(conn)
    (store.home / layout.DB_FILENAME).unlink()
    rebuild(store.location.db_path, store.files)
    with open_store(store.location.db_path) as conn:
        assert snapshot(conn) == before


def test_demo_records_a_complete_run_with_its_code_version(store):
    run = store.run(EXAMPLES / "train.py", "--florql-args", "epochs=2", timeout=120)
    assert "Warning" not in run.proc.stderr, run.proc.stderr
    rid = run.run_id
    steps = store.sql(f"SELECT count(*), count(DISTINCT epoch), max(step) + 1 FROM run_{rid}")[0]
    assert steps == (2 * 50, 2, 50)  # 3200 training samples in batches of 64
    accs = store.sql(f"SELECT DISTINCT epoch, val_acc FROM run_{rid} ORDER BY epoch")
    assert [e for e, _ in accs] == [0, 1] and all(0.3 < a <= 1.0 for _, a in accs)
    assert store.sql(f"SELECT count(*) FROM run_{rid} WHERE loss IS NULL OR loss <= 0") == [(0,)]
    row = store.sql("SELECT status, lr, epochs, batch_size, seed, checkpoints_taken, script_rel FROM runs")
    assert row == [("finished", 0.1, 2, 64, 0, 2, "examples/train.py")]
    assert [type(v) for v in row[0][1:5]] == [float, int, int, int]  # args keep their types
    version = store.sql("SELECT code_version FROM runs")[0][0]
    sources = load_code_version(store.files, version)
    assert sources == {"examples/train.py": (EXAMPLES / "train.py").read_bytes()}  # florql itself is not user code
    paths = {p for (p,) in store.sql("SELECT path FROM code_versions WHERE code_version = ?", [version])}
    assert paths == set(sources)
