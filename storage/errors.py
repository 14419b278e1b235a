"""The errors every layer raises, kept at the bottom layer so that every layer can import them.

Each carries a PostgreSQL SQLSTATE so the wire server can report it. The query-side errors
build on these in `florql.errors`.
"""

from __future__ import annotations


class FlorqlError(Exception):
    sqlstate = "XX000"


class UsageError(FlorqlError, ValueError):
    """florql was misused (bad name, unsupported value, a missing optional dependency…)."""

    sqlstate = "22023"


class StoreBusy(FlorqlError):
    """Another process held the DuckDB file for longer than we were willing to wait (object_in_use)."""

    sqlstate = "55006"


class StoreConflict(FlorqlError):
    """Two writers met in the DuckDB file: a retry is the answer (PostgreSQL's serialization_failure)."""

    sqlstate = "40001"
