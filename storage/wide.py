"""The physical wide tables and the catalog that describes them, maintained at ingest.

Per loop path (`epoch/step`) a table shared by the runs (`_w_<k>`): a row per run and coordinate
of that loop and a column per name logged there, holding the value shown (the last one logged at
that coordinate; for a replayed name, the last one of its current statement version). A table also
holds every coordinate of deeper loops' rows (`epoch` gets a row for each epoch that has steps), so
a query at a loop's grain reads that loop's table joined with its enclosing loops' tables on the
run and its coordinates, and a query over many runs reads one table. Runs share a path's table
while their names' types agree; a run whose name needs another type there gets another table.

The tables also *store* the values: beside a name's column, `__seq__<name>` holds the sequence
number of a value that is a logged record (NULL for a value shown from a replay or from a name of
more than one type, whose records are in `_log_records`). `logs` reads those values from here
(`long_form.view_sql`); a value overwritten at its coordinates moves to `_log_records` first.

The catalog, small and read by binding and planning:
- `_names`: per run, name and loop path: the value types, the first sequence number (column
  order), whether the run itself logged it, and the statement version a replayed name shows.
- `_grains`: per run and loop path, the wide table that holds its rows.

Everything here runs inside the ingest's transaction: tables and catalog change with the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from florql.storage import long_form
from florql.storage.long_form import seq_column
from florql.storage.views import lit, q, sql_type, value_expr

CATALOG = """
CREATE TABLE IF NOT EXISTS _names (
    run_id INTEGER, name VARCHAR, loop_path VARCHAR, value_types VARCHAR[], first_seq BIGINT,
    logged BOOLEAN, version VARCHAR, PRIMARY KEY (run_id, name, loop_path)
);
CREATE TABLE IF NOT EXISTS _grains (
    run_id INTEGER, loop_path VARCHAR, table_name VARCHAR, PRIMARY KEY (run_id, loop_path)
);
"""


VALUE_TYPES = ("float", "int", "bool", "str")  # in the order of the value columns


@dataclass
class Column:
    """What the catalog holds of one name at one loop path of a run."""

    types: frozenset[str]
    first_seq: int
    logged: bool
    version: str | None


def loops(path: str) -> list[str]:
    return [n for n in path.split("/") if n]


def grain_tables(conn: duckdb.DuckDBPyConnection, run_id: int) -> dict[str, str]:
    return dict(conn.execute("SELECT loop_path, table_name FROM _grains WHERE run_id = ?", [run_id]).fetchall())


def columns(conn: duckdb.DuckDBPyConnection, run_id: int) -> dict[tuple[str, str], Column]:
    rows = conn.execute(
        "SELECT name, loop_path, value_types, first_seq, logged, version FROM _names WHERE run_id = ?", [run_id]
    ).fetchall()
    return {(n, p): Column(frozenset(t), s, bool(lg), v) for n, p, t, s, lg, v in rows}


# ---- ingest ---------------------------------------------------------------------------------------
def merge_logged(conn: duckdb.DuckDBPyConnection, run_id: int, records: pa.Table) -> None:
    """Store the run's new logged records (encoded, `long_form.encode`, in seq order): in its wide
    tables where they can hold them, in `_log_records` otherwise.

    Their sequence numbers follow every stored one, so they win over what a table holds at the
    same coordinates (which then moves to `_log_records`).
    """
    conn.register("_staged", records)
    try:
        _merge_logged(conn, run_id, records)
    finally:
        conn.unregister("_staged")


def _merge_logged(conn: duckdb.DuckDBPyConnection, run_id: int, records: pa.Table) -> None:
    rows = conn.execute(
        "SELECT any_value(name), any_value(loop_path), _path_id, _name_id, bool_or(value_float IS NOT NULL), "
        "bool_or(value_int IS NOT NULL), bool_or(value_bool IS NOT NULL), bool_or(value_str IS NOT NULL), "
        "min(seq) FROM _staged GROUP BY _name_id, _path_id"  # a record holds one value column
    ).fetchall()
    summary = [(n, p, [t for t, has in zip(VALUE_TYPES, present) if has], s) for n, p, _, _, *present, s in rows]
    path_ids = {p: path_id for _, p, path_id, *_ in rows}
    name_ids = {name_id: n for n, _, _, name_id, *_ in rows}
    catalog = columns(conn, run_id)
    tables = grain_tables(conn, run_id)
    changed: dict[tuple[str, str], Column] = {}
    for name, path, types, first_seq in summary:
        old = catalog.get((name, path))
        merged = frozenset(types) | (old.types if old else frozenset())
        column = Column(merged, min(first_seq, old.first_seq) if old else first_seq, True, old.version if old else None)
        if column != old:
            changed[(name, path)] = column
    _store_columns(conn, run_id, changed)
    shown = {**catalog, **changed}
    by_path: dict[str, list[str]] = {}
    for name, path, _, _ in summary:
        by_path.setdefault(path, []).append(name)
    # A name whose column must change type moves the run's path to another table, rebuilt from `logs`.
    relocated = {
        p
        for p, names in by_path.items()
        if p in tables and _conflicts(conn, tables[p], {n: sql_type(shown[(n, p)].types) for n in names})
    }
    long_only = [
        (p, n)
        for p, names in by_path.items()
        for n in names
        if not loops(p) or p in relocated or not _storable(shown[(n, p)])
    ]
    if long_only:  # outside every loop, of more than one type, or rebuilt below: the long form keeps them
        ids = {n: i for i, n in name_ids.items()}
        which = " OR ".join(f"(_path_id = {path_ids[p]} AND _name_id = {ids[n]})" for p, n in long_only)
        long_form.insert_rows(conn, run_id, records, where=which)
    for path in sorted(set(by_path) - relocated, key=len, reverse=True):
        if not loops(path):
            continue
        names = sorted(by_path[path])
        stored = {n for n in names if _storable(shown[(n, path)])}
        spill(conn, run_id, path, [n for n in names if n not in stored])
        name_types = {n: shown[(n, path)].types for n in names}
        at_path = (
            records if len(path_ids) == 1 else records.filter(pc.equal(records.column("_path_id"), path_ids[path]))
        )
        pivot = regular_pivot(at_path, loops(path), name_ids, name_types) if len(stored) == len(names) else None
        if pivot is None and stored:  # a value overwritten within the batch: only the last is the table's
            stored_ids = ", ".join(str(i) for i, n in name_ids.items() if n in stored)
            long_form.insert_rows(
                conn,
                run_id,
                records,
                where=f"_path_id = {path_ids[path]} AND _name_id IN ({stored_ids})",
                qualify="seq < max(seq) OVER (PARTITION BY _name_id, coords)",
            )
        coords = ", ".join(f"coords[{i + 1}] AS {q(c)}" for i, c in enumerate(loops(path)))
        source = (
            f"SELECT name, seq, value_float, value_int, value_bool, value_str, {coords} FROM _staged "
            f"WHERE _path_id = {path_ids[path]}"
        )
        _merge(conn, run_id, path, source, names, pivot, stored)
    for path in relocated:
        rebuild_grain(conn, run_id, path)


def _storable(column: Column) -> bool:
    """Whether a name's logged values can be stored in its column: of one type, shown as logged."""
    return len(column.types) == 1 and column.version is None


