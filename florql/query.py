"""The query path, one pure-ish step at a time: parse → bind → plan replay → rewrite → execute.

- `bind` resolves florql's tables (`run_<id>`, `metrics`, the base tables), the columns each
  reference uses, and the loop ranges its predicates select.
- `missing_cells` turns that into (run, name, outer iterations) still absent from the store.
- `replay.planner.plan` turns cells into jobs; `job_specs` makes them runnable.
- `rewrite` replaces each wide table with a subquery at the grain of the columns it uses.
"""
from __future__ import annotations

import difflib
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import duckdb
import sqlglot
from sqlglot import exp

from florql.catalog import BASE_TABLES, RunInfo, load_run, run_facts, run_ids
from florql.errors import FlorqlError, ReplayFailed, UnknownColumn, UnknownTable
from replay.jobs import JobSpec
from replay.planner import Need, Plan, PlannedJob, RunFacts
from replay.source import PropagationError, analyze, propagate
from storage import layout, segments
from storage.code_versions import load_code_version
from storage.runfiles import RunFiles
from storage.views import grain_for, q, wide_select

_RUN_TABLE = re.compile(r"^run_(\d+)$", re.IGNORECASE)


@dataclass
class TableRef:
    node: exp.Table
    alias: str
    run_ids: list[int]  # one for run_<id>, the selected runs for metrics
    is_metrics: bool
    referenced: set[str] = field(default_factory=set)
    star: bool = False
    outer_indices: dict[int, set[int] | None] = field(default_factory=dict)  # per run; None = all


@dataclass
class Bound:
    statement: exp.Expression
    refs: list[TableRef]
    runs: dict[int, RunInfo]


# ---- bind -------------------------------------------------------------------------------------
def bind(statement: exp.Expression, conn: duckdb.DuckDBPyConnection) -> Bound:
    existing = run_ids(conn)
    ctes = {c.alias_or_name.lower() for c in statement.find_all(exp.CTE)}
    runs: dict[int, RunInfo] = {}
    refs: list[TableRef] = []
    for table in list(statement.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier):
            continue  # a table function such as range(10)
        name = table.name.lower()
        if table.db and table.db.lower() not in ("main", "public"):
            raise UnknownTable(f"unknown schema {table.db!r}: florql's tables are in the default schema")
        match = _RUN_TABLE.match(name)
        if match:
            run_id = int(match.group(1))
            if run_id not in existing:
                listed = ", ".join(f"run_{r}" for r in existing) or "none yet (record one with florql.loop/log)"
                raise UnknownTable(f"there is no run {run_id} (table {name}); runs in this store: {listed}")
            ids = [run_id]
        elif name == "metrics":
            ids = existing
        elif name in BASE_TABLES or name in ctes:
            continue
        else:
            tables = ", ".join([*BASE_TABLES, *(f"run_{r}" for r in existing)])
            raise UnknownTable(f"unknown table {table.name!r}; florql's tables are: {tables}")
        for run_id in ids:
            runs.setdefault(run_id, load_run(conn, run_id))
        refs.append(TableRef(table, table.alias_or_name, ids, name == "metrics"))
    for ref in refs:
        _bind_columns(statement, ref, runs)
    return Bound(statement, refs, runs)


def _bind_columns(statement: exp.Expression, ref: TableRef, runs: dict[int, RunInfo]) -> None:
    known = {c for r in ref.run_ids for c in runs[r].columns()}
    for col in statement.find_all(exp.Column):
        if col.table in ("", ref.alias) and col.name in known:
            ref.referenced.add(col.name)
    select = ref.node.find_ancestor(exp.Select)
    if select is not None:
        # `*` and `count(*)` mean the table's own rows: the run's finest grain.
        ref.star = any(
            not isinstance(star.parent, exp.Column) or star.parent.table in ("", ref.alias)
            for star in select.find_all(exp.Star)
        )
    where = select.args.get("where") if select is not None else None
    selected_runs = _analyse(where.this, "run_id", ref.alias, range(0, max(ref.run_ids, default=0) + 1))[0] \
        if (where is not None and ref.is_metrics) else None
    if selected_runs is not None:
        ref.run_ids = [r for r in ref.run_ids if r in selected_runs]
    for run_id in ref.run_ids:
        info = runs[run_id]
        completed = int(info.manifest.get("outer_completed") or 0)
        outer = info.outer_loop
        if where is None or not outer:
            ref.outer_indices[run_id] = None
        else:
            indices, _ = _analyse(where.this, outer, ref.alias, range(completed))
            ref.outer_indices[run_id] = indices


