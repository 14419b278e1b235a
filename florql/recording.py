"""Recording a run: manifest, code version, background segments and adaptive checkpoints."""

from __future__ import annotations

import builtins
import functools
import inspect
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch

from florql import args as florql_args
from florql import reads, replay, storage
from florql.call_chain import capture_chain
from florql.checkpoint_engine import ASSUMED_COPY_BYTES_PER_S, AdaptivePolicy, Persister, Stager, make_policy
from florql.inputs import InputRecorder
from florql.names import check_name
from florql.rng import capture_rng
from florql.scope import baseline_of, capture_scope
from florql.session import LoopFrame, TrainingSession
from florql.storage import layout
from florql.storage.checkpoints import CheckpointRecord
from florql.storage.code_versions import save_code_version
from florql.storage.errors import WriteFailed
from florql.storage.layout import locate_store
from florql.storage.manifest import Env, Manifest
from florql.storage.segment_writer import SegmentWriter
from florql.uptime import launch_cost_s

HEARTBEAT_S = 2.0
_OWN_PACKAGES = tuple(
    os.path.dirname(os.path.abspath(inspect.getfile(m))) + os.sep for m in (sys.modules["florql"], storage, replay)
)


def allocate_run_id(files) -> int:
    """The next free run id; mkdir-like exclusive creation makes concurrent starts safe."""
    taken = [int(d) for d in files.list_dirs("runs") if d.isdigit()]
    candidate = max(taken, default=0) + 1
    while not files.create(layout.claim_path(candidate), f"{os.getpid()}@{socket.gethostname()}".encode()):
        candidate += 1
    return candidate


