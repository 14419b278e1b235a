"""Median cost of one `florql.log(name, float)` call, against the floor of a bare list append.

Both are timed in the same process, in interleaved rounds, so machine noise hits them alike.
Run: python benchmarks/bench_log.py [--calls N] [--rounds R]
The recorded run goes to a temporary store, not yours.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

BUDGET_NS = 1000.0


def per_call_ns(body: Callable[[int], None], calls: int) -> float:
    started = time.perf_counter_ns()
    body(calls)
    return (time.perf_counter_ns() - started) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=31)
    opts = parser.parse_args()
    os.environ["FLORQL_HOME"] = tempfile.mkdtemp(prefix="florql-bench-")
    sys.argv = [sys.argv[0]]  # no --florql-args for florql to read
    import florql

    log = florql.log
    value = 0.125

    def florql_calls(n: int) -> None:
        for _ in range(n):
            log("loss", value)

    def floor_calls(n: int) -> None:
        sink: list[tuple] = []
        append = sink.append
        position = ("",)
        for _ in range(n):
            append(("loss", value, position))

    florql_calls(1000)  # starts the session: run id, manifest, writer thread
    floor_ns, florql_ns = [], []
    for _ in range(opts.rounds):
        floor_ns.append(per_call_ns(floor_calls, opts.calls))
        florql_ns.append(per_call_ns(florql_calls, opts.calls))
    floor, cost = statistics.median(floor_ns), statistics.median(florql_ns)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"bare list append (floor): {floor:7.1f} ns/call (median of {opts.rounds} rounds of {opts.calls})")
    print(f"florql.log(name, float):  {cost:7.1f} ns/call  ({cost / floor:.1f}x the floor)")
    verdict = "within" if cost <= BUDGET_NS else "OVER"
    print(f"{verdict} the {BUDGET_NS:.0f} ns budget")
    return 0 if cost <= BUDGET_NS else 1


if __name__ == "__main__":
    sys.exit(main())
