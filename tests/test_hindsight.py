"""Hindsight queries, bit-exact against ground truth.

A module-scoped store records, with `hindsight_scripts/train_v1.py` (logs only `loss` per step
and `val_acc` per epoch):
  run 1: with checkpoints; run 2: without checkpoints; run 3: with a value that differs on every
  execution (`jitter`), so that a replay of it cannot be exact;
then, with `train_v2.py` (v1 plus `grad_norm` per step and `w_norm` per epoch) as the current code,
  run 4: the ground truth (same seed, logged everything).
Each test that replays works on its own copy of that store. Which outer iterations a replay
executed or restored is read from `replay_jobs`; expectations derive from the checkpoints the run
actually took (the adaptive policy decides those), never from numbers of a single run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

import florql
from florql.api import ReplayWarning
from florql.errors import ReplayBudgetExceeded, ReplayFailed
from florql.replay.executor import Executor, LocalExecutor
from florql.replay.jobs import JobResult
from florql.storage import layout

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "hindsight_scripts"
QUERIES = ROOT / "queries"
EPOCHS = 6
STEPS = 8  # 192 samples / batch 24
RUN, NO_CKPT, JITTER, TRUTH = 1, 2, 3, 4


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS", "FLORQL_REPLAY_JOB")}
    env["FLORQL_HOME"] = str(home)
    return env


def _record(work: Path, home: Path, script: Path, *args: str) -> None:
    (work / "train.py").write_text(script.read_text())
    cmd = [sys.executable, "train.py", *(["--florql-args", *args] if args else [])]
    proc = subprocess.run(cmd, cwd=work, env=_env(home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@dataclass
class Recorded:
    work: Path
    home: Path

    def copy(self, dest: Path) -> Path:
        target = dest / "store"
        shutil.copytree(self.home, target)
        return target


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    work = tmp_path_factory.mktemp("hindsight")
    home = work / ".florql"
    _record(work, home, SCRIPTS / "train_v1.py")
    _record(work, home, SCRIPTS / "train_v1.py", "ckpt=False")
    _record(work, home, SCRIPTS / "train_v1.py", "jitter=True")
    _record(work, home, SCRIPTS / "train_v2.py")  # stays the current code
    db = florql.connect(home, progress=False)
    db.sync()
    return Recorded(work, home)


@pytest.fixture
def store(recorded: Recorded, tmp_path: Path) -> Path:
    return recorded.copy(tmp_path)


def connect(home: Path, **options) -> florql.api.Connection:
    options.setdefault("workers", 1)
    return florql.connect(home, progress=False, **options)


def jobs(db, run_id: int) -> list[dict]:
    table = db.sql(
        "SELECT job_id, start_index, stop_index, log_from, executed, restored, checkpoint, names "
        "FROM replay_jobs WHERE run_id = ? ORDER BY log_from",
        [run_id],
    ).arrow()
    return table.to_pylist()


def ran(db, run_id: int) -> tuple[set[int], set[int]]:
    """(executed, restored) outer iterations over every replay job of the run."""
    executed, restored = set(), set()
    for job in jobs(db, run_id):
        executed.update(job["executed"])
        restored.update(job["restored"])
    return executed, restored


def inner_end_checkpoints(db, run_id: int) -> set[int]:
    return {
        r[0]
        for r in db.sql(
            "SELECT outer_index FROM checkpoints WHERE run_id = ? AND kind = 'inner_end'", [run_id]
        ).fetchall()
    }


def same(db, query: str, run_id: int = RUN, truth: int = TRUTH, params=None) -> pa.Table:
    """Run `query` (with {run}) on `run_id` and on the ground truth; assert bit-exact equality."""
    answer = db.sql(query.format(run=run_id), params).arrow()
    expected = db.sql(query.format(run=truth), params).arrow()
    assert answer.num_rows > 0
    assert answer.equals(expected), f"{answer.to_pandas()}\n!=\n{expected.to_pandas()}"
    return answer


def test_ground_truth_is_reproducible(recorded: Recorded):
    """The seeded script is deterministic: the runs' shared logged values agree bit for bit."""
    db = connect(recorded.home)
    for run_id in (NO_CKPT, JITTER):
        same(db, "SELECT epoch, step, loss, val_acc FROM run_{run} ORDER BY ALL", run_id)
    same(db, "SELECT epoch, step, loss, val_acc FROM run_{run} ORDER BY ALL")
    assert db.sql("SELECT count(*) FROM replay_jobs").fetchall() == [(0,)]
    assert inner_end_checkpoints(db, RUN), "the run took no checkpoints"
    assert not inner_end_checkpoints(db, NO_CKPT)


