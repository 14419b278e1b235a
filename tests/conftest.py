"""Shared fixtures: real stores in temporary folders, training scripts run as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

import florql
from store_support import Store

# Tests assert behaviour, never timing: a first call that is slow because the machine is busy
# (lazy imports, two other processes on both cores) must not fail a test.
settings.register_profile("florql", deadline=None)
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
