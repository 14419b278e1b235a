"""The demo's query against retraining, side by side: `python benchmarks/bench_demo.py [repeats]`.

Runs `florql demo` (start the store's replay server, train the example, add the hindsight line,
explain, then query) in a fresh folder each time and reads the times it measured in one process:
the replay server's start (before training; in the first run no template server is up, so it
imports torch), the training subprocess and the query (the store's first replay, forked from that
server). Then a user's next command: `florql query` in a new process for the 4 epochs before those
(the same name), timed from launch to exit; it forks from the server the demo left up. Prints each
ratio and the medians, and the planner's estimate of the demo's query; the issue's target is >= 5x.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from florql.demo import FIRST, QUERY
from florql.replay.warm import TEMPLATE, stop_servers

ANSWER = re.compile(r"answered in ([\d.]+) s .* took ([\d.]+) s")
SERVER = re.compile(r"replay server for this store.*?: up in ([\d.]+) s")
ESTIMATE = re.compile(r"total: \d+ job\(s\), ~([\d.]+) s")


NEXT_QUERY = QUERY.replace(f"epoch >= {FIRST}", f"epoch BETWEEN {FIRST - 4} AND {FIRST - 1}")


def one_demo(cold: bool) -> tuple[float, float, float, float, float]:
    """(the demo's query s, its training s, the next command's query s, the replay server's start s,
    the planner's estimate of the demo's query s); `cold`: no template fork server is up, so the
    demo's server start imports torch."""
    if cold:
        stop_servers(TEMPLATE, current_only=True)
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [sys.executable, "-m", "florql.cli", "demo", "--dir", folder], capture_output=True, text=True, check=True
        ).stdout
        store = os.path.join(folder, ".florql")
        started = time.perf_counter()
        command = [sys.executable, "-m", "florql.cli", "--store", store, "query", NEXT_QUERY]
        # Bytecode cached as a user's install has it, even where PYTHONDONTWRITEBYTECODE is set here.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"FLORQL_QUIET": "1"}
        subprocess.run(command, capture_output=True, check=True, env=env)
        next_s = time.perf_counter() - started
        stop_servers(store)
    match, server, estimate = (p.search(out.replace("\n", " ")) for p in (ANSWER, SERVER, ESTIMATE))
    if match is None or server is None or estimate is None:
        raise SystemExit(f"the demo's output lacks a timing line:\n{out}")
    return float(match.group(1)), float(match.group(2)), next_s, float(server.group(1)), float(estimate.group(1))


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    ratios, next_ratios = [], []
    print(
        f"{'run':>3} {'server start s':>14} {'retrain s':>9} {'demo query s':>12} {'est s':>6} {'ratio':>6} "
        f"{'next command s':>14} {'ratio':>6}"
    )
    for i in range(repeats):
        query_s, train_s, next_s, server_s, est_s = one_demo(cold=i == 0)
        ratios.append(train_s / query_s)
        next_ratios.append(train_s / next_s)
        print(
            f"{i + 1:>3} {server_s:>14.2f} {train_s:>9.2f} {query_s:>12.2f} {est_s:>6.1f} {ratios[-1]:>5.1f}x "
            f"{next_s:>14.2f} {next_ratios[-1]:>5.1f}x",
            flush=True,
        )
    print(
        f"median ratio: the demo's query {statistics.median(ratios):.1f}x, the next command "
        f"{statistics.median(next_ratios):.1f}x (target >= 5x); the server start (run 1: no template server up) "
        "is paid before training, once per store"
    )


if __name__ == "__main__":
    main()