# ---- the planner's two modes ------------------------------------------------------------------------
def test_outer_level_statement_skips_the_inner_loop(store: Path):
    db = connect(store)
    result = db.sql("SELECT epoch, w_norm FROM run_1 ORDER BY epoch")
    assert result.plan is not None and all(j.mode == "skip" for j in result.plan.jobs)
    same(db, "SELECT epoch, w_norm FROM run_{run} ORDER BY epoch")
    executed, restored = ran(db, RUN)
    ckpts = inner_end_checkpoints(db, RUN)
    assert ckpts == set(range(EPOCHS)), "budget=0.9 and a pause per epoch should checkpoint every epoch"
    assert restored == ckpts
    assert executed == set()


def test_inner_level_statement_reexecutes_only_the_selected_epochs(store: Path):
    db = connect(store)
    k = 3
    result = db.sql(f"SELECT epoch, step, grad_norm FROM run_1 WHERE epoch > {k} ORDER BY ALL")
    assert result.plan is not None and [j.mode for j in result.plan.jobs] == ["re-execute"]
    table = same(db, f"SELECT epoch, step, grad_norm FROM run_{{run}} WHERE epoch > {k} ORDER BY ALL")
    assert table.num_rows == (EPOCHS - k - 1) * STEPS
    (job,) = jobs(db, RUN)
    start = max(c for c in inner_end_checkpoints(db, RUN) if c <= k)
    assert job["restored"] == [start]  # the checkpoint's own epoch: its inner loop restored, not run
    assert job["executed"] == list(range(start + 1, EPOCHS))
    if start == k:  # a checkpoint right before the range: nothing at or before k executes
        assert min(job["executed"]) > k
    assert job["log_from"] == k + 1 and job["stop_index"] == EPOCHS
    # logged and replayed values share rows
    same(db, f"SELECT epoch, step, loss, grad_norm, val_acc FROM run_{{run}} WHERE epoch > {k} ORDER BY ALL")
    # long form: hindsight rows are marked as replayed, and never duplicated
    rows = db.sql("SELECT source, count(*) FROM logs WHERE run_id = 1 AND name = 'grad_norm' GROUP BY ALL").fetchall()
    assert rows == [("replayed", (EPOCHS - k - 1) * STEPS)]
    assert db.sql("SELECT DISTINCT source FROM logs WHERE run_id = 1 AND name = 'loss'").fetchall() == [("logged",)]
    assert db.sql("SELECT DISTINCT source FROM logs WHERE run_id = 4 AND name = 'grad_norm'").fetchall() == [
        ("logged",)
    ]

    # The same query again, and a narrower one, replay nothing.
    count = len(jobs(db, RUN))
    again = db.sql(f"SELECT epoch, step, grad_norm FROM run_1 WHERE epoch > {k} ORDER BY ALL")
    assert again.plan is None and again.warnings == []
    assert again.arrow().equals(table)
    assert db.sql("SELECT step, grad_norm FROM run_1 WHERE epoch = 5").plan is None
    assert "no replay needed" in db.explain(f"SELECT grad_norm FROM run_1 WHERE epoch BETWEEN {k + 1} AND 5")
    assert len(jobs(db, RUN)) == count


def test_wider_query_replays_the_epochs_still_missing(store: Path):
    db = connect(store)
    same(db, "SELECT epoch, step, grad_norm FROM run_{run} WHERE epoch > 3 ORDER BY ALL")
    same(db, "SELECT epoch, step, grad_norm FROM run_{run} WHERE epoch >= 2 ORDER BY ALL")
    new = [j for j in jobs(db, RUN) if j["log_from"] < 4]
    assert len(new) == 1 and new[0]["log_from"] == 2 and new[0]["stop_index"] == 4


