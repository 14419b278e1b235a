"""The hindsight replay cases of test_hindsight.py, with every replay job run as a Ray task.

Each case is the same function as in test_hindsight.py; only the executor differs, so both
executors are held to the same bit-exact answers and the same job records.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'florql[ray]'")

import test_hindsight as cases  # noqa: E402
from test_hindsight import recorded, renamed, store  # noqa: E402,F401  (fixtures the cases use)

import florql  # noqa: E402

test_outer_level_statement_skips_the_inner_loop = cases.test_outer_level_statement_skips_the_inner_loop
test_inner_level_statement_reexecutes_only_the_selected_epochs = (
    cases.test_inner_level_statement_reexecutes_only_the_selected_epochs
)
test_wider_query_replays_the_epochs_still_missing = cases.test_wider_query_replays_the_epochs_still_missing
test_sparse_checkpoints = cases.test_sparse_checkpoints
test_run_without_checkpoints_replays_from_start_and_stops_early = (
    cases.test_run_without_checkpoints_replays_from_start_and_stops_early
)
test_two_workers = cases.test_two_workers
test_two_code_versions_renamed_variables_and_inserted_lines = (
    cases.test_two_code_versions_renamed_variables_and_inserted_lines
)
test_divergence_is_reported_and_audited = cases.test_divergence_is_reported_and_audited


@pytest.fixture(autouse=True)
def through_ray(ray_cluster: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def connect(home: Path, **options) -> florql.api.Connection:
        options.setdefault("executor", "ray")
        options.setdefault("workers", 1)  # as the local pool counts on 2 cores: the job records compare alike
        return florql.connect(home, progress=False, **options)

    monkeypatch.setattr(cases, "connect", connect)
