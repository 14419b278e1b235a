"""The long form, `logs`: every record ever ingested, one row each, each value stored once.

Most values are stored in the wide tables (`florql.storage.wide`): a logged value that is the last
at its coordinates, of a name of one type, sits in its name's column with its sequence number
beside it, and `logs` reads it from there (one branch per such column). `_log_records` holds the
rest: values overwritten at the same coordinates, names logged outside every loop or with more
than one type, replayed records, and every record of a store written before.

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

from florql.storage import segments
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


SEQ_PREFIX = "__seq__"  # a wide table's column of the sequence numbers of the values it stores


def seq_column(name: str) -> str:
    return SEQ_PREFIX + name


VALUE_TYPE_OF_SQL = {"DOUBLE": "float", "BIGINT": "int", "BOOLEAN": "bool", "VARCHAR": "str"}
_VALUE_COLUMNS = ("value_float", "value_int", "value_bool", "value_str")


def _records_sql(loops: list[str]) -> str:
    """The rows of `_log_records`, as `logs` shows them."""
    loop_cols = "".join(f", r.{q(n)}" for n in loops)
    return (
        "SELECT r.run_id, n.text AS name, p.text AS loop_path, CASE WHEN r.value_float IS NOT NULL THEN 'float' "
        "WHEN r.value_int IS NOT NULL THEN 'int' WHEN r.value_bool IS NOT NULL THEN 'bool' "
        "WHEN r.value_str IS NOT NULL THEN 'str' END AS value_type, r.value_float, r.value_int, r.value_bool, "
        "r.value_str, CASE WHEN r.job_id IS NULL THEN 'logged' ELSE 'replayed' END AS source, r.job_id, r.seq, "
        f"s.text AS segment, r.version{loop_cols} FROM _log_records r JOIN _log_strings n ON n.id = r.name_id "
        "JOIN _log_strings p ON p.id = r.path_id LEFT JOIN _log_strings s ON s.id = r.segment_id"
    )


def _stored_branch(table: str, path: str, name: str, sql_type: str, loops: list[str]) -> str:
    """One name's values stored in a wide table (those with a sequence number), as long rows."""
    vtype = VALUE_TYPE_OF_SQL[sql_type]
    values = ", ".join(
        f"w.{q(name)} AS {c}" if c == f"value_{vtype}" else f"NULL::{t} AS {c}"
        for c, t in zip(_VALUE_COLUMNS, ("DOUBLE", "BIGINT", "BOOLEAN", "VARCHAR"))
    )
    at = set(path.split("/"))
    loop_cols = "".join(f", w.{q(n)}" if n in at else f", NULL::BIGINT AS {q(n)}" for n in loops)
    seq = q(seq_column(name))
    return (
        f"SELECT w.run_id, {lit(name)} AS name, {lit(path)} AS loop_path, {lit(vtype)} AS value_type, {values}, "
        f"w.{seq} AS seq{loop_cols} FROM {q(table)} w WHERE w.{seq} IS NOT NULL"
    )


def stored_columns(conn: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str, str]]:
    """(table, loop path, name, SQL type) of every wide-table column that stores values."""
    return [
        (t, p, c, ty)
        for t, p, c, ty in conn.execute(
            "SELECT c.table_name, g.loop_path, c.column_name, c.data_type FROM duckdb_columns() c "
            "JOIN (SELECT DISTINCT table_name, loop_path FROM _grains) g USING (table_name) "
            "WHERE c.schema_name = 'main' AND list_contains((SELECT list(column_name) FROM duckdb_columns() s "
            "WHERE s.table_name = c.table_name AND s.schema_name = 'main'), ? || c.column_name) "
            "ORDER BY c.table_name, c.column_index",
            [SEQ_PREFIX],
        ).fetchall()
    ]


def view_sql(loops: list[str], stored: list[tuple[str, str, str, str]]) -> str:
    """`logs`: the records only the long form holds, and the values the wide tables store (each
    with its sequence number; its segment is the one whose range of sequence numbers holds it)."""
    records = _records_sql(loops)
    if not stored:
        return records
    branches = " UNION ALL ".join(_stored_branch(t, p, n, ty, loops) for t, p, n, ty in stored)
    loop_cols = "".join(f", w.{q(n)}" for n in loops)
    return (
        f"{records} UNION ALL SELECT w.run_id, w.name, w.loop_path, w.value_type, w.value_float, w.value_int, "
        "w.value_bool, w.value_str, 'logged' AS source, NULL::VARCHAR AS job_id, w.seq, s.text AS segment, "
        f"NULL::VARCHAR AS version{loop_cols} FROM ({branches}) w ASOF LEFT JOIN _log_segments g "
        "ON g.run_id = w.run_id AND w.seq >= g.first_seq LEFT JOIN _log_strings s ON s.id = g.segment_id"
    )


