"""The DuckDB store: schema, idempotent ingest of run files, and the one-writer discipline.

DuckDB lets one process open a file read-write and then no other process at all, so no process
holds the file for long: inside a process every thread shares one handle on it (`shared`), which
opens the file on demand, lets one thread at a time ingest, and closes the file when it is idle or
another process waits for it. A process that finds it busy retries with backoff. Training and
replay processes never open it: they write run files, which are the durable truth; `rebuild`
recreates the database from them alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from florql.storage import layout, long_form, segments, wide
from florql.storage.checkpoints import CheckpointRecord, read_record
from florql.storage.code_versions import code_version_manifest
from florql.storage.manifest import Manifest
from florql.storage.runfiles import RunFiles
from florql.storage.views import NameInfo, grain_for, lit, merge_runs, q, tables_select, wide_select

HEARTBEAT_TIMEOUT_S = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS _runs (
    run_id INTEGER PRIMARY KEY, script VARCHAR, script_rel VARCHAR, cwd_rel VARCHAR, status VARCHAR,
    started_at TIMESTAMP, ended_at TIMESTAMP, duration_s DOUBLE, code_version VARCHAR,
    git_commit VARCHAR, argv VARCHAR[], error VARCHAR, outer_loop VARCHAR, outer_planned INTEGER,
    outer_completed INTEGER, broke_early BOOLEAN, host VARCHAR, pid INTEGER, device VARCHAR,
    python VARCHAR, torch VARCHAR, cuda VARCHAR, checkpoints_taken INTEGER,
    checkpoint_overhead DOUBLE, checkpoint_budget DOUBLE, heartbeat_at DOUBLE, manifest VARCHAR,
    sealed BOOLEAN DEFAULT FALSE
);
CREATE TABLE IF NOT EXISTS run_args (
    run_id INTEGER, name VARCHAR, value_type VARCHAR, value_float DOUBLE, value_int BIGINT,
    value_bool BOOLEAN, value_str VARCHAR, PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS iterations (
    run_id INTEGER, outer_index INTEGER, seconds DOUBLE, inner_seconds DOUBLE, PRIMARY KEY (run_id, outer_index)
);
CREATE TABLE IF NOT EXISTS _log_records (
    run_id INTEGER NOT NULL, name_id INTEGER NOT NULL, path_id INTEGER NOT NULL,
    value_float DOUBLE, value_int BIGINT, value_bool BOOLEAN, value_str VARCHAR,
    job_id VARCHAR, seq BIGINT, segment_id INTEGER, version VARCHAR
);
CREATE TABLE IF NOT EXISTS _log_strings (id INTEGER PRIMARY KEY, text VARCHAR UNIQUE);
CREATE TABLE IF NOT EXISTS _log_segments (run_id INTEGER, segment_id INTEGER, first_seq BIGINT, last_seq BIGINT);
CREATE TABLE IF NOT EXISTS segments_ingested (
    path VARCHAR PRIMARY KEY, run_id INTEGER, rows BIGINT, ingested_at TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id INTEGER, name VARCHAR, outer_index INTEGER, kind VARCHAR, coords VARCHAR, bytes BIGINT,
    digest VARCHAR, stall_s DOUBLE, persist_s DOUBLE, created_at TIMESTAMP, code_version VARCHAR,
    stored_bytes BIGINT, chunks INTEGER, PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS code_versions (
    code_version VARCHAR, path VARCHAR, sha256 VARCHAR, PRIMARY KEY (code_version, path)
);
CREATE TABLE IF NOT EXISTS replay_jobs (
    job_id VARCHAR PRIMARY KEY, run_id INTEGER, names VARCHAR[], start_index INTEGER, stop_index INTEGER,
    log_from INTEGER, executed INTEGER[], restored INTEGER[], checkpoint VARCHAR, seconds DOUBLE,
    rows BIGINT, committed_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS _replay_costs (
    job_id VARCHAR PRIMARY KEY, run_id INTEGER, warm BOOLEAN, startup_s DOUBLE, setup_s DOUBLE,
    restore_s DOUBLE, restored_bytes BIGINT, work_s DOUBLE, est_work_s DOUBLE, est_s DOUBLE, seconds DOUBLE,
    recorded_exec_s DOUBLE, recorded_skip_s DOUBLE
);
CREATE TABLE IF NOT EXISTS _query_costs (
    finished_at TIMESTAMP, jobs INTEGER, jobs_s DOUBLE, overhead_s DOUBLE
);
CREATE TABLE IF NOT EXISTS replay_coverage (
    run_id INTEGER, name VARCHAR, version VARCHAR, outer_index INTEGER, job_id VARCHAR,
    PRIMARY KEY (run_id, name, version, outer_index)
);
CREATE TABLE IF NOT EXISTS _stale_views (run_id INTEGER);
CREATE TABLE IF NOT EXISTS replay_audit (
    run_id INTEGER, job_id VARCHAR, name VARCHAR, loop_path VARCHAR, coords VARCHAR,
    logged VARCHAR, replayed VARCHAR, abs_diff DOUBLE, mismatches BIGINT, detected_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS _views (
    name VARCHAR PRIMARY KEY, sql VARCHAR, part VARCHAR
);
"""
SCHEMA += wide.CATALOG

LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")


def is_lock_error(exc: BaseException) -> bool:
    """DuckDB's answer when another process holds the file."""
    return isinstance(exc, duckdb.Error) and any(m in str(exc) for m in LOCK_MARKERS)


def open_file(db_path: str) -> duckdb.DuckDBPyConnection:
    """A connection to the DuckDB file (created whole when missing), with this schema.

    Raises DuckDB's lock error (`is_lock_error`) when another process holds the file. Queries and
    ingest go through `open_store` instead, which shares one connection per process and waits.
    """
    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    _create_if_missing(db_path)
    conn = duckdb.connect(db_path)
    try:
        conn.execute(SCHEMA)
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def open_store(db_path: str, wait_s: float = 60.0) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
    """A connection to the store for one operation: a lease on this process's shared handle.

    Waits (with backoff) up to `wait_s` while another process holds the file, then raises StoreBusy
    naming the holder. See `florql.storage.shared`.
    """
    from florql.storage.shared import shared_database

    return shared_database(db_path).lease(wait_s)


def _migrate(conn: duckdb.DuckDBPyConnection) -> None:
    """Bring a store written by an older florql up to this schema.

    Replayed values of old stores carry no statement version: they stay in `logs` but no query
    shows them, and the next query that needs them replays again.
    """
    columns = {
        (t, c)
        for t, c in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main' "
            "AND table_name IN ('logs', 'replay_coverage', 'checkpoints', '_replay_costs')"
        ).fetchall()
    }
    for column in ("recorded_exec_s", "recorded_skip_s"):  # older rows: NULL, not used for calibration
        if ("_replay_costs", column) not in columns:
            conn.execute(f"ALTER TABLE _replay_costs ADD COLUMN {column} DOUBLE")
    if ("checkpoints", "sha256") in columns:  # payloads are named by XXH3 now; older rows keep their SHA-256
        conn.execute("ALTER TABLE checkpoints RENAME COLUMN sha256 TO digest")
    if ("checkpoints", "code_version") not in columns:  # NULL: the run's own recorded code
        conn.execute("ALTER TABLE checkpoints ADD COLUMN code_version VARCHAR")
    if ("checkpoints", "stored_bytes") not in columns:  # before chunks, a checkpoint stored all its bytes
        conn.execute("ALTER TABLE checkpoints ADD COLUMN stored_bytes BIGINT")
        conn.execute("ALTER TABLE checkpoints ADD COLUMN chunks INTEGER")
        conn.execute("UPDATE checkpoints SET stored_bytes = bytes, chunks = 0")
    if ("logs", "run_id") in columns and ("logs", "version") not in columns:
        conn.execute("ALTER TABLE logs ADD COLUMN version VARCHAR")
    moved = long_form.migrate(conn)
    if ("replay_coverage", "version") not in columns:
        conn.execute("DROP TABLE replay_coverage")
        conn.execute(SCHEMA)
    if moved or wide.has_per_run_tables(conn):  # built again, shared by the runs, from `logs`
        wide.drop_tables(conn)
        long_form.create_view(conn)  # without the dropped tables, which are built again from it
    if conn.execute("SELECT count(*) FROM _names").fetchall()[0][0] == 0:
        _build_wide_tables(conn)
    long_form.create_view(conn)


