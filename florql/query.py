"""The query path, one pure-ish step at a time: parse → bind → plan replay → rewrite → execute.

- `bind` resolves florql's tables (`run_<id>`, `metrics`, the base tables), the columns each
  reference uses, and the loop ranges its predicates select.
- `missing_cells` turns that into (run, name, outer iterations) still absent from the store.
- `replay.planner.plan` turns cells into jobs; `job_specs` makes them runnable.
- `rewrite` replaces each wide table with a subquery at the grain of the columns it uses.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.errors import OptimizeError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope

from florql.errors import FlorqlError, ReplayFailed, UnknownColumn, UnknownTable
from florql.replay.jobs import JobSpec
from florql.replay.planner import Need, Plan, PlannedJob, RunFacts
from florql.replay.source import LogSite, PropagationError, analyze, propagate, statement_inputs
from florql.runinfo import BASE_TABLES, RunInfo, load_run, run_facts, run_ids
from florql.storage import layout, segments
from florql.storage.code_versions import load_code_version
from florql.storage.runfiles import RunFiles
from florql.storage.views import grain_for, q, wide_select

_RUN_TABLE = re.compile(r"^run_(\d+)$", re.IGNORECASE)
_REF = "florql_ref"  # meta key tagging each table node of the user's statement


@dataclass
class TableRef:
    """One reference to a run table (`run_<id>` or `metrics`) in one SQL scope."""

    ref_id: int
    alias: str
    run_ids: list[int]  # one for run_<id>, the selected runs for metrics
    is_metrics: bool
    columns: set[str] = field(default_factory=set)  # the table's columns this scope reads
    finest: bool = False  # count(*) or no column at all: the run's own rows, at its finest grain
    outer_indices: dict[int, set[int] | None] = field(default_factory=dict)  # per run; None = all


@dataclass
class Bound:
    statement: exp.Expr
    refs: list[TableRef]
    runs: dict[int, RunInfo]


# ---- bind -------------------------------------------------------------------------------------
def bind(statement: exp.Expr, conn: duckdb.DuckDBPyConnection) -> Bound:
    """Resolve the statement's run tables as SQL scopes do, and what each reference reads.

    The statement is qualified on a copy (stars expanded to every column, loggable ones
    included; CTEs shadowing tables; aliases and derived tables resolved), so each reference
    gets the columns of its own scope and the loop ranges of its own WHERE. Where the analysis
    is unsure, a reference reads everything: the replay plan may be wider, never narrower.
    """
    existing = run_ids(conn)
    shadowed = {c.alias_or_name.lower() for c in statement.find_all(exp.CTE)}
    tables = [t for t in statement.find_all(exp.Table) if isinstance(t.this, exp.Identifier)]
    for ref_id, table in enumerate(tables):
        table.meta[_REF] = ref_id
    runs: dict[int, RunInfo] = {}
    for table in tables:
        for run_id in _table_runs(table, existing, shadowed):
            runs.setdefault(run_id, load_run(conn, run_id))
    schema = _schema(conn, runs, tables, existing)
    qualified = statement.copy()
    try:
        # sqlglot annotates `schema` as dict[str, object] (invariant), though it only reads the mapping
        qualify(qualified, schema=schema, dialect="duckdb", validate_qualify_columns=True)  # type: ignore[arg-type]
    except OptimizeError as err:
        if "could not be resolved" in str(err):
            raise _unknown_column(str(err), list(runs.values())) from err
        return Bound(statement, _widened(tables, existing, shadowed, runs), runs)
    refs = []
    for scope in traverse_scope(qualified):
        refs.extend(_scope_refs(scope, tables, existing, runs))
    return Bound(statement, refs, runs)


def _table_runs(table: exp.Table, existing: list[int], shadowed: set[str]) -> list[int]:
    """The runs a table name may stand for (before scopes: a CTE of that name may shadow it)."""
    name = table.name.lower()
    if table.db and table.db.lower() not in ("main", "public"):
        raise UnknownTable(f"unknown schema {table.db!r}: florql's tables are in the default schema")
    match = _RUN_TABLE.match(name)
    if match and int(match.group(1)) in existing:
        return [int(match.group(1))]
    if name == "metrics":
        return existing
    if name in shadowed or name in BASE_TABLES:
        return []
    if match:
        listed = ", ".join(f"run_{r}" for r in existing) or "none yet (record one with florql.loop/log)"
        raise UnknownTable(f"there is no run {match.group(1)} (table {name}); runs in this store: {listed}")
    names = ", ".join([*BASE_TABLES, *(f"run_{r}" for r in existing)])
    raise UnknownTable(f"unknown table {table.name!r}; florql's tables are: {names}")


def _schema(
    conn: duckdb.DuckDBPyConnection, runs: dict[int, RunInfo], tables: list[exp.Table], existing: list[int]
) -> dict[str, dict[str, str]]:
    """Column names of every table the statement names, run tables with their loggable names."""
    schema: dict[str, dict[str, str]] = {}
    for name in {t.name.lower() for t in tables}:
        if name in BASE_TABLES and name != "metrics":
            rows = conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                "AND table_schema = 'main' ORDER BY ordinal_position",
                [name],
            ).fetchall()
            schema[name] = {c: t for c, t in rows}
    for run_id, info in runs.items():
        schema[f"run_{run_id}"] = dict.fromkeys(info.columns(), "DOUBLE")
    if "metrics" in {t.name.lower() for t in tables}:
        merged: dict[str, str] = {"run_id": "INTEGER"}
        for run_id in existing:
            merged.update(schema[f"run_{run_id}"])
        schema["metrics"] = merged
    return schema


def _scope_refs(scope: Scope, tables: list[exp.Table], existing: list[int], runs: dict[int, RunInfo]) -> list[TableRef]:
    refs = []
    select = scope.expression if isinstance(scope.expression, exp.Select) else None
    where = select.args.get("where") if select is not None else None
    counts_rows = any(True for _ in scope.find_all(exp.Star))  # count(*): stars are expanded elsewhere
    for alias, source in scope.sources.items():
        if not isinstance(source, exp.Table) or _REF not in source.meta:
            continue
        original = tables[source.meta[_REF]]
        name = original.name.lower()
        if name != "metrics" and not _RUN_TABLE.match(name):
            continue
        ids = existing if name == "metrics" else [int(_RUN_TABLE.match(name).group(1))]  # type: ignore[union-attr]
        ref = TableRef(source.meta[_REF], original.alias_or_name, list(ids), name == "metrics")
        used = {c.name.lower() for c in scope.columns if c.table == alias}
        ref.columns = {n for r in ids for n in runs[r].columns() if n.lower() in used}
        if name == "metrics" and "run_id" in used:
            ref.columns.add("run_id")
        ref.finest = counts_rows or not (ref.columns - {"run_id"})
        _bind_ranges(ref, where.this if where is not None else None, alias, runs)
        refs.append(ref)
    return refs


def _bind_ranges(ref: TableRef, where: exp.Expr | None, alias: str, runs: dict[int, RunInfo]) -> None:
    """The runs (for metrics) and outer iterations the reference's own WHERE can select."""
    if where is not None and ref.is_metrics:
        selected, _ = _analyse(where, "run_id", alias, range(max(ref.run_ids, default=0) + 1))
        ref.run_ids = [r for r in ref.run_ids if r in selected]
    for run_id in ref.run_ids:
        info = runs[run_id]
        completed = int(info.manifest.outer_completed or 0)
        if where is None or not info.outer_loop:
            ref.outer_indices[run_id] = None
        else:
            ref.outer_indices[run_id] = _analyse(where, info.outer_loop, alias, range(completed))[0]


