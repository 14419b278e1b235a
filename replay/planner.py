"""The replay planner: from missing cells to the smallest set of replay jobs.

Cells are (run, name, outer iteration). An outer-level name whose iteration has an 'inner_end'
checkpoint is produced by *skipping*: the iteration's first inner loop is replaced by restoring
that checkpoint. Every other cell is produced by *re-executing* from the nearest earlier
checkpoint (or from the start), logging only from the first needed iteration and stopping after
the last. Ranges split across workers at checkpoint boundaries.

Costs: a job pays its start-up (process and imports), the script's set-up, its checkpoint
restores and the recorded time of the iterations it runs, executed ones and restored ones (whose
tail after the inner loop runs) scaled apart by what earlier replays of the run actually took
(`Costs`, measured from the `_replay_costs` table; before any, the run's own recorded set-up). Jobs running side by side
share the cores: the plan with the most workers is chosen only when its estimate, slowed by that
sharing, beats fewer workers.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

COLD_START_S = 2.5  # a fresh interpreter importing torch, measured on 2 shared cores
WARM_START_S = 0.1  # a fork of the warm fork server (benchmarks/bench_warm_start.py)
SETUP_S = 0.5  # the script's own set-up before its first iteration (data, model)
RESTORE_BYTES_PER_S = 5.0e8
INGEST_S = 0.1  # per job, the query's own part: ingesting the job's values, planning again (the demo's)


@dataclass(frozen=True)
class Costs:
    """What a replay job of a run costs on this machine: defaults until replays measured it."""

    start_s: float = COLD_START_S
    setup_s: float = SETUP_S
    restore_bytes_per_s: float = RESTORE_BYTES_PER_S
    work_scale: float = 1.0  # replayed time / recorded time of executed iterations
    skip_scale: float = 1.0  # the same for iterations whose first inner loop is restored (their tail runs)
    measured_jobs: int = 0
    retrain_start_s: float = COLD_START_S  # retraining starts a fresh interpreter
    retrain_setup_s: float = SETUP_S  # and pays the script's whole set-up, imports included


@dataclass(frozen=True)
class Checkpoint:
    outer_index: int
    kind: str  # 'inner_end' | 'iter_end'
    name: str
    bytes: int


@dataclass
class RunFacts:
    run_id: int
    completed: int  # outer iterations the run executed (early stopping included)
    iteration_s: list[float]
    inner_s: list[float]
    checkpoints: list[Checkpoint]
    costs: Costs = field(default_factory=Costs)

    def cost(self, index: int) -> float:
        return self.iteration_s[index] if index < len(self.iteration_s) else (max(self.iteration_s, default=1.0))

    def tail_cost(self, index: int) -> float:
        inner = self.inner_s[index] if index < len(self.inner_s) else 0.0
        return max(self.cost(index) - inner, 0.0)

    def inner_end(self, index: int) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.outer_index == index and c.kind == "inner_end"), None)

    def resume_point(self, first: int) -> Checkpoint | None:
        """The latest checkpoint from which iteration `first` can be re-executed."""
        usable = [c for c in self.checkpoints if c.outer_index < first]
        return max(usable, key=lambda c: (c.outer_index, c.kind == "iter_end"), default=None)


@dataclass(frozen=True)
class Need:
    name: str
    indices: frozenset[int]  # missing outer iterations
    skippable: bool  # an outer-level statement: the first inner loop may be skipped
    why_not_skipped: str = ""  # for an outer-level statement that must re-execute: the reason, for explain


@dataclass
class PlannedJob:
    run_id: int
    names: list[str]
    start: int
    stop: int
    log_from: int
    mode: str  # 'skip' | 're-execute'
    restore_inner: dict[int, str] = field(default_factory=dict)
    restore_before: tuple[int, str] | None = None
    checkpoint: str | None = None
    est_s: float = 0.0
    est_work_s: float = 0.0  # the iterations' part of est_s (what the measured work is compared with)
    # What the iterations took when recorded: those it executes, and the tails of those it restores.
    # Measured work is compared with these (never with scaled estimates: calibration must not feed on itself).
    recorded_exec_s: float = 0.0
    recorded_skip_s: float = 0.0
    checkpoint_at: list[int] = field(default_factory=list)  # executed iterations lacking a checkpoint: take one

    @property
    def range_text(self) -> str:
        return f"{self.log_from}..{self.stop - 1}"


@dataclass
class Plan:
    jobs: list[PlannedJob]
    workers: int
    retrain_s: float  # retraining every involved run from scratch
    notes: list[str] = field(default_factory=list)
    slowdown: float = 1.0  # how much jobs running side by side slow each other (cores shared)
    ingest_s: float = 0.0  # per job, the query's own part once it is done (ingesting its values, planning again)

    @property
    def serial_s(self) -> float:
        return sum(j.est_s for j in self.jobs)

    @property
    def est_s(self) -> float:
        """Makespan with `workers` slots, longest job first, slowed by sharing the cores; plus the
        query's own part when there are jobs."""
        slots = [0.0] * max(1, self.workers)
        for cost in sorted((j.est_s for j in self.jobs), reverse=True):
            heapq.heapreplace(slots, slots[0] + cost)
        return max(slots) * self.slowdown + self.ingest_s * len(self.jobs)

    @property
    def slower_than_retraining(self) -> str:
        """A warning when replaying is estimated to take longer than retraining, else ''."""
        if not self.jobs or self.est_s <= self.retrain_s:
            return ""
        return (
            f"this replay is estimated slower than retraining from scratch (~{self.est_s:.1f} s against "
            f"~{self.retrain_s:.1f} s): the run has too few checkpoints in the range, or its start-up dominates"
        )

    def describe(self, outer_loop: str = "epoch") -> str:
        if not self.jobs:
            return "no replay needed: every requested value is stored"
        lines = [f"{'job':>3}  {'run':>4}  {'range':>10}  {'checkpoint':<20} {'mode':<11} {'est':>8}  names"]
        for i, j in enumerate(self.jobs, 1):
            lines.append(
                f"{i:>3}  {j.run_id:>4}  {j.range_text:>10}  {(j.checkpoint or 'start of run'):<20} "
                f"{j.mode:<11} {j.est_s:>7.1f}s  {', '.join(j.names)}"
            )
        speedup = self.retrain_s / self.est_s if self.est_s else float("inf")
        extras = f", x{self.slowdown:.2f} for sharing the cores" if self.slowdown > 1 else ""
        ingest = self.ingest_s * len(self.jobs)
        extras += f", {ingest:.1f} s to ingest the values" if ingest >= 0.05 else ""
        lines.append(
            f"total: {len(self.jobs)} job(s), ~{self.est_s:.1f} s on {self.workers} worker(s) "
            f"({self.serial_s:.1f} s of work{extras}) vs ~{self.retrain_s:.1f} s retraining from scratch ({speedup:.1f}x)"
        )
        if self.slower_than_retraining:
            lines.append("warning: " + self.slower_than_retraining)
        lines.extend(self.notes)
        return "\n".join(lines)