def refresh_replayed(conn: duckdb.DuckDBPyConnection, run_id: int, names: list[str]) -> None:
    """After a replay job landed: each name shows the values of the version whose replay committed
    last, recomputed from `logs` (replays are rare; their columns are small next to the run's)."""
    rows = conn.execute(
        "SELECT l.name, l.loop_path, list(DISTINCT l.value_type), min(l.seq) FROM logs l WHERE l.run_id = ? "
        "AND list_contains(?, l.name) GROUP BY l.name, l.loop_path",
        [run_id, names],
    ).fetchall()
    versions = dict(
        conn.execute(
            "SELECT c.name, arg_max(c.version, j.committed_at) FROM replay_coverage c JOIN replay_jobs j USING (job_id) "
            "WHERE c.run_id = ? AND list_contains(?, c.name) GROUP BY c.name",
            [run_id, names],
        ).fetchall()
    )
    catalog = columns(conn, run_id)
    tables = grain_tables(conn, run_id)
    for name, path, types, first_seq in rows:
        old = catalog.get((name, path))
        column = Column(frozenset(types), first_seq, bool(old and old.logged), versions.get(name))
        _store_columns(conn, run_id, {(name, path): column})
        if not loops(path):
            continue
        spill(conn, run_id, path, [name])  # its column shows values that are records elsewhere now
        table = tables.get(path)
        if table and _conflicts(conn, table, {name: sql_type(column.types)}):
            rebuild_grain(conn, run_id, path)
            continue
        if table and name in _column_types(conn, table):
            conn.execute(f"UPDATE {q(table)} SET {q(name)} = NULL WHERE run_id = {run_id}")
        _merge(conn, run_id, path, _logs_source(run_id, path, {name: column}), [name])