def _widened(
    tables: list[exp.Table], existing: list[int], shadowed: set[str], runs: dict[int, RunInfo]
) -> list[TableRef]:
    """References read as everything: every column, every iteration, the finest grain."""
    refs = []
    for ref_id, table in enumerate(tables):
        name = table.name.lower()
        ids = _table_runs(table, existing, shadowed) if (name == "metrics" or _RUN_TABLE.match(name)) else []
        if not ids and name != "metrics":
            continue
        ref = TableRef(ref_id, table.alias_or_name, list(ids), name == "metrics", finest=True)
        ref.columns = {n for r in ids for n in runs[r].columns()}
        ref.outer_indices = dict.fromkeys(ids)
        refs.append(ref)
    return refs


def _analyse(cond: exp.Expr, column: str, alias: str, universe: range) -> tuple[set[int], bool]:
    """A superset of the values of `column` in `universe` that satisfy `cond`, and whether it is exact.

    Literals compare exactly (as fractions, like DuckDB's decimals), never rounded through floats.
    """
    everything = (set(universe), False)
    if isinstance(cond, exp.Paren):
        return _analyse(cond.this, column, alias, universe)
    if isinstance(cond, (exp.And, exp.Or)):
        (a, ea), (b, eb) = _analyse(cond.left, column, alias, universe), _analyse(cond.right, column, alias, universe)
        return (a & b if isinstance(cond, exp.And) else a | b), ea and eb
    if isinstance(cond, exp.Not):
        inner, exact = _analyse(cond.this, column, alias, universe)
        return (set(universe) - inner, True) if exact else everything
    if isinstance(cond, exp.Between) and _is_col(cond.this, column, alias):
        lo, hi = _number(cond.args.get("low")), _number(cond.args.get("high"))
        if lo is None or hi is None:
            return everything
        if cond.args.get("symmetric"):
            lo, hi = min(lo, hi), max(lo, hi)
        elif cond.args.get("symmetric") is not None and cond.args.get("symmetric") is not False:
            return everything
        return {i for i in universe if lo <= i <= hi}, True
    if (
        isinstance(cond, exp.In)
        and _is_col(cond.this, column, alias)
        and not cond.args.get("query")
        and not cond.args.get("unnest")
        and not cond.args.get("field")
    ):
        values = [_number(v) for v in cond.expressions]
        if not values or any(v is None for v in values):
            return everything
        return {i for i in universe if i in values}, True
    comparisons: dict[type[exp.Expr], str] = {
        exp.EQ: "=",
        exp.GT: ">",
        exp.GTE: ">=",
        exp.LT: "<",
        exp.LTE: "<=",
        exp.NEQ: "!=",
    }
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
    test = {
        "=": lambda i: i == value,
        ">": lambda i: i > value,
        ">=": lambda i: i >= value,
        "<": lambda i: i < value,
        "<=": lambda i: i <= value,
        "!=": lambda i: i != value,
    }[op]
    return {i for i in universe if test(i)}, True


