"""Query latency of a dashboard while training runs: p50/p95, failures, and how soon new epochs show.

A real trainer records a run into a store while client threads poll the catalog, `metrics` and
`run_<id>` (the load of tests/test_concurrency.py, longer). Through `florql serve` with psycopg,
one connection per thread: one client refreshing every second; several clients without pause (the
stress the issue describes); several clients, a round per second each (a dashboard's panels).
Through one `florql.connect()` shared by a notebook's threads, without pause. For reference, the
same queries from one client with no trainer, on the store holding only the first (small) run. Run:
python benchmarks/bench_dashboard.py [--clients 8] [--threads 4] [--epochs 20] [--pause 0.2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import duckdb  # noqa: E402
from dashboard_support import (  # noqa: E402
    Client,
    Load,
    NotebookClient,
    Observations,
    WireClient,
    Workspace,
    dashboard,
    dsn,
    percentile,
    poll,
)

import florql  # noqa: E402
from florql.storage import layout, segments  # noqa: E402
from florql.storage.layout import locate_store  # noqa: E402


def row(label: str, obs: Observations) -> str:
    failed, total = len(obs.failures), len(obs.samples)
    cells = [label, f"{failed} / {total}"]
    for kind in (None, "metrics", "run", "catalog"):
        lat = obs.latencies(kind)
        cells.append(f"{1e3 * percentile(lat, 50):.0f} / {1e3 * percentile(lat, 95):.0f}" if lat else "–")
    return "| " + " | ".join(cells) + " |"


def visibility(ws: Workspace, load: Load) -> list[float]:
    """Per client and epoch: seconds from the segment holding the epoch's `epoch_loss` being
    written to the end of the client's first query that showed it."""
    run_files = locate_store(ws.home).run_files()
    written: dict[int, float] = {}
    for path in run_files.list(f"{layout.segments_dir(load.run_id)}/{layout.MAIN_WRITER}"):
        table = segments.read_segment(run_files, path)
        for name, coords in zip(table.column("name").to_pylist(), table.column("coords").to_pylist()):
            if name == "epoch_loss":
                written[coords[0]] = os.stat(ws.home / path).st_mtime
    lags = []
    seen: dict[tuple[int, int], float] = {}
    for s in sorted(load.obs.samples, key=lambda s: s.started):
        if s.kind != "run" or s.error is not None:
            continue
        for epoch, _, logged in s.value:
            if logged and (s.client, epoch) not in seen:
                seen[(s.client, epoch)] = s.started + s.seconds
    for (_client, epoch), at in seen.items():
        if epoch in written:
            lags.append(at - written[epoch])
    return sorted(lags)


def idle(client: Client, seconds: float) -> Observations:
    obs = Observations()
    end = time.time() + seconds
    poll(0, client, 1, obs, lambda: end)
    client.close()
    return obs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="psycopg clients of florql serve")
    parser.add_argument("--threads", type=int, default=4, help="notebook threads sharing one florql.connect()")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds per step (an epoch: steps × pause)")
    parser.add_argument("--idle-s", type=float, default=6.0)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, DuckDB {duckdb.__version__}; trainer: {args.epochs} epochs × "
        f"{args.steps} steps, {args.pause} s per step"
    )
    header = (
        "| load | failed / queries | all p50 / p95 ms | metrics p50 / p95 | run_<id> p50 / p95 | catalog p50 / p95 |"
    )
    lines = [header, "|" + "---|" * 6]
    lags: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="florql-dash-") as tmp:
        ws = Workspace(Path(tmp) / "store", Path(tmp) / "work")
        first = ws.train(2, 3)
        first.communicate(timeout=300)
        run = iter(range(2, 100))

        def record(label: str, clients: list[Client], interval: float = 0.0) -> None:
            load = dashboard(ws, clients, next(run), args.epochs, args.steps, args.pause, interval)
            lines.append(row(label, load.obs))
            lags[label] = visibility(ws, load)
            for s in load.obs.failures[:5]:
                print("failure:", s.kind, s.error)

        db = florql.connect(ws.home)
        notebook_idle = row("florql.connect(), 1 thread, no trainer", idle(NotebookClient(db), args.idle_s))
        db.database.close()  # let the server have the file at once
        with ws.serve() as port:
            lines.append(row("florql serve, 1 client, no trainer", idle(WireClient(dsn(port)), args.idle_s)))
            record("florql serve, 1 client, a round per second, trainer", [WireClient(dsn(port))], interval=1.0)
            n = args.clients
            record(f"florql serve, {n} clients without pause, trainer", [WireClient(dsn(port)) for _ in range(n)])
            record(
                f"florql serve, {n} clients, a round each per second, trainer",
                [WireClient(dsn(port)) for _ in range(n)],
                interval=1.0,
            )
        lines.append(notebook_idle)
        n = args.threads
        record(f"florql.connect(), {n} threads without pause, trainer", [NotebookClient(db) for _ in range(n)])
        db.close()

    print("\n".join(lines))
    print(
        "\nFrom the segment holding an epoch's `epoch_loss` being written to the end of a client's first query showing it:"
    )
    for name, values in lags.items():
        print(
            f"{name}: a new epoch shows after p50 {percentile(values, 50):.2f} s, "
            f"p95 {percentile(values, 95):.2f} s, max {max(values, default=float('nan')):.2f} s "
            f"({len(values)} client-epochs)"
        )


if __name__ == "__main__":
    main()
