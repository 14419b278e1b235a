"""What the server needs from a query engine, and two engines that provide it.

`Backend` is the slice of `florql.connect()`'s interface the server uses; any object
with these members works (florql's `Database`, or `DuckDBBackend` over a plain
DuckDB connection, which tests and benchmarks use).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import sqlglot

from florql.api import ColumnInfo, TableInfo  # the query API's catalog records
from florql.errors import from_duckdb


class ResultLike(Protocol):  # read-only properties: florql's Result computes its schema on demand
    @property
    def schema(self) -> pa.Schema: ...

    warnings: list[str]

    def batches(self, batch_size: int = ...) -> Iterator[pa.RecordBatch]: ...

    def close(self) -> None: ...


class ColumnLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def type(self) -> pa.DataType: ...
    @property
    def nullable(self) -> bool: ...
    @property
    def comment(self) -> str: ...


class TableLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...  # 'table' | 'view'
    @property
    def columns(self) -> Sequence[ColumnLike]: ...


class Backend(Protocol):
    settings: dict[str, Any]

    def sql(self, query: str, params: Sequence[Any] | None = None, /, *, dialect: str = ...) -> ResultLike: ...

    def tables(self) -> Sequence[TableLike]: ...


class EngineError(Exception):
    """An error from DuckDB, carrying the SQLSTATE a PostgreSQL client expects."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def engine_error(e: duckdb.Error) -> EngineError:
    """DuckDB's error with the SQLSTATE a PostgreSQL client expects (florql's own mapping)."""
    err = from_duckdb(e)
    return EngineError(str(err), err.sqlstate)


class ArrowResult:
    """A DuckDB result as a stream of record batches (never materialised whole)."""

    def __init__(self, reader: pa.RecordBatchReader, cursor: duckdb.DuckDBPyConnection | None = None) -> None:
        self.reader = reader
        self.cursor = cursor
        self.schema = reader.schema
        self.warnings: list[str] = []

    def batches(self, batch_size: int = 10_000) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.reader
        except duckdb.Error as e:
            raise engine_error(e) from e
        finally:
            self.close()

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None


def run_duckdb(
    con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] | None = None, batch_size: int = 10_000
) -> ArrowResult:
    """Execute on a fresh cursor so that concurrent sessions never share one."""
    cursor = con.cursor()
    try:
        relation = cursor.sql(query, params=list(params) if params else None)
        if relation is None:
            raise EngineError("statement returned no result", "0A000")
        reader = relation.to_arrow_reader(batch_size)
    except duckdb.Error as e:
        cursor.close()
        raise engine_error(e) from e
    return ArrowResult(reader, cursor)


class DuckDBBackend:
    """A `Backend` over a plain DuckDB database: user queries are PostgreSQL SQL transpiled by sqlglot."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.settings: dict[str, Any] = {}

    def sql(self, query: str, params: Sequence[Any] | None = None, *, dialect: str = "duckdb") -> ArrowResult:
        if dialect != "duckdb":
            try:
                query = ";".join(e.sql("duckdb") for e in sqlglot.parse(query, read=dialect) if e)
            except sqlglot.errors.ParseError as e:
                raise EngineError(str(e), "42601") from e
        return run_duckdb(self.con, query, params)

    def tables(self) -> list[TableInfo]:
        with self.con.cursor() as cursor:
            rows = cursor.execute(
                "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1"
            ).fetchall()
            return [self._table(cursor, name, kind) for name, kind in rows]

    @staticmethod
    def _table(cursor: duckdb.DuckDBPyConnection, name: str, kind: str) -> TableInfo:
        schema = cursor.sql(f'SELECT * FROM "{name}" LIMIT 0').to_arrow_table().schema
        columns = [ColumnInfo(f.name, f.type, f.nullable) for f in schema]
        return TableInfo(name, "view" if kind == "VIEW" else "table", columns)