def _build_wide_tables(conn: duckdb.DuckDBPyConnection) -> None:
    """A store written before the wide tables existed: build them from `logs` (once)."""
    runs = [r[0] for r in conn.execute("SELECT DISTINCT run_id FROM logs ORDER BY run_id").fetchall()]
    if not runs:
        return
    conn.execute("BEGIN")
    try:
        for run_id in runs:
            wide.rebuild_run(conn, run_id)
            conn.execute("INSERT INTO _stale_views VALUES (?)", [run_id])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _create_if_missing(db_path: str) -> None:
    """Create the file whole, then link it into place.

    A process opening the file while another creates it in place sees a half-written header
    ("not a valid DuckDB database file"); a hard link appears complete or not at all.
    """
    if os.path.exists(db_path):
        return
    tmp = f"{db_path}.new-{os.getpid()}-{threading.get_ident()}"
    try:
        conn = duckdb.connect(tmp)
        conn.execute(SCHEMA)
        conn.close()
        with contextlib.suppress(FileExistsError):
            os.link(tmp, db_path)
    finally:
        for leftover in (tmp, tmp + ".wal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


# ---- ingest -----------------------------------------------------------------------------------
def sync(conn: duckdb.DuckDBPyConnection, files: RunFiles) -> set[int]:
    """Bring the tables up to date with the run files. Idempotent: each file lands exactly once.

    Returns the runs that changed. Nothing is written for a run whose files did not change, and a
    view is re-created only when its SQL changes (see `refresh_views`). One writer at a time: in a
    process, `SharedDatabase.sync` serialises callers.
    """
    known = {
        row[0]: (row[1], row[2], row[3])
        for row in conn.execute("SELECT run_id, sealed, manifest, status FROM _runs").fetchall()
    }
    landed = _landed_jobs(conn)
    touched: set[int] = set()
    for run_dir in files.list_dirs("runs"):
        if not run_dir.isdigit():
            continue
        run_id = int(run_dir)
        sealed, manifest, status = known.get(run_id, (False, None, None))
        if sealed:
            changed = ingest_replays(conn, files, run_id, landed.get(run_id, (set(), set())))
        else:
            changed = ingest_run(conn, files, run_id, (manifest, status) if run_id in known else None)
        if changed:
            touched.add(run_id)
    # The views follow the tables: ingest marks a run's views stale in its own transaction, and only
    # a completed refresh clears the mark, so a process killed in between leaves them to the next sync.
    touched |= {r[0] for r in conn.execute("SELECT DISTINCT run_id FROM _stale_views").fetchall()}
    refresh_views(conn, touched)
    return touched


def ingest_run(
    conn: duckdb.DuckDBPyConnection,
    files: RunFiles,
    run_id: int,
    stored: tuple[str | None, str | None] | None = None,
) -> bool:
    """Land a run's new segments, checkpoints and replays, and its manifest when it changed.

    `stored` is the (manifest, status) `_runs` holds for the run, None when it holds none. Returns
    whether anything changed.
    """
    try:
        manifest = Manifest.from_json(files.get(layout.manifest_path(run_id)))
    except FileNotFoundError:
        return False  # claimed a moment ago; the manifest follows
    status = effective_status(manifest)
    record = manifest.to_json(indent=None)
    new_manifest = stored != (record, status)
    conn.execute("BEGIN")
    try:
        rows = _ingest_segments(conn, files, run_id)
        if new_manifest:
            _upsert_run(conn, run_id, manifest, status, record)
            _ingest_code_version(conn, files, manifest.code_version)
        checkpoints = _ingest_checkpoints(conn, files, run_id, manifest.code_version)
        if status != "running":
            conn.execute("UPDATE _runs SET sealed = TRUE WHERE run_id = ?", [run_id])
        if new_manifest or rows or checkpoints:
            conn.execute("INSERT INTO _stale_views VALUES (?)", [run_id])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    replays = ingest_replays(conn, files, run_id)
    return new_manifest or rows > 0 or checkpoints > 0 or replays


def effective_status(manifest: Manifest) -> str:
    """A run still marked running whose process is gone was killed."""
    if manifest.status != "running":
        return manifest.status
    env = manifest.env
    if env.hostname == socket.gethostname():
        try:
            os.kill(int(env.pid), 0)  # type: ignore[arg-type]
        except ProcessLookupError:
            return "killed"
        except (PermissionError, TypeError, ValueError):  # TypeError: no pid recorded
            pass
        else:
            if _zombie(int(env.pid)):  # type: ignore[arg-type]
                return "killed"
            return "running"
    if time.time() - float(manifest.heartbeat_at or 0) > HEARTBEAT_TIMEOUT_S:
        return "killed"
    return "running"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _upsert_run(conn: duckdb.DuckDBPyConnection, run_id: int, m: Manifest, status: str, record: str) -> None:
    env = m.env
    ckpt = m.checkpoints
    ended = m.ended_at
    conn.execute("DELETE FROM _runs WHERE run_id = ?", [run_id])
    conn.execute(
        "INSERT INTO _runs VALUES (?, ?, ?, ?, ?, to_timestamp(?)::TIMESTAMP, to_timestamp(?)::TIMESTAMP, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
        " ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, FALSE)",
        [
            run_id,
            m.script,
            m.script_rel,
            m.cwd_rel,
            status,
            m.started_at,
            ended,
            (ended - m.started_at) if ended and m.started_at is not None else None,
            m.code_version,
            m.git_commit,
            m.argv,
            m.error,
            m.outer_loop,
            m.outer_planned,
            m.outer_completed,
            m.outer_broke_early,
            env.hostname,
            env.pid,
            env.device,
            env.python,
            env.torch,
            env.cuda,
            ckpt.get("taken"),
            ckpt.get("overhead"),
            m.checkpoint_budget,
            m.heartbeat_at,
            record,
        ],
    )
    conn.execute("DELETE FROM run_args WHERE run_id = ?", [run_id])
    for name, value in m.args.items():
        vtype = segments.VALUE_TYPES.get(type(value), "str")
        row: list[Any] = [None, None, None, None]
        row[["float", "int", "bool", "str"].index(vtype)] = (
            value if vtype != "str" else (None if value is None else str(value))
        )
        conn.execute("INSERT INTO run_args VALUES (?, ?, ?, ?, ?, ?, ?)", [run_id, name, vtype, *row])
    conn.execute("DELETE FROM iterations WHERE run_id = ?", [run_id])
    times = m.iteration_s
    inner = m.inner_s
    if times:
        table = pa.table(
            {
                "run_id": pa.array([run_id] * len(times), pa.int32()),
                "outer_index": pa.array(range(len(times)), pa.int32()),
                "seconds": pa.array(times, pa.float64()),
                "inner_seconds": pa.array(inner + [0.0] * (len(times) - len(inner)), pa.float64()),
            }
        )
        conn.register("_iterations_in", table)
        conn.execute("INSERT INTO iterations SELECT * FROM _iterations_in")
        conn.unregister("_iterations_in")


STAGE_ROWS = 1_000_000  # records inserted and merged at a time: few statements, bounded memory


def _ingest_segments(conn: duckdb.DuckDBPyConnection, files: RunFiles, run_id: int) -> int:
    """Land the run's new segments in `logs` and merge them into its wide tables, in order."""
    prefix = f"{layout.segments_dir(run_id)}/{layout.MAIN_WRITER}"
    done = {r[0] for r in conn.execute("SELECT path FROM segments_ingested WHERE run_id = ?", [run_id]).fetchall()}
    new = [p for p in files.list(prefix) if p not in done and layout.is_segment(p)]
    rows = 0
    pending: list[tuple[str, pa.Table]] = []
    for k, path in enumerate(new):
        pending.append((path, segments.read_segment(files, path, decoded=False)))
        if sum(t.num_rows for _, t in pending) >= STAGE_ROWS or k == len(new) - 1:
            table = long_form.encode(conn, pending)
            conn.execute(
                "INSERT INTO segments_ingested (path, run_id, rows) SELECT unnest(?::VARCHAR[]), ?, unnest(?::BIGINT[])",
                [[p for p, _ in pending], run_id, [t.num_rows for _, t in pending]],
            )
            _record_seq_ranges(conn, run_id, pending)
            if table.num_rows:
                wide.merge_logged(conn, run_id, table)
            rows += table.num_rows
            pending = []
    if new:
        long_form.create_view(conn)
    return rows


def _record_seq_ranges(conn: duckdb.DuckDBPyConnection, run_id: int, parts: list[tuple[str, pa.Table]]) -> None:
    """Each segment's range of sequence numbers: `logs` finds the segment of a value the wide
    tables store by it (a writer's segments hold consecutive ranges)."""
    ranges = [(p, pc.min_max(t.column("seq")).as_py()) for p, t in parts if t.num_rows]
    if not ranges:
        return
    ids = long_form.string_ids(conn, [p for p, _ in ranges])
    conn.execute(
        "INSERT INTO _log_segments SELECT ?, unnest(?::INTEGER[]), unnest(?::BIGINT[]), unnest(?::BIGINT[])",
        [run_id, [ids[p] for p, _ in ranges], [r["min"] for _, r in ranges], [r["max"] for _, r in ranges]],
    )


def _ingest_checkpoints(conn: duckdb.DuckDBPyConnection, files: RunFiles, run_id: int, code_version: str | None) -> int:
    have = {r[0] for r in conn.execute("SELECT name FROM checkpoints WHERE run_id = ?", [run_id]).fetchall()}
    landed = 0
    for path in files.list(layout.checkpoints_dir(run_id)):
        if not path.endswith(".json") or path.rsplit("/", 1)[-1][: -len(".json")] in have:
            continue  # named <checkpoint>.json (layout.checkpoint_meta_path): no need to read it again
        rec = read_record(files, path)
        if rec.name in have:
            continue
        landed += 1
        _insert_checkpoint(conn, rec, rec.name, code_version)
    return landed


def _insert_checkpoint(
    conn: duckdb.DuckDBPyConnection, rec: CheckpointRecord, stored_name: str, code_version: str | None
) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO checkpoints (run_id, name, outer_index, kind, coords, bytes, digest, stall_s,"
        " persist_s, created_at, code_version, stored_bytes, chunks)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, to_timestamp(?)::TIMESTAMP, ?, ?, ?)",
        [
            rec.run_id,
            stored_name,
            rec.outer_index,
            rec.kind,
            json.dumps(rec.coords),
            rec.bytes,
            rec.digest,
            rec.stall_s,
            rec.persist_s,
            rec.created_at,
            code_version,
            rec.stored_bytes,
            len(rec.chunks),
        ],
    )


def _ingest_code_version(conn: duckdb.DuckDBPyConnection, files: RunFiles, version: str | None) -> None:
    if not version or conn.execute("SELECT 1 FROM code_versions WHERE code_version = ? LIMIT 1", [version]).fetchall():
        return
    for rel, digest in code_version_manifest(files, version).items():
        conn.execute("INSERT INTO code_versions VALUES (?, ?, ?)", [version, rel, digest])


def _landed_jobs(conn: duckdb.DuckDBPyConnection) -> dict[int, tuple[set[str], set[str]]]:
    """Per run, the replay jobs ingested and those whose divergence is recorded (one read for all runs)."""
    out: dict[int, tuple[set[str], set[str]]] = {}
    for kind, run_id, job_id in conn.execute(
        "SELECT 0, run_id, job_id FROM replay_jobs UNION ALL SELECT DISTINCT 1, run_id, job_id FROM replay_audit"
    ).fetchall():
        out.setdefault(run_id, (set(), set()))[kind].add(job_id)
    return out


def ingest_replays(
    conn: duckdb.DuckDBPyConnection,
    files: RunFiles,
    run_id: int,
    known: tuple[set[str], set[str]] | None = None,
) -> bool:
    """Committed replay jobs land whole; uncommitted ones stay invisible.

    `known`: the run's jobs already ingested and already audited (`_landed_jobs`), read here when None.
    """
    jobs = files.list_dirs(layout.replays_dir(run_id))
    if not jobs:
        return False
    have, audited = known if known is not None else _landed_jobs(conn).get(run_id, (set(), set()))
    landed = False
    for job_id in jobs:
        if job_id in have:
            continue
        diverged = layout.replay_divergence_path(run_id, job_id)
        if job_id not in audited and files.exists(diverged):
            _ingest_divergence(conn, run_id, job_id, json.loads(files.get(diverged)))
        if not files.exists(layout.replay_commit_path(run_id, job_id)):
            continue
        summary = json.loads(files.get(layout.replay_commit_path(run_id, job_id)))
        versions = summary.get("versions") or {}  # jobs of older florql versions: none, never shown
        conn.execute("BEGIN")
        try:
            rows = 0
            for path in summary["segments"]:
                table = segments.read_segment(files, path)
                long_form.insert(conn, run_id, [(path, table)], job_id, versions)
                rows += table.num_rows
            for name, indices in summary["coverage"].items() if versions else ():
                conn.execute(
                    "INSERT OR IGNORE INTO replay_coverage SELECT ?, ?, ?, unnest(?::INTEGER[]), ?",
                    [run_id, name, versions.get(name), indices, job_id],
                )
            conn.execute(
                "INSERT INTO replay_jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, to_timestamp(?)::TIMESTAMP)",
                [
                    job_id,
                    run_id,
                    summary["names"],
                    summary["start"],
                    summary["stop"],
                    summary["log_from"],
                    summary["executed"],
                    summary["restored"],
                    summary.get("checkpoint"),
                    summary["seconds"],
                    rows,
                    summary["committed_at"],
                ],
            )
            wide.refresh_replayed(conn, run_id, list(summary["names"]))
            long_form.create_view(conn)
            _ingest_costs(conn, run_id, job_id, summary.get("timings"))
            for record in summary.get("checkpoints", ()):  # persisted by the job: they land with its rows
                rec = CheckpointRecord(**record)
                _insert_checkpoint(conn, rec, f"{job_id}/{rec.name}", summary.get("checkpoint_version"))
            conn.execute("INSERT INTO _stale_views VALUES (?)", [run_id])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        landed = True
    return landed


def _ingest_costs(conn: duckdb.DuckDBPyConnection, run_id: int, job_id: str, t: dict | None) -> None:
    """What a replay job cost, by phase: the planner's measured cost model (jobs of older florql versions: none)."""
    if not t or not t.get("launched_at") or not t.get("first_iteration_at"):
        return
    startup = t["script_started_at"] - t["launched_at"]
    setup = t["first_iteration_at"] - t["script_started_at"]
    work = max(t["finished_at"] - t["first_iteration_at"] - t["restore_s"], 0.0)
    conn.execute(
        "INSERT OR IGNORE INTO _replay_costs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            job_id,
            run_id,
            bool(t.get("warm")),
            startup,
            setup,
            t["restore_s"],
            t["restored_bytes"],
            work,
            t["est_work_s"],
            t["est_s"],
            t["finished_at"] - t["launched_at"],
            t.get("recorded_exec_s"),
            t.get("recorded_skip_s"),
        ],
    )


