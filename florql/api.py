"""The Python query API: `florql.connect()` → `Connection.sql()` → `Result`."""

from __future__ import annotations

import builtins
import contextlib
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import sqlglot.errors
from sqlglot import exp

from florql import query, reads
from florql.binder import Bound, bind, unknown_column_error
from florql.catalog_cache import RunCatalog
from florql.dialect import bind_parameters, ensure_read_only, florql_setting, in_user_terms, parse
from florql.errors import (
    FlorqlError,
    InputChanged,
    MissingHindsight,
    QueryFailed,
    QuerySyntaxError,
    ReplayBudgetExceeded,
    ReplayFailed,
    StoreConflict,
    UsageError,
    from_duckdb,
)
from florql.progress import ReplayProgress
from florql.replay.executor import Executor, LocalExecutor, make_executor, warm_start_enabled
from florql.replay.jobs import JobResult, JobSpec
from florql.replay.planner import Plan, plan
from florql.replay.warm import starts_warm
from florql.runinfo import BASE_TABLES, RunInfo, measured_ingest_s
from florql.storage.database import record_query_cost
from florql.storage.layout import StoreLocation, locate_store
from florql.storage.shared import DEFAULT_WAIT_S, shared_database

if TYPE_CHECKING:
    from florql.ui.charts import Chart

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
def answering(user_sql: str | None = None) -> Iterator[None]:
    """Every error a query can cause reaches the caller as a `FlorqlError`, the original as `__cause__`.

    With `user_sql`, an engine error about florql's rewrite is told about the user's own SQL.
    """
    try:
        try:
            yield
        except FlorqlError:
            raise
        except (duckdb.Error, sqlglot.errors.SqlglotError, RecursionError) as err:
            raise query_error(err) from err
    except QueryFailed as failed:
        told = in_user_terms(str(failed), user_sql) if user_sql else str(failed)
        if told == str(failed):
            raise
        raise QueryFailed(told, failed.sqlstate) from failed.__cause__


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
    loop_path: tuple[str, ...] = ()  # the loops around the name: its grain


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
    """A query's answer: Arrow, pandas, polars or rows. `plan` and `warnings` tell what replay did.

    The query ran once. A small answer is held whole; a large one is streamed from the store,
    which stays leased to it until it is read to the end or closed.
    """

    def __init__(
        self,
        plan: Plan | None = None,
        warnings_: list[str] | None = None,
        table: pa.Table | None = None,
        stream: Stream | None = None,
        final_sql: str | None = None,
    ) -> None:
        assert (table is None) != (stream is None), "a Result holds a table or a stream"
        self.plan = plan
        self.warnings = warnings_ or []
        self._table = table
        self._stream = stream
        self.final_sql = final_sql
        self.user_sql: str | None = None  # the SQL the user wrote: errors point into it
        self.coordinates: set[str] = set()  # loop-coordinate columns of the runs the query read
        self.hindsight: set[str] = set()  # names the query asked for that the runs did not log

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema if self._table is not None else self._stream.schema  # type: ignore[union-attr]

    def arrow(self) -> pa.Table:
        if self._table is None:
            self._table = pa.Table.from_batches(list(self.batches()), schema=self.schema)
        return self._table

    def batches(self, batch_size: int = 10_000) -> Iterator[pa.RecordBatch]:
        """The answer batch by batch (a streamed answer can be read once)."""
        if self._table is not None:
            yield from self._table.to_batches(batch_size)
            return
        stream, self._stream = self._stream, None
        if stream is None:
            raise UsageError("this result was streamed already: run the query again to read it again")
        with answering(self.user_sql):
            yield from stream.read()

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
        if self._stream is not None:
            self._stream.close()

    def __repr__(self) -> str:
        return self.arrow().to_pandas().to_string(max_rows=40)

    def chart(self, title: str = "") -> Chart | None:
        """The automatic chart of this answer (loop coordinates on x, values as lines), or None."""
        from florql.ui.charts import chart_of

        return chart_of(self.arrow(), self.coordinates, self.hindsight, title)

    def plot(self, path: str | None = None, title: str = "") -> Chart:
        """The answer as a line chart; shown inline in a notebook, or written to `path` (.svg or .png)."""
        chart = self.chart(title)
        if chart is None:
            raise UsageError(
                f"nothing to plot: the answer has no numeric column beside its x axis (columns: {', '.join(self.arrow().column_names)})"
            )
        if path is not None:
            chart.save(path)
        return chart

    def _repr_html_(self) -> str:
        from florql.ui.notebook import result_html

        return result_html(self)