def plan(
    runs: list[tuple[RunFacts, list[Need]]], workers: int, cores: int = 0, threads: int = 1, ingest_s: float = 0.0
) -> Plan:
    """The fastest plan on at most `workers` workers, each job using `threads` of `cores` cores
    (0: do not model sharing the cores); never one estimated slower than on fewer workers.
    `ingest_s`: the query's own part per job (`Plan.ingest_s`): more jobs, more to ingest."""
    best: Plan | None = None
    for count in range(1, max(1, workers) + 1):
        candidate = _plan_for(runs, count)
        candidate.ingest_s = ingest_s
        running = min(count, len(candidate.jobs))
        candidate.slowdown = max(1.0, running * threads / cores) if cores else 1.0
        if best is None or candidate.est_s < best.est_s:
            best = candidate
        if len(candidate.jobs) < count:
            break  # more workers than jobs: nothing more to gain
    assert best is not None
    return best


def _plan_for(runs: list[tuple[RunFacts, list[Need]]], workers: int) -> Plan:
    jobs: list[PlannedJob] = []
    notes: list[str] = []
    retrain = 0.0
    for facts, needs in runs:
        needs = [n for n in needs if n.indices]
        if not needs:
            continue
        run_jobs = plan_run(facts, needs, workers)
        jobs.extend(run_jobs)
        if any(j.mode == "re-execute" for j in run_jobs):
            notes.extend(
                f"run {facts.run_id}: {n.name} re-executes: {n.why_not_skipped}" for n in needs if n.why_not_skipped
            )
        c = facts.costs
        retrain += c.retrain_start_s + c.retrain_setup_s + sum(facts.cost(i) for i in range(facts.completed))
    return Plan(jobs=jobs, workers=workers, retrain_s=retrain, notes=notes)


def plan_run(facts: RunFacts, needs: list[Need], workers: int) -> list[PlannedJob]:
    """Jobs for one run: clusters of needed iterations, each one job, split for parallelism.

    Inside a job every iteration that has an 'inner_end' checkpoint and needs no inner-loop value
    is restored instead of executed (its first inner loop is skipped); the rest execute.
    """
    names = sorted(n.name for n in needs)
    inner = {i for n in needs if not n.skippable for i in n.indices}
    wanted = sorted({i for n in needs for i in n.indices})
    jobs = [_job(facts, names, inner, a, b) for a, b in _clusters(facts, inner, wanted)]
    jobs = _split(facts, names, inner, jobs, workers)
    return jobs