def test_explain_shows_the_plan_without_replaying(store: Path):
    db = connect(store)
    text = db.explain("SELECT grad_norm FROM run_1 WHERE epoch BETWEEN 3 AND 4")
    assert "re-execute" in text and "grad_norm" in text and "retraining" in text and "3..4" in text
    text = db.explain("SELECT epoch, w_norm FROM run_1")
    assert "skip" in text and "w_norm" in text
    assert db.sql("SELECT count(*) FROM replay_jobs").fetchall() == [(0,)]


def test_params_select_the_replayed_range(store: Path):
    db = connect(store)
    result = db.sql("SELECT epoch, step, grad_norm FROM run_1 WHERE epoch > ? ORDER BY ALL", [3])
    truth = db.sql("SELECT epoch, step, grad_norm FROM run_4 WHERE epoch > ? ORDER BY ALL", [3]).arrow()
    assert result.arrow().equals(truth) and truth.num_rows == 2 * STEPS
    assert result.df().equals(truth.to_pandas())
    assert result.fetchall() == list(zip(*[c.to_pylist() for c in truth.columns]))


def test_queries_that_replay_nothing_build_no_executor(recorded: Recorded):
    """An executor (a Ray cluster, say) is built only when a plan has jobs."""
    db = florql.connect(recorded.home, progress=False, executor="no-such-executor")
    assert db.sql("SELECT count(*) FROM runs").fetchall() == [(4,)]
    assert db.sql("SELECT epoch, val_acc FROM run_1 WHERE epoch = 0").fetchall()
    with pytest.raises(ValueError, match="unknown executor"):
        db.sql("SELECT epoch, w_norm FROM run_1")


def test_params_replay_only_the_selected_epochs(store: Path):
    db = connect(store)
    db.sql("SELECT epoch, step, grad_norm FROM run_1 WHERE epoch > ? ORDER BY ALL", [3])
    executed, _ = ran(db, RUN)
    assert min(executed) > 3


# ---- where jobs start ---------------------------------------------------------------------------------
def test_sparse_checkpoints(store: Path):
    ckpt_dir = store / "runs" / str(RUN) / "checkpoints"
    for path in ckpt_dir.iterdir():
        if int(path.name.split("-")[0]) % 3 != 0:
            path.unlink()
    for leftover in store.glob("florql.duckdb*"):
        leftover.unlink()  # rebuilt from the run files
    db = connect(store)
    kept = inner_end_checkpoints(db, RUN)
    assert kept and all(c % 3 == 0 for c in kept)

    same(db, "SELECT epoch, step, grad_norm FROM run_{run} WHERE epoch = 5 ORDER BY ALL")
    (job,) = jobs(db, RUN)
    start = max(c for c in kept if c < 5)
    assert job["checkpoint"].startswith(f"{start:08d}")
    assert job["restored"] == [start] and job["executed"] == list(range(start + 1, 6))

    now = inner_end_checkpoints(db, RUN)  # the run's, and those the first replay left
    assert now == kept | set(range(start + 1, 6))
    same(db, "SELECT epoch, w_norm FROM run_{run} ORDER BY epoch")
    executed, restored = ran(db, RUN)
    w_jobs = [j for j in jobs(db, RUN) if j["names"] == ["w_norm"]]
    w_exec = {i for j in w_jobs for i in j["executed"]}
    w_rest = {i for j in w_jobs for i in j["restored"]}
    assert w_rest == now  # skipped wherever a checkpoint allows
    assert w_exec == set(range(EPOCHS)) - now
    same(db, "SELECT epoch, step, loss, grad_norm, w_norm FROM run_{run} WHERE epoch = 5 ORDER BY ALL")


def _keep_checkpoints_before(store: Path, first_missing: int) -> None:
    """Delete the run's checkpoints from `first_missing` on; the tables are rebuilt from the files."""
    for path in (store / "runs" / str(RUN) / "checkpoints").iterdir():
        if int(path.name.split("-")[0]) >= first_missing:
            path.unlink()
    for leftover in store.glob("florql.duckdb*"):
        leftover.unlink()