def rebuild_grain(conn: duckdb.DuckDBPyConnection, run_id: int, path: str) -> None:
    """Recreate one loop path's rows of a run from `logs` (a name's type changed, or an older store),
    in a table whose columns' types suit it."""
    table = grain_tables(conn, run_id).get(path)
    if table:
        spill(conn, run_id, path, _stored_names(_column_types(conn, table)))
        conn.execute(f"DELETE FROM {q(table)} WHERE run_id = {run_id}")
        conn.execute("DELETE FROM _grains WHERE run_id = ? AND loop_path = ?", [run_id, path])
    at_path = {n: c for (n, p), c in columns(conn, run_id).items() if p == path}
    if at_path:
        _merge(conn, run_id, path, _logs_source(run_id, path, at_path), sorted(at_path))
    deeper = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT loop_path FROM _names WHERE run_id = ? AND starts_with(loop_path, ?)", [run_id, path + "/"]
        ).fetchall()
    ]
    for longer in deeper:  # coordinates of deeper rows
        cols = ", ".join(q(c) for c in loops(path))
        source = f"SELECT DISTINCT {cols} FROM logs WHERE run_id = {run_id} AND loop_path = {lit(longer)}"
        _add_coordinates(conn, run_id, path, source)


def rebuild_run(conn: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """Recreate a run's catalog and rows in the wide tables from `logs` (stores written before them)."""
    for path, table in grain_tables(conn, run_id).items():
        spill(conn, run_id, path, _stored_names(_column_types(conn, table)))
        conn.execute(f"DELETE FROM {q(table)} WHERE run_id = {run_id}")
    conn.execute("DELETE FROM _grains WHERE run_id = ?", [run_id])
    conn.execute("DELETE FROM _names WHERE run_id = ?", [run_id])
    conn.execute(
        "INSERT INTO _names SELECT run_id, name, loop_path, list(DISTINCT value_type), min(seq), "
        "bool_or(source = 'logged'), NULL FROM logs WHERE run_id = ? GROUP BY run_id, name, loop_path",
        [run_id],
    )
    conn.execute(
        "UPDATE _names n SET version = v.version FROM (SELECT c.name, arg_max(c.version, j.committed_at) AS version "
        "FROM replay_coverage c JOIN replay_jobs j USING (job_id) WHERE c.run_id = ? GROUP BY c.name) v "
        "WHERE n.run_id = ? AND n.name = v.name",
        [run_id, run_id],
    )
    paths = {r[0] for r in conn.execute("SELECT DISTINCT loop_path FROM _names WHERE run_id = ?", [run_id]).fetchall()}
    for path in sorted(paths, key=len, reverse=True):
        if loops(path):
            rebuild_grain(conn, run_id, path)


def drop_tables(conn: duckdb.DuckDBPyConnection) -> None:
    """Drop every wide table and the catalog, to be built again from `logs` (`rebuild_run`)."""
    for (table,) in conn.execute("SELECT DISTINCT table_name FROM _grains").fetchall():
        conn.execute(f"DROP TABLE IF EXISTS {q(table)}")
    conn.execute("DELETE FROM _grains")
    conn.execute("DELETE FROM _names")


def has_per_run_tables(conn: duckdb.DuckDBPyConnection) -> bool:
    """Whether the store keeps a table per run and loop path (an older florql: no `run_id` column)."""
    return bool(
        conn.execute(
            "SELECT 1 FROM (SELECT DISTINCT table_name FROM _grains) g WHERE NOT EXISTS (SELECT 1 FROM duckdb_columns() c "
            "WHERE c.table_name = g.table_name AND c.schema_name = 'main' AND c.column_name = 'run_id') LIMIT 1"
        ).fetchall()
    )


# ---- building blocks ------------------------------------------------------------------------------
def _store_columns(conn: duckdb.DuckDBPyConnection, run_id: int, changed: dict[tuple[str, str], Column]) -> None:
    """Write catalog entries of (name, loop path) in one statement."""
    if not changed:
        return
    rows = [(n, p, sorted(c.types), c.first_seq, c.logged, c.version) for (n, p), c in changed.items()]
    conn.execute(
        "INSERT OR REPLACE INTO _names SELECT ?, r.* FROM (SELECT unnest(?, max_depth := 2)) r",
        [run_id, [dict(zip(("name", "loop_path", "value_types", "first_seq", "logged", "version"), r)) for r in rows]],
    )


def _logs_source(run_id: int, path: str, shown: dict[str, Column]) -> str:
    """Rows of `logs` the tables show for these names at this path: logged ones, and replayed ones
    of the name's current version."""
    coords = ", ".join(q(c) for c in loops(path))
    version = "CASE name " + " ".join(f"WHEN {lit(n)} THEN {lit(c.version or '')} " for n, c in shown.items()) + "END"
    names = ", ".join(lit(n) for n in shown)
    return (
        f"SELECT name, seq, value_type, value_float, value_int, value_bool, value_str, {coords} FROM logs "
        f"WHERE run_id = {run_id} AND loop_path = {lit(path)} AND name IN ({names}) "
        f"AND (source = 'logged' OR version = {version})"
    )


def _column_types(conn: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    return dict(
        conn.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? AND schema_name = 'main'", [table]
        ).fetchall()
    )


def _stored_names(types: dict[str, str]) -> list[str]:
    return [n for n in types if seq_column(n) in types]


def _conflicts(conn: duckdb.DuckDBPyConnection, table: str, wanted: dict[str, str]) -> bool:
    """Whether `table` has a column of one of these names with another SQL type."""
    present = _column_types(conn, table)
    return any(n in present and present[n] != t for n, t in wanted.items())


def _table(conn: duckdb.DuckDBPyConnection, run_id: int, path: str, wanted: dict[str, str]) -> str:
    """The run's table for the path; when it has none, one of the path's tables whose columns of
    these names (SQL types) agree, created (coordinates only) when none does."""
    found = grain_tables(conn, run_id)
    if path in found:
        return found[path]
    candidates = conn.execute(
        "SELECT DISTINCT table_name FROM _grains WHERE loop_path = ? ORDER BY table_name", [path]
    ).fetchall()
    table = next((t for (t,) in candidates if not _conflicts(conn, t, wanted)), None)
    if table is None:
        taken = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' AND starts_with(table_name, '_w_')"
            ).fetchall()
        }
        table = next(f"_w_{k}" for k in range(1, len(taken) + 2) if f"_w_{k}" not in taken)
        conn.execute(f"CREATE TABLE {q(table)} (run_id INTEGER, {', '.join(f'{q(c)} BIGINT' for c in loops(path))})")
    conn.execute("INSERT INTO _grains VALUES (?, ?, ?)", [run_id, path, table])
    return table