def _start_for(
    facts: RunFacts, inner: set[int], first: int
) -> tuple[int, dict[int, str], tuple[int, str] | None, str | None]:
    """Where a job whose first needed iteration is `first` starts: (start, restores, restore_before, checkpoint).

    Always from the state at the *start* of `first` (the latest checkpoint before it), never
    from the script's fresh state: code before the inner loop must see the trained state. The
    iterations in between are restored wherever their checkpoints allow (see `_job`).
    """
    ckpt = facts.resume_point(first)
    if ckpt is None:
        return 0, {}, None, None
    if ckpt.kind == "inner_end":
        return ckpt.outer_index, {ckpt.outer_index: ckpt.name}, None, ckpt.name
    return ckpt.outer_index + 1, {}, (ckpt.outer_index + 1, ckpt.name), ckpt.name


def _job(facts: RunFacts, names: list[str], inner: set[int], first: int, last: int) -> PlannedJob:
    start, restores, before, ckpt = _start_for(facts, inner, first)
    for i in range(start, last + 1):
        c = facts.inner_end(i)
        if c is not None and i not in inner and i not in restores:
            restores[i] = c.name
    mode = "skip" if all(i in restores for i in range(first, last + 1)) else "re-execute"
    job = PlannedJob(
        facts.run_id,
        names,
        start=start,
        stop=last + 1,
        log_from=first,
        mode=mode,
        restore_inner=restores,
        restore_before=before,
        checkpoint=ckpt,
    )
    taken = {c.outer_index for c in facts.checkpoints}
    job.checkpoint_at = [i for i in range(start, last + 1) if i not in restores and i not in taken]
    job.est_s = _cost(facts, job)
    return job


def _cost(facts: RunFacts, job: PlannedJob) -> float:
    c = facts.costs
    sizes = {k.name: k.bytes for k in facts.checkpoints}
    restore_bytes = sum(sizes.get(name, 0) for name in job.restore_inner.values())
    iterations = range(job.start, job.stop)
    job.recorded_exec_s = sum(facts.cost(i) for i in iterations if i not in job.restore_inner)
    job.recorded_skip_s = sum(facts.tail_cost(i) for i in iterations if i in job.restore_inner)
    if job.restore_before:
        restore_bytes += sizes.get(job.restore_before[1], 0)
    job.est_work_s = job.recorded_exec_s * c.work_scale + job.recorded_skip_s * c.skip_scale
    return c.start_s + c.setup_s + restore_bytes / c.restore_bytes_per_s + job.est_work_s


def _clusters(facts: RunFacts, inner: set[int], wanted: list[int]) -> list[tuple[int, int]]:
    """Group needed iterations; a gap becomes a new job only when restarting is cheaper than crossing it."""
    out: list[tuple[int, int]] = []
    for i in wanted:
        if out:
            a, b = out[-1]
            start = _start_for(facts, inner, i)[0]
            crossing = sum(
                facts.cost(k) if facts.inner_end(k) is None or k in inner else facts.tail_cost(k)
                for k in range(b + 1, i)
            )
            restart = facts.costs.start_s + facts.costs.setup_s + sum(facts.cost(k) for k in range(start, i))
            if start <= b or crossing <= restart:
                out[-1] = (a, i)
                continue
        out.append((i, i))
    return out


def _split(
    facts: RunFacts, names: list[str], inner: set[int], jobs: list[PlannedJob], workers: int
) -> list[PlannedJob]:
    """Cut the longest job in two while that shortens the makespan and workers are free."""
    jobs = list(jobs)
    while len(jobs) < workers:
        jobs.sort(key=lambda j: j.est_s, reverse=True)
        longest = jobs[0]
        halves = _halve(facts, names, inner, longest)
        if halves is None or max(h.est_s for h in halves) >= longest.est_s:
            break
        jobs[0:1] = halves
    return sorted(jobs, key=lambda j: (j.run_id, j.log_from))


def _halve(facts: RunFacts, names: list[str], inner: set[int], job: PlannedJob) -> list[PlannedJob] | None:
    best: tuple[float, list[PlannedJob]] | None = None
    for m in range(job.log_from + 1, job.stop):
        start = _start_for(facts, inner, m)[0]
        if start < job.log_from:
            continue  # the second half would replay what the first already does
        pair = [_job(facts, names, inner, job.log_from, m - 1), _job(facts, names, inner, m, job.stop - 1)]
        worst = max(p.est_s for p in pair)
        if best is None or worst < best[0]:
            best = (worst, pair)
    return best[1] if best else None
