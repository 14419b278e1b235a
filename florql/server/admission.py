"""One replay queue for every session of the server: admission, sharing, cancel, accounting.

A slot runs one replay job at a time (slot i is pinned to GPU i when there are GPUs). Jobs are
keyed by what they compute, so two sessions asking for the same missing cells at once wait on
one job. A session's queue wait counts against its replay budget. A cancelled query withdraws
its jobs: one nobody else waits for leaves the queue, or its worker process group is killed
(a job commits whole or not at all, so nothing partial becomes visible).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field
from typing import Any

from florql.errors import FlorqlError, ReplayBudgetExceeded
from florql.replay.executor import Executor, LocalExecutor, ProgressFn, StartFn, default_workers, make_executor
from florql.replay.jobs import JobResult, JobSpec
from florql.replay.launcher import OUTPUT_TAIL, SPEC_FILE, result_path, worker_env

ACCOUNTING_KEPT = 100_000  # jobs florql_replay_accounting keeps (the file holds up to twice as many)
REMEMBERED_JOBS = 256  # committed jobs remembered, for a session that planned one just before it committed
_NOT_IN_KEY = ("job_id", "threads", "est_s", "expected_path")  # differ between sessions planning the same job


class QueryCanceled(FlorqlError):
    sqlstate = "57014"


@dataclass
class Activity:
    """One session as `florql_activity` shows it."""

    pid: int
    user: str
    role: str
    backend_start: float = field(default_factory=time.time)
    query: str = ""
    state: str = "idle"  # idle, running, queued, replaying
    query_start: float | None = None
    estimate_s: float | None = None
    jobs_done: int = 0
    jobs_total: int = 0
    cancel_request: Future[None] = field(default_factory=Future)

    def begin(self, query: str) -> None:
        self.query, self.state, self.query_start = query, "running", time.time()
        self.estimate_s, self.jobs_done, self.jobs_total = None, 0, 0
        self.cancel_request = Future()

    def finish(self) -> None:
        self.state = "idle"

    def cancel(self) -> None:
        if self.state != "idle" and not self.cancel_request.done():
            self.cancel_request.set_result(None)


def job_key(spec: JobSpec) -> str:
    body = {k: v for k, v in asdict(spec).items() if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class QueuedJob:
    key: str
    spec: JobSpec
    queued_at: float
    result: Future[JobResult] = field(default_factory=Future)
    started: Future[None] = field(default_factory=Future)
    waiters: set[int] = field(default_factory=set)  # session pids
    askers: set[str] = field(default_factory=set)  # users
    process_group: int | None = None  # of the job's worker, once it runs: cancel kills it
    withdrawn: bool = False


class ReplayQueue:
    """The server's replay slots and the queue in front of them."""

    def __init__(
        self, max_workers: int | None = None, accounting_path: str | None = None, store: str | None = None
    ) -> None:
        self._max_workers = max_workers
        self._store = store  # whose fork server local jobs fork from
        self._lock = threading.Condition()
        self._pending: deque[QueuedJob] = deque()
        self._inflight: dict[str, QueuedJob] = {}
        self._committed: OrderedDict[str, JobResult] = OrderedDict()
        self._local: LocalExecutor | None = None
        self._other: Executor | None = None
        self._slots: list[threading.Thread] = []
        self.accounting_path = accounting_path
        self.accounting: list[dict[str, Any]] = load_accounting(accounting_path)

    @property
    def workers(self) -> int:
        if self._max_workers is None:
            self._max_workers = default_workers()
        return self._max_workers

    def submit(self, spec: JobSpec, pid: int, user: str) -> tuple[QueuedJob, bool]:
        """The job computing `spec` (queued now, or already in flight), and whether it was shared."""
        key = job_key(spec)
        with self._lock:
            job = self._inflight.get(key)
            if job is not None and job.withdrawn:  # being killed: this ask needs a job of its own
                job = None
            shared = job is not None
            if job is None:
                job = QueuedJob(key, spec, time.time())
                if key in self._committed:
                    job.started.set_result(None)
                    job.result.set_result(self._committed[key])
                    return job, True
                self._inflight[key] = job
                self._pending.append(job)
                self._start_slots()
                self._lock.notify()
            job.waiters.add(pid)
            job.askers.add(user)
            return job, shared

    def ahead_of(self, job: QueuedJob) -> int:
        """Jobs that run before `job` starts: those running plus those queued in front of it."""
        with self._lock:
            if job.started.done():
                return 0
            running = sum(1 for j in self._inflight.values() if j.started.done())
            return running + next((i for i, j in enumerate(self._pending) if j is job), 0)

    def withdraw(self, job: QueuedJob, pid: int, running_too: bool) -> None:
        """Session `pid` no longer waits for `job`; with nobody else waiting, drop it from the queue
        (and, when `running_too`, kill its worker)."""
        with self._lock:
            job.waiters.discard(pid)
            if job.waiters or job.result.done():
                return
            if not job.started.done():
                self._pending.remove(job)
                self._inflight.pop(job.key, None)
                job.result.set_result(JobResult(job.spec.job_id, ok=False, error="cancelled before it started"))
            elif running_too:
                job.withdrawn = True
                if job.process_group is not None:
                    _kill(job.process_group)

    def close(self) -> None:
        """Stop: queued jobs leave the queue, running workers are killed (their jobs never commit)."""
        with self._lock:
            for job in self._pending:
                job.result.set_result(JobResult(job.spec.job_id, ok=False, error="the server stopped"))
            self._pending.clear()
            for job in self._inflight.values():
                job.withdrawn = True
                if job.process_group is not None:
                    _kill(job.process_group)

    # the slots

    def _start_slots(self) -> None:
        while len(self._slots) < self.workers:
            slot = threading.Thread(target=self._serve_slot, args=(len(self._slots),), daemon=True)
            slot.name = f"florql-replay-slot-{len(self._slots)}"
            self._slots.append(slot)
            slot.start()

    def _serve_slot(self, slot: int) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._lock.wait()
                job = self._pending.popleft()
                job.started.set_result(None)
            started = time.time()
            result = self._run(job, slot)
            with self._lock:
                if self._inflight.get(job.key) is job:
                    del self._inflight[job.key]
                if result.ok:
                    self._committed[job.key] = result
                    while len(self._committed) > REMEMBERED_JOBS:
                        self._committed.popitem(last=False)
                self._account(job, slot, started, result)
            job.result.set_result(result)

    def _run(self, job: QueuedJob, slot: int) -> JobResult:
        try:
            if self._executor_kind() != "local":
                assert self._other is not None
                return self._other.run([job.spec])[0]
            assert self._local is not None
            job.spec.threads = job.spec.threads or self._local.threads_per_job()
            gpu = {"CUDA_VISIBLE_DEVICES": str(slot % self._local.gpus)} if self._local.gpus else None
            return self._launch_warm(job, worker_env(job.spec, gpu)) or self._launch(job, worker_env(job.spec, gpu))
        except Exception as e:  # a slot outlives any one job
            return JobResult(job.spec.job_id, ok=False, error=f"{type(e).__name__}: {e}")

    def _executor_kind(self) -> str:
        kind = os.environ.get("FLORQL_EXECUTOR", "local")
        with self._lock:
            if kind == "local" and self._local is None:
                self._local = LocalExecutor(self.workers, store=self._store)
            elif kind != "local" and self._other is None:
                self._other = make_executor(kind, self.workers)
        return kind

    def _launch_warm(self, job: QueuedJob, env: dict[str, str]) -> JobResult | None:
        """The job in a fork of the store's fork server (its own process group); None: run it cold."""
        assert self._local is not None
        server = self._local.fork_server
        job.spec.launched_at = time.time()
        job.spec.warm = server is not None and server.serving()
        if server is None or not (job.spec.warm or server.ready()):
            return None

        def started(pid: int) -> None:
            with self._lock:
                job.process_group = pid
                if job.withdrawn:
                    _kill(pid)

        result = server.launch(job.spec, env, on_started=started)
        if job.withdrawn:
            return JobResult(job.spec.job_id, ok=False, error="cancelled")
        return result

    def _launch(self, job: QueuedJob, env: dict[str, str]) -> JobResult:
        """`florql.replay.launcher.launch_worker`, in its own process group so that cancel can kill it."""
        with tempfile.TemporaryDirectory(prefix="florql-job-") as tmp:
            spec_path = os.path.join(tmp, SPEC_FILE)
            with open(spec_path, "w") as f:
                f.write(job.spec.to_json())
            command = [sys.executable, "-m", "florql.replay.worker", spec_path]
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
            with self._lock:
                job.process_group = proc.pid
                if job.withdrawn:
                    _kill(proc.pid)
            out, err = proc.communicate()
            if job.withdrawn:
                return JobResult(job.spec.job_id, ok=False, error="cancelled")
            try:
                with open(result_path(spec_path)) as f:
                    return JobResult(**json.load(f))
            except FileNotFoundError:
                tail = (err or out or "")[-OUTPUT_TAIL:]
                return JobResult(job.spec.job_id, ok=False, error=f"worker exited with {proc.returncode}: {tail}")

    def _account(self, job: QueuedJob, slot: int, started: float, result: JobResult) -> None:
        ended = time.time()
        spec = job.spec
        gpus = self._local.gpus if self._local is not None else 0
        record = {
            "job_id": spec.job_id,
            "run_id": spec.run_id,
            "names": ",".join(spec.names),
            "first_iteration": spec.log_from,
            "last_iteration": spec.stop - 1,
            "asked_by": ",".join(sorted(job.askers)),
            "queued_at": job.queued_at,
            "started_at": started,
            "ended_at": ended,
            "wait_s": started - job.queued_at,
            "run_s": ended - started,
            "slot": slot,
            "gpu": slot % gpus if gpus else None,
            "threads": spec.threads,
            "warm": spec.warm,
            "outcome": "cancelled" if job.withdrawn else "committed" if result.ok else "failed",
        }
        self.accounting = append_accounting(self.accounting, record, self.accounting_path)


