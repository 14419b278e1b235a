"""The planner's cost model: measured costs, cores shared by parallel jobs, honest warnings."""

from __future__ import annotations

from florql.replay.planner import WARM_START_S, Checkpoint, Costs, Need, RunFacts, plan

EPOCHS = 10


def facts(costs: Costs, every: int = 1, kind: str = "iter_end") -> RunFacts:
    return RunFacts(
        run_id=1,
        completed=EPOCHS,
        iteration_s=[2.0] * EPOCHS,
        inner_s=[1.8] * EPOCHS,
        checkpoints=[Checkpoint(i, kind, f"c{i}", 1_000_000) for i in range(0, EPOCHS, every)],
        costs=costs,
    )


def step_level(indices: range) -> list[Need]:
    return [Need("grad_norm", frozenset(indices), skippable=False)]


def test_job_estimates_add_measured_start_up_set_up_restore_and_scaled_iterations():
    costs = Costs(start_s=0.2, setup_s=0.3, restore_bytes_per_s=1e6, work_scale=1.5)
    [job] = plan([(facts(costs), step_level(range(8, 10)))], workers=1).jobs
    assert (job.start, job.stop, job.restore_before) == (8, 10, (8, "c7"))
    assert job.est_work_s == 2 * 2.0 * 1.5
    assert job.est_s == 0.2 + 0.3 + 1.0 + 6.0


def test_more_workers_only_when_they_beat_fewer_after_sharing_the_cores():
    costs = Costs(start_s=0.1, setup_s=0.1)
    run = [(facts(costs), step_level(range(EPOCHS)))]
    # Each job uses both cores: two side by side take as long as one after the other, plus a start-up.
    shared = plan(run, workers=2, cores=2, threads=2)
    assert shared.workers == 1 and len(shared.jobs) == 1
    assert shared.est_s <= plan(run, workers=1).est_s
    # One thread per job on two cores: splitting at a checkpoint halves the time.
    split = plan(run, workers=2, cores=2, threads=1)
    assert split.workers == 2 and len(split.jobs) == 2 and split.est_s < shared.est_s


def test_a_plan_estimated_slower_than_retraining_says_so():
    slow_start = Costs(start_s=30.0, setup_s=0.5, retrain_start_s=2.0)
    slow = plan([(facts(slow_start), step_level(range(EPOCHS)))], workers=1)
    assert slow.est_s > slow.retrain_s
    assert "estimated slower than retraining" in slow.slower_than_retraining
    assert "warning: this replay is estimated slower than retraining" in slow.describe()
    quick = plan([(facts(Costs()), step_level(range(9, 10)))], workers=1)
    assert quick.slower_than_retraining == "" and "warning" not in quick.describe()


def test_epoch_level_names_restore_every_iteration_and_cost_only_the_tails():
    costs = Costs(start_s=0.1, setup_s=0.1, restore_bytes_per_s=1e9)
    [job] = plan([(facts(costs, kind="inner_end"), [Need("w", frozenset(range(EPOCHS)), True)])], workers=1).jobs
    assert job.mode == "skip" and sorted(job.restore_inner) == list(range(EPOCHS))
    assert abs(job.est_work_s - EPOCHS * 0.2) < 1e-9


def _replay_cost(conn, job: str, recorded_exec_s: float, recorded_skip_s: float, work_s: float) -> None:
    conn.execute(
        "INSERT INTO _replay_costs VALUES (?, 1, TRUE, 0.1, 0.4, 0.0, 0, ?, 0.0, 0.0, 0.0, ?, ?)",
        [job, work_s, recorded_exec_s, recorded_skip_s],
    )


def test_executed_and_restored_iterations_are_calibrated_apart(tmp_path):
    from florql.runinfo import measured_costs
    from florql.storage.database import open_file

    conn = open_file(str(tmp_path / "florql.duckdb"))
    assert measured_costs(conn, 1, warm=True, recorded_setup_s=1.7).setup_s == 1.7  # the run's own, until measured
    # A step-level job ran its iterations at half the recorded pace; an epoch-level job restored
    # every inner loop and ran the tails at about their recorded pace.
    _replay_cost(conn, "step", recorded_exec_s=10.0, recorded_skip_s=0.5, work_s=20.5)
    _replay_cost(conn, "epoch", recorded_exec_s=0.0, recorded_skip_s=2.0, work_s=2.2)
    costs = measured_costs(conn, 1, warm=True, recorded_setup_s=1.7)
    assert costs.setup_s == 0.4 and costs.work_scale == 2.05
    assert abs(costs.skip_scale - 1.1) < 1e-9  # from the job that mostly restored
    conn.close()
    [job] = plan([(facts(costs, kind="inner_end"), [Need("w", frozenset(range(EPOCHS)), True)])], workers=1).jobs
    assert job.recorded_exec_s == 0 and abs(job.recorded_skip_s - EPOCHS * 0.2) < 1e-9
    assert abs(job.est_work_s - job.recorded_skip_s * costs.skip_scale) < 1e-9  # not the executed pace