def record_query_cost(conn: duckdb.DuckDBPyConnection, jobs: int, jobs_s: float, overhead_s: float) -> None:
    """What a replaying query cost besides its jobs (ingesting their values, planning again): the
    planner adds it to a plan's estimate, which is otherwise short by it on a small replay."""
    conn.execute("INSERT INTO _query_costs VALUES (now()::TIMESTAMP, ?, ?, ?)", [jobs, jobs_s, overhead_s])


def _ingest_divergence(conn: duckdb.DuckDBPyConnection, run_id: int, job_id: str, d: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO replay_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, to_timestamp(?)::TIMESTAMP)",
        [
            run_id,
            job_id,
            d["name"],
            d["loop_path"],
            json.dumps(d["coords"]),
            repr(d["logged"]),
            repr(d["replayed"]),
            d.get("abs_diff"),
            d.get("mismatches", 1),
            d["detected_at"],
        ],
    )


# ---- views ------------------------------------------------------------------------------------
def run_names(conn: duckdb.DuckDBPyConnection, run_id: int) -> list[NameInfo]:
    """The run's stored names (logged, or replayed since), in the order first logged, from the catalog."""
    return runs_names(conn, [run_id]).get(run_id, [])


def runs_names(conn: duckdb.DuckDBPyConnection, run_ids: list[int]) -> dict[int, list[NameInfo]]:
    """`run_names` of many runs in one read of the catalog. A name logged in more than one loop is
    shown at its deepest."""
    rows = conn.execute(
        "SELECT run_id, name, loop_path, value_types FROM _names WHERE list_contains(?, run_id) "
        "ORDER BY run_id, first_seq, name",
        [run_ids],
    ).fetchall()
    chosen: dict[int, dict[str, NameInfo]] = {}
    for run_id, name, path, types in rows:
        info = NameInfo(name, tuple(p for p in path.split("/") if p), frozenset(types))
        names = chosen.setdefault(run_id, {})
        if name not in names or len(info.loop_path) > len(names[name].loop_path):
            names[name] = info
    return {r: list(names.values()) for r, names in chosen.items()}


