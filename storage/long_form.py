"""The long form: every record ever ingested, one row each, kept compact.

`_log_records` holds a row per record: the run, ids for the repetitive strings (the name, the loop
path, the segment; `_log_strings` spells them), one BIGINT column per loop name, the typed value
columns, and for replayed records the job and the statement version. `logs` is a view that shows
it as users know it. Two of its columns are derived rather than stored: `value_type` (a record
holds exactly one non-NULL value column) and `source` (only replayed records have a job).

Strings cost DuckDB far more to insert than integers (five VARCHAR columns per record made up most
of the ingest time), so the long form stores integers and the view joins them back.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from florql.storage.views import lit, q

FIXED_COLUMNS = (
    "run_id",
    "name_id",
    "path_id",
    "value_float",
    "value_int",
    "value_bool",
    "value_str",
    "job_id",
    "seq",
    "segment_id",
    "version",
)


def loop_columns(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """The loop columns of the long form, in the order they were added."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = '_log_records' AND schema_name = 'main' "
            "ORDER BY column_index"
        ).fetchall()
        if r[0] not in FIXED_COLUMNS
    ]


def view_sql(loops: list[str]) -> str:
    """`logs` as before the long form was compacted: the same columns, in the same order."""
    loop_cols = "".join(f", r.{q(n)}" for n in loops)
    return (
        "SELECT r.run_id, n.text AS name, p.text AS loop_path, CASE WHEN r.value_float IS NOT NULL THEN 'float' "
        "WHEN r.value_int IS NOT NULL THEN 'int' WHEN r.value_bool IS NOT NULL THEN 'bool' "
        "WHEN r.value_str IS NOT NULL THEN 'str' END AS value_type, r.value_float, r.value_int, r.value_bool, "
        "r.value_str, CASE WHEN r.job_id IS NULL THEN 'logged' ELSE 'replayed' END AS source, r.job_id, r.seq, "
        f"s.text AS segment, r.version{loop_cols} FROM _log_records r JOIN _log_strings n ON n.id = r.name_id "
        "JOIN _log_strings p ON p.id = r.path_id LEFT JOIN _log_strings s ON s.id = r.segment_id"
    )


def create_view(conn: duckdb.DuckDBPyConnection) -> None:
    """(Re)create `logs`: a view's columns are fixed when it is created, so it follows each new loop column."""
    conn.execute(f"CREATE OR REPLACE VIEW logs AS {view_sql(loop_columns(conn))}")


def ensure_loop_columns(conn: duckdb.DuckDBPyConnection, loop_names: set[str]) -> None:
    if _add_loop_columns(conn, loop_names):
        create_view(conn)


def _add_loop_columns(conn: duckdb.DuckDBPyConnection, loop_names: set[str]) -> bool:
    missing = sorted(loop_names - set(loop_columns(conn)))
    for name in missing:
        conn.execute(f"ALTER TABLE _log_records ADD COLUMN {q(name)} BIGINT")
    return bool(missing)


def string_ids(conn: duckdb.DuckDBPyConnection, texts: list[str]) -> dict[str, int]:
    """The ids of `texts` in `_log_strings`, adding those it lacks."""
    ids = dict(
        (text, id_)
        for id_, text in conn.execute(
            "SELECT id, text FROM _log_strings WHERE list_contains(?, text)", [texts]
        ).fetchall()
    )
    new = [t for t in dict.fromkeys(texts) if t not in ids]
    if new:
        first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM _log_strings").fetchall()[0][0]
        ids.update({t: first + k for k, t in enumerate(new)})
        conn.execute(
            "INSERT INTO _log_strings SELECT unnest(?::INTEGER[]), unnest(?::VARCHAR[])", [[ids[t] for t in new], new]
        )
    return ids


def _encoded(column: pa.ChunkedArray, ids: dict[str, int]) -> pa.Array:
    """`column` (strings) as the ids of its values."""
    values = column.unique()
    positions = pc.index_in(column, value_set=values)
    return pa.array(np.array([ids[v] for v in values.to_pylist()], np.int32)).take(positions.combine_chunks())