def _segment_of(seq: str) -> str:
    """SQL for the segment (id) of the run's logged record with sequence number `seq`: the one whose
    range starts last at or before it (as `logs` finds it)."""
    return f"(SELECT arg_max(s.segment_id, s.first_seq) FROM _log_segments s WHERE s.run_id = w.run_id AND s.first_seq <= {seq})"


def _to_long_form(
    conn: duckdb.DuckDBPyConnection, run_id: int, table: str, path: str, name: str, join: str = ""
) -> None:
    """Copy the values of `name` the run's rows of `table` store (`join`: only rows that match it)
    into `_log_records`, as the records they are."""
    vtype = long_form.VALUE_TYPE_OF_SQL[_column_types(conn, table)[name]]
    ids = long_form.string_ids(conn, [name, path])
    cols = "".join(f", {q(c)}" for c in loops(path))
    vals = "".join(f", w.{q(c)}" for c in loops(path))
    seq = f"w.{q(seq_column(name))}"
    conn.execute(
        f"INSERT INTO _log_records (run_id, name_id, path_id{cols}, value_{vtype}, seq, segment_id) "
        f"SELECT w.run_id, {ids[name]}, {ids[path]}{vals}, w.{q(name)}, {seq}, {_segment_of(seq)} "
        f"FROM {q(table)} w {join} WHERE w.run_id = {run_id} AND {seq} IS NOT NULL"
    )


