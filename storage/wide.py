"""The physical wide tables and the catalog that describes them, maintained at ingest.

Per run and loop path (`epoch/step`) one table (`_w<run>_<k>`): a row per coordinate of that loop
and a column per name logged there, holding the value shown (the last one logged at that
coordinate; for a replayed name, the last one of its current statement version). A table also
holds every coordinate of deeper loops' rows (`epoch` gets a row for each epoch that has steps), so
a query at a loop's grain reads that loop's table joined with its enclosing loops' tables on
their coordinates, and never scans `logs` (which keeps every record, in long form).

The catalog, small and read by binding and planning:
- `_names`: per run, name and loop path: the value types, the first sequence number (column
  order), whether the run itself logged it, and the statement version a replayed name shows.
- `_grains`: per run and loop path, the wide table that holds it.

Everything here runs inside the ingest's transaction: tables and catalog change with the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    """Merge the run's new logged records into its tables: `records` has the segment schema plus
    the ids of name and loop path (`_name_id`, `_path_id`, see `long_form.insert`), in seq order.

    The records are already in `logs`. Their sequence numbers follow every stored one, so they
    win over what a table holds at the same coordinates.
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
    retyped: set[str] = set()
    changed: dict[tuple[str, str], Column] = {}
    for name, path, types, first_seq in summary:
        old = catalog.get((name, path))
        merged = frozenset(types) | (old.types if old else frozenset())
        if old and merged != old.types and path in tables:
            retyped.add(path)  # the column's type changes: the table is rebuilt from `logs`
        column = Column(merged, min(first_seq, old.first_seq) if old else first_seq, True, old.version if old else None)
        if column != old:
            changed[(name, path)] = column
    _store_columns(conn, run_id, changed)
    for path in sorted({p for _, p, _, _ in summary} - retyped, key=len, reverse=True):
        if not loops(path):
            continue  # names outside every loop are read from `logs` (views.wide_select)
        names = sorted({n for n, p, _, _ in summary if p == path})
        coords = ", ".join(f"coords[{i + 1}] AS {q(c)}" for i, c in enumerate(loops(path)))
        source = (
            f"SELECT name, seq, value_float, value_int, value_bool, value_str, {coords} FROM _staged "
            f"WHERE _path_id = {path_ids[path]}"
        )
        at_path = (
            records if len(path_ids) == 1 else records.filter(pc.equal(records.column("_path_id"), path_ids[path]))
        )
        shown = {n: (changed.get((n, path)) or catalog[(n, path)]).types for n in names}
        _merge(conn, run_id, path, source, names, regular_pivot(at_path, loops(path), name_ids, shown))
    for path in retyped:
        rebuild_grain(conn, run_id, path)


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
        if old and old.types != column.types and path in tables:
            rebuild_grain(conn, run_id, path)
            continue
        if path in tables and old:
            conn.execute(f"UPDATE {q(tables[path])} SET {q(name)} = NULL")
        _merge(conn, run_id, path, _logs_source(run_id, path, {name: column}), [name])


def rebuild_grain(conn: duckdb.DuckDBPyConnection, run_id: int, path: str) -> None:
    """Recreate one loop path's table from `logs` (a name's type changed, or an older store)."""
    table = grain_tables(conn, run_id).get(path)
    if table:
        conn.execute(f"DROP TABLE {q(table)}")
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
    """Recreate a run's catalog and tables from `logs` (stores written before they existed)."""
    for (table,) in conn.execute("SELECT table_name FROM _grains WHERE run_id = ?", [run_id]).fetchall():
        conn.execute(f"DROP TABLE IF EXISTS {q(table)}")
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


def _table(conn: duckdb.DuckDBPyConnection, run_id: int, path: str) -> str:
    """The path's table, created (coordinates only) when missing."""
    found = grain_tables(conn, run_id)
    if path in found:
        return found[path]
    taken = set(found.values())
    k = len(found)
    while f"_w{run_id}_{k}" in taken:
        k += 1
    table = f"_w{run_id}_{k}"
    conn.execute(f"CREATE TABLE {q(table)} ({', '.join(f'{q(c)} BIGINT' for c in loops(path))})")
    conn.execute("INSERT INTO _grains VALUES (?, ?, ?)", [run_id, path, table])
    return table