def create_view(conn: duckdb.DuckDBPyConnection) -> None:
    """(Re)create `logs` when its SQL changes: a view's columns are fixed when it is created, so it
    follows each new loop column and each wide-table column that stores values. Columns are only
    ever added, so while the tables' column counts hold, so does the view (checked first: cheap)."""
    layout = repr(
        conn.execute(
            "SELECT count(*), sum(column_count) FROM duckdb_tables() WHERE schema_name = 'main' "
            "AND (starts_with(table_name, '_w_') OR table_name = '_log_records')"
        ).fetchall()
        + conn.execute("SELECT count(DISTINCT table_name) FROM _grains").fetchall()
    )
    present = conn.execute(
        "SELECT v.sql, v.part FROM _views v WHERE v.name = 'logs' AND EXISTS (SELECT 1 FROM duckdb_views() "
        "WHERE view_name = 'logs' AND schema_name = 'main')"
    ).fetchall()
    if present and present[0][1] == layout:
        return
    sql = view_sql(loop_columns(conn), stored_columns(conn))
    if not present or present[0][0] != sql:
        conn.execute(f"CREATE OR REPLACE VIEW logs AS {sql}")
    conn.execute("INSERT OR REPLACE INTO _views VALUES ('logs', ?, ?)", [sql, layout])


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


def _strings(column: pa.ChunkedArray) -> list[str]:
    """The distinct values of a string column, plain or dictionary-encoded."""
    if pa.types.is_dictionary(column.type):
        return list(dict.fromkeys(v for chunk in column.chunks for v in chunk.dictionary.to_pylist()))
    return column.unique().to_pylist()


def _int32s(values: np.ndarray) -> pa.Array:
    """An Arrow array over NumPy int32s, built from its buffer: `pa.array` imports pandas on its
    first call (0.3 s of a `florql query` command that ingests a replay)."""
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def _encoded(column: pa.ChunkedArray, ids: dict[str, int]) -> pa.ChunkedArray:
    """`column` (strings, plain or dictionary-encoded) as the ids of its values."""
    parts = []
    for chunk in column.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        lookup = _int32s(np.array([ids[v] for v in chunk.dictionary.to_pylist()], np.int32))
        parts.append(pc.take(lookup, chunk.indices))
    return pa.chunked_array(parts, pa.int32())


def encode(conn: duckdb.DuckDBPyConnection, parts: list[tuple[str, pa.Table]]) -> pa.Table:
    """The rows of segments (each its path and its rows, segment schema) with the ids of their
    name, loop path and segment added (`_name_id`, `_path_id`, `_segment_id`): grouping on them is
    cheaper than on the strings. Adds the long form's columns for new loops."""
    tables = [t.replace_schema_metadata(None) for _, t in parts]
    if any(not t.schema.equals(tables[0].schema) for t in tables):  # segments of older florql versions among them
        tables = [t.cast(segments.SCHEMA) for t in tables]
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        return table
    paths = _strings(table.column("loop_path"))
    ensure_loop_columns(conn, {n for p in paths for n in p.split("/") if n})
    ids = string_ids(conn, [*_strings(table.column("name")), *paths, *(p for p, _ in parts)])
    table = table.append_column("_name_id", _encoded(table.column("name"), ids))
    table = table.append_column("_path_id", _encoded(table.column("loop_path"), ids))
    segment_ids = [_int32s(np.full(t.num_rows, ids[p], np.int32)) for p, t in parts]
    return table.append_column("_segment_id", pa.chunked_array(segment_ids, pa.int32()))


def insert(
    conn: duckdb.DuckDBPyConnection,
    run_id: int,
    parts: list[tuple[str, pa.Table]],
    job_id: str | None = None,
    versions: dict[str, str] | None = None,
) -> pa.Table:
    """Insert every row of segments into `_log_records` (`encode`, then `insert_rows`); returns them encoded."""
    table = encode(conn, parts)
    insert_rows(conn, run_id, table, job_id, versions)
    return table


def insert_rows(
    conn: duckdb.DuckDBPyConnection,
    run_id: int,
    table: pa.Table,
    job_id: str | None = None,
    versions: dict[str, str] | None = None,
    where: str = "TRUE",
    qualify: str | None = None,
) -> None:
    """Insert encoded rows (`encode`) into `_log_records`, spreading `coords` into one column per
    loop name, with one statement per loop path; `where`, `qualify`: only the rows they keep.

    Replayed rows (with a `job_id`) carry their statement's version, and a cell already covered by
    another job for that version is not inserted twice.
    """
    if table.num_rows == 0:
        return
    version = (
        "CASE s.name " + " ".join(f"WHEN {lit(n)} THEN {lit(v)}" for n, v in versions.items()) + " END"
        if versions
        else "NULL"
    )
    conn.register("_segment_in", table)
    try:
        paths = conn.execute(f"SELECT DISTINCT _path_id, loop_path FROM _segment_in WHERE {where}").fetchall()
        for path_id, path in paths:
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
                f" WHERE _path_id = {path_id} AND ({where}){keep}{f' QUALIFY {qualify}' if qualify else ''}",
                [job_id],
            )
    finally:
        conn.unregister("_segment_in")


def migrate(conn: duckdb.DuckDBPyConnection) -> bool:
    """Create `logs`; a store of an older florql, whose `logs` is a table, has it moved into the
    compact form (returns True then: its wide tables are to be built again)."""
    kind = conn.execute(
        "SELECT table_type FROM information_schema.tables WHERE table_schema = 'main' AND table_name = 'logs'"
    ).fetchall()
    if kind == [("VIEW",)]:
        return False
    if not kind:
        create_view(conn)
        return False
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
    return True
