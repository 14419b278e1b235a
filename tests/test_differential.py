"""Differential tests of hindsight answers: no silent wrong answers.

The module records (once, see `differential/support.py`): ground-truth stores that ran the full
script (every hindsight name logged from the start; one per variant of the script), and a recorded
store that ran the minimal script (only `loss` and `val_acc`) whose project's current code is then
the full script. The same query must give the same answer, bit for bit, from the recorded store
(replaying what is missing) as the oracle computes from the ground truth; the recorded store may
refuse with a FlorqlError that names what went wrong, never answer differently.

The regression tests below name the cases known to go wrong; the hypothesis test generates queries
(predicates on loop columns and values, CTEs that shadow table names, derived tables, subqueries,
joins, unions, windows, grouping, ordering, `*`, upper-case names) and switches the current code
between the two variants now and then. More examples: `python benchmarks/differential.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from differential import support as D
from differential.support import Q, R

EXAMPLES = int(os.environ.get("FLORQL_DIFF_EXAMPLES", "80"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> D.Lab:
    lab = D.build_lab(tmp_path_factory.mktemp("differential"))
    print(f"recorded the differential stores in {lab.build_s:.0f} s")
    return lab


@pytest.fixture(scope="module")
def oracle(lab: D.Lab) -> D.Oracle:
    return D.Oracle(lab.truth)


@pytest.fixture
def fresh(lab: D.Lab, tmp_path: Path):
    """A connection to a private copy of the pristine recorded store, current code: full.py."""
    lab.use_code("full")
    try:
        yield D.connect(lab.fresh(tmp_path))
    finally:
        lab.use_code("full")


def outcomes_ok(*outcomes: D.Outcome) -> None:
    """Every answer equals the expected one (a refusal is not enough for these named cases)."""
    bad = [o for o in outcomes if o.kind != "equal"]
    assert not bad, "\n".join(str(o) for o in bad)


def same(query: D.Query, oracle: D.Oracle, db, variant: str = "full") -> D.Outcome:
    return D.judge(query, oracle, db, variant)


# ---- the stores themselves ----------------------------------------------------------------------
def test_hindsight_statements_do_not_change_training(lab: D.Lab, oracle: D.Oracle):
    """The scripts differ only in florql.log lines: logged values agree bit for bit across the
    stores, the recorded runs checkpointed every epoch, and full_b's `w_norm` differs from full's."""
    rec = D.connect(lab.home, replay="never")
    sql = "SELECT epoch, step, loss, val_acc FROM run_{} ORDER BY ALL"
    for run_id in D.RUNS:
        recorded = rec.sql(sql.format(run_id)).arrow()
        assert recorded.num_rows == D.EPOCHS * D.STEPS
        for variant in D.VARIANTS:
            assert D.table_diff(oracle.base(variant, sql.format(run_id)), recorded, ordered=True) is None, variant
        ckpts = rec.sql(
            "SELECT outer_index FROM checkpoints WHERE run_id = ? AND kind = 'inner_end' ORDER BY 1", [run_id]
        ).fetchall()
        # budget=0.9 and a pause per epoch: a checkpoint (nearly) every epoch, so that skip mode is
        # exercised; on a loaded machine the adaptive policy may drop one
        assert len(ckpts) >= D.EPOCHS - 2, f"run {run_id}: inner-loop checkpoints only at {ckpts}"
    full = oracle.base("full", "SELECT epoch, w_norm FROM run_1")
    other = oracle.base("full_b", "SELECT epoch, w_norm FROM run_1")
    assert D.table_diff(full, other, ordered=False) is not None
    assert rec.sql("SELECT count(*) FROM replay_jobs").fetchall() == [(0,)]


def test_logged_values_need_no_replay(lab: D.Lab, oracle: D.Oracle):
    lab.use_code("full")
    rec = D.connect(lab.home, replay="never")
    outcomes_ok(
        same(
            Q("SELECT epoch, step, loss FROM {} WHERE epoch BETWEEN 2 AND 3", R("run_1", "epoch step loss")),
            oracle,
            rec,
        ),
        same(
            Q("SELECT run_id, max(val_acc) AS best FROM {} GROUP BY run_id", R("metrics", "run_id val_acc")),
            oracle,
            rec,
        ),
        same(Q("SELECT count(*) AS n FROM {}", R("run_2", counts_rows=True)), oracle, rec),
    )


# ---- known failure cases ------------------------------------------------------------------------
def test_a_statement_before_the_inner_loop_in_skip_mode(fresh, oracle: D.Oracle):
    """`w_start` is logged after net.train(), before the inner loop: skipping the inner loop by
    restoring its end-of-loop checkpoint must not give the weights *after* the epoch."""
    outcomes_ok(same(Q("SELECT epoch, w_start FROM {} WHERE epoch >= 4", R("run_1", "epoch w_start")), oracle, fresh))


def test_b_value_from_state_no_checkpoint_holds(fresh, oracle: D.Oracle):
    """`recent` averages a deque (not plain data: no checkpoint holds it) that spans two epochs.
    Asked twice: the second answer must not be NULLs from a half-done first attempt."""
    query = Q("SELECT epoch, recent FROM {} WHERE epoch IN (2,3)", R("run_1", "epoch recent"))
    first = same(query, oracle, fresh)
    second = same(query, oracle, fresh)
    outcomes_ok(first, second)


def test_c_changed_statement_between_queries(lab: D.Lab, fresh, oracle: D.Oracle):
    """Replay `w_norm` with full.py, then make full_b.py (w_norm of another layer) the current code:
    every row must follow the new definition, none the old."""
    before = same(Q("SELECT epoch, w_norm FROM {} WHERE epoch >= 4", R("run_1", "epoch w_norm")), oracle, fresh)
    lab.use_code("full_b")
    after = same(
        Q("SELECT epoch, w_norm FROM {} WHERE epoch >= 3", R("run_1", "epoch w_norm")), oracle, fresh, variant="full_b"
    )
    outcomes_ok(before, after)


def test_d_star_and_derived_tables_after_a_partial_replay(fresh, oracle: D.Oracle):
    partial = same(Q("SELECT epoch, w_norm FROM {} WHERE epoch >= 4", R("run_1", "epoch w_norm")), oracle, fresh)
    outcomes_ok(
        partial,
        same(Q("SELECT * FROM {} WHERE step = 0", R("run_1", "step", star=True)), oracle, fresh),
        same(Q("SELECT t.w_norm FROM (SELECT * FROM {}) t", R("run_1", star=True)), oracle, fresh),
        same(Q("SELECT * FROM {}", R("metrics", star=True)), oracle, fresh),
    )


def test_d_star_lists_loggable_columns_on_a_fresh_store(fresh, oracle: D.Oracle):
    """`SELECT *` lists every loggable name, as the ground truth does, before anything is replayed
    (no epoch matches, so nothing needs replaying)."""
    outcomes_ok(
        same(Q("SELECT * FROM {} WHERE epoch < 0", R("run_1", "epoch", star=True)), oracle, fresh),
        same(
            Q("SELECT * FROM {} WHERE run_id = 1 AND epoch < 0", R("metrics", "run_id epoch", star=True)), oracle, fresh
        ),
    )


def test_e_between_symmetric(fresh, oracle: D.Oracle):
    outcomes_ok(
        same(
            Q("SELECT epoch, w_norm FROM {} WHERE epoch BETWEEN SYMMETRIC 5 AND 4", R("run_1", "epoch w_norm")),
            oracle,
            fresh,
        )
    )


def test_f_decimal_literal_that_rounds_as_a_float(fresh, oracle: D.Oracle):
    """3.9999999999999999999 is a DECIMAL in SQL (epoch 4 > it) but 4.0 as a binary float."""
    outcomes_ok(
        same(
            Q("SELECT epoch, w_norm FROM {} WHERE epoch > 3.9999999999999999999", R("run_1", "epoch w_norm")),
            oracle,
            fresh,
        )
    )


def test_g_ctes_that_shadow_table_names(fresh, oracle: D.Oracle):
    outcomes_ok(
        same(
            Q(
                "WITH run_1 AS (SELECT epoch, w_norm FROM {}) SELECT epoch, w_norm FROM run_1",
                R("run_2", "epoch w_norm"),
            ),
            oracle,
            fresh,
        ),
        same(
            Q(
                "WITH metrics AS (SELECT epoch, w_norm FROM {}) SELECT epoch, w_norm FROM metrics",
                R("run_1", "epoch w_norm"),
            ),
            oracle,
            fresh,
        ),
    )


def test_h_union_of_two_grains_and_join_with_an_aggregate(fresh, oracle: D.Oracle):
    union = Q(
        "SELECT epoch, w_norm AS v FROM {} UNION ALL SELECT epoch, grad_norm FROM {}",
        R("run_1", "epoch w_norm"),
        R("run_1", "epoch grad_norm"),
    )
    join = Q(
        "SELECT * FROM {} JOIN (SELECT epoch, avg(loss) AS l FROM {} GROUP BY epoch) b USING (epoch)",
        R("run_1", star=True, alias="a"),
        R("run_2", "epoch loss"),
    )
    outcomes = [same(union, oracle, fresh), same(join, oracle, fresh)]
    assert oracle.answer("full", union).num_rows == D.EPOCHS + D.EPOCHS * D.STEPS  # 6 epochs + 36 steps
    assert oracle.answer("full", join).num_rows == D.EPOCHS * D.STEPS
    outcomes_ok(*outcomes)


def test_i_upper_case_column_names(fresh, oracle: D.Oracle):
    outcomes_ok(same(Q("SELECT epoch, W_NORM FROM {}", R("run_1", "epoch w_norm")), oracle, fresh))


@pytest.mark.parametrize(
    "query",
    [
        Q("SELECT epoch, h_w_start FROM {} WHERE epoch >= 3", R("run_1", "epoch h_w_start")),
        Q("SELECT epoch, h_w_norm FROM {} WHERE epoch >= 3", R("run_1", "epoch h_w_norm")),
        Q("SELECT epoch, step, h_grad_norm FROM {} WHERE epoch >= 4", R("run_1", "epoch step h_grad_norm")),
        Q("SELECT epoch, h_train_loss, h_w_norm FROM {}", R("run_1", "epoch h_train_loss h_w_norm")),
        Q("SELECT epoch, h_train_loss FROM {} WHERE epoch IN (1, 4)", R("run_1", "epoch h_train_loss")),
    ],
    ids=[
        "epoch-level-in-helper",
        "epoch-level-in-outer-loop",
        "step-level-in-helper",
        "helper-return-all-epochs",
        "helper-return-some-epochs",
    ],
)
def test_j_train_helper_layout(lab: D.Lab, tmp_path: Path, query: D.Query):
    """pytorch/examples layout: the batch loop lives in `train(epoch)`, called from the epoch loop."""
    oracle = D.Oracle({"full": lab.helper_truth})
    outcomes_ok(same(query, oracle, D.connect(lab.fresh_helper(tmp_path))))


def test_k_epoch_level_names_skip_every_batch_through_the_helper(lab: D.Lab, tmp_path: Path):
    """The checkpoint at the end of train()'s batch loop holds train()'s locals, so an epoch-level
    name over all epochs restores every epoch's loop instead of running it: 0 batches execute, and
    train() still returns the averaged loss it returned originally (compared bit for bit)."""
    oracle = D.Oracle({"full": lab.helper_truth})
    db = D.connect(lab.fresh_helper(tmp_path))
    plan = db.explain("SELECT epoch, h_train_loss FROM run_1")
    assert " skip " in plan and "re-execute" not in plan, plan
    outcomes_ok(same(Q("SELECT epoch, h_train_loss FROM {}", R("run_1", "epoch h_train_loss")), oracle, db))
    summaries = [result.summary for _, result in db.last_jobs]
    assert summaries and all(s is not None for s in summaries)
    assert sorted(i for s in summaries for i in s["restored"]) == list(range(D.EPOCHS))
    assert sum(s["inner_iterations"] for s in summaries) == 0


# ---- generated queries --------------------------------------------------------------------------
def test_generated_queries(lab: D.Lab):
    """Generated queries against the shared recorded store, from pristine and partly replayed
    states, with the current code switched between full.py and full_b.py now and then. Replays are
    budgeted per cycle (each starts a process that imports torch); past the budget, queries that
    would replay are skipped. Failures are collected and reported together, not shrunk: the
    store's state depends on every earlier example."""
    session = D.Session(lab, restore_every=max(EXAMPLES // 2, 1), replays_per_cycle=3)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(D.steps())
    def run(step: D.Step) -> None:
        session.run(step)

    try:
        run()
    finally:
        lab.restore()
        lab.use_code("full")
    print(session.summary())
    assert session.counts().get("equal", 0) > 0
    assert not session.failures(), session.report()