def _kill(process_group: int) -> None:
    try:
        os.killpg(process_group, signal.SIGKILL)  # the worker and anything it started (DataLoader workers)
    except ProcessLookupError:
        pass


def append_accounting(records: list[dict[str, Any]], record: dict[str, Any], path: str | None) -> list[dict[str, Any]]:
    """`records` with `record` added, in memory and in the file at `path`. Bounded: at twice
    ACCOUNTING_KEPT records, the oldest go from both (the file is rewritten whole, atomically)."""
    records.append(record)
    if len(records) < 2 * ACCOUNTING_KEPT:
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return records
    records = records[-ACCOUNTING_KEPT:]
    if path:
        _rewrite_accounting(path, records)
    return records


def load_accounting(path: str | None) -> list[dict[str, Any]]:
    """The last ACCOUNTING_KEPT jobs. A line cut short by a crash mid-write is dropped, and the file
    rewritten without it (so the next record starts a line of its own)."""
    if not path or not os.path.exists(path):
        return []
    records, damaged = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                damaged = True
    records = records[-ACCOUNTING_KEPT:]
    if damaged:
        _rewrite_accounting(path, records)
    return records


def _rewrite_accounting(path: str, records: list[dict[str, Any]]) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(temporary, path)  # atomic: a reader sees the old file or the new one