def test_replay_leaves_checkpoints_that_the_next_query_restores(store: Path):
    _keep_checkpoints_before(store, 2)
    db = connect(store)
    same(db, "SELECT epoch, step, grad_norm FROM run_{run} WHERE epoch >= 3 ORDER BY ALL")
    (first,) = jobs(db, RUN)
    assert first["executed"] == list(range(2, EPOCHS))
    left = db.sql(
        "SELECT outer_index, kind, name, code_version FROM checkpoints WHERE run_id = ? AND name LIKE ? ORDER BY 1",
        [RUN, first["job_id"] + "/%"],
    ).fetchall()
    recorded_version = db.sql("SELECT code_version FROM runs WHERE run_id = ?", [RUN]).fetchall()[0][0]
    # Every executed iteration lacking a checkpoint got one (FLORQL_CHECKPOINTS=every), belonging to
    # the recorded code: the grad_norm statement changes no state.
    assert [(i, k) for i, k, _, _ in left] == [(i, "inner_end") for i in range(2, EPOCHS)]
    assert {v for *_, v in left} == {recorded_version}

    # A new name over the same range restores them instead of re-executing.
    same(db, "SELECT epoch, w_norm FROM run_{run} WHERE epoch >= 2 ORDER BY epoch")
    (second,) = [j for j in jobs(db, RUN) if j["names"] == ["w_norm"]]
    assert second["executed"] == [] and set(second["restored"]) >= set(range(2, EPOCHS))
    # And a step-level name starts from the latest of them.
    same(db, "SELECT epoch, step, loss, grad_norm FROM run_{run} WHERE epoch = 5 ORDER BY ALL")


def test_replay_checkpoints_of_state_changing_code_serve_only_that_code(store: Path, recorded: Recorded):
    _keep_checkpoints_before(store, 2)
    script = recorded.work / "train.py"
    original = script.read_text()
    # An in-place call: the static check cannot tell it leaves the training state alone (here it does:
    # it changes a temporary), so what this code leaves belongs to this code only.
    script.write_text(
        original.replace("float(net[0].weight.detach().norm())", "float(net[0].weight.detach().norm().add_(0))")
    )
    try:
        db = connect(store)
        db.sql("SELECT epoch, w_norm FROM run_1 WHERE epoch >= 3").fetchall()
        versions = {r[0] for r in db.sql("SELECT code_version FROM checkpoints WHERE name LIKE '%/%'").fetchall()}
        assert len(versions) == 1 and next(iter(versions)).startswith("patched-")
    finally:
        script.write_text(original)
    # The recorded code's state differs: those checkpoints are never restored for it.
    same(db, "SELECT epoch, step, grad_norm FROM run_{run} WHERE epoch = 4 ORDER BY ALL")
    grad_job = next(j for j in jobs(db, RUN) if j["names"] == ["grad_norm"])
    assert grad_job["executed"] == [2, 3, 4] and not grad_job["checkpoint"].count("/")


def test_run_without_checkpoints_replays_from_start_and_stops_early(store: Path):
    db = connect(store)
    last = 2
    same(db, f"SELECT epoch, step, grad_norm FROM run_{{run}} WHERE epoch <= {last} ORDER BY ALL", NO_CKPT)
    (job,) = jobs(db, NO_CKPT)
    assert job["start_index"] == 0 and job["checkpoint"] is None and job["restored"] == []
    assert job["executed"] == list(range(last + 1))
    assert job["stop_index"] == last + 1
    same(db, "SELECT epoch, w_norm FROM run_{run} WHERE epoch = 1", NO_CKPT)


def test_two_workers(store: Path):
    db = connect(store, workers=2)
    result = db.sql("SELECT epoch, step, grad_norm FROM run_1 ORDER BY ALL")
    assert result.plan is not None and len(result.plan.jobs) >= 2 and result.plan.workers == 2
    same(db, "SELECT epoch, step, grad_norm FROM run_{run} ORDER BY ALL")
    all_jobs = jobs(db, RUN)
    assert len(all_jobs) >= 2
    logged = sorted(i for j in all_jobs for i in range(j["log_from"], j["stop_index"]))
    assert logged == list(range(EPOCHS))  # the ranges split the run, without overlap
    assert db.sql("SELECT count(*) FROM logs WHERE run_id = 1 AND name = 'grad_norm'").fetchall() == [(EPOCHS * STEPS,)]