def spill(conn: duckdb.DuckDBPyConnection, run_id: int, path: str, names: list[str]) -> None:
    """Move the values of `names` the run's row of the path store into `_log_records`: their
    columns then only show values (recomputed from `logs` by the caller, or merged over)."""
    table = grain_tables(conn, run_id).get(path)
    if not table or not names:
        return
    for name in set(names) & set(_stored_names(_column_types(conn, table))):
        _to_long_form(conn, run_id, table, path, name)
        conn.execute(f"UPDATE {q(table)} SET {q(seq_column(name))} = NULL WHERE run_id = {run_id}")


def regular_pivot(
    records: pa.Table, loop_names: list[str], name_ids: dict[int, str], types: dict[str, frozenset[str]]
) -> pa.Table | None:
    """The pivot of one loop path's records (in seq order) when they are regular, by reshaping
    instead of grouping: every iteration logs the same names in the same order, one value each, of
    one type, and coordinates strictly increase (so no cell repeats). None otherwise.

    Training loops that log the same names every step are regular; anything else is pivoted in SQL.
    Each name's column comes with its sequence numbers (`__seq__<name>`).
    """
    n, width = records.num_rows, len(types)
    if n == 0 or n % width or any(len(t) != 1 for t in types.values()):
        return None
    order = records.column("_name_id").slice(0, width).to_numpy()
    if len(set(order.tolist())) != width:
        return None
    blocks: list[np.ndarray] = []  # the coordinates of each iteration, a block of them at a time
    for start in range(0, n, PIVOT_BLOCK * width):
        at = _iterations(records.slice(start, PIVOT_BLOCK * width), order, len(loop_names))
        if at is None or not _increasing(np.concatenate([blocks[-1][-1:], at]) if blocks else at):
            return None
        blocks.append(at)
    at = np.concatenate(blocks)
    columns = {c: pa.array(at[:, k]) for k, c in enumerate(loop_names)}
    for k, name_id in enumerate(order.tolist()):
        name = name_ids[name_id]
        (vtype,) = types[name]
        values = records.column(f"value_{vtype}")
        if vtype in ("float", "int"):  # a strided slice of the data (others' rows are NULL there: skipped)
            columns[name] = pa.array(_strided(values, k, width))
        else:
            columns[name] = values.combine_chunks().take(pa.array(np.arange(k, n, width)))
        columns[seq_column(name)] = pa.array(_strided(records.column("seq"), k, width))
    return pa.table(columns)