class SessionReplays(Executor):
    """A session's view of the shared queue: the executor its florql connection runs jobs with."""

    def __init__(self, queue: ReplayQueue, activity: Activity, budget: Callable[[], float | None]) -> None:
        self.queue = queue
        self.activity = activity
        self.budget = budget
        self.notes: list[str] = []

    @property
    def workers(self) -> int:  # type: ignore[override]  # the queue's, resolved on first use
        return self.queue.workers

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def run(
        self, jobs: list[JobSpec], on_done: ProgressFn | None = None, on_start: StartFn | None = None
    ) -> list[JobResult]:
        # `on_start` goes unused: the queue starts jobs for every session, and the server shows
        # a query's progress in florql_activity rather than in start lines.
        activity = self.activity
        if activity.cancel_request.done():
            raise QueryCanceled("canceling statement due to user request")
        submitted = [self.queue.submit(spec, activity.pid, activity.user) for spec in jobs]
        queued = [job for job, _ in submitted]
        shared = sum(1 for _, was_shared in submitted if was_shared)
        if shared:
            self.notes.append(
                f"{shared} of {len(jobs)} replay job(s) were already under way for another session: "
                "this query waits for them instead of replaying the same cells twice"
            )
        ahead = max((self.queue.ahead_of(job) for job in queued), default=0)
        activity.jobs_total += len(jobs)
        try:
            waited = self._wait(queued, on_done, ahead)
        except BaseException:
            for job in queued:
                self.queue.withdraw(job, activity.pid, running_too=activity.cancel_request.done())
            raise
        if ahead:
            self.notes.append(
                f"waited {waited:.1f} s in the shared replay queue behind {ahead} job(s); "
                f"the wait counts against replay_budget ({_budget_text(self.budget())})"
            )
        activity.state = "running"
        return [job.result.result() for job in queued]

    def _wait(self, queued: list[QueuedJob], on_done: ProgressFn | None, ahead: int) -> float:
        """Wait for every job; a queue wait beyond what the budget leaves after the plan's estimate fails."""
        activity, start = self.activity, time.monotonic()
        budget = self.budget()
        estimate = max(max(j.spec.est_s for j in queued), sum(j.spec.est_s for j in queued) / self.workers)
        allowance = None if budget is None else max(0.0, budget - estimate)
        pending = {job.result: job for job in queued}
        waited = 0.0
        while pending:
            unstarted = [job.started for job in queued if not job.started.done()]
            activity.state = "queued" if unstarted else "replaying"
            if not unstarted and waited == 0.0:
                waited = time.monotonic() - start
            timeout = None if allowance is None or not unstarted else allowance - (time.monotonic() - start)
            waiting: list[Future[Any]] = [*pending, *unstarted, activity.cancel_request]
            done, _ = wait(waiting, timeout, FIRST_COMPLETED)
            if activity.cancel_request.done():
                raise QueryCanceled("canceling statement due to user request: its replay jobs were stopped")
            if not done and unstarted:
                raise ReplayBudgetExceeded(
                    f"waited {time.monotonic() - start:.1f} s in the shared replay queue behind {ahead} job(s); "
                    f"with this plan's ~{estimate:.1f} s of replay that is over the budget of {_budget_text(budget)}. "
                    "See florql_activity for what runs now, and try again later or with a larger budget."
                )
            for future in [f for f in done if f in pending]:
                activity.jobs_done += 1
                job = pending.pop(future)
                if on_done:
                    on_done(job.spec, future.result())
        return waited or time.monotonic() - start


def _budget_text(budget: float | None) -> str:
    return "unlimited" if budget is None else f"{budget:g} s"
