"""The demo's query against retraining, side by side: `python benchmarks/bench_demo.py [repeats]`.

Runs `florql demo` (train the example, add the hindsight line, explain, then query) in a fresh
folder each time and reads the two times it measured in one process: the training subprocess
and the query (the store's first replay: its fork server is forked from the user's template
server, except in the first run, where no template is up and the query starts one cold). Then a user's next command:
`florql query` in a new process for the 4 epochs before those (the same name), timed from launch
to exit; it forks from the fork server the demo left up. Prints each ratio and the medians; the
issue's target is >= 5x.
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


NEXT_QUERY = QUERY.replace(f"epoch >= {FIRST}", f"epoch BETWEEN {FIRST - 4} AND {FIRST - 1}")


def one_demo(cold: bool) -> tuple[float, float, float]:
    """(the demo's query s, its training s, the next command's query s); `cold`: no template fork
    server is up, so the demo's query starts one (importing torch)."""
    if cold:
        stop_servers(TEMPLATE, current_only=True)
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [sys.executable, "-m", "florql.cli", "demo", "--dir", folder], capture_output=True, text=True, check=True
        ).stdout
        store = os.path.join(folder, ".florql")
        started = time.perf_counter()
        command = [sys.executable, "-m", "florql.cli", "--store", store, "query", NEXT_QUERY]
        subprocess.run(command, capture_output=True, check=True, env=dict(os.environ, FLORQL_QUIET="1"))
        next_s = time.perf_counter() - started
        stop_servers(store)
    match = ANSWER.search(out.replace("\n", " "))
    if match is None:
        raise SystemExit(f"the demo's output has no timing line:\n{out}")
    return float(match.group(1)), float(match.group(2)), next_s


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    ratios, next_ratios = [], []
    print(f"{'run':>3} {'retrain s':>9} {'demo query s':>12} {'ratio':>6} {'next command s':>14} {'ratio':>6}")
    for i in range(repeats):
        query_s, train_s, next_s = one_demo(cold=i == 0)
        ratios.append(train_s / query_s)
        next_ratios.append(train_s / next_s)
        print(
            f"{i + 1:>3} {train_s:>9.2f} {query_s:>12.2f} {ratios[-1]:>5.1f}x {next_s:>14.2f} {next_ratios[-1]:>5.1f}x",
            flush=True,
        )
    print(
        f"median ratio: the demo's query {statistics.median(ratios):.1f}x (run 1: no template server up), "
        f"the next command (server up) {statistics.median(next_ratios):.1f}x (target >= 5x)"
    )


if __name__ == "__main__":
    main()
