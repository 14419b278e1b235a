"""Shared fixtures: real stores in temporary folders, training scripts run as real processes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

import florql
from store_support import Store

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