# ---- code versions ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def renamed(tmp_path_factory: pytest.TempPathFactory, recorded: Recorded) -> Path:
    """A project whose run was recorded with v1 and whose current code renamed things and grew lines."""
    work = tmp_path_factory.mktemp("renamed")
    home = work / ".florql"
    _record(work, home, SCRIPTS / "train_v1.py")
    (work / "train.py").write_text((SCRIPTS / "train_v2_renamed.py").read_text())
    return home


def test_two_code_versions_renamed_variables_and_inserted_lines(renamed: Path, recorded: Recorded):
    db = connect(renamed)
    truth = connect(recorded.home)
    for query in (
        "SELECT epoch, step, loss, grad_norm FROM run_{run} WHERE epoch >= 3 ORDER BY ALL",
        "SELECT epoch, w_norm, val_acc FROM run_{run} ORDER BY epoch",
    ):
        answer = db.sql(query.format(run=1)).arrow()
        expected = truth.sql(query.format(run=TRUTH)).arrow()
        assert answer.equals(expected), f"{answer.to_pandas()}\n!=\n{expected.to_pandas()}"


def test_statement_that_cannot_be_placed_is_refused(tmp_path: Path, recorded: Recorded):
    """The current code logs through a helper the recorded code lacks: say so, do not guess."""
    store = recorded.copy(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    source = (
        (SCRIPTS / "train_v2.py")
        .read_text()
        .replace("float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()])))", "grad_norm_of(net)")
    )
    source = source.replace(
        "import florql\n",
        "import florql\n\n\ndef grad_norm_of(module):\n"
        "    return float(torch.norm(torch.stack([p.grad.norm() for p in module.parameters()])))\n",
    )
    manifest = json.loads((store / "runs" / "1" / "run.json").read_text())
    project = Path(manifest["project_root"])
    original = (project / "train.py").read_text()
    try:
        (project / "train.py").write_text(source)
        db = connect(store)
        with pytest.raises(ReplayFailed) as err:
            db.sql("SELECT step, grad_norm FROM run_1 WHERE epoch = 5")
        assert "run 1" in str(err.value) and "grad_norm" in str(err.value)
        assert db.sql("SELECT count(*) FROM replay_jobs").fetchall() == [(0,)]
    finally:
        (project / "train.py").write_text(original)


# ---- atomicity --------------------------------------------------------------------------------------
class KilledBeforeCommit(Executor):
    """Runs the jobs for real, then takes away their commit records, as a kill before commit would."""

    def __init__(self, home: Path) -> None:
        self.home, self.workers, self.inner = home, 1, LocalExecutor(1)
        self.partial: list[Path] = []

    def run(self, specs, on_done=None):
        results = []
        for spec, result in zip(specs, self.inner.run(specs)):
            assert result.ok, result.error
            (self.home / layout.replay_commit_path(spec.run_id, spec.job_id)).unlink()
            self.partial.append(self.home / layout.replay_dir(spec.run_id, spec.job_id))
            results.append(JobResult(spec.job_id, ok=False, error="killed (SIGKILL) before commit"))
        return results


def test_replay_killed_midway_leaves_nothing_then_completes(store: Path):
    query = "SELECT epoch, step, grad_norm FROM run_{run} WHERE epoch >= 3 ORDER BY ALL"
    killer = KilledBeforeCommit(store)
    db = connect(store, executor=killer)
    with pytest.raises(ReplayFailed):
        db.sql(query.format(run=RUN))
    assert killer.partial and all(list((p / "segments").glob("*.seg")) for p in killer.partial)
    db = connect(store)
    assert db.sql("SELECT count(*) FROM logs WHERE source = 'replayed'").fetchall() == [(0,)]
    assert db.sql("SELECT count(*) FROM replay_jobs").fetchall() == [(0,)]
    db.sql("SET replay = 'never'")
    with pytest.warns(ReplayWarning):
        nulls = db.sql(query.format(run=RUN)).arrow()
    assert nulls.column("grad_norm").null_count == nulls.num_rows == 3 * STEPS
    db.sql("SET replay = 'auto'")
    same(db, query)
    assert len(jobs(db, RUN)) >= 1
    assert db.sql("SELECT count(*) FROM logs WHERE run_id = 1 AND name = 'grad_norm'").fetchall() == [(3 * STEPS,)]


# ---- policy -----------------------------------------------------------------------------------------
def test_replay_never_returns_nulls_and_describes_the_plan(recorded: Recorded):
    db = connect(recorded.home)  # nothing replays: the shared store stays untouched
    db.sql("SET replay = 'never'")
    with pytest.warns(ReplayWarning):
        result = db.sql("SELECT epoch, step, loss, grad_norm FROM run_1 WHERE epoch >= 4 ORDER BY ALL")
    table = result.arrow()
    assert table.num_rows == 2 * STEPS and table.column("grad_norm").null_count == table.num_rows
    assert table.column("loss").null_count == 0
    assert result.plan is None  # nothing ran
    plan_note, gaps = result.warnings
    assert "never" in plan_note and "re-execute" in plan_note and "grad_norm" in plan_note and "4..5" in plan_note
    assert "run 1: grad_norm at epoch 4, 5" in gaps
    assert db.sql("SELECT count(*) FROM replay_jobs").fetchall() == [(0,)]


def test_replay_budget_exceeded_shows_the_plan(recorded: Recorded):
    db = connect(recorded.home)
    db.sql("SET replay_budget = '10 ms'")
    with pytest.raises(ReplayBudgetExceeded) as err:
        db.sql("SELECT epoch, w_norm FROM run_1")
    message = str(err.value)
    assert "budget" in message and "w_norm" in message and "skip" in message and "total:" in message
    assert db.sql("SELECT count(*) FROM replay_jobs").fetchall() == [(0,)]
    db.sql("SET replay_budget = '10 min'")
    assert "w_norm" in db.explain("SELECT epoch, w_norm FROM run_1")


# ---- determinism audit ------------------------------------------------------------------------------
def test_divergence_is_reported_and_audited(store: Path):
    db = connect(store)
    with pytest.raises(ReplayFailed) as err:
        db.sql("SELECT epoch, w_norm FROM run_3 ORDER BY epoch")
    message = str(err.value)
    assert "run 3" in message and "jitter" in message and "epoch" in message and "diverged" in message
    audit = db.sql("SELECT run_id, name, loop_path, logged, replayed, abs_diff FROM replay_audit").fetchall()
    assert audit and audit[0][:3] == (3, "jitter", "epoch")
    assert audit[0][3] != audit[0][4] and audit[0][5] > 0
    # nothing of the diverged replay is visible
    assert db.sql("SELECT count(*) FROM logs WHERE run_id = 3 AND source = 'replayed'").fetchall() == [(0,)]


# ---- queries/ ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo recorded as is (run 1), then with the hindsight statements of queries/demo_hindsight.json
    added (run 2, the ground truth), which stay the current code."""
    work = tmp_path_factory.mktemp("demo")
    home = work / ".florql"
    source = (ROOT / "examples" / "train.py").read_text()
    (work / "train.py").write_text(source)
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "train.py"], cwd=work, env=_env(home), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        for edit in json.loads((QUERIES / "demo_hindsight.json").read_text())["insert_after"]:
            anchor = edit["anchor"]
            assert source.count(anchor) == 1, anchor
            indent = anchor[: len(anchor) - len(anchor.lstrip())]
            source = source.replace(anchor, anchor + "\n" + indent + edit["statement"])
        (work / "train.py").write_text(source)
    return home


@pytest.mark.parametrize("path", sorted(QUERIES.glob("*.sql")), ids=lambda p: p.stem)
def test_example_queries(path: Path, demo: Path, tmp_path: Path):
    spec = json.loads((QUERIES / "demo_hindsight.json").read_text())["queries"][path.stem]
    home = tmp_path / "store"
    shutil.copytree(demo, home)
    db = connect(home, workers=2)
    sql = path.read_text()
    result = db.sql(sql)
    answer = result.arrow()
    truth = db.sql(sql.replace("run_1", "run_2")).arrow()
    assert answer.num_rows == spec["rows"]
    assert answer.column_names == spec["columns"]
    assert answer.equals(truth), f"{answer.to_pandas()}\n!=\n{truth.to_pandas()}"
    modes = {j.mode for j in result.plan.jobs} if result.plan else set()
    assert modes <= set(spec["replay"]) and bool(modes) == bool(spec["replay"])