def _project_root(script: str | None) -> str:
    start = os.path.dirname(script) if script else os.getcwd()
    folder = start
    while True:
        if os.path.exists(os.path.join(folder, ".git")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return start
        folder = parent


def _git_commit(root: str) -> str | None:
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class ImportClock:
    """Times the main thread's imports of packages a replay's warm fork has imported already
    (`florql.replay.PRELOAD`), from florql's start to the outer loop: part of the script's set-up
    that a warm replay does not pay (an optimizer's constructor importing torch._dynamo: ~1 s)."""

    PACKAGES = frozenset(m.partition(".")[0] for m in replay.PRELOAD) - {"florql"}

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = 0.0
        self._clock = clock
        self._thread = threading.get_ident()
        self._inside = False
        self._original = builtins.__import__
        builtins.__import__ = self._import  # type: ignore[assignment]

    def _import(self, name: str, globals_: Any = None, locals_: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        package = (globals_ or {}).get("__package__") or "" if level else name
        if self._inside or threading.get_ident() != self._thread or package.partition(".")[0] not in self.PACKAGES:
            return self._original(name, globals_, locals_, fromlist, level)
        self._inside, began = True, self._clock()
        try:
            return self._original(name, globals_, locals_, fromlist, level)
        finally:
            self.seconds += self._clock() - began
            self._inside = False

    def stop(self) -> float:
        if builtins.__import__ == self._import:  # someone else's hook installed since stays in place
            builtins.__import__ = self._original
        return self.seconds


def say(line: str) -> None:
    """One line on stderr about the run, unless FLORQL_QUIET is set."""
    if os.environ.get("FLORQL_QUIET", "") in ("", "0"):
        print(line, file=sys.stderr, flush=True)


def environment() -> Env:
    env = Env(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        platform=platform.platform(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        device="cpu",
        torch_threads=torch.get_num_threads(),  # replay uses the same count: reductions depend on it
    )
    if torch.cuda.is_available():
        env.device = torch.cuda.get_device_name(0)
        env.cuda_devices = torch.cuda.device_count()
    return env


class RecordSession(TrainingSession):
    def __init__(self) -> None:
        super().__init__()
        self.location = locate_store()
        self.files = self.location.run_files()
        self.run_id = allocate_run_id(self.files)
        self.script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] and os.path.isfile(sys.argv[0]) else None
        self.root = _project_root(self.script)
        self._manifest_lock = threading.Lock()
        self._manifest_dirty = True
        self._last_manifest = 0.0
        self.policy: AdaptivePolicy | None = None
        self.stager = Stager()
        self.persister = Persister(self.files, self.run_id, self._checkpoint_done, self._persist_cost)
        self.scope_warned: set[str] = set()
        self._chain_blocked = False  # the helper frames at the inner loop's end cannot be restored exactly
        self.previous_scope: dict[str, Any] = {}  # the last checkpoint's plain scope values
        self._code_thread: threading.Thread | None = None
        self.inputs = InputRecorder(
            self.files, self.root, (self.location.home + os.sep, *_OWN_PACKAGES), self._inputs_hashed
        )
        self._announced: set[str] = set()
        self._reads_collected = 0
        self._set_up_imports = ImportClock()
        self.manifest = Manifest(
            run_id=self.run_id,
            script=self.script,
            script_rel=os.path.relpath(self.script, self.root) if self.script else None,
            cwd_rel=os.path.relpath(os.getcwd(), self.root),
            project_root=self.root,
            argv=sys.argv[1:],
            git_commit=_git_commit(self.root),
            env=environment(),
            started_at=time.time(),
            launch_s=launch_cost_s(),
            heartbeat_at=time.time(),
            status="running",
            checkpoints={"taken": 0, "considered": 0, "stall_s": 0.0, "skipped_in_flight": 0},
            folders=self.inputs.folders(),
        )
        try:
            self._capture_code_version(wait=True)  # the manifest names its code version from the start
            self._write_manifest()
        except OSError as exc:
            raise WriteFailed(f"florql cannot start recording run {self.run_id} in {self.files.url}: {exc}") from exc
        self.writer = SegmentWriter(
            self.files,
            lambda seq: layout.segment_path(self.run_id, layout.MAIN_WRITER, seq),
            {"run_id": str(self.run_id), "writer": layout.MAIN_WRITER, "source": "logged"},
            on_swap=self._manifest_snapshot,
            on_flush=self._heartbeat,
        )
        self._writer_cpu_at_loop = 0.0
        say(f"florql: recording run {self.run_id} in {self.files.url}")

    # ---- manifest ---------------------------------------------------------------------------
    def update(self, **fields: Any) -> None:
        with self._manifest_lock:
            self.manifest.update(**fields)
            self._manifest_dirty = True

    def _write_manifest(self) -> None:
        with self._manifest_lock:
            self.manifest.heartbeat_at = time.time()
            body = self.manifest.to_json().encode()
            self._manifest_dirty = False
        try:
            self.files.put(layout.manifest_path(self.run_id), body)
        except BaseException:
            self._manifest_dirty = True  # written again at the next heartbeat
            raise
        self._last_manifest = time.monotonic()

    def _manifest_snapshot(self) -> bytes | None:
        """The manifest as it is just before the writer takes the buffered records (when due).

        Whatever it reports (e.g. `outer_completed`) was logged before, so by the time `_heartbeat`
        writes it, it is in a written segment: a reader never sees an iteration completed whose
        records have not landed (a query would take them for hindsight values to replay).
        """
        with self._manifest_lock:
            if not (self._manifest_dirty or time.monotonic() - self._last_manifest > HEARTBEAT_S):
                return None
            self.manifest.heartbeat_at = time.time()
            self._manifest_dirty = False
            return self.manifest.to_json().encode()

    def _heartbeat(self, body: bytes | None) -> None:
        if body is not None:
            # It replaces the previous manifest: should a power loss undo the rename, the previous one,
            # complete, stays. The folder is synced with the final manifest, not at every heartbeat.
            self.files.put(layout.manifest_path(self.run_id), body, durable_name=False)
            self._last_manifest = time.monotonic()

    # ---- code version -----------------------------------------------------------------------
    def _project_files(self) -> dict[str, bytes]:
        candidates: set[str] = set()
        if self.script:
            candidates.add(self.script)
        inside = self.root + os.sep
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if not (path and path.endswith(".py")):
                continue
            # Most of the ~4,000 modules a torch script has loaded live outside the project: a
            # prefix test rules them out without `abspath` (18 ms of the run's start, twice).
            if not os.path.isabs(path) or f"{os.sep}.{os.sep}" in path or f"{os.sep}..{os.sep}" in path:
                path = os.path.abspath(path)
            if path.startswith(inside):
                candidates.add(path)
        sources: dict[str, bytes] = {}
        for path in candidates:
            rel = self._relative_source(path)
            if rel is None:
                continue
            try:
                with open(path, "rb") as f:
                    sources[rel] = f.read()
            except OSError:
                continue
        return sources

    def _relative_source(self, path: str) -> str | None:
        if not path.startswith(self.root + os.sep) or not os.path.isfile(path):
            return None
        rel = os.path.relpath(path, self.root).replace(os.sep, "/")
        parts = rel.split("/")
        excluded = {"site-packages", "dist-packages", ".git", ".venv", "venv", "__pycache__"}
        if excluded & set(parts) or path.startswith(self.location.home + os.sep):
            return None
        if any(path.startswith(own) for own in _OWN_PACKAGES):  # florql itself is not the user's code
            return None
        return rel

    def _capture_code_version(self, wait: bool = False) -> None:
        """Read the sources now; store them (fsync'd blobs) off the training thread.

        With `wait`, a failure to store them is raised here; otherwise the run keeps the code
        version it had (the one stored at its start).
        """
        self.inputs.collect()
        sources = {**self.inputs.contents, **self._project_files()}
        self._record_inputs()
        if self._code_thread is not None:
            self._code_thread.join()
        failed: list[OSError] = []

        def save() -> None:
            try:
                self.update(code_version=save_code_version(self.files, sources))
            except OSError as exc:
                failed.append(exc)

        self._code_thread = threading.Thread(target=save, name="florql-code-version", daemon=True)
        self._code_thread.start()
        if wait:
            self._code_thread.join()
            if failed:
                raise failed[0]

    def _record_inputs(self) -> None:
        unrecorded = self.inputs.unrecorded()
        for note in unrecorded:
            if note not in self._announced:
                self._announced.add(note)
                say(f"florql: run {self.run_id} used {note}: not recorded, a replay cannot get it back as it was")
        self.update(inputs=self.inputs.entries(), unrecorded=unrecorded)

    def _inputs_hashed(self) -> None:
        self.update(inputs=self.inputs.entries())

    # ---- args -------------------------------------------------------------------------------
    def arg(self, name: str, default: Any) -> Any:
        check_name("arg", name)
        if name in self.args:
            return self.args[name]
        value = default
        if name in florql_args.OVERRIDES:
            value = florql_args.coerce(name, florql_args.OVERRIDES[name], default)
        elif not isinstance(default, (bool, int, float, str, type(None))):
            florql_args.coerce(name, "", default)  # raises the type error
        self.args[name] = value
        self.update(args=dict(self.args))
        return value

    # ---- loops ------------------------------------------------------------------------------
    def outer_loop(self, lf: LoopFrame, iterable: Iterable[Any], frame) -> Iterator[Any]:
        planned = len(iterable) if isinstance(iterable, Sized) else None
        setup_s = time.time() - (self.manifest.started_at or time.time())  # the planner's set-up cost
        setup_import_s = self._set_up_imports.stop()
        self.update(
            outer_loop=lf.name,
            outer_planned=planned,
            setup_s=round(setup_s, 6),
            setup_import_s=round(setup_import_s, 6),
        )
        with self._manifest_lock:  # scripts set their thread count in their set-up, after florql started
            self.manifest.env.torch_threads = torch.get_num_threads()
        self._capture_code_version()  # project modules are imported by now
        self.outer.frame = frame
        self.outer.baseline = baseline_of(frame)
        self._writer_cpu_at_loop = self.writer.cpu_s  # the set-up's logs are not training's
        index = -1
        completed = False
        try:
            for index, item in enumerate(iterable):
                self.outer.index = index
                self.outer.inner_point_done = False
                self.outer.stall_s = 0.0
                self.outer.inner_s = 0.0
                self.outer.observed_s = 0.0
                self.outer.overlapped = self.persister.in_flight
                self.enter_iteration(lf, index)
                self.outer.started = self.clock()
                yield item
                self._end_outer_iteration(index)
            completed = True
        finally:
            if not completed and index >= 0 and self.manifest.outer_completed == index:
                # `break` inside iteration `index`: it ran, so it counts.
                self._end_outer_iteration(index)
            self.update(outer_broke_early=not completed)
            self.outer.frame = None

    def _end_outer_iteration(self, index: int) -> None:
        elapsed = self.clock() - self.outer.started - self.outer.stall_s
        if self.policy is not None:
            self.policy.iteration(elapsed, self.outer.overlapped or self.persister.in_flight)
        if not self.outer.inner_point_done:  # (a blocked inner point already reported its share)
            self.maybe_checkpoint(index, "iter_end", elapsed - self.outer.observed_s)
        else:
            self.policy_observe(elapsed - self.outer.observed_s)
        if len(reads.READ_FILES) != self._reads_collected:  # a data file first opened in this iteration
            self._reads_collected = len(reads.READ_FILES)
            self.inputs.collect()
            self._record_inputs()
        with self._manifest_lock:
            self.manifest.iteration_s.append(round(elapsed, 6))
            self.manifest.inner_s.append(round(self.outer.inner_s, 6))
            self.manifest.outer_completed = index + 1
            self._manifest_dirty = True

    def inner_loop(self, lf: LoopFrame, iterable: Iterable[Any], frame) -> Iterator[Any]:
        chain = self.checkpoint_chain(lf, frame)
        started = self.clock()
        finished = False
        try:
            prefix = self.inner_prefix()
            for index, item in enumerate(iterable):
                lf.index = index
                self.position = prefix + (index,)
                yield item
            finished = True
        finally:
            # A `break` out of the inner loop ends it too (the generator is closed).
            if chain is not None and (finished or sys.exc_info()[0] in (None, GeneratorExit)):
                self._end_first_inner_loop(chain, started)

    def _end_first_inner_loop(self, chain: list, started: float) -> None:
        if chain and self._chain_blocked:  # not exact here: the end of the iteration is the point
            return
        self.outer.inner_point_done = True
        self.outer.inner_s = self.clock() - started
        self.outer.observed_s = self.clock() - self.outer.started - self.outer.stall_s
        outer = self.outer.frame
        frames: Callable[[], dict[str, Any]] | None = None
        if chain and self.checkpointing_active and outer is not None:
            frames = functools.partial(capture_chain, chain, outer, self.objects, self.scope_warned)
        if self.maybe_checkpoint(self.outer.index, "inner_end", self.outer.observed_s, frames) == "blocked":
            self.outer.inner_point_done = False

    def _chain_blockers(self, frames: dict[str, Any]) -> bool:
        """Record why the helper's frames cannot be restored exactly; from then on the run
        checkpoints at the end of its outer iterations (the layout does not change between them)."""
        if not frames["blockers"]:
            return False
        new = [b for b in frames["blockers"] if b not in self.manifest.skip_blockers]
        if new:
            self.update(skip_blockers=[*self.manifest.skip_blockers, *new])
        self._chain_blocked = True
        return True

    # ---- checkpoints ------------------------------------------------------------------------
    def register(self, objects: dict[str, Any], budget: float | None) -> None:
        super().register(objects, budget)
        self.policy = make_policy(self.budget)
        self.update(checkpoint_budget=self.budget, checkpoint_objects=sorted(objects))

    def unregister(self) -> None:
        self.persister.wait()
        self._report_policy()
        super().unregister()

    def policy_observe(self, seconds: float) -> None:
        if self.policy is not None:
            self.policy.observe(max(seconds, 0.0))

    def maybe_checkpoint(
        self, outer_index: int, kind: str, train_s: float, frames: Callable[[], dict[str, Any]] | None = None
    ) -> str:
        """Take a checkpoint at this point if the overhead budget allows it: "taken", "declined", or
        "blocked" (the helper frames `frames` captures cannot be restored exactly).

        The helper frames are captured only for a checkpoint the policy allows, and the capture
        counts as the checkpoint's stall: it is florql's time on the training thread."""
        if not self.checkpointing_active or self.policy is None:
            return "declined"
        self.policy_observe(train_s)
        self.policy.background_cpu_s = max(self.writer.cpu_s - self._writer_cpu_at_loop, 0.0)
        unmeasured = self.policy.last_cost_s is None  # before the second checkpoint: the first is not typical
        estimate = self.stager.nbytes(self.objects) / ASSUMED_COPY_BYTES_PER_S if unmeasured else 0.0
        final = outer_index + 1 == self.manifest.outer_planned  # the run waits for this persist at exit
        self.policy.planned = self.manifest.outer_planned
        overlap = self._recent_tail_s() if final and kind == "inner_end" else 0.0
        if not self.policy.should_checkpoint(estimate, self.persister.in_flight, final, overlap):
            self._report_policy()
            return "declined"
        started = self.clock()
        captured = frames() if frames is not None else None
        if captured is not None and self._chain_blockers(captured):
            wasted = self.clock() - started
            self.outer.stall_s += wasted
            self.policy.stall_s += wasted
            return "blocked"
        # The staging buffers are reused: never overwrite them while a persist still reads them.
        # (The adaptive policy skips such opportunities; `every` waits here, and that is a stall.)
        self.persister.wait()
        payload: dict[str, Any] = {
            "objects": self.stager.stage(self.objects),
            "rng": capture_rng(),
            "modes": self.module_modes(),
            "scope": capture_scope(
                self.outer.frame,
                {id(o) for o in self.objects.values()},
                self.scope_warned,
                self.outer.baseline,
                self.previous_scope,
            )
            if self.outer.frame
            else None,
            "position": {"outer_index": outer_index, "kind": kind},
            "frames": captured,  # the helper frames' locals when the inner loop ran in a helper
            "args": dict(self.args),
        }
        stall = self.clock() - started
        self.previous_scope = payload["scope"]["plain"] if payload["scope"] else {}
        uncaptured = set((payload["scope"] or {}).get("uncaptured", ())) - set(self.manifest.uncaptured)
        if uncaptured:  # statements reading these are answered by re-execution, never by skipping
            self.update(uncaptured=sorted(uncaptured | set(self.manifest.uncaptured)))
        self.policy.record(stall)
        self.outer.stall_s += stall
        coords = {f.name: f.index for f in self.stack[:1]}
        self.persister.submit(outer_index, kind, coords, payload, stall, self.stager.pending_event)
        self.outer.overlapped = True
        self._report_policy()
        return "taken"

    def _recent_tail_s(self) -> float:
        """What recent iterations ran after their inner loop (an evaluation, say): a persist started
        at an inner loop's end overlaps that much of the iteration."""
        recent = list(zip(self.manifest.iteration_s, self.manifest.inner_s))[-AdaptivePolicy.SAMPLES :]
        return max(statistics.median(i - n for i, n in recent), 0.0) if recent else 0.0

    def _persist_cost(self, cpu_s: float, wall_s: float) -> None:
        if self.policy is not None:
            self.policy.persisted(cpu_s, wall_s)

    def _checkpoint_done(self, record: CheckpointRecord) -> None:
        self.update(last_checkpoint=record.name)

    def _report_policy(self) -> None:
        p = self.policy
        if p is None:
            return
        self.update(
            checkpoints={
                "taken": p.taken - self.persister.failed,
                "considered": p.considered,
                "stall_s": round(p.stall_s, 6),
                "train_s": round(p.train_s, 6),
                "overhead": round(p.overhead, 6),
                "skipped_in_flight": p.skipped_in_flight,
                "skipped_close": p.skipped_close,
                "spacing_s": round(p.spacing_s, 6),
                "period": p.period if p.gaps else None,
                "interference_s": round(p.interference_s, 6),
                "persist_cpu_s": round(p.persist_cpu_s, 6),
                "writer_cpu_s": round(p.background_cpu_s, 6),
                "contended": p.contended,
                "failed": self.persister.failed,
            }
        )

    # ---- end of run -------------------------------------------------------------------------
    def fail(self, exc_type: type, exc: BaseException, tb: Any) -> None:
        text = "".join(traceback.format_exception_only(exc_type, exc)).strip()
        fields: dict[str, Any] = {"status": "failed", "error": text}
        if self.manifest.outer_broke_early and self.manifest.outer_completed:
            # The exception left the outer loop mid-iteration: that iteration did not complete.
            fields["outer_completed"] = self.manifest.outer_completed - 1
        self.update(**fields)

    def finish(self) -> None:
        """Called at interpreter exit: write what is left. Failures end in one clear line each."""
        self._set_up_imports.stop()  # a script without an outer loop
        self.persister.finish()
        self._report_policy()
        fields: dict[str, Any] = {"ended_at": time.time()}
        try:
            self.writer.close()
        except WriteFailed as exc:
            print(f"florql: run {self.run_id}: {exc}", file=sys.stderr, flush=True)
            fields.update(status="failed", error=str(exc))
        self.inputs.wait()  # the hashes of the large files it read
        try:
            self._capture_code_version(wait=True)
        except OSError as exc:  # the run keeps the code version stored at its start
            print(f"florql: run {self.run_id}: could not store its final code version: {exc}", file=sys.stderr)
        if self.manifest.status == "running" and "status" not in fields:
            fields["status"] = "finished"
        self.update(**fields)
        try:
            self._write_manifest()
        except OSError as exc:
            print(
                f"florql: run {self.run_id}: could not write its manifest ({exc}); the run will show as killed",
                file=sys.stderr,
                flush=True,
            )

    def describe(self) -> str:
        return f"run {self.run_id}"
