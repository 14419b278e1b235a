"""The demo's query against retraining, side by side: `python benchmarks/bench_demo.py [repeats]`.

Runs `florql demo` (train the example, add the hindsight line, explain, then query) in a fresh
folder each time and reads the two times it measured in one process: the training subprocess
and the query. Prints each ratio and the median; the issue's target is >= 5x.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile

ANSWER = re.compile(r"answered in ([\d.]+) s .* took ([\d.]+) s")


def one_demo() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [sys.executable, "-m", "florql.cli", "demo", "--dir", folder], capture_output=True, text=True, check=True
        ).stdout
    match = ANSWER.search(out.replace("\n", " "))
    if match is None:
        raise SystemExit(f"the demo's output has no timing line:\n{out}")
    return float(match.group(1)), float(match.group(2))


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    ratios = []
    print(f"{'run':>3} {'query s':>8} {'retrain s':>9} {'ratio':>6}")
    for i in range(repeats):
        query_s, train_s = one_demo()
        ratios.append(train_s / query_s)
        print(f"{i + 1:>3} {query_s:>8.2f} {train_s:>9.2f} {ratios[-1]:>5.1f}x", flush=True)
    print(f"median ratio: {statistics.median(ratios):.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