PIVOT_BLOCK = 1 << 16  # iterations checked at a time: small arrays, whose memory is reused


def _iterations(records: pa.Table, order: np.ndarray, depth: int) -> np.ndarray | None:
    """The coordinates of each iteration of `records` (whole iterations) when each logs the names
    in `order` at one coordinate; None otherwise."""
    ids = records.column("_name_id").to_numpy().reshape(-1, len(order))
    if not (ids == order).all():
        return None
    flat = pc.list_flatten(records.column("coords")).to_numpy()
    if len(flat) != records.num_rows * depth:
        return None
    coords = flat.reshape(-1, len(order), depth)
    if not (coords == coords[:, :1, :]).all():
        return None  # an iteration's records at different coordinates
    return coords[:, 0, :]


def _increasing(at: np.ndarray) -> bool:
    """Whether coordinates (rows, outermost loop first) strictly increase: no cell repeats."""
    step = at[1:] - at[:-1]
    first = (step != 0).argmax(axis=1)  # the outermost loop that moved
    return not (len(step) and (step[np.arange(len(step)), first] <= 0).any())


def _strided(column: pa.ChunkedArray, first: int, step: int) -> np.ndarray:
    """Every `step`-th value of a fixed-width column from `first` on, read from its values buffers
    as they are (a NULL's slot holds anything: the stride skips them)."""
    dtype = np.dtype(column.type.to_pandas_dtype())
    parts, start = [], 0
    for chunk in column.chunks:
        data = np.frombuffer(chunk.buffers()[1], dtype)[chunk.offset : chunk.offset + len(chunk)]
        parts.append(data[(first - start) % step :: step])
        start += len(chunk)
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _merge(
    conn: duckdb.DuckDBPyConnection,
    run_id: int,
    path: str,
    source: str,
    names: list[str],
    pivot: pa.Table | None = None,
    stored: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Pivot `source` (long rows at `path`) to one row per coordinate, the last value per name, and
    merge it into the run's rows of the path's table: present coordinates are updated, new ones
    inserted. `stored`: names whose values are stored here (with their sequence numbers; a value
    they overwrite moves to `_log_records`); the others' columns only show values. `pivot`: the
    same pivot built already (`regular_pivot`)."""
    catalog = {n: c for (n, p), c in columns(conn, run_id).items() if p == path and n in names}
    table = _table(conn, run_id, path, {n: sql_type(catalog[n].types) for n in names})
    present = _column_types(conn, table)
    for name in names:
        if name not in present:
            conn.execute(f"ALTER TABLE {q(table)} ADD COLUMN {q(name)} {sql_type(catalog[name].types)}")
        if name in stored and seq_column(name) not in present:
            conn.execute(f"ALTER TABLE {q(table)} ADD COLUMN {q(seq_column(name))} BIGINT")
    coords = [q(c) for c in loops(path)]
    values = ", ".join(
        f"arg_max({value_expr(catalog[n].types)}, seq) FILTER (WHERE name = {lit(n)})::{sql_type(catalog[n].types)} AS {q(n)}"
        + (f", max(seq) FILTER (WHERE name = {lit(n)}) AS {q(seq_column(n))}" if n in stored else "")
        for n in names
    )
    if pivot is not None and _appends(conn, run_id, table, coords[0], pivot):
        conn.register("_pivot_in", pivot)
        try:
            conn.execute(f"INSERT INTO {q(table)} BY NAME SELECT {run_id} AS run_id, * FROM _pivot_in")
            _add_enclosing(conn, run_id, path, "_pivot_in")
        finally:
            conn.unregister("_pivot_in")
        return
    if pivot is not None:
        conn.register("_pivot_in", pivot)
        conn.execute("CREATE OR REPLACE TEMP TABLE _pivot AS SELECT * FROM _pivot_in")
        conn.unregister("_pivot_in")
    else:
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE _pivot AS SELECT {', '.join(coords)}, {values} FROM ({source}) "
            f"GROUP BY {', '.join(coords)} ORDER BY {', '.join(coords)}"  # clustered: zone maps skip the rest
        )
    try:
        outer = coords[0]
        low = conn.execute(f"SELECT min({outer}) FROM _pivot").fetchall()[0][0]
        if low is None:
            return
        mine = f"w.run_id = {run_id} AND w.{outer} >= {int(low)}"
        match = " AND ".join(f"w.{c} = p.{c}" for c in coords)
        overlap = conn.execute(f"SELECT 1 FROM {q(table)} w WHERE {mine} LIMIT 1").fetchall()
        if overlap:
            _update(conn, run_id, table, path, names, stored, f"{mine} AND {match}")
            conn.execute(
                f"INSERT INTO {q(table)} BY NAME SELECT {run_id} AS run_id, p.* FROM _pivot p "
                f"WHERE NOT EXISTS (SELECT 1 FROM {q(table)} w WHERE {mine} AND {match})"
            )
        else:
            conn.execute(f"INSERT INTO {q(table)} BY NAME SELECT {run_id} AS run_id, * FROM _pivot")
        _add_enclosing(conn, run_id, path, "_pivot")
    finally:
        conn.execute("DROP TABLE IF EXISTS _pivot")


def _appends(conn: duckdb.DuckDBPyConnection, run_id: int, table: str, outer: str, pivot: pa.Table) -> bool:
    """Whether a pivot's rows all lie beyond the run's rows in the table (nothing to update)."""
    low = pc.min(pivot.column(0)).as_py()
    return (
        low is not None
        and not conn.execute(
            f"SELECT 1 FROM {q(table)} WHERE run_id = {run_id} AND {outer} >= {int(low)} LIMIT 1"
        ).fetchall()
    )


def _add_enclosing(conn: duckdb.DuckDBPyConnection, run_id: int, path: str, pivot: str) -> None:
    """Give the enclosing loops' tables the coordinates of the pivot's rows they lack."""
    parts = loops(path)
    for depth in range(len(parts) - 1, 0, -1):
        cols = ", ".join(q(c) for c in parts[:depth])
        _add_coordinates(conn, run_id, "/".join(parts[:depth]), f"SELECT DISTINCT {cols} FROM {pivot}")


def _update(
    conn: duckdb.DuckDBPyConnection,
    run_id: int,
    table: str,
    path: str,
    names: list[str],
    stored: set[str] | frozenset[str],
    on: str,
) -> None:
    """Merge `_pivot` into the rows it shares with the table (`on`). A stored value the pivot
    overwrites is a record still: it moves to `_log_records` first."""
    for name in stored:
        seq = q(seq_column(name))
        _to_long_form(conn, run_id, table, path, name, f"JOIN _pivot p ON {on} AND p.{seq} IS NOT NULL")
    updates = []
    for name in names:
        if name in stored:
            seq = q(seq_column(name))
            updates.append(f"{q(name)} = CASE WHEN p.{seq} IS NULL THEN w.{q(name)} ELSE p.{q(name)} END")
            updates.append(f"{seq} = coalesce(p.{seq}, w.{seq})")
        else:
            updates.append(f"{q(name)} = coalesce(p.{q(name)}, w.{q(name)})")
    conn.execute(f"UPDATE {q(table)} w SET {', '.join(updates)} FROM _pivot p WHERE {on}")


def _add_coordinates(conn: duckdb.DuckDBPyConnection, run_id: int, path: str, source: str) -> None:
    """Insert the coordinates of `source` (columns: the path's loops) that the run's rows lack."""
    table = _table(conn, run_id, path, {})
    coords = [q(c) for c in loops(path)]
    match = " AND ".join(f"w.{c} = s.{c}" for c in coords)
    conn.execute(
        f"INSERT INTO {q(table)} BY NAME SELECT {run_id} AS run_id, s.* FROM ({source}) s WHERE NOT EXISTS "
        f"(SELECT 1 FROM {q(table)} w WHERE w.run_id = {run_id} AND {match})"
    )
