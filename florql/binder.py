"""Binding: which run tables a statement reads, with which columns, at which loop ranges.

The statement is resolved as SQL resolves it (sqlglot's qualify and scopes on a copy): CTEs shadow
tables, derived tables and subqueries are scopes of their own, stars expand to every column
(loggable names included). Each run table reference gets the columns its own scope reads (its
grain) and the outer iterations its own WHERE can select: a superset, never narrower.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from fractions import Fraction

import duckdb
from sqlglot import exp
from sqlglot.errors import OptimizeError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope

from florql.catalog_cache import RunCatalog
from florql.errors import FlorqlError, UnknownColumn, UnknownTable
from florql.runinfo import BASE_TABLES, RunInfo

_RUN_TABLE = re.compile(r"^run_(\d+)$", re.IGNORECASE)
REF_KEY = "florql_ref"  # meta key tagging each table node of the user's statement


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


def bind(statement: exp.Expr, conn: duckdb.DuckDBPyConnection, catalog: RunCatalog | None = None) -> Bound:
    """Resolve the statement's run tables as SQL scopes do, and what each reference reads.

    The statement is qualified on a copy (stars expanded to every column, loggable ones
    included; CTEs shadowing tables; aliases and derived tables resolved), so each reference
    gets the columns of its own scope and the loop ranges of its own WHERE. Where the analysis
    is unsure, a reference reads everything: the replay plan may be wider, never narrower.
    `catalog`: the query's reads of the catalog tables (kept between queries); one of `conn` by default.
    """
    catalog = catalog or RunCatalog(conn)
    existing = catalog.run_ids()
    shadowed = {c.alias_or_name.lower() for c in statement.find_all(exp.CTE)}
    tables = [t for t in statement.find_all(exp.Table) if isinstance(t.this, exp.Identifier)]
    for ref_id, table in enumerate(tables):
        table.meta[REF_KEY] = ref_id
    wanted = {run_id: None for table in tables for run_id in _table_runs(table, existing, shadowed)}
    runs = catalog.runs(sorted(wanted))
    schema = _schema(catalog, runs, tables, existing)
    qualified = statement.copy()
    try:
        # sqlglot annotates `schema` as dict[str, object] (invariant), though it only reads the mapping
        qualify(qualified, schema=schema, dialect="duckdb", validate_qualify_columns=True)  # type: ignore[arg-type]
    except OptimizeError as err:
        if "could not be resolved" in str(err):
            raise _unknown_column(str(err), list(runs.values())) from err
        return Bound(statement, _widened(tables, existing, shadowed, runs), runs)
    except Exception:  # sqlglot's own assertion on a statement it cannot qualify: DuckDB will judge it
        return Bound(statement, _widened(tables, existing, shadowed, runs), runs)
    try:
        refs = [ref for scope in traverse_scope(qualified) for ref in _scope_refs(scope, tables, existing, runs)]
    except Exception:  # the same, in the scope analysis
        return Bound(statement, _widened(tables, existing, shadowed, runs), runs)
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
    catalog: RunCatalog, runs: dict[int, RunInfo], tables: list[exp.Table], existing: list[int]
) -> dict[str, dict[str, str]]:
    """Column names of every table the statement names, run tables with their loggable names."""
    schema: dict[str, dict[str, str]] = {}
    for name in {t.name.lower() for t in tables}:
        if name in BASE_TABLES and name != "metrics":
            schema[name] = catalog.columns(name)
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
        if not isinstance(source, exp.Table) or REF_KEY not in source.meta:
            continue
        original = tables[source.meta[REF_KEY]]
        name = original.name.lower()
        if name != "metrics" and not _RUN_TABLE.match(name):
            continue
        ids = existing if name == "metrics" else [int(_RUN_TABLE.match(name).group(1))]  # type: ignore[union-attr]
        ref = TableRef(source.meta[REF_KEY], original.alias_or_name, list(ids), name == "metrics")
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
