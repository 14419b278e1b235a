"""What binding reads of the catalog tables, kept between queries while the tables stay the same.

Reading the runs a query names (`load_runs`: manifests, names, grains, code) costs milliseconds
per query, and `metrics` names every run. The store's `catalog_token` (storage/shared.py) changes
whenever an ingest wrote something or the file was reopened, so what was read under one token
holds for every query that finds the same token. Loggable names come from the current source of
each run's code, so a kept run is read again when one of its source files changed.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import duckdb

from florql.runinfo import RunInfo, load_runs, run_ids
from florql.storage.shared import SharedDatabase

CodeStamp = tuple[tuple[str, int, int], ...]  # (source file, mtime_ns, size) of a run's Python files


@dataclass
class _Kept:
    run_ids: list[int] | None = None
    runs: dict[int, tuple[CodeStamp, RunInfo]] = field(default_factory=dict)
    columns: dict[str, dict[str, str]] = field(default_factory=dict)  # base table → column → type


_kept: dict[tuple[str, int], _Kept] = {}  # (DuckDB file, catalog token) → what was read under it
_kept_lock = threading.Lock()


class RunCatalog:
    """One query's reads of the catalog, through the process's cache when the token allows it.

    Make it inside the lease the query runs under, after the store was synced.
    """

    def __init__(self, conn: duckdb.DuckDBPyConnection, database: SharedDatabase | None = None) -> None:
        self.conn = conn
        token = database.catalog_token if database is not None else None
        self._kept = _kept_under(database.db_path, token) if database is not None and token is not None else _Kept()

    def run_ids(self) -> list[int]:
        if self._kept.run_ids is None:
            self._kept.run_ids = run_ids(self.conn)
        return self._kept.run_ids

    def runs(self, ids: list[int]) -> dict[int, RunInfo]:
        """The runs' RunInfo, read again only for runs not kept or whose source files changed."""
        stamps: dict[tuple[str, str], CodeStamp] = {}  # runs of one code version share their files
        fresh: dict[int, RunInfo] = {}
        for run_id in ids:
            kept = self._kept.runs.get(run_id)
            if kept is not None and kept[0] == _stamp(kept[1], stamps):
                fresh[run_id] = kept[1]
        missing = [r for r in ids if r not in fresh]
        for run_id, info in load_runs(self.conn, missing).items():
            self._kept.runs[run_id] = (_stamp(info, stamps), info)
            fresh[run_id] = info
        return {r: fresh[r] for r in ids}

    def columns(self, table: str) -> dict[str, str]:
        """A base table's columns and their DuckDB types, in order."""
        if table not in self._kept.columns:
            rows = self.conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                "AND table_schema = 'main' ORDER BY ordinal_position",
                [table],
            ).fetchall()
            self._kept.columns[table] = dict(rows)
        return self._kept.columns[table]


def _kept_under(db_path: str, token: int) -> _Kept:
    with _kept_lock:
        kept = _kept.get((db_path, token))
        if kept is None:
            for key in [k for k in _kept if k[0] == db_path]:
                del _kept[key]  # an older token's reads are never valid again
            kept = _kept[(db_path, token)] = _Kept()
        return kept


def _stamp(info: RunInfo, stamps: dict[tuple[str, str], CodeStamp]) -> CodeStamp:
    """What the run's loggable names depend on: its Python files as they are now."""
    root = info.manifest.project_root or ""
    key = (root, info.manifest.code_version or "")
    if key not in stamps:
        stamps[key] = tuple(
            _file_stamp(os.path.join(root, rel)) for rel in sorted(info.code_files) if rel.endswith(".py")
        )
    return stamps[key]


def _file_stamp(path: str) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, st.st_mtime_ns, st.st_size)
