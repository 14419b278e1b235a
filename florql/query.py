"""The query path after binding (`florql.binder`): missing cells → replay jobs → rewrite.

- `missing_cells` turns a bound statement into (run, name, outer iterations) no replay of the
  current statement version has produced; `describe_missing` names what is still missing.
- `patch_sources` propagates the hindsight statements into the recorded code; `job_specs` makes
  `replay.planner.plan`'s jobs runnable.
- `rewrite` replaces each run table reference with a subquery at the grain of its scope.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass
from functools import lru_cache

import duckdb
from sqlglot import exp

from florql.binder import REF_KEY, Bound, TableRef
from florql.errors import FlorqlError, ReplayFailed
from florql.replay.analysis import LogSite, analyze, statement_inputs
from florql.replay.jobs import JobSpec
from florql.replay.planner import Need, Plan, PlannedJob, RunFacts
from florql.replay.propagation import PropagationError, propagate
from florql.replay.skip_tail import Pruned, prune_skip_tail
from florql.replay.state_neutral import inserted_code_keeps_state
from florql.runinfo import RunInfo, run_facts
from florql.storage import layout, segments
from florql.storage.code_versions import load_code_version
from florql.storage.runfiles import RunFiles
from florql.storage.views import grain_for, merge_runs, q, sql_type, tables_select, wide_select


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
    bound: Bound,
    conn: duckdb.DuckDBPyConnection,
    sites: dict[int, dict[str, Site]],
    reexecute: bool = False,
    warm: bool = False,
) -> list[tuple[RunFacts, list[Need]]]:
    """(run facts, needs) for every run with hindsight cells still missing in the selected range.

    `reexecute` plans every need by re-execution (no skipped inner loops): for cells a skip job
    did not produce. `warm`: jobs will fork from a warm server (their measured start-up differs).
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
            outer_level = len(site.loop_path) == 1 and not reexecute
            skippable = outer_level and not site.inputs & uncaptured
            why = _why_not_skipped(info, site, uncaptured) if outer_level else ""
            needs.append(Need(name, frozenset(missing), skippable=skippable, why_not_skipped=why))
        state_version = next(iter(sites[run_id].values())).state_version
        result.append((run_facts(conn, info, warm, state_version), needs))
    return result


def _why_not_skipped(info: RunInfo, site: Site, uncaptured: set[str]) -> str:
    """Why an outer-level statement may have to run the inner loop rather than restore it."""
    if site.inputs & uncaptured:
        names = ", ".join(sorted(site.inputs & uncaptured))
        return f"it reads {names}, which no checkpoint holds (not plain data, not registered)"
    blockers = info.manifest.skip_blockers
    if blockers:
        shown = "; ".join(blockers[:3]) + (f"; … ({len(blockers)} in all)" if len(blockers) > 3 else "")
        return f"the inner loop runs in a helper that cannot be restored exactly ({shown})"
    return ""


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
    # The code version whose training state the patched code produces: the recorded one when the
    # propagated statements change no state (`inserted_code_keeps_state`), else one of its own.
    # Checkpoints a replay leaves belong to it; only replays reaching the same state restore them.
    state_version: str | None = None


def patch_sources(info: RunInfo, names: set[str], files: RunFiles) -> tuple[dict[str, str], dict[str, Site]]:
    """The run's files with the hindsight statements propagated in, and each name's site there."""
    assert info.manifest.code_version is not None  # loggable names come from the run's code version
    recorded = load_code_version(files, info.manifest.code_version)
    by_file: dict[str, set[str]] = {}
    for name in names:
        by_file.setdefault(info.loggable[name][0], set()).add(name)
    patched: dict[str, str] = {}
    sites: dict[str, Site] = {}
    keeps_state = True
    root = info.manifest.project_root or ""
    for rel, file_names in by_file.items():
        old = recorded[rel].decode()
        with open(f"{root}/{rel}", encoding="utf-8") as f:
            current = f.read()
        new = _propagated(info.run_id, old, current, frozenset(file_names), rel)
        if new != old:
            patched[rel] = new
            keeps_state = keeps_state and _keeps_state(old, new)
        analysis = _analysis(new, rel)
        for name in file_names:
            site = analysis.get(name)
            alone = _propagated(info.run_id, old, current, frozenset([name]), rel)
            digest = hashlib.sha256(f"{info.manifest.code_version}\0{rel}\0{alone}".encode()).hexdigest()[:16]
            sites[name] = Site(info.place(rel, site) if site else (), digest, _inputs(new, name))
    state = info.manifest.code_version if keeps_state else _patched_version(info.manifest.code_version, patched)
    return patched, {name: dataclasses.replace(site, state_version=state) for name, site in sites.items()}


def _patched_version(code_version: str, patched: dict[str, str]) -> str:
    body = "\0".join(f"{rel}\0{text}" for rel, text in sorted(patched.items()))
    return "patched-" + hashlib.sha256(f"{code_version}\0{body}".encode()).hexdigest()[:16]


@lru_cache(maxsize=256)
def _keeps_state(old: str, new: str) -> bool:
    return inserted_code_keeps_state(old, new)


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
                patched=job_sources(job, m.script_rel, patched.get(job.run_id, {})),
                threads=int(m.env.torch_threads or 0),
                mode=job.mode,
                est_s=job.est_s,
                est_work_s=job.est_work_s,
                recorded_exec_s=job.recorded_exec_s,
                recorded_skip_s=job.recorded_skip_s,
                versions={n: sites[job.run_id][n].version for n in job.names},
                expected_path=_write_expected(conn, files, info, job, job_id),
                checkpoint_at=list(job.checkpoint_at),
                checkpoint_version=next(iter(sites[job.run_id].values())).state_version,
            )
        )
    return specs


