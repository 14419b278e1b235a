"""SQL for the wide per-run views: loop coordinates plus one column per log name.

A view is built at a *grain* (a loop path such as ("epoch", "step")): one row per coordinate of
that loop; a name logged in an enclosing loop is repeated on every row of its iteration, as a join
on the shared coordinates would give. When a name was logged more than once at one coordinate,
the value logged last wins (the long-form `logs` table keeps them all).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NameInfo:
    name: str
    loop_path: tuple[str, ...]
    value_types: frozenset[str]  # empty when never logged (a loggable name not replayed yet)


def q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def value_expr(types: frozenset[str]) -> str:
    if not types or types == {"float"}:
        return "value_float"
    if len(types) == 1:
        return {"int": "value_int", "bool": "value_bool", "str": "value_str"}[next(iter(types))]
    if "str" in types:
        return "coalesce(value_str, value_float::VARCHAR, value_int::VARCHAR, value_bool::VARCHAR)"
    return "coalesce(value_float, value_int::DOUBLE, value_bool::INTEGER::DOUBLE)"


def sql_type(types: frozenset[str]) -> str:
    return {"float": "DOUBLE", "int": "BIGINT", "bool": "BOOLEAN", "str": "VARCHAR"}.get(
        next(iter(types)) if len(types) == 1 else "", "VARCHAR" if "str" in types else "DOUBLE"
    )


def tables_select(
    run_id: int,
    grain: tuple[str, ...],
    names: list[NameInfo],
    tables: dict[str, str],
    with_run_id: bool = False,
    null_coords: tuple[str, ...] = (),
) -> str | None:
    """The same SELECT as `wide_select`, read from the run's wide tables (`florql.storage.wide`):
    the grain's table joined with its enclosing loops' tables. None when they cannot answer (no
    rows at the grain, or a name logged outside every loop): then `wide_select` does.

    The tables show each replayed name's current version; the caller checks that is the one it wants.
    """
    base = tables.get("/".join(grain)) if grain else None
    if base is None:
        return None
    select = ["g.run_id"] if with_run_id else []
    select += [f"g.{q(c)}" for c in grain] + [f"NULL::BIGINT AS {q(c)}" for c in null_coords]
    joins: dict[tuple[str, ...], str] = {}
    for info in names:
        if not info.value_types or len(info.loop_path) > len(grain):  # never logged, or in a loop without rows
            select.append(f"NULL::{sql_type(info.value_types)} AS {q(info.name)}")
            continue
        if not info.loop_path:
            return None
        alias = "g" if info.loop_path == grain else joins.setdefault(info.loop_path, f"p{len(joins)}")
        select.append(f"{alias}.{q(info.name)}")
    sql = f"SELECT {', '.join(select)} FROM {q(base)} g"
    for path, alias in joins.items():
        on = " AND ".join(f"g.{q(c)} = {alias}.{q(c)}" for c in ("run_id", *path))
        sql += f" LEFT JOIN {q(tables['/'.join(path)])} {alias} ON {on}"
    return f"{sql}{RUN_FILTER}{run_id}"


RUN_FILTER = " WHERE g.run_id = "  # how a `tables_select` ends: runs that differ only there share it


def merge_runs(selects: list[tuple[int, str]]) -> list[str]:
    """The SELECTs of many runs (with `run_id`), those that differ only in their run read as one:
    runs share their wide tables, so a query over many runs reads each table once."""
    shared: dict[str, list[int]] = {}
    alone: list[str] = []
    for run_id, sql in selects:
        suffix = f"{RUN_FILTER}{run_id}"
        if sql.endswith(suffix):
            shared.setdefault(sql[: -len(suffix)], []).append(run_id)
        else:
            alone.append(sql)
    merged = [
        f"{head}{RUN_FILTER}{ids[0]}" if len(ids) == 1 else f"{head} WHERE g.run_id IN ({', '.join(map(str, ids))})"
        for head, ids in shared.items()
    ]
    return merged + alone


def wide_select(
    run_id: int,
    grain: tuple[str, ...],
    names: list[NameInfo],
    with_run_id: bool = False,
    versions: dict[str, str] | None = None,
    null_coords: tuple[str, ...] = (),
) -> str:
    """A SELECT with columns [run_id,] *grain, *null_coords, *names at `grain` for one run, from `logs`.

    Replayed values show only for the statement version `versions` names (by default the version
    replayed last): a changed statement's old values never mix with its new ones. `null_coords`:
    loops deeper than the grain that have no rows in this run (NULL, so that they stay selectable).
    """
    path = "/".join(grain)
    coords = ", ".join(q(c) for c in grain)
    where_path = f"(loop_path = {lit(path)} OR starts_with(loop_path, {lit(path + '/')}))" if grain else "TRUE"
    base = (
        f"SELECT DISTINCT {coords} FROM logs WHERE run_id = {run_id} AND {where_path}" if grain else "SELECT 1 AS _one"
    )
    select = [f"{run_id} AS run_id"] if with_run_id else []
    select += [f"b.{q(c)}" for c in grain] + [f"NULL::BIGINT AS {q(c)}" for c in null_coords]
    joins = []
    for i, info in enumerate(names):
        if len(info.loop_path) > len(grain):  # in a loop with no rows in this run (see null_coords)
            select.append(f"NULL::{sql_type(info.value_types)} AS {q(info.name)}")
            continue
        alias = f"t{i}"
        keys = info.loop_path
        key_cols = ", ".join(q(c) for c in keys)
        group = f" GROUP BY {key_cols}" if keys else ""
        version = lit(versions[info.name]) if versions and info.name in versions else latest_version(run_id, info.name)
        sub = (
            f"SELECT {key_cols + ', ' if keys else ''}arg_max({value_expr(info.value_types)}, seq) AS v "
            f"FROM logs WHERE run_id = {run_id} AND name = {lit(info.name)} "
            f"AND loop_path = {lit('/'.join(keys))} AND (source = 'logged' OR version = {version}){group}"
        )
        on = " AND ".join(f"b.{q(c)} = {alias}.{q(c)}" for c in keys) or "TRUE"
        joins.append(f"LEFT JOIN ({sub}) {alias} ON {on}")
        select.append(f"{alias}.v::{sql_type(info.value_types)} AS {q(info.name)}")
    if not select:
        select = ["NULL AS _empty"]
    return f"SELECT {', '.join(select)} FROM ({base}) b " + " ".join(joins)


def latest_version(run_id: int, name: str) -> str:
    """SQL for the version of a hindsight statement whose replay committed last."""
    return (
        f"(SELECT arg_max(c.version, j.committed_at) FROM replay_coverage c JOIN replay_jobs j USING (job_id) "
        f"WHERE c.run_id = {run_id} AND c.name = {lit(name)})"
    )


def grain_for(names: list[NameInfo], coords: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The finest loop path among the referenced names and coordinates; they must nest.

    Raises ValueError naming the two columns whose loops are not nested.
    """
    paths = [(n.name, n.loop_path) for n in names] + [(p[-1], p) for p in coords if p]
    grain: tuple[str, ...] = ()
    holder = ""
    for name, path in paths:
        if path[: len(grain)] == grain:
            grain, holder = (path, name) if len(path) >= len(grain) else (grain, holder)
        elif grain[: len(path)] != path:
            raise ValueError(
                f"'{holder}' is logged in loop {'/'.join(grain)} and '{name}' in loop {'/'.join(path)}, "
                "which are not nested; query them separately and join on the shared coordinates"
            )
    return grain