class Stream:
    """The rest of a large answer: its batches and the lease on the store they are read under."""

    def __init__(self, head: list[pa.RecordBatch], reader: pa.RecordBatchReader, lease: contextlib.ExitStack) -> None:
        self.head, self.reader, self.schema = head, reader, reader.schema
        self._lease: contextlib.ExitStack | None = lease

    def read(self) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.head
            self.head = []
            while True:
                try:
                    yield self.reader.read_next_batch()
                except StopIteration:
                    return
        finally:
            self.close()

    def close(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.close()

    def __del__(self) -> None:
        self.close()


HELD_BYTES = 4 << 20  # an answer up to this size is read whole while the query runs; larger ones stream
BATCH_ROWS = 10_000


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
        on_progress: Callable[[int, int], None] | None = None,
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
        # A line per replay job as it starts and ends, terminal or not; FLORQL_QUIET=1 silences it.
        self.progress = os.environ.get("FLORQL_QUIET", "") in ("", "0") if progress is None else progress
        self.on_progress = on_progress  # called with (jobs done, jobs in all) as replay jobs finish
        self.last_jobs: list[tuple[JobSpec, JobResult]] = []
        self._jobs_s = 0.0  # wall seconds spent running replay jobs, all queries together

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
                self._executor = make_executor(
                    self._executor_arg, self.settings["workers"], store=self.location.home, **self._executor_options
                )
        return self._executor

    # ---- plumbing -----------------------------------------------------------------------------
    def _open(self):
        return self.database.lease(self.busy_timeout)

    def _catalog(self, db: duckdb.DuckDBPyConnection) -> RunCatalog:
        """The catalog as read under this lease, kept between queries while the store is unchanged."""
        return RunCatalog(db, self.database)

    @staticmethod
    def _execute(db: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None):
        # The shared handle opened the file without external access and locked its configuration.
        return db.sql(sql, params=list(params)) if params else db.sql(sql)

    def sync(self) -> None:
        """Ingest the run files that are complete now (one thread of the process at a time)."""
        with answering():
            self.database.sync(self.files, self.busy_timeout)

    # ---- queries ------------------------------------------------------------------------------
    def sql(self, sql: str, params: Sequence[Any] | None = None, *, dialect: str = "duckdb") -> Result:
        _check_query(sql, params)
        with answering(sql):
            statements = parse(sql, read=dialect)
            result: Result | None = None
            for statement in statements:
                result = self._retrying(statement, params)
            assert result is not None
            result.user_sql = sql
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
            return Result(table=pa.table({"setting": [setting[0]], "value": [str(self.settings[setting[0]])]}))
        ensure_read_only(statement)
        statement = bind_parameters(statement, params)
        notes: list[str] = []
        self.sync()
        lease = contextlib.ExitStack()
        try:
            db = lease.enter_context(self._open())
            planned = self._plan(bind(statement.copy(), db, self._catalog(db)), db)
            if planned.plan.jobs and self.settings["replay"] != "never":
                lease.close()
                started, jobs_before = time.perf_counter(), self._jobs_s
                ran = self._replay(statement, planned, notes)
                db = lease.enter_context(self._open())
                planned = self._plan(bind(statement.copy(), db, self._catalog(db)), db, runnable=False)
                jobs_s = self._jobs_s - jobs_before
                with contextlib.suppress(duckdb.Error):  # calibration only: never worth failing the answer
                    record_query_cost(db, len(ran.jobs), jobs_s, time.perf_counter() - started - jobs_s)
            else:
                ran = None
                if planned.plan.jobs:
                    notes.append(
                        "replay = 'never': values that were never logged are NULL; a replay would run:\n"
                        + planned.plan.describe()
                    )
            return self._answer(db, planned, ran, notes, lease)
        finally:
            lease.close()  # unless the answer streams: then `_answer` took it

    def _replay(self, statement: exp.Expr, planned: Planned, notes: list[str]) -> Plan:
        """Run the plan's jobs, then re-execute the cells a skip job did not produce (a statement
        reading state no checkpoint holds); the store is synced after."""
        self._check_budget(planned.plan, statement)
        if planned.plan.slower_than_retraining:
            notes.append(planned.plan.slower_than_retraining)
        self._run_jobs(planned.specs)
        ran = planned.plan
        self.sync()
        with self._open() as db:
            again = self._plan(bind(statement.copy(), db, self._catalog(db)), db, reexecute=True)
        if again.plan.jobs:
            self._run_jobs(again.specs)
            ran = Plan(ran.jobs + again.plan.jobs, ran.workers, ran.retrain_s, ran.notes, ran.slowdown, ran.ingest_s)
        self.sync()
        return ran

    def _answer(
        self,
        db: duckdb.DuckDBPyConnection,
        planned: Planned,
        ran: Plan | None,
        notes: list[str],
        lease: contextlib.ExitStack,
    ) -> Result:
        """Execute the final query once. A large answer keeps the lease and streams."""
        gaps = query.describe_missing(planned.bound, db, planned.sites)
        if gaps and self.settings["replay"] != "never":
            raise MissingHindsight("hindsight values the answer needs are still missing after replay:\n" + gaps)
        if gaps:
            notes.append("these hindsight values are NULL in the answer (not replayed):\n" + gaps)
        for note in notes:
            warnings.warn(note, ReplayWarning, stacklevel=5)
        final = query.rewrite(planned.bound, planned.versions())
        try:
            reader = self._execute(db, final, None).to_arrow_reader(BATCH_ROWS)
        except duckdb.Error as err:
            better = unknown_column_error(str(err), planned.bound)
            raise (better or from_duckdb(err)) from err
        head: list[pa.RecordBatch] = []
        held = 0
        while held <= HELD_BYTES:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                table = pa.Table.from_batches(head, schema=reader.schema)
                return _described(Result(ran, notes, table=table, final_sql=final), planned)
            except duckdb.Error as err:
                raise from_duckdb(err) from err
            head.append(batch)
            held += batch.nbytes
        return _described(Result(ran, notes, stream=Stream(head, reader, lease.pop_all()), final_sql=final), planned)

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
        replay_plan = plan(cells, *self._workers(bound, wanted), measured_ingest_s(db)) if missing else plan(cells, 1)
        replay_plan.notes += query.prune_skip_jobs(replay_plan, bound, patched)
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
        """Will replay jobs start from a warm fork server that is already up (this process's, or
        the store's that an earlier process started)?"""
        executor = self._executor
        if executor is None:
            local = (self._executor_arg or os.environ.get("FLORQL_EXECUTOR", "local")) == "local"
            return local and warm_start_enabled() and starts_warm(self.location.home)
        server = getattr(executor, "fork_server", None)
        # Not yet started by this executor (it starts on the first job) but up for the store: warm too.
        return server is not None and (server.serving() or starts_warm(self.location.home))

    def _run_jobs(self, specs: list[JobSpec]) -> None:
        reporter = ReplayProgress(specs, self.executor.workers) if self.progress else None
        done = [0]
        if self.on_progress is not None:
            self.on_progress(0, len(specs))

        def finished(spec: JobSpec, result: JobResult) -> None:
            done[0] += 1
            if reporter is not None:
                reporter.job_done(spec, result)
            if self.on_progress is not None:
                self.on_progress(done[0], len(specs))

        started = time.perf_counter()
        try:
            if reporter is not None:
                reporter.begin()
                results = self.executor.run(specs, finished, on_start=reporter.job_started)
            else:
                results = self.executor.run(specs, finished)
        finally:
            self._jobs_s += time.perf_counter() - started
        self.last_jobs = list(zip(specs, results))
        failures = [(s, r) for s, r in self.last_jobs if not r.ok]
        if failures:
            self.sync()
            prefix = f"{InputChanged.__name__}: "
            errors = [r.error or "" for _, r in failures]
            changed = [e.removeprefix(prefix) for e in errors if e.startswith(prefix)]
            if changed:  # the run's data changed: no replay of it can be exact
                raise InputChanged("\n".join(dict.fromkeys(changed)))
            raise ReplayFailed(_failure_message(failures))

    def explain(self, sql: str, params: Sequence[Any] | None = None, *, dialect: str = "duckdb") -> str:
        """The replay plan a query would run, without running it."""
        return self.replay_plan(sql, params, dialect=dialect).describe()

    def replay_plan(self, sql: str, params: Sequence[Any] | None = None, *, dialect: str = "duckdb") -> Plan:
        """The replay plan a query would run (its jobs and estimate `est_s`), without running it."""
        _check_query(sql, params)
        with answering(sql):
            statement = parse(sql, read=dialect)[-1]
            ensure_read_only(statement)
            statement = bind_parameters(statement, params)
            self.sync()
            with self._open() as db:
                planned = self._plan(bind(statement.copy(), db, self._catalog(db)), db, runnable=False).plan
        if planned.jobs and self.settings["replay"] != "never":
            self.executor  # noqa: B018 (starts the warm fork server now: the query that follows starts warm)
        return planned

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
            catalog = self._catalog(db)
            out += [_run_table(info) for info in catalog.runs(catalog.run_ids()).values()]
        return out

    def run_table(self, run_id: int) -> TableInfo | None:
        """The columns of run_<id> (each with its loop path and whether it was logged, replayed or
        is loggable), or None when there is no such run."""
        self.sync()
        with answering(), self._open() as db:
            catalog = self._catalog(db)
            return _run_table(catalog.runs([run_id])[run_id]) if run_id in catalog.run_ids() else None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self.database.close(wait_s=0)  # let go of the file now, unless another thread is using it

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _described(result: Result, planned: Planned) -> Result:
    """What charts of the answer need: which columns are loop coordinates, which were never logged."""
    result.coordinates = {loop for info in planned.bound.runs.values() for loop in info.loop_paths}
    result.hindsight = {name for names in planned.sites.values() for name in names}
    return result


def _run_table(info: RunInfo) -> TableInfo:
    run_id = info.run_id
    cols = []
    for n in info.columns():
        if n in info.loop_paths:
            cols.append(ColumnInfo(n, pa.int64(), comment="loop coordinate", loop_path=info.loop_paths[n]))
        elif n in info.logged:
            dtype = {"BIGINT": pa.int64(), "BOOLEAN": pa.bool_(), "VARCHAR": pa.string()}.get(
                _sql_type(info.logged[n].value_types), pa.float64()
            )
            comment = "logged" if n in info.original else "replayed"
            cols.append(ColumnInfo(n, dtype, comment=comment, loop_path=info.logged[n].loop_path))
        else:
            site = info.loggable[n][1]
            cols.append(ColumnInfo(n, pa.float64(), comment="loggable: replayed on demand", loop_path=site.loop_path))
    return TableInfo(f"run_{run_id}", "table", cols)


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