def _is_col(node: exp.Expr | None, column: str, alias: str) -> bool:
    return isinstance(node, exp.Column) and node.name.lower() == column.lower() and node.table in ("", alias)


def _number(node: exp.Expr | None) -> Fraction | None:
    if isinstance(node, exp.Neg):
        inner = _number(node.this)
        return -inner if inner is not None else None
    if isinstance(node, exp.Paren):
        return _number(node.this)
    if isinstance(node, exp.Cast) and node.to.is_type(*exp.DataType.NUMERIC_TYPES):  # a bound float parameter
        return _number(node.this)
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return Fraction(node.this)
        except (ValueError, ZeroDivisionError):
            return None
    return None


# ---- what is missing --------------------------------------------------------------------------
def hindsight_names(bound: Bound) -> dict[int, set[str]]:
    """Per run, the names the statement reads that the current code can log but the run did not."""
    out: dict[int, set[str]] = {}
    for ref in bound.refs:
        for run_id in ref.run_ids:
            info = bound.runs[run_id]
            names = {
                n for n in ref.columns if n in info.loggable and n not in info.original and n not in info.loop_paths
            }
            if names:
                out.setdefault(run_id, set()).update(names)
    return out


def wanted_cells(bound: Bound) -> dict[int, dict[str, set[int]]]:
    """Per run and hindsight name, the outer iterations the statement may read."""
    wanted: dict[int, dict[str, set[int]]] = {}
    hindsight = hindsight_names(bound)
    for ref in bound.refs:
        for run_id in ref.run_ids:
            completed = int(bound.runs[run_id].manifest.outer_completed or 0)
            selected = ref.outer_indices.get(run_id)
            indices = set(range(completed)) if selected is None else {i for i in selected if i < completed}
            for name in ref.columns & hindsight.get(run_id, set()):
                wanted.setdefault(run_id, {}).setdefault(name, set()).update(indices)
    return wanted


def covered(conn: duckdb.DuckDBPyConnection, run_id: int, name: str, version: str) -> set[int]:
    """Outer iterations for which a replay of this version of the statement produced its cells."""
    return {
        r[0]
        for r in conn.execute(
            "SELECT outer_index FROM replay_coverage WHERE run_id = ? AND name = ? AND version = ?",
            [run_id, name, version],
        ).fetchall()
    }


def missing_cells(
    bound: Bound, conn: duckdb.DuckDBPyConnection, sites: dict[int, dict[str, Site]], reexecute: bool = False
) -> list[tuple[RunFacts, list[Need]]]:
    """(run facts, needs) for every run with hindsight cells still missing in the selected range.

    `reexecute` plans every need by re-execution (no skipped inner loops): for cells a skip job
    did not produce.
    """
    result = []
    for run_id, names in sorted(wanted_cells(bound).items()):
        info = bound.runs[run_id]
        uncaptured = set(info.manifest.uncaptured)
        needs = []
        for name, indices in sorted(names.items()):
            site = sites[run_id][name]
            if not site.loop_path:
                raise FlorqlError(
                    f"run {run_id}: florql.log({name!r}) is not inside a florql.loop; "
                    "statements outside loops cannot be replayed"
                )
            missing = indices - covered(conn, run_id, name, site.version)
            # Restoring a checkpoint stands in for the inner loop only if it holds all the statement reads.
            skippable = len(site.loop_path) == 1 and not reexecute and not site.inputs & uncaptured
            needs.append(Need(name, frozenset(missing), skippable=skippable))
        result.append((run_facts(conn, info), needs))
    return result


