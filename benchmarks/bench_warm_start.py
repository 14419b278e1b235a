"""Replay job start: a fresh interpreter per job against a fork of the warm fork server.

    python benchmarks/bench_warm_start.py [--jobs 5]

Records a small run (torch model, 4 epochs), then runs the same one-epoch replay job `--jobs`
times with each executor, alternating cold and warm so that machine load hits both alike. Per job
it reports, from the job's own timings: start-up (launch → the script's first line: process start,
interpreter, imports florql and torch need), the script's own set-up (first line → first outer
iteration: its imports, data, model) and their sum, launch → first iteration. Medians; ratios
side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import florql  # noqa: E402
from florql.binder import bind  # noqa: E402
from florql.dialect import parse  # noqa: E402
from florql.replay.executor import LocalExecutor  # noqa: E402

SCRIPT = """
import torch
import florql

torch.manual_seed(0)
net = torch.nn.Linear(32, 4)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
data = torch.randn(64, 32)
with florql.checkpointing(model=net, optimizer=opt):
    for epoch in florql.loop("epoch", range(4)):
        for step in florql.loop("step", range(4)):
            opt.zero_grad()
            loss = net(data[step * 16 : step * 16 + 16]).pow(2).mean()
            loss.backward()
            opt.step()
            florql.log("loss", loss.item())
        #HINDSIGHT
"""


def record(work: Path) -> Path:
    (work / "train.py").write_text(SCRIPT)
    env = dict(os.environ, FLORQL_HOME=str(work / ".florql"))
    subprocess.run([sys.executable, "train.py"], cwd=work, env=env, check=True, capture_output=True)
    (work / "train.py").write_text(SCRIPT.replace("#HINDSIGHT", 'florql.log("w", float(net.weight.sum()))'))
    return work / ".florql"


def job_timings(db: florql.api.Connection, executor: LocalExecutor) -> dict[str, float]:
    statement = parse("SELECT epoch, step, w FROM run_1 WHERE epoch = 3")[0]
    with db._open() as conn:
        planned = db._plan(bind(statement, conn), conn)
    [result] = executor.run(planned.specs)
    assert result.ok and result.summary is not None, result.error
    t = result.summary["timings"]
    return {
        "start-up": t["script_started_at"] - t["launched_at"],
        "script set-up": t["first_iteration_at"] - t["script_started_at"],
        "launch → first iteration": t["first_iteration_at"] - t["launched_at"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="florql-bench-warm-") as tmp:
        home = record(Path(tmp))
        db = florql.connect(home, progress=False, workers=1)
        db.sync()
        cold, warm = LocalExecutor(1, warm=False), LocalExecutor(1, warm=True)
        assert warm.fork_server is not None and warm.fork_server.ready(), "the fork server did not start"
        samples: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
        try:
            for _ in range(args.jobs):
                samples["cold"].append(job_timings(db, cold))
                samples["warm"].append(job_timings(db, warm))
        finally:
            warm.close()
            db.close()
    print(f"replay job start, median of {args.jobs} jobs each (seconds); {os.cpu_count()} cores")
    print(f"{'phase':<28}{'fresh interpreter':>18}{'warm fork':>12}{'ratio':>8}")
    for phase in samples["cold"][0]:
        c = statistics.median(s[phase] for s in samples["cold"])
        w = statistics.median(s[phase] for s in samples["warm"])
        print(f"{phase:<28}{c:>18.3f}{w:>12.3f}{c / w if w else float('inf'):>7.1f}x")


if __name__ == "__main__":
    main()