def test_a_new_sessions_start_is_the_runs_own_launch_until_a_cold_start_is_measured(tmp_path):
    """A replay that waits for a fork server pays what the recorded process paid before florql's
    start (the interpreter and the script's imports); once such a start is measured, that counts."""
    from florql.runinfo import measured_costs
    from florql.storage.database import open_file

    conn = open_file(str(tmp_path / "florql.duckdb"))
    costs = measured_costs(conn, 1, warm=False, recorded_setup_s=0.5, recorded_launch_s=3.2)
    assert costs.start_s == 3.2 and costs.retrain_start_s == 3.2
    assert measured_costs(conn, 1, warm=True, recorded_launch_s=3.2).start_s == WARM_START_S
    conn.execute("INSERT INTO _replay_costs VALUES ('cold', 1, FALSE, 4.5, 0.4, 0.0, 0, 1.0, 0.0, 0.0, 5.9, 1.0, 0.0)")
    costs = measured_costs(conn, 1, warm=False, recorded_launch_s=3.2)
    assert costs.start_s == 4.5 and costs.retrain_start_s == 4.5
    conn.close()


def test_a_warm_jobs_set_up_leaves_out_the_imports_its_fork_has_done(tmp_path):
    """The recorded set-up spent 1.2 of its 1.7 s importing torch & co. (an optimizer's constructor
    imports torch._dynamo): a fork of the warm server has them, a cold job and retraining do not."""
    from florql.runinfo import measured_costs
    from florql.storage.database import open_file

    conn = open_file(str(tmp_path / "florql.duckdb"))
    recorded = {"recorded_setup_s": 1.7, "recorded_setup_import_s": 1.2}
    warm, cold = measured_costs(conn, 1, True, **recorded), measured_costs(conn, 1, False, **recorded)
    assert abs(warm.setup_s - 0.5) < 1e-9 and cold.setup_s == 1.7
    assert warm.retrain_setup_s == cold.retrain_setup_s == 1.7
    # A measured set-up counts for jobs started the same way only.
    conn.execute("INSERT INTO _replay_costs VALUES ('cold', 1, FALSE, 3.0, 1.6, 0.0, 0, 1.0, 0.0, 0.0, 5.6, 1.0, 0.0)")
    assert measured_costs(conn, 1, False, **recorded).setup_s == 1.6
    assert abs(measured_costs(conn, 1, True, **recorded).setup_s - 0.5) < 1e-9
    conn.close()


def test_a_query_ingests_each_jobs_values_after_it_and_the_estimate_counts_it():
    run = [(facts(Costs(start_s=0.1, setup_s=0.1)), step_level(range(EPOCHS)))]
    alone = plan(run, workers=1)
    with_ingest = plan(run, workers=1, ingest_s=0.25)
    assert with_ingest.est_s == alone.est_s + 0.25 * len(with_ingest.jobs)
    assert "0.2 s to ingest the values" in with_ingest.describe()
    # Two jobs on two cores halve the work, less a second job's ingest: still worth it here, ...
    assert len(plan(run, workers=2, cores=2, threads=1, ingest_s=0.25).jobs) == 2
    # ... not when each job's values take longer to ingest than the split saves.
    assert len(plan(run, workers=2, cores=2, threads=1, ingest_s=20.0).jobs) == 1


def test_the_ingest_estimate_is_measured_per_job_from_recent_queries(tmp_path):
    from florql.replay.planner import INGEST_S
    from florql.runinfo import measured_ingest_s
    from florql.storage.database import open_file, record_query_cost

    conn = open_file(str(tmp_path / "florql.duckdb"))
    assert measured_ingest_s(conn) == INGEST_S
    record_query_cost(conn, jobs=2, jobs_s=3.0, overhead_s=0.3)
    record_query_cost(conn, jobs=1, jobs_s=1.0, overhead_s=0.05)
    record_query_cost(conn, jobs=1, jobs_s=1.0, overhead_s=0.11)
    assert abs(measured_ingest_s(conn) - 0.11) < 1e-9  # the median of 0.15, 0.05 and 0.11 per job
    conn.close()


def test_a_replaying_query_records_what_it_cost_besides_its_jobs(store):
    import florql
    from store_support import GRAD_NORM_QUERY, record_then_add_grad_norm

    record_then_add_grad_norm(store.workdir, store.env())
    db = florql.connect(store.home, workers=1, progress=False)
    assert db.sql(GRAD_NORM_QUERY).fetchall()
    [(jobs, jobs_s, overhead_s)] = store.sql("SELECT jobs, jobs_s, overhead_s FROM _query_costs")
    assert jobs == len(db.last_jobs) >= 1 and jobs_s > 0 and overhead_s > 0
    db.sql(GRAD_NORM_QUERY).fetchall()  # nothing to replay: nothing recorded
    assert store.sql("SELECT count(*) FROM _query_costs") == [(1,)]