def insert(
    conn: duckdb.DuckDBPyConnection,
    run_id: int,
    parts: list[tuple[str, pa.Table]],
    job_id: str | None = None,
    versions: dict[str, str] | None = None,
) -> pa.Table:
    """Insert the rows of segments (each its path and its rows, segment schema), spreading `coords`
    into one column per loop name, with one statement per loop path for all of them.

    Replayed rows (with a `job_id`) carry their statement's version, and a cell already covered by
    another job for that version is not inserted twice. Returns the rows with their name's and loop
    path's ids added (`_name_id`, `_path_id`): grouping on them is cheaper than on the strings.
    """
    table = pa.concat_tables([t for _, t in parts])
    if table.num_rows == 0:
        return table
    paths = table.column("loop_path").unique().to_pylist()
    ensure_loop_columns(conn, {n for p in paths for n in p.split("/") if n})
    ids = string_ids(conn, [*table.column("name").unique().to_pylist(), *paths, *(p for p, _ in parts)])
    table = table.append_column("_name_id", _encoded(table.column("name"), ids))
    table = table.append_column("_path_id", _encoded(table.column("loop_path"), ids))
    segment_ids = np.repeat([ids[p] for p, _ in parts], [t.num_rows for _, t in parts]).astype(np.int32)
    table = table.append_column("_segment_id", pa.array(segment_ids))
    version = (
        "CASE s.name " + " ".join(f"WHEN {lit(n)} THEN {lit(v)}" for n, v in versions.items()) + " END"
        if versions
        else "NULL"
    )
    conn.register("_segment_in", table)
    try:
        for path in paths:
            loops = [n for n in path.split("/") if n]
            cols = "".join(f", {q(n)}" for n in loops)
            vals = "".join(f", coords[{i + 1}]" for i in range(len(loops)))
            outer = "coords[1]" if loops else "NULL"
            keep = (
                f" AND NOT EXISTS (SELECT 1 FROM replay_coverage c WHERE c.run_id = {run_id} "
                f"AND c.name = s.name AND c.version = {version} AND c.outer_index = {outer})"
                if versions
                else ""
            )
            conn.execute(
                f"INSERT INTO _log_records (run_id, name_id, path_id{cols}, value_float, value_int, value_bool, value_str,"
                f" job_id, seq, segment_id, version) SELECT {run_id}, _name_id, _path_id{vals}, value_float, value_int,"
                f" value_bool, value_str, ?, seq, _segment_id, {version} FROM _segment_in s"
                f" WHERE _path_id = {ids[path]}{keep}",
                [job_id],
            )
    finally:
        conn.unregister("_segment_in")
    return table


def migrate(conn: duckdb.DuckDBPyConnection) -> None:
    """Create `logs`; a store of an older florql, whose `logs` is a table, has it moved into the compact form."""
    kind = conn.execute(
        "SELECT table_type FROM information_schema.tables WHERE table_schema = 'main' AND table_name = 'logs'"
    ).fetchall()
    if kind == [("VIEW",)]:
        return
    if not kind:
        create_view(conn)
        return
    old = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'logs' AND schema_name = 'main' "
            "ORDER BY column_index"
        ).fetchall()
    ]
    loops = old[old.index("version") + 1 :]
    conn.execute("BEGIN")
    try:
        _add_loop_columns(conn, set(loops))
        conn.execute(
            "INSERT INTO _log_strings SELECT row_number() OVER (ORDER BY text), text FROM (SELECT name AS text FROM logs "
            "UNION SELECT loop_path FROM logs UNION SELECT segment FROM logs WHERE segment IS NOT NULL)"
        )
        cols = "".join(f", {q(n)}" for n in loops)
        conn.execute(
            f"INSERT INTO _log_records (run_id, name_id, path_id{cols}, value_float, value_int, value_bool, value_str,"
            f" job_id, seq, segment_id, version) SELECT l.run_id, n.id, p.id{''.join(f', l.{q(c)}' for c in loops)},"
            " l.value_float, l.value_int, l.value_bool, l.value_str, l.job_id, l.seq, s.id, l.version FROM logs l"
            " JOIN _log_strings n ON n.text = l.name JOIN _log_strings p ON p.text = l.loop_path"
            " LEFT JOIN _log_strings s ON s.text = l.segment ORDER BY l.run_id, l.seq"
        )
        conn.execute("DROP TABLE logs")
        create_view(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
