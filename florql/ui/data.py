"""What the web UI shows, read through the public query path (`florql.connect().sql`).

Every read is a query the dialect's read-only guard accepts; browsing never replays (a
connection with `replay = 'never'`), the query box does, on a connection of its own per query.
"""

from __future__ import annotations

import datetime
import decimal
import difflib
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

import florql
from florql.api import Connection, TableInfo
from florql.errors import FlorqlError, UsageError
from florql.storage.code_versions import load_code_version
from florql.ui.charts import Chart, Series, chart_of, line_sql, thinning_notes

RESULT_ROWS = 1000  # rows of an answer sent to the page; the chart uses them all
KEPT_TASKS = 100


class UnknownRun(FlorqlError):
    sqlstate = "42P01"


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def json_safe(value: Any) -> Any:
    """A value JSON can carry: non-finite floats become null, times and decimals text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time, datetime.timedelta)):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class QueryTask:
    """One query from the box, answered in a thread; the page polls it for progress."""

    id: int
    sql: str
    state: str = "running"  # running | done | error
    jobs_done: int = 0
    jobs_total: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    answer: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        return {
            "id": self.id,
            "sql": self.sql,
            "state": self.state,
            "jobs_done": self.jobs_done,
            "jobs_total": self.jobs_total,
            "seconds": round(end - self.started, 2),
            "answer": self.answer,
            "error": self.error,
        }


def error_json(err: FlorqlError) -> dict[str, Any]:
    return {"error": str(err), "sqlstate": getattr(err, "sqlstate", "XX000"), "kind": type(err).__name__}


class StoreView:
    """The store as the UI sees it."""

    def __init__(self, store: str | None, replay_budget: float | None = 60.0) -> None:
        # Browsing never starts a replay: a replayed name stored for part of a run shows that part.
        self.store = store
        self.replay_budget = replay_budget
        self.browse = florql.connect(store, replay="never", progress=False)
        self._tasks: dict[int, QueryTask] = {}
        self._task_ids = itertools.count(1)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.browse.close()

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return self.browse.sql(sql, params).arrow().to_pylist()

    # ---- runs ---------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        runs = self._rows(
            "SELECT run_id, script_rel AS script, status, started_at, duration_s, outer_completed,"
            " outer_planned, checkpoints_taken, checkpoint_overhead FROM runs ORDER BY run_id"
        )
        args = self._args()
        names: dict[int, list[str]] = {}
        for row in self._rows("SELECT run_id, name FROM logs GROUP BY ALL ORDER BY run_id, name"):
            names.setdefault(row["run_id"], []).append(row["name"])
        for run in runs:
            run["args"] = args.get(run["run_id"], {})
            run["names"] = names.get(run["run_id"], [])
        return json_safe(runs)

    def _args(self, run_id: int | None = None) -> dict[int, dict[str, Any]]:
        where, params = ("WHERE run_id = ?", [run_id]) if run_id is not None else ("", None)
        out: dict[int, dict[str, Any]] = {}
        for row in self._rows(
            "SELECT run_id, name, coalesce(CAST(value_int AS VARCHAR), CAST(value_float AS VARCHAR),"
            f" CAST(value_bool AS VARCHAR), value_str) AS value FROM run_args {where} ORDER BY run_id, name",
            params,
        ):
            out.setdefault(row["run_id"], {})[row["name"]] = row["value"]
        return out

    def run_table(self, run_id: int) -> TableInfo:
        table = self.browse.run_table(run_id)
        if table is None:
            raise UnknownRun(f"there is no run {run_id} in this store; the runs page lists the runs there are")
        return table

    def run(self, run_id: int) -> dict[str, Any]:
        table = self.run_table(run_id)
        (run,) = self._rows("SELECT * FROM runs WHERE run_id = ?", [run_id])
        names: list[dict[str, Any]] = [
            {"name": c.name, "kind": c.comment.split(":")[0], "loop_path": list(c.loop_path)}
            for c in table.columns
            if c.comment != "loop coordinate"
        ]
        charts = [
            self._name_chart(run_id, n["name"], n["loop_path"], n["kind"] == "replayed")
            for n in names
            if n["kind"] != "loggable"  # nothing stored yet: the page offers to replay it
        ]
        return json_safe(
            {
                "run": run,
                "args": self._args(run_id).get(run_id, {}),
                "names": names,
                "charts": [c.to_json() for c in charts if c is not None],
                "checkpoints": self._rows(
                    "SELECT outer_index, kind, name, bytes, round(stall_s * 1000, 2) AS stall_ms,"
                    " round(persist_s * 1000, 1) AS persist_ms FROM checkpoints WHERE run_id = ? ORDER BY outer_index",
                    [run_id],
                ),
                "code": self._code(run),
            }
        )

    def _name_series(self, run_id: int, name: str, loop_path: list[str], label: str, replayed: bool) -> Series | None:
        if not loop_path:
            return None
        column = next((c for c in self.run_table(run_id).columns if c.name == name), None)
        numeric = column is not None and (
            pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)
        )
        if not numeric:
            return None  # text values: in the table, not on a chart
        rows = self.browse.sql(line_sql(f"run_{run_id}", name, loop_path)).fetchall()
        if not rows:
            return None
        series = Series(label, [r[0] for r in rows], [_finite(r[1]) for r in rows], replayed)
        if rows[0][2] > len(rows):
            series.thinned_from = rows[0][2]
        return series

    def _name_chart(self, run_id: int, name: str, loop_path: list[str], replayed: bool) -> Chart | None:
        series = self._name_series(run_id, name, loop_path, name, replayed)
        if series is None:
            return None
        return Chart(name, _x_label(loop_path), [series], notes=thinning_notes([series]))

    def _code(self, run: dict[str, Any]) -> dict[str, Any]:
        recorded = ""
        if run.get("code_version") and run.get("script_rel"):
            sources = load_code_version(self.browse.files, run["code_version"])
            recorded = sources.get(run["script_rel"], b"").decode("utf-8", "replace")
        try:
            with open(run["script"], encoding="utf-8") as f:
                current: str | None = f.read()
        except (OSError, TypeError, UnicodeDecodeError):
            current = None
        diff = (
            "".join(
                difflib.unified_diff(
                    recorded.splitlines(keepends=True),
                    current.splitlines(keepends=True),
                    "recorded",
                    "current",
                )
            )
            if current is not None
            else None
        )
        return {"version": run.get("code_version"), "script": run.get("script_rel"), "recorded": recorded, "diff": diff}

    def compare(self, run_ids: list[int], name: str) -> dict[str, Any]:
        """`name` from several runs on one chart, each line labelled with its run's args."""
        if not run_ids:
            raise UsageError("pick at least one run to compare")
        args = self._args()
        series: list[Series] = []
        x_label = ""
        for run_id in run_ids:
            column = next((c for c in self.run_table(run_id).columns if c.name == name), None)
            if column is None or column.comment.startswith("loggable"):
                continue
            described = ", ".join(f"{k}={v}" for k, v in args.get(run_id, {}).items())
            label = f"run {run_id}" + (f" ({described})" if described else "")
            found = self._name_series(run_id, name, list(column.loop_path), label, column.comment == "replayed")
            if found is not None:
                series.append(found)
                x_label = _x_label(list(column.loop_path))
        if not series:
            raise UsageError(f"none of runs {', '.join(map(str, run_ids))} has values of {name!r} to chart")
        return Chart(f"{name} by run", x_label, series, notes=thinning_notes(series)).to_json()

    # ---- the query box ------------------------------------------------------------------------
    def _connect(self, task: QueryTask | None = None) -> Connection:
        def progress(done: int, total: int) -> None:
            if task is not None:
                task.jobs_done, task.jobs_total = done, total

        return florql.connect(self.store, replay_budget=self.replay_budget, progress=False, on_progress=progress)

    def explain(self, sql: str) -> dict[str, Any]:
        db = self._connect()
        try:
            plan = db.replay_plan(sql)
        finally:
            db.close()
        return {
            "plan": plan.describe(),
            "jobs": len(plan.jobs),
            "est_s": round(plan.est_s, 2) if plan.jobs else 0.0,
            "retrain_s": round(plan.retrain_s, 2),
            "budget_s": self.replay_budget,
        }

    def start_query(self, sql: str) -> QueryTask:
        if not isinstance(sql, str) or not sql.strip():
            raise UsageError("type a query first, e.g. SELECT * FROM runs")
        with self._lock:
            task = QueryTask(next(self._task_ids), sql)
            self._tasks[task.id] = task
            for old in sorted(self._tasks)[:-KEPT_TASKS]:
                del self._tasks[old]
        threading.Thread(target=self._answer, args=(task,), name=f"florql-ui-query-{task.id}", daemon=True).start()
        return task

    def task(self, task_id: int) -> QueryTask:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            raise UsageError(f"no query {task_id} is known here (the server keeps the last {KEPT_TASKS})")
        return task

    def _answer(self, task: QueryTask) -> None:
        db = self._connect(task)
        try:
            result = db.sql(task.sql)
            table = result.arrow()
            chart = chart_of(table, result.coordinates, result.hindsight, "answer")
            task.answer = json_safe(
                {
                    "columns": table.column_names,
                    "rows": [list(r.values()) for r in table.slice(0, RESULT_ROWS).to_pylist()],
                    "row_count": table.num_rows,
                    "chart": chart.to_json() if chart is not None else None,
                    "replayed": result.plan.describe() if result.plan is not None else None,
                    "warnings": result.warnings,
                }
            )
            task.state = "done"
        except FlorqlError as err:
            task.error, task.state = error_json(err), "error"
        except Exception as err:  # a bug of ours: still a message on the page, not a hung spinner
            task.error, task.state = (
                {"error": f"internal error: {type(err).__name__}: {err}", "sqlstate": "XX000"},
                "error",
            )
        finally:
            task.finished = time.monotonic()
            db.close()


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _x_label(loop_path: list[str]) -> str:
    return loop_path[0] + (f" ({', '.join(loop_path[1:])} within)" if len(loop_path) > 1 else "") if loop_path else ""