def describe_missing(bound: Bound, conn: duckdb.DuckDBPyConnection, sites: dict[int, dict[str, Site]]) -> str:
    """A line per run and name whose wanted cells no replay has produced; empty when none."""
    lines = []
    for run_id, names in sorted(wanted_cells(bound).items()):
        outer = bound.runs[run_id].outer_loop or "outer iteration"
        for name, indices in sorted(names.items()):
            gap = sorted(indices - covered(conn, run_id, name, sites[run_id][name].version))
            if gap:
                shown = ", ".join(map(str, gap[:20])) + (f", … ({len(gap)} in all)" if len(gap) > 20 else "")
                lines.append(f"  run {run_id}: {name} at {outer} {shown}")
    return "\n".join(lines)


# ---- code for replay ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """Where a hindsight statement runs in the replayed code, and which version of it that is."""

    loop_path: tuple[str, ...]
    version: str  # changes when the statement, its place, or the recorded code changes
    inputs: frozenset[str] = frozenset()  # variables its value may depend on (see statement_inputs)


def patch_sources(info: RunInfo, names: set[str], files: RunFiles) -> tuple[dict[str, str], dict[str, Site]]:
    """The run's files with the hindsight statements propagated in, and each name's site there."""
    assert info.manifest.code_version is not None  # loggable names come from the run's code version
    recorded = load_code_version(files, info.manifest.code_version)
    by_file: dict[str, set[str]] = {}
    for name in names:
        by_file.setdefault(info.loggable[name][0], set()).add(name)
    patched: dict[str, str] = {}
    sites: dict[str, Site] = {}
    root = info.manifest.project_root or ""
    for rel, file_names in by_file.items():
        old = recorded[rel].decode()
        with open(f"{root}/{rel}", encoding="utf-8") as f:
            current = f.read()
        new = _propagated(info.run_id, old, current, frozenset(file_names), rel)
        if new != old:
            patched[rel] = new
        analysis = _analysis(new, rel)
        for name in file_names:
            site = analysis.get(name)
            alone = _propagated(info.run_id, old, current, frozenset([name]), rel)
            digest = hashlib.sha256(f"{info.manifest.code_version}\0{rel}\0{alone}".encode()).hexdigest()[:16]
            sites[name] = Site(site.loop_path if site else (), digest, _inputs(new, name))
    return patched, sites


@lru_cache(maxsize=512)
def _propagated(run_id: int, old: str, current: str, names: frozenset[str], rel: str) -> str:
    try:
        return propagate(old, current, set(names), filename=rel)
    except PropagationError as err:
        raise ReplayFailed(f"run {run_id}: {err}; this run cannot answer it by replay") from err


@lru_cache(maxsize=256)
def _inputs(source: str, name: str) -> frozenset[str]:
    return statement_inputs(source, name)


@lru_cache(maxsize=256)
def _analysis(source: str, rel: str) -> dict[str, LogSite]:
    return analyze(source, rel).loggable_names()


def job_specs(
    plan: Plan,
    bound: Bound,
    patched: dict[int, dict[str, str]],
    sites: dict[int, dict[str, Site]],
    files: RunFiles,
    conn: duckdb.DuckDBPyConnection,
) -> list[JobSpec]:
    specs = []
    for job in plan.jobs:
        info = bound.runs[job.run_id]
        m = info.manifest
        # Replayed runs have a code version (patch_sources loaded it) and a script, which the worker runs.
        assert m.code_version is not None and m.script_rel is not None
        job_id = f"{job.run_id}-{uuid.uuid4().hex[:12]}"
        audit = sorted(info.original)
        specs.append(
            JobSpec(
                job_id=job_id,
                run_id=job.run_id,
                runs_url=files.url,
                code_version=m.code_version,
                script_rel=m.script_rel,
                cwd_rel=m.cwd_rel or ".",
                argv=list(m.argv),
                args=dict(m.args),
                names=job.names,
                audit_names=audit,
                start=job.start,
                stop=job.stop,
                log_from=job.log_from,
                restore_inner=dict(job.restore_inner),
                restore_before=job.restore_before,
                patched=patched.get(job.run_id, {}),
                threads=int(m.env.torch_threads or 0),
                mode=job.mode,
                est_s=job.est_s,
                versions={n: sites[job.run_id][n].version for n in job.names},
                expected_path=_write_expected(conn, files, info, job, job_id),
            )
        )
    return specs


