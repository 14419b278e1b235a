"""Errors a user can act on. Each carries a PostgreSQL SQLSTATE so the wire server can report it."""
from __future__ import annotations


class FlorqlError(Exception):
    sqlstate = "XX000"


class UsageError(FlorqlError, ValueError):
    """The training API was misused (bad name, unsupported value, nested loops with one name…)."""

    sqlstate = "22023"


class QuerySyntaxError(FlorqlError):
    sqlstate = "42601"

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line, self.column = line, column


class UnknownTable(FlorqlError):
    sqlstate = "42P01"


class UnknownColumn(FlorqlError):
    sqlstate = "42703"


class ForbiddenStatement(FlorqlError):
    """Queries are read-only: writes, DDL, file access and foreign settings are refused."""

    sqlstate = "25006"


class ReplayBudgetExceeded(FlorqlError):
    sqlstate = "53400"


class ReplayFailed(FlorqlError):
    sqlstate = "XX000"


class StoreBusy(FlorqlError):
    """Another process held the DuckDB file for longer than we were willing to wait."""

    sqlstate = "55006"


class MissingHindsight(FlorqlError):
    """A hindsight value the answer needs is still missing after replay: never answered as NULL."""

    sqlstate = "55000"
