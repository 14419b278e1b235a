"""Errors a user can act on. Each carries a PostgreSQL SQLSTATE so the wire server can report it."""

from __future__ import annotations

import re

from florql.storage.errors import (
    CorruptCheckpoint,
    CorruptRunFile,
    CorruptSegment,
    FlorqlError,
    InputChanged,
    StoreBusy,
    StoreConflict,
    UsageError,
    WriteFailed,
)

__all__ = [
    "CorruptCheckpoint",
    "CorruptRunFile",
    "CorruptSegment",
    "FlorqlError",
    "ForbiddenAccess",
    "ForbiddenStatement",
    "InputChanged",
    "MissingHindsight",
    "ParameterError",
    "QueryFailed",
    "QuerySyntaxError",
    "ReplayBudgetExceeded",
    "ReplayFailed",
    "StoreBusy",
    "StoreConflict",
    "UnknownColumn",
    "UnknownTable",
    "UsageError",
    "WriteFailed",
]


class QuerySyntaxError(FlorqlError):
    sqlstate = "42601"

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line, self.column = line, column


class QueryFailed(FlorqlError):
    """The database could not answer a query (a failed cast, an out-of-range value, a function's
    error…); the SQLSTATE is the one PostgreSQL gives for the same failure, the engine's error
    is the `__cause__`."""

    def __init__(self, message: str, sqlstate: str = "XX000") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class UnknownTable(FlorqlError):
    sqlstate = "42P01"


class UnknownColumn(FlorqlError):
    sqlstate = "42703"


class ForbiddenStatement(FlorqlError):
    """Queries are read-only: writes, DDL, file access and foreign settings are refused."""

    sqlstate = "25006"


class ForbiddenAccess(ForbiddenStatement):
    """A query tried to read files or the environment (`read_csv`, `FROM 'file.csv'`, `getenv`…)."""

    sqlstate = "42501"


class ParameterError(FlorqlError):
    """A query's `?` / `$n` parameters do not match the values given."""

    sqlstate = "08P01"


class ReplayBudgetExceeded(FlorqlError):
    sqlstate = "53400"


class ReplayFailed(FlorqlError):
    sqlstate = "XX000"


class MissingHindsight(FlorqlError):
    """A hindsight value the answer needs is still missing after replay: never answered as NULL."""

    sqlstate = "55000"


# DuckDB's exception classes (by name: `import florql` does not load DuckDB) → PostgreSQL SQLSTATEs.
DUCKDB_SQLSTATES = {
    "ParserException": "42601",
    "SyntaxException": "42601",
    "CatalogException": "42P01",
    "BinderException": "42703",
    "ConversionException": "22P02",
    "OutOfRangeException": "22003",
    "InvalidInputException": "22023",
    "TypeMismatchException": "42804",
    "InvalidTypeException": "42804",
    "PermissionException": "42501",
    "InterruptException": "57014",
    "NotImplementedException": "0A000",
    "TransactionException": "40001",
    "ConstraintException": "40001",  # only ingest writes, idempotently: a collision is retried
    "DependencyException": "40001",
    "OutOfMemoryException": "53200",
    "IOException": "58030",
    "HTTPException": "58030",
    "ConnectionException": "08006",
}


def from_duckdb(err: Exception) -> FlorqlError:
    """A DuckDB exception as a florql error with a SQLSTATE; a retry-able one as StoreConflict."""
    names = [cls.__name__ for cls in type(err).__mro__]
    code = next((DUCKDB_SQLSTATES[n] for n in names if n in DUCKDB_SQLSTATES), "XX000")
    text = str(err)
    if code in ("42P01", "42703") and re.search(
        r"no function matches|function with name .* does not exist", text, re.I
    ):
        code = "42883"  # undefined_function
    if code == "40001":
        return StoreConflict(f"the store changed under the query ({names[0]}); try again")
    if code == "XX000":
        return QueryFailed(f"the query engine failed ({names[0]}): {text}")
    return QueryFailed(text, code)
