"""Fixtures for the web UI: a real store with a run to ask about in hindsight, served on a real port.

Run 1 logged only `loss`; the current script also logs `grad_norm`, so asking for it replays run 1.
Run 2 ran the current script (with an `lr` arg), so it logged both: replayed values of run 1 are
checked bit for bit against it (same seed, same code, same lr).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from florql.ui.server import BackgroundUI
from store_support import TRAIN, record_then_add_grad_norm

# The same script with an arg (recorded in run_args), so that the runs page and comparisons show args.
TRAIN_WITH_ARG = TRAIN.replace("lr=0.1)", 'lr=florql.arg("lr", 0.1))')


@dataclass
class RecordedStore:
    home: Path
    script: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS")}
        env.update(FLORQL_HOME=str(self.home), FLORQL_CHECKPOINTS="every")
        return env


def record_store(root: Path) -> RecordedStore:
    store = RecordedStore(root / "store", root / "work" / "train.py")
    record_then_add_grad_norm(root / "work", store.env(), TRAIN_WITH_ARG)
    subprocess.run(
        [sys.executable, str(store.script)], cwd=store.script.parent, env=store.env(), check=True, capture_output=True
    )
    return store


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> RecordedStore:
    return record_store(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def ui(recorded: RecordedStore) -> Iterator[BackgroundUI]:
    with BackgroundUI(str(recorded.home)) as server:
        yield server
