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


class CorruptRunFile(FlorqlError):
    """A run file whose bytes are not what was written (a checksum mismatch, a truncated file).

    The message names the file; nothing is answered from it.
    """

    sqlstate = "XX001"  # data_corrupted


class CorruptSegment(CorruptRunFile):
    """A log segment that fails its checksum or is not a readable Arrow file."""


class CorruptCheckpoint(CorruptRunFile, RuntimeError):
    """A checkpoint whose bytes do not match the checksum recorded when it was written."""


class WriteFailed(FlorqlError):
    """Run files could not be written (a full disk, a read-only or unreachable store)."""

    sqlstate = "53100"  # disk_full, the usual cause


class InputChanged(FlorqlError):
    """A data file the run read is gone or its content changed since: a replay would not be exact."""

    sqlstate = "55000"  # object_not_in_prerequisite_state