def full_view_sql(
    names: list[NameInfo], run_id: int, tables: dict[str, str] | None = None, with_run_id: bool = False
) -> str:
    """The run's wide view at its finest grain, keeping the names whose loops nest with it."""
    deepest = max((n.loop_path for n in names), key=len, default=())
    nested = [n for n in names if deepest[: len(n.loop_path)] == n.loop_path]
    grain = grain_for(nested, [])
    fast = tables_select(run_id, grain, nested, tables or {}, with_run_id)
    return fast if fast is not None else wide_select(run_id, grain, nested, with_run_id)


def refresh_views(conn: duckdb.DuckDBPyConnection, touched: set[int] | None = None) -> None:
    """(Re)create `runs` (args as columns), `run_<id>` and `metrics` for direct DuckDB users.

    `touched`: the runs whose rows or manifest changed (None: all). A view is re-created only when
    its SQL differs from the one `_views` records, so that a sync that brings no new name leaves
    the catalog alone; all changes land in one transaction.
    """
    stored = {n: (sql, part) for n, sql, part in conn.execute("SELECT name, sql, part FROM _views").fetchall()}
    present = {
        r[0]
        for r in conn.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'"
        ).fetchall()
    }

    def stale(name: str) -> bool:
        return touched is None or name not in stored or name not in present

    run_ids = [r[0] for r in conn.execute("SELECT run_id FROM _runs ORDER BY run_id").fetchall()]
    wanted: dict[str, tuple[str, str | None]] = {}
    if touched or stale("runs"):
        wanted["runs"] = (_runs_view_sql(conn), None)
    for run_id in run_ids:
        name = f"run_{run_id}"
        if (touched and run_id in touched) or stale(name):
            names = run_names(conn, run_id)
            tables = wide.grain_tables(conn, run_id)
            metrics_part = full_view_sql(names, run_id, tables, with_run_id=True)
            wanted[name] = (full_view_sql(names, run_id, tables), metrics_part)
    parts = [(r, (wanted.get(f"run_{r}") or stored[f"run_{r}"])[1]) for r in run_ids]
    merged = merge_runs([(r, p) for r, p in parts if p])
    wanted["metrics"] = (" UNION ALL BY NAME ".join(f"SELECT * FROM ({p})" for p in merged) or EMPTY_METRICS, None)
    changes = {n: v for n, v in wanted.items() if stored.get(n) != v or n not in present}
    if not changes:
        conn.execute("DELETE FROM _stale_views")
        return
    conn.execute("BEGIN")
    try:
        for name, (view, part) in changes.items():
            conn.execute(f"CREATE OR REPLACE VIEW {q(name)} AS {view}")
            conn.execute("INSERT OR REPLACE INTO _views VALUES (?, ?, ?)", [name, view, part])
        conn.execute("DELETE FROM _stale_views")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


