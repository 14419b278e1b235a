"""Errors a user can act on. Each carries a PostgreSQL SQLSTATE so the wire server can report it."""

from __future__ import annotations

from florql.storage.errors import (
    CorruptCheckpoint,
    CorruptRunFile,
    CorruptSegment,
    FlorqlError,
    StoreBusy,
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
    "MissingHindsight",
    "ParameterError",
    "QueryFailed",
    "QuerySyntaxError",
    "ReplayBudgetExceeded",
    "ReplayFailed",
    "StoreBusy",
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
