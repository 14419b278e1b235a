"""Shared fixtures: real stores in temporary folders, training scripts run as real processes.

The suite must pass the same way on an idle machine and on one whose cores are busy, so no test
of behaviour depends on wall-clock timing:
- every training run of the suite (in-process, and the scripts it starts, which inherit the
  environment) checkpoints at every opportunity (`FLORQL_CHECKPOINTS=every`), so which checkpoints
  a run holds depends on its code, never on the load; the tests of the adaptive policy itself
  choose it explicitly and inject a clock (tests/test_checkpoints.py);
- hypothesis has no deadline: a slow example on a busy machine is not a failure.
Tests of timing belong in benchmarks/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import florql
from store_support import Store

os.environ["FLORQL_CHECKPOINTS"] = "every"
# A store's replay fork server outlives the test that started it: on a shared machine let it go soon.
os.environ.setdefault("FLORQL_REPLAY_SERVER_IDLE_S", "20")
settings.register_profile("florql", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("florql")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    home = tmp_path / "store"
    monkeypatch.setenv("FLORQL_HOME", str(home))
    monkeypatch.delenv("FLORQL_ARGS", raising=False)
    monkeypatch.delenv("FLORQL_RUNS", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    return Store(home, work)


@pytest.fixture
def session(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An in-process recording session behind the public `florql.*` functions, finished afterwards."""
    from florql.recording import RecordSession

    s = RecordSession()
    monkeypatch.setattr(florql, "_session", s)
    try:
        yield s
    finally:
        s.finish()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster (2 CPUs, no GPU) for one module's tests; module-scoped, so that an idle
    cluster does not compete for CI's 2 cores with the modules after it."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'florql[ray]'")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