EMPTY_METRICS = "SELECT NULL::INTEGER AS run_id WHERE FALSE"


def _runs_view_sql(conn: duckdb.DuckDBPyConnection) -> str:
    args = [r[0] for r in conn.execute("SELECT DISTINCT name FROM run_args ORDER BY name").fetchall()]
    fixed = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = '_runs' AND schema_name = 'main' "
            "ORDER BY column_index"
        ).fetchall()
    ]
    # Columns named one by one: DuckDB renders `* EXCLUDE (a, b)` in no fixed order, and BI tools
    # compare a view's SQL between calls.
    shown = ", ".join(f"r.{q(c)}" for c in fixed if c not in ("manifest", "sealed"))
    pivots = "".join(
        f", (SELECT {_arg_value(conn, a)} FROM run_args a WHERE a.run_id = r.run_id AND a.name = {lit(a)})"
        f" AS {q(a if a not in fixed else 'arg_' + a)}"
        for a in args
    )
    return f"SELECT {shown}{pivots} FROM _runs r"


def _arg_value(conn: duckdb.DuckDBPyConnection, name: str) -> str:
    """The column expression for an arg, keeping its type: ints stay BIGINT, bools BOOLEAN."""
    types = {r[0] for r in conn.execute("SELECT DISTINCT value_type FROM run_args WHERE name = ?", [name]).fetchall()}
    if types in ({"int"}, {"bool"}, {"float"}):
        return f"a.value_{next(iter(types))}"
    if types == {"float", "int"}:
        return "coalesce(a.value_float, a.value_int::DOUBLE)"
    return "coalesce(a.value_str, a.value_float::VARCHAR, a.value_int::VARCHAR, a.value_bool::VARCHAR)"


def rebuild(db_path: str, files: RunFiles, wait_s: float = 60.0) -> None:
    """Recreate the database from the run files alone (the old file is replaced atomically)."""
    from florql.storage.shared import shared_database

    tmp = db_path + ".rebuild"
    for leftover in (tmp, tmp + ".wal"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    conn = open_file(tmp)  # a private file: no other user knows it
    try:
        sync(conn, files)
    finally:
        conn.close()
    # Wait for every user of the old file, in this process and others, to let go of it.
    with shared_database(db_path).exclusive(wait_s):
        os.replace(tmp, db_path)
        if os.path.exists(db_path + ".wal"):
            os.unlink(db_path + ".wal")