def regular_pivot(
    records: pa.Table, loop_names: list[str], name_ids: dict[int, str], types: dict[str, frozenset[str]]
) -> pa.Table | None:
    """The pivot of one loop path's records (in seq order) when they are regular, by reshaping
    instead of grouping: every iteration logs the same names in the same order, one value each, of
    one type, and coordinates strictly increase (so no cell repeats). None otherwise.

    Training loops that log the same names every step are regular; anything else is pivoted in SQL.
    """
    n, width, depth = records.num_rows, len(types), len(loop_names)
    if n == 0 or n % width or any(len(t) != 1 for t in types.values()):
        return None
    ids = records.column("_name_id").to_numpy().reshape(-1, width)
    if len(set(ids[0].tolist())) != width or not (ids == ids[0]).all():
        return None
    flat = pc.list_flatten(records.column("coords")).to_numpy()
    if len(flat) != n * depth:
        return None
    coords = flat.reshape(-1, width, depth)
    if not (coords == coords[:, :1, :]).all():
        return None  # an iteration's records at different coordinates
    at = coords[:, 0, :]
    step = at[1:] - at[:-1]
    first = (step != 0).argmax(axis=1)  # the outermost loop that moved
    if len(step) and (step[np.arange(len(step)), first] <= 0).any():
        return None  # a coordinate repeats, or goes back
    columns = {c: pa.array(at[:, k]) for k, c in enumerate(loop_names)}
    for k, name_id in enumerate(ids[0].tolist()):
        name = name_ids[name_id]
        (vtype,) = types[name]
        values = records.column(f"value_{vtype}")
        if vtype in ("float", "int"):  # a strided slice of the buffer (others' rows are NULL: filled, then skipped)
            columns[name] = pa.array(pc.fill_null(values, 0).to_numpy()[k::width])
        else:
            columns[name] = values.combine_chunks().take(pa.array(np.arange(k, n, width)))
    return pa.table(columns)


def _merge(
    conn: duckdb.DuckDBPyConnection,
    run_id: int,
    path: str,
    source: str,
    names: list[str],
    pivot: pa.Table | None = None,
) -> None:
    """Pivot `source` (long rows at `path`) to one row per coordinate, the last value per name, and
    merge it into the path's table: present coordinates are updated, new ones inserted. `pivot`:
    the same pivot built already (`regular_pivot`)."""
    catalog = {n: c for (n, p), c in columns(conn, run_id).items() if p == path and n in names}
    table = _table(conn, run_id, path)
    present = {
        r[0]
        for r in conn.execute(f"SELECT column_name FROM duckdb_columns() WHERE table_name = {lit(table)}").fetchall()
    }
    for name in names:
        if name not in present:
            conn.execute(f"ALTER TABLE {q(table)} ADD COLUMN {q(name)} {sql_type(catalog[name].types)}")
    coords = [q(c) for c in loops(path)]
    values = ", ".join(
        f"arg_max({value_expr(catalog[n].types)}, seq) FILTER (WHERE name = {lit(n)})::{sql_type(catalog[n].types)} AS {q(n)}"
        for n in names
    )
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
        match = " AND ".join(f"w.{c} = p.{c}" for c in coords) + f" AND w.{outer} >= {int(low)}"
        overlap = conn.execute(f"SELECT 1 FROM {q(table)} WHERE {outer} >= {int(low)} LIMIT 1").fetchall()
        if overlap:
            updates = ", ".join(f"{q(n)} = coalesce(p.{q(n)}, w.{q(n)})" for n in names)
            conn.execute(f"UPDATE {q(table)} w SET {updates} FROM _pivot p WHERE {match}")
            conn.execute(
                f"INSERT INTO {q(table)} BY NAME SELECT p.* FROM _pivot p "
                f"WHERE NOT EXISTS (SELECT 1 FROM {q(table)} w WHERE {match})"
            )
        else:
            conn.execute(f"INSERT INTO {q(table)} BY NAME SELECT * FROM _pivot")
        parts = loops(path)
        for depth in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:depth])
            cols = ", ".join(q(c) for c in parts[:depth])
            _add_coordinates(conn, run_id, prefix, f"SELECT DISTINCT {cols} FROM _pivot")
    finally:
        conn.execute("DROP TABLE IF EXISTS _pivot")


def _add_coordinates(conn: duckdb.DuckDBPyConnection, run_id: int, path: str, source: str) -> None:
    """Insert the coordinates of `source` (columns: the path's loops) that the path's table lacks."""
    table = _table(conn, run_id, path)
    coords = [q(c) for c in loops(path)]
    match = " AND ".join(f"w.{c} = s.{c}" for c in coords)
    conn.execute(
        f"INSERT INTO {q(table)} BY NAME SELECT s.* FROM ({source}) s WHERE NOT EXISTS "
        f"(SELECT 1 FROM {q(table)} w WHERE {match})"
    )
