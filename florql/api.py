"""The Python query API: `florql.connect()` → `Connection.sql()` → `Result`."""

from __future__ import annotations

import builtins
import contextlib
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import sqlglot.errors
from sqlglot import exp

from florql import query, reads
from florql.binder import Bound, bind, unknown_column_error
from florql.dialect import bind_parameters, ensure_read_only, florql_setting, parse
from florql.errors import (
    FlorqlError,
    MissingHindsight,
    QueryFailed,
    QuerySyntaxError,
    ReplayBudgetExceeded,
    ReplayFailed,
    StoreConflict,
    UsageError,
    from_duckdb,
)
from florql.replay.executor import Executor, LocalExecutor, make_executor
from florql.replay.jobs import JobResult, JobSpec
from florql.replay.planner import Plan, plan
from florql.runinfo import BASE_TABLES, load_run, run_ids
from florql.storage.layout import StoreLocation, locate_store
from florql.storage.shared import DEFAULT_WAIT_S, shared_database

CONFLICT_RETRIES = 3  # a query that met a concurrent change to the store runs again this many times


class ReplayWarning(UserWarning):
    pass


def query_error(err: BaseException) -> FlorqlError:
    """What the caller sees of an engine or parser error a query caused (raise it `from err`)."""
    if isinstance(err, duckdb.Error):
        return from_duckdb(err)
    if isinstance(err, (sqlglot.errors.ParseError, sqlglot.errors.TokenError)):
        return QuerySyntaxError(f"syntax error: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if isinstance(err, sqlglot.errors.UnsupportedError):
        return QueryFailed(f"not supported: {err}", "0A000")
    if isinstance(err, RecursionError):
        return QueryFailed("the query is nested too deeply to analyse; simplify it", "54001")
    return QueryFailed(f"{type(err).__name__}: {err}")


@contextlib.contextmanager
def answering() -> Iterator[None]:
    """Every error a query can cause reaches the caller as a `FlorqlError`, the original as `__cause__`."""
    try:
        yield
    except FlorqlError:
        raise
    except (duckdb.Error, sqlglot.errors.SqlglotError, RecursionError) as err:
        raise query_error(err) from err


@dataclass
class Planned:
    """One pass of the query path up to the replay plan."""

    bound: Bound
    sites: dict[int, dict[str, query.Site]]  # per run, each hindsight name's site and version
    plan: Plan
    specs: list[JobSpec]

    def versions(self) -> dict[int, dict[str, str]]:
        return {r: {n: s.version for n, s in names.items()} for r, names in self.sites.items()}


@dataclass
class ColumnInfo:
    name: str
    type: pa.DataType
    nullable: bool = True
    comment: str = ""


@dataclass
class TableInfo:
    name: str
    kind: str  # 'table' | 'view'
    columns: list[ColumnInfo] = field(default_factory=list)


def parse_duration(text: str | float | int | None) -> float | None:
    """'10 min', '90 s', '1.5h', '30' (seconds) → seconds; None/'none'/'unlimited' → no budget."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    if not isinstance(text, str):
        raise UsageError(f"cannot read the duration {text!r}; write e.g. '90 s', '10 min' or '1 h'")
    t = text.strip().lower()
    if t in ("", "none", "unlimited", "inf"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(ms|s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)?", t)
    if not m:
        raise UsageError(f"cannot read the duration {text!r}; write e.g. '90 s', '10 min' or '1 h'")
    unit = m.group(2) or "s"
    factor = 0.001 if unit == "ms" else 60 if unit.startswith("m") else 3600 if unit.startswith("h") else 1
    return float(m.group(1)) * factor


class Result:
    """A query's answer: Arrow, pandas, polars or rows. `plan` and `warnings` tell what replay did."""

    def __init__(
        self,
        conn: Connection,
        sql: str | None,
        params: Sequence[Any] | None,
        plan: Plan | None = None,
        warnings_: list[str] | None = None,
        table: pa.Table | None = None,
    ) -> None:
        self._conn, self._sql, self._params = conn, sql, list(params) if params else None
        self.plan = plan
        self.warnings = warnings_ or []
        self._table = table
        self._schema: pa.Schema | None = None
        self.final_sql = sql

    @property
    def schema(self) -> pa.Schema:
        if self._table is not None:
            return self._table.schema
        if self._schema is None:  # the server asks more than once per query
            with answering(), self._conn._open() as db:
                self._schema = self._conn._fetch(db, f"SELECT * FROM ({self._sql}) LIMIT 0", self._params).schema
        return self._schema

    def arrow(self) -> pa.Table:
        if self._table is None:
            assert self._sql is not None  # a Result holds a table or the query that makes it
            with answering(), self._conn._open() as db:
                self._table = self._conn._fetch(db, self._sql, self._params)
        return self._table

    def batches(self, batch_size: int = 10_000) -> Iterator[pa.RecordBatch]:
        """Stream the result; the store is held only while the stream is being read."""
        if self._table is not None:
            yield from self._table.to_batches(batch_size)
            return
        assert self._sql is not None  # a Result holds a table or the query that makes it
        with answering(), self._conn._open() as db:
            yield from self._conn._execute(db, self._sql, self._params).to_arrow_reader(batch_size)

    def df(self):
        return self.arrow().to_pandas()

    def pl(self):
        try:
            import polars
        except ImportError:
            raise UsageError("Result.pl() needs polars: pip install polars") from None
        return polars.from_arrow(self.arrow())

    def fetchall(self) -> list[tuple]:
        table = self.arrow()
        columns = [c.to_pylist() for c in table.columns]
        return list(zip(*columns)) if columns else []

    def close(self) -> None:
        self._table = None

    def __repr__(self) -> str:
        return self.arrow().to_pandas().to_string(max_rows=40)


class Connection:
    """One user's view of a store; threads may share it.

    Each call leases the process's one handle on the DuckDB file (`florql.storage.shared`), which
    ingests new run files one thread at a time, keeps the file open for a second after the last
    call and hands it to another process as soon as one waits for it. `busy_timeout`: how long a
    call waits for the file before it fails with StoreBusy; `close()` lets go of it at once.
    """

    def __init__(
        self,
        location: StoreLocation,
        replay: str = "auto",
        replay_budget: Any = None,
        workers: int | None = None,
        executor: str | Executor | None = None,
        progress: bool | None = None,
        busy_timeout: float = DEFAULT_WAIT_S,
        **executor_options: Any,
    ) -> None:
        self.location = location
        self.files = location.run_files()
        self.database = shared_database(location.db_path)
        self.busy_timeout = float(busy_timeout)
        self.settings: dict[str, Any] = {"replay": "auto", "replay_budget": None, "workers": workers}
        self.set("replay", replay)
        self.settings["replay_budget"] = parse_duration(replay_budget)
        self._executor_arg = executor
        self._executor_options = executor_options
        self._executor: Executor | None = None
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.last_jobs: list[tuple[JobSpec, JobResult]] = []

    # ---- settings -----------------------------------------------------------------------------
    def set(self, name: str, value: Any) -> None:
        name = name.lower()
        if name == "replay":
            value = str(value).lower()
            if value not in ("auto", "never"):
                raise UsageError(f"SET replay = {value!r}: use 'auto' (replay what is missing) or 'never'")
        elif name == "replay_budget":
            value = parse_duration(value)
        elif name == "workers":
            if value in (None, "", "auto"):
                value = None
            else:
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    value = 0
                if value < 1:
                    raise UsageError(f"SET workers = {value!r}: use a number of worker processes (1 or more) or 'auto'")
            self._executor = None
        else:
            raise UsageError(f"unknown florql setting {name!r}; settings: replay, replay_budget, workers")
        self.settings[name] = value

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            if isinstance(self._executor_arg, Executor):
                self._executor = self._executor_arg
            else:
                self._executor = make_executor(self._executor_arg, self.settings["workers"], **self._executor_options)
        return self._executor

    # ---- plumbing -----------------------------------------------------------------------------
    def _open(self):
        return self.database.lease(self.busy_timeout)

    @staticmethod
    def _execute(db: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None):
        # The shared handle opened the file without external access and locked its configuration.
        return db.sql(sql, params=list(params)) if params else db.sql(sql)

    def _fetch(self, db: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None) -> pa.Table:
        try:
            return self._execute(db, sql, params).to_arrow_table()
        except duckdb.Error as err:
            raise from_duckdb(err) from err

    def sync(self) -> None:
        """Ingest the run files that are complete now (one thread of the process at a time)."""
        with answering():
            self.database.sync(self.files, self.busy_timeout)

    # ---- queries ------------------------------------------------------------------------------
    def sql(self, sql: str, params: Sequence[Any] | None = None, *, dialect: str = "duckdb") -> Result:
        _check_query(sql, params)
        with answering():
            statements = parse(sql, read=dialect)
            result: Result | None = None
            for statement in statements:
                result = self._retrying(statement, params)
            assert result is not None
            return result

    def _retrying(self, statement: exp.Expr, params: Sequence[Any] | None) -> Result:
        """One statement; when it met a concurrent change to the store, again (a few times)."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                try:
                    return self._one(statement, params)
                except duckdb.Error as err:
                    raise from_duckdb(err) from err
            except StoreConflict:
                if attempt == CONFLICT_RETRIES:
                    raise
                time.sleep(0.01 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _one(self, statement: exp.Expr, params: Sequence[Any] | None) -> Result:
        setting = florql_setting(statement)
        if setting:
            self.set(*setting)
            return Result(
                self, None, None, table=pa.table({"setting": [setting[0]], "value": [str(self.settings[setting[0]])]})
            )
        ensure_read_only(statement)
        statement = bind_parameters(statement, params)
        notes: list[str] = []
        self.sync()
        with self._open() as db:
            planned = self._plan(bind(statement.copy(), db), db)
        ran: Plan | None = None
        if planned.plan.jobs and self.settings["replay"] == "never":
            notes.append(
                "replay = 'never': values that were never logged are NULL; a replay would run:\n"
                + planned.plan.describe()
            )
        elif planned.plan.jobs:
            self._check_budget(planned.plan, statement)
            if planned.plan.slower_than_retraining:
                notes.append(planned.plan.slower_than_retraining)
            self._run_jobs(planned.specs)
            ran = planned.plan
            self.sync()
            with self._open() as db:
                # Cells a skip job did not produce (a statement reading state no checkpoint holds):
                # re-execute exactly those.
                again = self._plan(bind(statement.copy(), db), db, reexecute=True)
            if again.plan.jobs:
                self._run_jobs(again.specs)
                ran = Plan(ran.jobs + again.plan.jobs, ran.workers, ran.retrain_s, ran.notes, ran.slowdown)
        if ran is not None:
            self.sync()
        with self._open() as db:
            if ran is not None:
                planned = self._plan(bind(statement.copy(), db), db, runnable=False)
            gaps = query.describe_missing(planned.bound, db, planned.sites)
        if gaps and self.settings["replay"] != "never":
            raise MissingHindsight("hindsight values the answer needs are still missing after replay:\n" + gaps)
        if gaps:
            notes.append("these hindsight values are NULL in the answer (not replayed):\n" + gaps)
        for note in notes:
            warnings.warn(note, ReplayWarning, stacklevel=3)
        final = query.rewrite(planned.bound, planned.versions()).sql(dialect="duckdb")
        result = Result(self, final, None, plan=ran, warnings_=notes)
        try:
            _ = result.schema  # binds the final query (errors surface here) without fetching rows
        except QueryFailed as err:
            better = unknown_column_error(str(err), planned.bound)
            if better is not None:
                raise better from err.__cause__
            raise
        return result

    def _check_budget(self, replay_plan: Plan, statement: exp.Expr) -> None:
        budget = self.settings["replay_budget"]
        if budget is not None and replay_plan.est_s > budget:
            raise ReplayBudgetExceeded(
                f"this query needs ~{replay_plan.est_s:.1f} s of replay, over the budget of {budget:.0f} s:\n"
                f"{replay_plan.describe()}\nRaise the budget (SET replay_budget = '10 min') or run it from the CLI: "
                f'florql query "{statement.sql(dialect="duckdb")}"'
            )

    def _plan(
        self, bound: Bound, db: duckdb.DuckDBPyConnection, reexecute: bool = False, runnable: bool = True
    ) -> Planned:
        """Missing cells → replay plan → runnable jobs (only when `runnable`, and never under replay = 'never')."""
        patched: dict[int, dict[str, str]] = {}
        sites: dict[int, dict[str, query.Site]] = {}
        wanted = query.hindsight_names(bound)
        for run_id, names in wanted.items():
            patched[run_id], sites[run_id] = query.patch_sources(bound.runs[run_id], names, self.files)
        cells = query.missing_cells(bound, db, sites, reexecute=reexecute, warm=self._warm())
        missing = any(need.indices for _, needs in cells for need in needs)
        # No executor unless needed; a plan on more workers only where its estimate beats fewer.
        replay_plan = plan(cells, *self._workers(bound, wanted)) if missing else plan(cells, 1)
        specs: list[JobSpec] = []
        if runnable and replay_plan.jobs and self.settings["replay"] != "never":
            specs = query.job_specs(replay_plan, bound, patched, sites, self.files, db)
        return Planned(bound, sites, replay_plan, specs)

    def _workers(self, bound: Bound, wanted: dict[int, builtins.set[str]]) -> tuple[int, int, int]:  # `set`: a method
        """(workers the plan may count on, cores they share, threads per job); cores 0 where jobs
        do not share this machine's cores. Replays use the run's recorded thread count (for
        bit-identical float reductions), so by default a CPU machine fits cores // threads of them."""
        threads = max((int(bound.runs[r].manifest.env.torch_threads or 1) for r in wanted), default=1)
        executor = self.executor
        local = isinstance(executor, LocalExecutor) and not executor.gpus
        cores = (os.cpu_count() or 1) if local else 0
        if self.settings["workers"]:
            return self.settings["workers"], cores, threads
        if not local:
            return executor.workers, cores, threads
        return max(1, min(executor.workers, cores // threads)), cores, threads

    def _warm(self) -> bool:
        """Will replay jobs start from a warm fork server that is already up?"""
        executor = self._executor
        server = getattr(executor, "fork_server", None)
        return server is not None and server.ready(timeout=0)

    def _run_jobs(self, specs: list[JobSpec]) -> None:
        done = [0]
        started = time.monotonic()

        def progress(spec: JobSpec, result: JobResult) -> None:
            done[0] += 1
            if self.progress:
                width = 30
                filled = int(width * done[0] / len(specs))
                print(
                    f"\rflorql replay [{'#' * filled}{'.' * (width - filled)}] {done[0]}/{len(specs)} jobs "
                    f"{time.monotonic() - started:5.1f}s",
                    end="" if done[0] < len(specs) else "\n",
                    file=sys.stderr,
                    flush=True,
                )

        results = self.executor.run(specs, progress)
        self.last_jobs = list(zip(specs, results))
        failures = [(s, r) for s, r in self.last_jobs if not r.ok]
        if failures:
            self.sync()
            raise ReplayFailed(_failure_message(failures))

    def explain(self, sql: str, params: Sequence[Any] | None = None, *, dialect: str = "duckdb") -> str:
        """The replay plan a query would run, without running it."""
        _check_query(sql, params)
        with answering():
            statement = parse(sql, read=dialect)[-1]
            ensure_read_only(statement)
            statement = bind_parameters(statement, params)
            self.sync()
            with self._open() as db:
                planned = self._plan(bind(statement.copy(), db), db, runnable=False)
            return planned.plan.describe()

    # ---- catalog ------------------------------------------------------------------------------
    def tables(self) -> list[TableInfo]:
        """Every table a user can query, with loggable-but-unlogged names as columns of run_<id>."""
        out: list[TableInfo] = []
        self.sync()
        with answering(), self._open() as db:
            for name in BASE_TABLES:
                rel = db.sql(f"SELECT * FROM {name} LIMIT 0").to_arrow_table()
                # Everything is presented as a read-only table: BI tools list tables first (psql's \dt).
                out.append(TableInfo(name, "table", [ColumnInfo(f.name, f.type) for f in rel.schema]))
            for run_id in run_ids(db):
                info = load_run(db, run_id)
                cols = []
                for n in info.columns():
                    if n in info.loop_paths:
                        cols.append(ColumnInfo(n, pa.int64(), comment="loop coordinate"))
                    elif n in info.logged:
                        dtype = {"BIGINT": pa.int64(), "BOOLEAN": pa.bool_(), "VARCHAR": pa.string()}.get(
                            _sql_type(info.logged[n].value_types), pa.float64()
                        )
                        cols.append(ColumnInfo(n, dtype, comment="logged" if n in info.original else "replayed"))
                    else:
                        cols.append(ColumnInfo(n, pa.float64(), comment="loggable: replayed on demand"))
                out.append(TableInfo(f"run_{run_id}", "table", cols))
        return out

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self.database.close(wait_s=0)  # let go of the file now, unless another thread is using it

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_query(sql: Any, params: Any) -> None:
    if not isinstance(sql, str):
        raise UsageError(f"the query must be a string of SQL, not a {type(sql).__name__}")
    if params is not None and (isinstance(params, (str, bytes, dict)) or not isinstance(params, Sequence)):
        raise UsageError(f"query parameters are a list of values, e.g. [5] for one ?, not a {type(params).__name__}")


def _sql_type(types: frozenset[str]) -> str:
    from florql.storage.views import sql_type

    return sql_type(types)


def _failure_message(failures: list[tuple[JobSpec, JobResult]]) -> str:
    lines = []
    for spec, result in failures:
        if result.divergence:
            d = result.divergence
            largest = d.get("largest") or d
            lines.append(
                f"run {spec.run_id}: replay diverged from the original run at {d['loop_path']} {d['coords']}: "
                f"{d['name']} was {d['logged']!r}, replay gave {d['replayed']!r} (|diff| {d.get('abs_diff')}); "
                f"{d.get('mismatches', 1)} value(s) differ in that iteration, largest |diff| {largest.get('abs_diff')} "
                f"for {largest.get('name')}. Stopped: hindsight values from this run would not be exact "
                "(see the replay_audit table)."
            )
        else:
            lines.append(
                f"run {spec.run_id}, iterations {spec.log_from}..{spec.stop - 1}: replay failed:\n{result.error}"
            )
    return "\n".join(lines)


def connect(path: str | os.PathLike | None = None, **options: Any) -> Connection:
    reads.stop()
    return Connection(locate_store(path), **options)
