"""A dashboard over a store while a trainer records into it.

The load the concurrency tests check and `benchmarks/bench_dashboard.py` measures: a real trainer
(a subprocess recording a new run), and client threads polling `metrics`, `run_<id>` and the
catalog, either through `florql serve` (psycopg, one connection per thread) or through one shared
`florql.connect()` (a notebook with several threads).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINER = """
import time
import florql

epochs = florql.arg("epochs", 3)
steps = florql.arg("steps", 4)
pause = florql.arg("pause", 0.0)
for epoch in florql.loop("epoch", range(epochs)):
    total = 0.0
    for step in florql.loop("step", range(steps)):
        loss = 1.0 / (1 + epoch * steps + step)
        total += loss
        florql.log("loss", loss)
        time.sleep(pause)
    florql.log("epoch_loss", total / steps)
"""

METRICS = "SELECT count(*), max(epoch_loss) FROM metrics"
RUN = "SELECT epoch, count(loss) AS steps, count(epoch_loss) AS logged FROM run_{run} GROUP BY epoch ORDER BY epoch"
CATALOG = (
    "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v') ORDER BY 1"
)


@dataclass
class Sample:
    client: int
    kind: str  # 'metrics', 'run', 'catalog'
    started: float  # time.time()
    seconds: float
    error: str | None = None
    value: Any = None


@dataclass
class Observations:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample) -> None:
        with self.lock:
            self.samples.append(sample)

    @property
    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.error is not None]

    def latencies(self, kind: str | None = None) -> list[float]:
        return sorted(s.seconds for s in self.samples if s.error is None and kind in (None, s.kind))


class Client:
    """One dashboard panel's connection: `metrics`, `run`, `catalog` return plain Python values."""

    def metrics(self) -> tuple[int, float | None]:
        raise NotImplementedError

    def run(self, run_id: int) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def catalog(self) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class WireClient(Client):
    def __init__(self, dsn: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)

    def metrics(self) -> tuple[int, float | None]:
        return tuple(self.conn.execute(METRICS).fetchone())  # type: ignore[return-value, arg-type]

    def run(self, run_id: int) -> list[tuple[int, int, int]]:
        return [tuple(r) for r in self.conn.execute(RUN.format(run=run_id)).fetchall()]  # type: ignore[misc]

    def catalog(self) -> list[str]:
        return [r[0] for r in self.conn.execute(CATALOG).fetchall()]

    def close(self) -> None:
        self.conn.close()


class NotebookClient(Client):
    """A thread of a notebook sharing one `florql.connect()` with the others."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def metrics(self) -> tuple[int, float | None]:
        return self.db.sql(METRICS).fetchall()[0]

    def run(self, run_id: int) -> list[tuple[int, int, int]]:
        return self.db.sql(RUN.format(run=run_id)).fetchall()

    def catalog(self) -> list[str]:
        return [t.name for t in self.db.tables()]


def poll(
    client_id: int,
    client: Client,
    run_id: int,
    obs: Observations,
    until: Callable[[], float | None],
    interval: float = 0.0,
) -> None:
    """Refresh the panels: the catalog, the metrics count, and the new run's epochs once the
    catalog lists its table; a round every `interval` seconds (0: without pause). Stops after a
    round that began once `until()` gives a time (time.time()): the last round sees the end."""
    listed = False
    while True:
        round_started, began = time.monotonic(), time.time()
        for kind in ("catalog", "metrics", "run"):
            if kind == "run" and not listed:
                continue
            started, t0 = time.time(), time.perf_counter()
            try:
                if kind == "catalog":
                    value: Any = client.catalog()
                    listed = listed or f"run_{run_id}" in value
                elif kind == "metrics":
                    value = client.metrics()
                else:
                    value = client.run(run_id)
                obs.add(Sample(client_id, kind, started, time.perf_counter() - t0, value=value))
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                obs.add(Sample(client_id, kind, started, time.perf_counter() - t0, error=error))
        end = until()
        if end is not None and began > end:
            return
        time.sleep(max(0.0, round_started + interval - time.monotonic()))


@dataclass
class Workspace:
    """A store and a working folder for the trainer's script."""

    home: Path
    work: Path
    server_log: str = ""  # what the last `serve()` wrote to stderr

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS")}
        env["FLORQL_HOME"] = str(self.home)
        return env

    def script(self) -> Path:
        path = self.work / "train.py"
        if not path.exists():
            path.write_text(TRAINER.lstrip("\n"))
        return path

    def train(self, epochs: int, steps: int, pause: float = 0.0) -> subprocess.Popen:
        """Start the trainer recording a new run (a real process)."""
        args = ["--florql-args", f"epochs={epochs}", f"steps={steps}", f"pause={pause}"]
        return subprocess.Popen(
            [sys.executable, str(self.script()), *args],
            cwd=self.work,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @contextmanager
    def serve(self) -> Iterator[int]:
        """`florql serve` on the store (a real process) on a free loopback port; yields the port."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "florql.cli", "--store", str(self.home), "serve", "--port", "0"],
            cwd=self.work,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        log: list[str] = []
        port = None
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                log.append(line)
                match = re.search(r"listening on [^:]+:(\d+)", line)
                if match:
                    port = int(match.group(1))
                    break
            if port is None:
                raise RuntimeError("florql serve did not start:\n" + "".join(log))
            drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
            drain.start()
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.server_log = "".join(log)


def dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} dbname=florql user=florql connect_timeout=10"


@dataclass
class Load:
    """What a dashboard saw while a trainer recorded run `run_id`."""

    obs: Observations
    run_id: int
    epochs: int
    steps: int
    trainer_exit: float  # time.time() when the trainer had exited
    trainer: subprocess.CompletedProcess


def dashboard(
    ws: Workspace,
    clients: list[Client],
    run_id: int,
    epochs: int,
    steps: int,
    pause: float,
    interval: float = 0.0,
) -> Load:
    """Poll with every client while the trainer records run `run_id`, until each client has made
    a round that began after the trainer exited. Clients start staggered over one `interval`, as
    a dashboard's panels do."""
    obs = Observations()
    done_at: list[float] = []
    threads = [
        threading.Thread(
            target=poll,
            args=(i, c, run_id, obs, lambda: done_at[0] if done_at else None, interval),
            name=f"panel-{i}",
            daemon=True,
        )
        for i, c in enumerate(clients)
    ]
    trainer = ws.train(epochs, steps, pause)
    for i, t in enumerate(threads):
        time.sleep(interval / len(threads) if i else 0.0)
        t.start()
    out, err = trainer.communicate(timeout=600)
    done_at.append(time.time())
    for t in threads:
        t.join(timeout=300)
    for c in clients:
        c.close()
    finished = subprocess.CompletedProcess(trainer.args, trainer.returncode, out, err)
    return Load(obs, run_id, epochs, steps, done_at[0], finished)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100) of sorted `values`, nearest rank."""
    if not values:
        return float("nan")
    rank = max(1, min(len(values), round(p / 100 * len(values) + 0.5)))
    return values[rank - 1]
