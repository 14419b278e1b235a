"""What the query side knows about runs: coordinates, logged and loggable names, checkpoints."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import lru_cache

import duckdb

from florql.replay.analysis import LogSite, ModuleAnalysis, analyze
from florql.replay.planner import INGEST_S, WARM_START_S, Checkpoint, Costs, RunFacts
from florql.storage.manifest import Manifest
from florql.storage.views import NameInfo

BASE_TABLES = (
    "runs",
    "logs",
    "checkpoints",
    "iterations",
    "run_args",
    "code_versions",
    "replay_jobs",
    "replay_coverage",
    "replay_audit",
    "metrics",
)


@dataclass
class RunInfo:
    run_id: int
    manifest: Manifest
    logged: dict[str, NameInfo]  # every stored name: logged by the run or replayed since
    original: set[str] = field(default_factory=set)  # names the run itself logged
    loggable: dict[str, tuple[str, LogSite]] = field(default_factory=dict)  # name → (file, site), current code
    loop_paths: dict[str, tuple[str, ...]] = field(default_factory=dict)  # loop name → its path
    code_files: dict[str, str] = field(default_factory=dict)  # rel path → sha256 (recorded)
    # (file, function) → the loops it ran inside, from the coordinates of what it logged
    contexts: dict[tuple[str, str | None], tuple[str, ...]] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)  # loop path → its wide table
    shown_versions: dict[str, str] = field(default_factory=dict)  # replayed name → version its table shows

    @property
    def outer_loop(self) -> str | None:
        return self.manifest.outer_loop

    def columns(self) -> list[str]:
        """Loop coordinates (outer first), then every logged or loggable name: those in the current
        code in code order, the rest in the order the run first logged them."""
        loops = sorted(self.loop_paths, key=lambda n: len(self.loop_paths[n]))
        names = [n for n in dict.fromkeys([*self.loggable, *self.logged]) if n not in self.loop_paths]
        script = self.manifest.script_rel
        order = {n: i for i, n in enumerate(self.logged)}

        def place(name: str) -> tuple:
            if name in self.loggable:
                rel, site = self.loggable[name]
                return (0, rel != script, rel, site.lineno, 0)
            return (1, False, "", 0, order[name])

        return loops + sorted(names, key=place)

    def place(self, rel: str, site: LogSite) -> tuple[str, ...]:
        """Where a statement runs: the static guess, unless what the run logged from the same
        function says where that function ran (closures, hooks and callbacks run where they are
        called, not where they are written)."""
        context = self.contexts.get((rel, site.function))
        return site.loop_path if context is None else context + site.lex_path

    def name_info(self, name: str) -> NameInfo:
        if name in self.logged:
            return self.logged[name]
        site = self.loggable[name][1]
        return NameInfo(name, site.loop_path, frozenset())


def run_ids(conn: duckdb.DuckDBPyConnection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT run_id FROM _runs ORDER BY run_id").fetchall()]


def load_run(conn: duckdb.DuckDBPyConnection, run_id: int) -> RunInfo:
    return load_runs(conn, [run_id])[run_id]


def load_runs(conn: duckdb.DuckDBPyConnection, ids: list[int]) -> dict[int, RunInfo]:
    """What binding needs of these runs, from the catalog tables: a few reads for any number of runs."""
    from florql.storage.database import runs_names

    if not ids:
        return {}
    manifests = {
        r: Manifest.from_json(m)
        for r, m in conn.execute("SELECT run_id, manifest FROM _runs WHERE list_contains(?, run_id)", [ids]).fetchall()
    }
    names = runs_names(conn, ids)
    catalog: dict[int, list[tuple]] = {}
    for run_id, *row in conn.execute(
        "SELECT run_id, name, logged, version FROM _names WHERE list_contains(?, run_id)", [ids]
    ).fetchall():
        catalog.setdefault(run_id, []).append(tuple(row))
    tables: dict[int, dict[str, str]] = {}
    for run_id, path, table in conn.execute(
        "SELECT run_id, loop_path, table_name FROM _grains WHERE list_contains(?, run_id)", [ids]
    ).fetchall():
        tables.setdefault(run_id, {})[path] = table
    versions = [m.code_version for m in manifests.values()]
    code: dict[str, dict[str, str]] = {}
    for version, path, digest in conn.execute(
        "SELECT code_version, path, sha256 FROM code_versions WHERE list_contains(?, code_version)",
        [[v for v in versions if v]],
    ).fetchall():
        code.setdefault(version, {})[path] = digest
    runs = {}
    for run_id in ids:
        manifest = manifests[run_id]
        info = RunInfo(run_id, manifest, {n.name: n for n in names.get(run_id, [])})
        info.original = {n for n, logged, _ in catalog.get(run_id, []) if logged}
        info.shown_versions = {n: v for n, _, v in catalog.get(run_id, []) if v is not None}
        info.tables = tables.get(run_id, {})
        info.code_files = code.get(manifest.code_version or "", {})
        _add_code(info)
        runs[run_id] = info
    return runs


def _add_code(info: RunInfo) -> None:
    """Loop paths from the stored rows, then loggable names and loops from the current code."""
    for n in info.logged.values():
        for depth in range(1, len(n.loop_path) + 1):
            info.loop_paths.setdefault(n.loop_path[depth - 1], n.loop_path[:depth])
    root = info.manifest.project_root or ""
    for rel in info.code_files:
        if not rel.endswith(".py"):
            continue
        analysis = _analyze_file(os.path.join(root, rel))
        if analysis is None:
            continue
        for site in analysis.log_sites:
            info.loggable.setdefault(site.name, (rel, site))
        for loop in analysis.loops:
            info.loop_paths.setdefault(loop.name, loop.loop_path)
    _confirm_places(info)


def _confirm_places(info: RunInfo) -> None:
    """Correct the static loop paths of loggable names by the coordinates the run recorded."""
    for name in info.original & info.loggable.keys():
        rel, site = info.loggable[name]
        recorded = info.logged[name].loop_path if name in info.logged else ()
        depth = len(recorded) - len(site.lex_path)
        if site.function is not None and depth >= 0 and recorded[depth:] == site.lex_path:
            info.contexts.setdefault((rel, site.function), recorded[:depth])
    for name, (rel, site) in info.loggable.items():
        path = info.place(rel, site)
        if path != site.loop_path:
            info.loggable[name] = (rel, dataclasses.replace(site, loop_path=path))


def _analyze_file(path: str) -> ModuleAnalysis | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _analyze_cached(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=256)
def _analyze_cached(path: str, mtime_ns: int, size: int) -> ModuleAnalysis | None:
    try:
        with open(path, encoding="utf-8") as f:
            return analyze(f.read(), os.path.basename(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def run_facts(
    conn: duckdb.DuckDBPyConnection, info: RunInfo, warm: bool = False, state_version: str | None = None
) -> RunFacts:
    """What planning a replay of the run needs. `state_version`: the code version whose state the
    replay's patched code produces (`Site.state_version`): checkpoints replays of other patched
    code left are not the state this replay would reach, so it never restores them."""
    rows = conn.execute(
        "SELECT outer_index, kind, name, bytes FROM checkpoints WHERE run_id = ? AND "
        "(code_version IS NULL OR code_version = ? OR code_version = ?) ORDER BY outer_index, name",
        [info.run_id, info.manifest.code_version, state_version],
    ).fetchall()
    m = info.manifest
    return RunFacts(
        run_id=info.run_id,
        completed=int(m.outer_completed or 0),
        iteration_s=list(m.iteration_s),
        inner_s=list(m.inner_s),
        checkpoints=[Checkpoint(i, k, n, b) for i, k, n, b in rows],
        costs=measured_costs(conn, info.run_id, warm, m.setup_s, m.launch_s, m.setup_import_s),
    )


RECENT_JOBS = 20  # the measurements a cost estimate takes the median of
MEASURABLE_S = 0.05  # recorded seconds below which a job's ratio is noise


def measured_costs(
    conn: duckdb.DuckDBPyConnection,
    run_id: int,
    warm: bool,
    recorded_setup_s: float | None = None,
    recorded_launch_s: float | None = None,
    recorded_setup_import_s: float | None = None,
) -> Costs:
    """The cost model of replaying `run_id`, from what recent replays actually took: start-up from
    jobs started the same way (warm or cold) on any run (before any: the run's own launch), set-up
    from this run's jobs started the same way (before any: the set-up the run recorded, less its
    imports a warm fork has done), the iterations' pace from this run's own jobs, restore
    throughput from every job that restored. Defaults where none measured."""
    default = Costs()
    recorded_setup_s = default.setup_s if recorded_setup_s is None else recorded_setup_s
    # A warm job's fork has torch & co. imported: of the recorded set-up, their imports are not paid.
    warm_setup_s = max(recorded_setup_s - (recorded_setup_import_s or 0.0), 0.0)
    # Before a cold start was measured: the recorded run's own (its imports before florql's start).
    cold_default = default.retrain_start_s if recorded_launch_s is None else recorded_launch_s
    start, _ = _recent_median(conn, "startup_s", "warm = ?", [warm], WARM_START_S if warm else cold_default)
    cold, _ = _recent_median(conn, "startup_s", "NOT warm", [], cold_default)
    setup, jobs = _recent_median(
        conn, "setup_s", "run_id = ? AND warm = ?", [run_id, warm], warm_setup_s if warm else recorded_setup_s
    )
    # Executed iterations' pace from jobs that mostly execute; restored iterations' from jobs that
    # mostly restore, once their executed part is accounted for.
    scale, _ = _recent_median(
        conn,
        "work_s / recorded_exec_s",
        f"run_id = ? AND recorded_exec_s > {MEASURABLE_S} AND recorded_skip_s <= 0.25 * recorded_exec_s",
        [run_id],
        1.0,
    )
    skip_scale, _ = _recent_median(
        conn,
        f"greatest(work_s - {scale} * recorded_exec_s, 0) / recorded_skip_s",
        f"run_id = ? AND recorded_skip_s > {MEASURABLE_S} AND recorded_skip_s >= recorded_exec_s",
        [run_id],
        1.0,
    )
    [row] = conn.execute(
        "SELECT sum(restored_bytes), sum(restore_s) FROM _replay_costs WHERE restored_bytes > 0"
    ).fetchall()  # fetchone would leave the result open (DuckDB refuses the next statement)
    rate = row[0] / row[1] if row and row[0] and row[1] else default.restore_bytes_per_s
    return Costs(start, setup, rate, scale, skip_scale, jobs, cold, recorded_setup_s)


def measured_ingest_s(conn: duckdb.DuckDBPyConnection) -> float:
    """What recent replaying queries spent per job besides running it (ingest, planning again)."""
    [row] = conn.execute(
        f"SELECT median(overhead_s / jobs) FROM (SELECT * FROM _query_costs WHERE jobs > 0 "
        f"ORDER BY finished_at DESC LIMIT {RECENT_JOBS})"
    ).fetchall()
    return float(row[0]) if row and row[0] is not None else INGEST_S


def _recent_median(
    conn: duckdb.DuckDBPyConnection, value: str, where: str, params: list, fallback: float
) -> tuple[float, int]:
    """The median of `value` over the most recent matching jobs, and how many there were."""
    [row] = conn.execute(
        f"SELECT median(v), count(*) FROM (SELECT {value} AS v FROM _replay_costs WHERE {where} "
        f"ORDER BY rowid DESC LIMIT {RECENT_JOBS})",
        params,
    ).fetchall()
    return (float(row[0]), int(row[1])) if row and row[1] else (fallback, 0)