def job_sources(job: PlannedJob, script_rel: str, patched: dict[str, str]) -> dict[str, str]:
    """The patched files a job runs: a skip job's script without what its names do not need."""
    pruned = _pruned(job, script_rel, patched)
    return dict(patched, **{script_rel: pruned.source}) if pruned else patched


def _pruned(job: PlannedJob, script_rel: str | None, patched: dict[str, str]) -> Pruned | None:
    every_restored = job.mode == "skip" and all(i in job.restore_inner for i in range(job.start, job.stop))
    if not every_restored or script_rel not in patched:
        return None
    return prune_skip_tail(patched[script_rel], frozenset(job.names))


def prune_skip_jobs(plan: Plan, bound: Bound, patched: dict[int, dict[str, str]]) -> list[str]:
    """Skip jobs that will leave statements out (`job_sources`): their estimates drop the recorded
    tails (mostly what is left out; no timing tells the rest apart), which also keeps them out of
    the calibration of restored iterations' pace. Returns the notes `explain` shows."""
    notes: dict[str, None] = {}
    for job in plan.jobs:
        pruned = _pruned(job, bound.runs[job.run_id].manifest.script_rel, patched.get(job.run_id, {}))
        if pruned is None:
            continue
        job.est_s -= job.est_work_s
        job.est_work_s = job.recorded_skip_s = 0.0
        left_out = "; ".join(f"`{s}`" for s in pruned.left_out)
        notes[
            f"run {job.run_id}: skip jobs leave out {left_out}: no asked name reads what it computes, and "
            "the next checkpoint restore resets what it changes (the modes of registered modules, the RNG; "
            "premise: calling a registered module changes only its state_dict and modes); "
            "the run's own values it logged are not re-checked there"
        ] = None
    return list(notes)


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
def rewrite(bound: Bound, versions: dict[int, dict[str, str]]) -> str:
    """The statement's SQL with each run table reference replaced by a subquery at the grain of the
    columns its scope reads.

    `versions` names, per run, the current version of each hindsight statement: replayed values
    of other versions stay in `logs` but are invisible here. The subqueries (one per run; for
    `metrics`, one per group of runs that read the same tables alike) are put in as text, not
    parsed and printed again.
    """
    statement = bound.statement
    by_id = {t.meta.get(REF_KEY): t for t in statement.find_all(exp.Table) if REF_KEY in t.meta}
    subqueries: dict[str, str] = {}
    for ref in bound.refs:
        parts = merge_runs(
            [(r, _run_select(bound.runs[r], ref, versions.get(r, {}), with_run_id=ref.is_metrics)) for r in ref.run_ids]
        )
        if not parts:
            parts = ["SELECT NULL::INTEGER AS run_id WHERE FALSE"]
        marker = f"__florql_ref_{ref.ref_id}_{uuid.uuid4().hex}"
        subqueries[q(marker)] = "(" + " UNION ALL BY NAME ".join(f"SELECT * FROM ({p})" for p in parts) + ")"
        by_id[ref.ref_id].replace(exp.Table(this=exp.to_identifier(marker, quoted=True)).as_(ref.alias))
    sql = statement.sql(dialect="duckdb")
    for marker, subquery in subqueries.items():
        sql = sql.replace(marker, subquery)
    return sql


def _run_select(info: RunInfo, ref: TableRef, versions: dict[str, str], with_run_id: bool) -> str:
    names = [n for n in info.columns() if n in ref.columns and n not in info.loop_paths]
    infos = [info.name_info(n) for n in names]
    coords = [info.loop_paths[n] for n in ref.columns if n in info.loop_paths]
    if ref.finest:  # count(*) counts the run's own rows, whatever else the scope reads
        pool = [info.name_info(n) for n in info.columns() if n not in info.loop_paths]
        coords.append(max((i.loop_path for i in pool), key=len, default=()))
    try:
        grain = grain_for(infos, coords)
    except ValueError as err:
        raise FlorqlError(f"run_{info.run_id}: {err}") from err
    grain, empty = _grain_with_rows(info, grain)
    if empty and not grain:  # nothing stored in these loops yet (a run that just started): no rows
        columns = [f"{info.run_id} AS run_id"] if with_run_id else []
        columns += [f"NULL::BIGINT AS {q(c)}" for c in empty]
        columns += [f"NULL::{sql_type(i.value_types)} AS {q(i.name)}" for i in infos]
        return f"SELECT {', '.join(columns)} WHERE FALSE"
    if all(versions.get(n, info.shown_versions.get(n)) == info.shown_versions.get(n) for n in names):
        fast = tables_select(info.run_id, grain, infos, info.tables, with_run_id, empty)
        if fast is not None:
            return fast
    return wide_select(info.run_id, grain, infos, with_run_id, versions, empty)


def _grain_with_rows(info: RunInfo, grain: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The grain without its innermost loops that hold no rows in this run, and those loops.

    A loop of the code that logged nothing (a per-epoch-only run's `step`) is still a column:
    NULL at the grain of the rows there are.
    """
    stored = set(info.tables) | {"/".join(n.loop_path) for n in info.logged.values()}
    keep = len(grain)
    while keep and "/".join(grain[:keep]) not in stored:
        keep -= 1
    return grain[:keep], grain[keep:]
