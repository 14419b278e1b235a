"""Fixtures: a store (a recorded florql run when the API exists, else a DuckDB stand-in) served on an ephemeral port."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from florql.server import BackgroundServer, DuckDBBackend, Server
from florql.server.backend import Backend

PASSWORD = "s3cret-pw"

TRAINING_SCRIPT = textwrap.dedent(
    """
    import florql
    for epoch in florql.loop("epoch", range(3)):
        for step in florql.loop("step", range(4)):
            florql.log("loss", float(1.0 / (1 + epoch * 4 + step)))
        florql.log("val_acc", 0.5 + 0.1 * epoch)
    """
)


def florql_api_ready() -> bool:
    """The query API (florql.api) and the training API are both there."""
    try:
        import florql
    except ImportError:
        return False
    return importlib.util.find_spec("florql.api") is not None and all(
        hasattr(florql, name) for name in ("connect", "log", "loop")
    )


@dataclass
class Store:
    factory: Callable[[], Backend]
    run_table: str  # the recorded run's table, e.g. run_1
    rows: int  # rows of run_table
    real: bool  # a florql store, not the DuckDB stand-in


def _duckdb_store() -> Store:
    con = duckdb.connect()
    con.execute("CREATE TABLE runs AS SELECT 1::BIGINT AS run_id, 'train.py' AS script")
    con.execute(
        "CREATE TABLE run_1 AS SELECT i // 4 AS epoch, i % 4 AS step, 1.0 / (1 + i) AS loss, "
        "0.5 + 0.1 * (i // 4) AS val_acc FROM range(12) t(i)"
    )
    backend = DuckDBBackend(con)
    return Store(lambda: backend, "run_1", 12, real=False)


def _florql_store(home: Path) -> Store:
    import florql

    script = home / "train.py"
    script.write_text(TRAINING_SCRIPT)
    env = {**os.environ, "FLORQL_HOME": str(home / "store")}
    subprocess.run([sys.executable, str(script)], cwd=home, env=env, check=True, timeout=300)
    db = florql.connect(str(home / "store"))
    run_table = sorted(t.name for t in db.tables() if t.name.startswith("run_"))[0]
    rows = db.sql(f"SELECT count(*) AS n FROM {run_table}").arrow().column(0)[0].as_py()
    return Store(lambda: florql.connect(str(home / "store"), replay_budget=60.0), run_table, rows, real=True)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    if florql_api_ready():
        return _florql_store(tmp_path_factory.mktemp("florql"))
    return _duckdb_store()


@dataclass
class Running:
    port: int
    password: str | None = None

    def dsn(self, **extra: str) -> str:
        parts = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "dbname": "florql",
            "user": "florql",
            "connect_timeout": "10",
            **({"password": self.password} if self.password else {}),
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def url(self, driver: str = "psycopg") -> str:
        auth = f"florql:{self.password}" if self.password else "florql"
        return f"postgresql+{driver}://{auth}@127.0.0.1:{self.port}/florql"


@pytest.fixture(scope="session")
def server(store: Store) -> Iterator[Running]:
    with BackgroundServer(Server(store.factory, port=0)) as running:
        yield Running(running.port)


@pytest.fixture(scope="session")
def password_server(store: Store) -> Iterator[Running]:
    with BackgroundServer(Server(store.factory, port=0, password=PASSWORD)) as running:
        yield Running(running.port, PASSWORD)