def _write_expected(
    conn: duckdb.DuckDBPyConnection, files: RunFiles, info: RunInfo, job: PlannedJob, job_id: str
) -> str | None:
    """The originally logged values in the job's range, for the determinism audit."""
    outer = info.outer_loop
    if not outer or not info.logged:
        return None
    loops = sorted(
        {loop for n in info.logged.values() for loop in n.loop_path}, key=lambda n: len(info.loop_paths.get(n, ()))
    )
    coords = "[" + ", ".join(q(loop) for loop in loops) + "]"
    table = conn.sql(
        f"SELECT seq, name, loop_path, list_filter({coords}, lambda x: x IS NOT NULL) AS coords, value_type, value_float,"
        f" value_int, value_bool, value_str FROM logs WHERE run_id = ? AND source = 'logged' AND {q(outer)} >= ? "
        f"AND {q(outer)} < ? ORDER BY seq",
        params=[info.run_id, job.log_from, job.stop],
    ).to_arrow_table()
    table = table.cast(segments.SCHEMA)
    return segments.write_table(files, layout.replay_expected_path(info.run_id, job_id), table.to_batches(), {})


# ---- rewrite ------------------------------------------------------------------------------------
def rewrite(bound: Bound, versions: dict[int, dict[str, str]]) -> exp.Expr:
    """Replace each run table reference with a subquery at the grain of the columns its scope reads.

    `versions` names, per run, the current version of each hindsight statement: replayed values
    of other versions stay in `logs` but are invisible here.
    """
    statement = bound.statement
    by_id = {t.meta.get(_REF): t for t in statement.find_all(exp.Table) if _REF in t.meta}
    for ref in bound.refs:
        parts = [_run_select(bound.runs[r], ref, versions.get(r, {}), with_run_id=ref.is_metrics) for r in ref.run_ids]
        if not parts:
            parts = ["SELECT NULL::INTEGER AS run_id WHERE FALSE"]
        sql = " UNION ALL BY NAME ".join(f"SELECT * FROM ({p})" for p in parts)
        by_id[ref.ref_id].replace(sqlglot.parse_one(sql, read="duckdb").assert_is(exp.Query).subquery(ref.alias))
    return statement


def _run_select(info: RunInfo, ref: TableRef, versions: dict[str, str], with_run_id: bool) -> str:
    names = [n for n in info.columns() if n in ref.columns and n not in info.loop_paths]
    infos = [info.name_info(n) for n in names]
    coords = [info.loop_paths[n] for n in ref.columns if n in info.loop_paths]
    if ref.finest:
        pool = infos or [info.name_info(n) for n in info.columns() if n not in info.loop_paths]
        coords.append(max((i.loop_path for i in pool), key=len, default=()))
    try:
        grain = grain_for(infos, coords)
    except ValueError as err:
        raise FlorqlError(f"run_{info.run_id}: {err}") from err
    return wide_select(info.run_id, grain, infos, with_run_id, versions)


def _unknown_column(message: str, runs: list[RunInfo]) -> FlorqlError:
    match = re.search(r"Column '([^']+)' could not be resolved", message)
    return _column_error(match.group(1) if match else message, runs)


def unknown_column_error(message: str, bound: Bound) -> FlorqlError | None:
    """Turn DuckDB's binder error for a missing column into one that lists florql's names."""
    match = re.search(r'Referenced column "([^"]+)" not found', message) or re.search(
        r'column "?([A-Za-z_][\w]*)"? (?:not found|does not exist)', message
    )
    if not match or not bound.refs:
        return None
    return _column_error(match.group(1), list(bound.runs.values()))


def _column_error(missing: str, runs: list[RunInfo]) -> FlorqlError:
    logged = sorted({n for info in runs for n in info.logged})
    loggable = sorted({n for info in runs for n in info.loggable} - set(logged))
    coords = sorted({n for info in runs for n in info.loop_paths})
    nearest = difflib.get_close_matches(missing, logged + loggable + coords, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(nearest)}?" if nearest else ""
    return UnknownColumn(
        f"unknown column {missing!r}.{hint} Loop coordinates: {', '.join(coords) or '-'}; logged: "
        f"{', '.join(logged) or '-'}; loggable (add florql.log to the script to add more): {', '.join(loggable) or '-'}"
    )