def bind_parameters(statement: exp.Expression, params: Sequence[Any] | None) -> exp.Expression:
    """Inline `?` / `$n` parameters as literals, so the planner can read predicates that use them."""
    if not params:
        return statement
    values = list(params)
    position = iter(range(len(values)))

    def substitute(node: exp.Expression) -> exp.Expression:
        if isinstance(node, (exp.Placeholder, exp.Parameter)):
            text = node.name
            index = int(text) - 1 if text.isdigit() else next(position)
            if not 0 <= index < len(values):
                raise FlorqlError(f"the query uses parameter {index + 1}, but {len(values)} value(s) were given")
            return exp.convert(values[index])
        return node

    return statement.transform(substitute)


def _analyse(cond: exp.Expression, column: str, alias: str, universe: range) -> tuple[set[int], bool]:
    """A superset of the values of `column` in `universe` that satisfy `cond`, and whether it is exact."""
    everything = (set(universe), False)
    if isinstance(cond, exp.Paren):
        return _analyse(cond.this, column, alias, universe)
    if isinstance(cond, exp.And):
        (a, ea), (b, eb) = _analyse(cond.left, column, alias, universe), _analyse(cond.right, column, alias, universe)
        return a & b, ea and eb
    if isinstance(cond, exp.Or):
        (a, ea), (b, eb) = _analyse(cond.left, column, alias, universe), _analyse(cond.right, column, alias, universe)
        return a | b, ea and eb
    if isinstance(cond, exp.Not):
        inner, exact = _analyse(cond.this, column, alias, universe)
        return (set(universe) - inner, True) if exact else everything
    if isinstance(cond, exp.Between) and _is_col(cond.this, column, alias):
        lo, hi = _number(cond.args.get("low")), _number(cond.args.get("high"))
        if lo is None or hi is None:
            return everything
        return {i for i in universe if lo <= i <= hi}, True
    if isinstance(cond, exp.In) and _is_col(cond.this, column, alias) and not cond.args.get("query"):
        values = [_number(v) for v in cond.expressions]
        if any(v is None for v in values):
            return everything
        return {i for i in universe if i in values}, True
    comparisons = {exp.EQ: "=", exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<=", exp.NEQ: "!="}
    op = comparisons.get(type(cond))
    if op is None:
        return everything
    left, right = cond.this, cond.expression
    if _is_col(right, column, alias):
        left, right = right, left
        op = {">": "<", "<": ">", ">=": "<=", "<=": ">="}.get(op, op)
    value = _number(right)
    if not _is_col(left, column, alias) or value is None:
        return everything
    test = {"=": lambda i: i == value, ">": lambda i: i > value, ">=": lambda i: i >= value,
            "<": lambda i: i < value, "<=": lambda i: i <= value, "!=": lambda i: i != value}[op]
    return {i for i in universe if test(i)}, True


def _is_col(node: exp.Expression | None, column: str, alias: str) -> bool:
    return isinstance(node, exp.Column) and node.name == column and node.table in ("", alias)


def _number(node: exp.Expression | None) -> float | None:
    if isinstance(node, exp.Neg):
        inner = _number(node.this)
        return -inner if inner is not None else None
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return float(node.this)
        except ValueError:
            return None
    return None


# ---- what is missing --------------------------------------------------------------------------
def _hindsight(info: RunInfo, referenced: set[str]) -> set[str]:
    # Replayed names stay candidates: `missing_cells` subtracts the iterations already covered.
    return {n for n in referenced if n in info.loggable and n not in info.original and n not in info.loop_paths}


def hindsight_names(bound: Bound) -> dict[int, set[str]]:
    """Per run, the referenced names that the current code can log but the run did not."""
    out: dict[int, set[str]] = {}
    for ref in bound.refs:
        for run_id in ref.run_ids:
            names = _hindsight(bound.runs[run_id], ref.referenced)
            if names:
                out.setdefault(run_id, set()).update(names)
    return out


def missing_cells(bound: Bound, conn: duckdb.DuckDBPyConnection, patched_sites: dict[int, dict[str, tuple]]
                  ) -> list[tuple[RunFacts, list[Need]]]:
    """(run facts, needs) for every run with hindsight names still missing in the selected range."""
    wanted: dict[int, dict[str, set[int]]] = {}
    for ref in bound.refs:
        for run_id in ref.run_ids:
            names = _hindsight(bound.runs[run_id], ref.referenced)
            completed = int(bound.runs[run_id].manifest.get("outer_completed") or 0)
            selected = ref.outer_indices.get(run_id)
            indices = set(range(completed)) if selected is None else {i for i in selected if i < completed}
            for name in names:
                wanted.setdefault(run_id, {}).setdefault(name, set()).update(indices)
    result = []
    for run_id, names in sorted(wanted.items()):
        info = bound.runs[run_id]
        facts = run_facts(conn, info)
        needs = []
        for name, indices in sorted(names.items()):
            covered = {r[0] for r in conn.execute(
                "SELECT outer_index FROM replay_coverage WHERE run_id = ? AND name = ?", [run_id, name]).fetchall()}
            path, reason = patched_sites[run_id][name]
            if not path:
                raise FlorqlError(f"run {run_id}: florql.log({name!r}) is not inside a florql.loop; {reason}")
            needs.append(Need(name, frozenset(indices - covered), skippable=len(path) == 1))
        result.append((facts, needs))
    return result


# ---- code for replay ------------------------------------------------------------------------------
def patch_sources(info: RunInfo, names: set[str], files: RunFiles) -> tuple[dict[str, str], dict[str, tuple]]:
    """The run's files with the hindsight statements propagated in, and each name's loop path there."""
    recorded = load_code_version(files, info.manifest["code_version"])
    by_file: dict[str, set[str]] = {}
    for name in names:
        by_file.setdefault(info.loggable[name][0], set()).add(name)
    patched: dict[str, str] = {}
    sites: dict[str, tuple] = {}
    root = info.manifest.get("project_root") or ""
    for rel, file_names in by_file.items():
        old = recorded[rel].decode()
        with open(f"{root}/{rel}", encoding="utf-8") as f:
            current = f.read()
        try:
            new = propagate(old, current, file_names, filename=rel)
        except PropagationError as err:
            raise ReplayFailed(f"run {info.run_id}: {err}; this run cannot answer it by replay") from None
        if new != old:
            patched[rel] = new
        analysis = analyze(new, rel).loggable_names()
        for name in file_names:
            site = analysis.get(name)
            sites[name] = (site.loop_path if site else (), "statements outside loops cannot be replayed")
    return patched, sites


def job_specs(plan: Plan, bound: Bound, patched: dict[int, dict[str, str]], files: RunFiles,
              conn: duckdb.DuckDBPyConnection) -> list[JobSpec]:
    specs = []
    for job in plan.jobs:
        info = bound.runs[job.run_id]
        m = info.manifest
        job_id = f"{job.run_id}-{uuid.uuid4().hex[:12]}"
        audit = sorted(info.original)
        specs.append(JobSpec(
            job_id=job_id, run_id=job.run_id, runs_url=files.url, code_version=m["code_version"],
            script_rel=m["script_rel"], cwd_rel=m.get("cwd_rel") or ".", argv=list(m.get("argv") or []),
            args=dict(m.get("args") or {}), names=job.names, audit_names=audit, start=job.start, stop=job.stop,
            log_from=job.log_from, restore_inner=dict(job.restore_inner), restore_before=job.restore_before,
            patched=patched.get(job.run_id, {}), threads=int(m.get("env", {}).get("torch_threads") or 0), mode=job.mode, est_s=job.est_s,
            inner_names=job.inner_names,
            expected_path=_write_expected(conn, files, info, job, job_id),
        ))
    return specs


def _write_expected(conn: duckdb.DuckDBPyConnection, files: RunFiles, info: RunInfo, job: PlannedJob,
                    job_id: str) -> str | None:
    """The originally logged values in the job's range, for the determinism audit."""
    outer = info.outer_loop
    if not outer or not info.logged:
        return None
    loops = sorted({loop for n in info.logged.values() for loop in n.loop_path},
                   key=lambda n: len(info.loop_paths.get(n, ())))
    coords = "[" + ", ".join(q(loop) for loop in loops) + "]"
    table = conn.sql(
        f"SELECT seq, name, loop_path, list_filter({coords}, lambda x: x IS NOT NULL) AS coords, value_type, value_float,"
        f" value_int, value_bool, value_str FROM logs WHERE run_id = ? AND source = 'logged' AND {q(outer)} >= ? "
        f"AND {q(outer)} < ? ORDER BY seq", params=[info.run_id, job.log_from, job.stop]
    ).to_arrow_table()
    table = table.cast(segments.SCHEMA)
    path = f"{layout.replay_dir(info.run_id, job_id)}/expected.arrow"
    files.put(path, segments.encode(table.to_batches(), {}))
    return path


# ---- rewrite ------------------------------------------------------------------------------------
def rewrite(bound: Bound) -> exp.Expression:
    """Replace each wide table reference with a subquery at the grain of the columns it uses."""
    for ref in bound.refs:
        parts = []
        for run_id in ref.run_ids:
            info = bound.runs[run_id]
            parts.append(_run_select(info, ref, with_run_id=ref.is_metrics))
        if not parts:
            parts = ["SELECT NULL::INTEGER AS run_id WHERE FALSE"]
        sql = " UNION ALL BY NAME ".join(f"SELECT * FROM ({p})" for p in parts)
        sub = sqlglot.parse_one(sql, read="duckdb").subquery(ref.alias)
        ref.node.replace(sub)
    return bound.statement


def _run_select(info: RunInfo, ref: TableRef, with_run_id: bool) -> str:
    names = [n for n in ref.referenced if n not in info.loop_paths and (n in info.logged or n in info.loggable)]
    if ref.star:
        names = list(dict.fromkeys([*info.logged, *names]))
    infos = [info.name_info(n) for n in names]
    coords = [info.loop_paths[n] for n in ref.referenced if n in info.loop_paths]
    if ref.star or not (infos or coords):
        # `*`, or no column at all (count(*)): the run's finest grain.
        pool = infos if infos else [info.name_info(n) for n in info.logged]
        deepest = max((i.loop_path for i in pool), key=len, default=())
        coords.append(deepest)
        infos = [i for i in infos if deepest[: len(i.loop_path)] == i.loop_path]
    try:
        grain = grain_for(infos, coords)
    except ValueError as err:
        raise FlorqlError(f"run_{info.run_id}: {err}") from None
    return wide_select(info.run_id, grain, infos, with_run_id)


def unknown_column_error(message: str, bound: Bound) -> FlorqlError | None:
    """Turn DuckDB's binder error for a missing column into one that lists florql's names."""
    match = re.search(r'Referenced column "([^"]+)" not found', message) or re.search(
        r'column "?([A-Za-z_][\w]*)"? (?:not found|does not exist)', message)
    if not match or not bound.refs:
        return None
    missing = match.group(1)
    logged = sorted({n for r in bound.refs for i in r.run_ids for n in bound.runs[i].logged})
    loggable = sorted({n for r in bound.refs for i in r.run_ids for n in bound.runs[i].loggable} - set(logged))
    coords = sorted({n for r in bound.refs for i in r.run_ids for n in bound.runs[i].loop_paths})
    nearest = difflib.get_close_matches(missing, logged + loggable + coords, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(nearest)}?" if nearest else ""
    return UnknownColumn(
        f"unknown column {missing!r}.{hint} Loop coordinates: {', '.join(coords) or '-'}; logged: "
        f"{', '.join(logged) or '-'}; loggable (add florql.log to the script to add more): {', '.join(loggable) or '-'}"
    )


