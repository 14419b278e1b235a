"""Hindsight replay time with the local process pool and with Ray, 1 and 2 workers, side by side.

Records `examples/train.py` once, adds a per-step `grad_norm` log statement to a copy of it (a
hindsight query must re-execute every inner loop), then answers the same query from a fresh copy
of the store under each executor, in interleaved rounds so machine noise hits them alike. The
planner's estimate is printed next to each measurement. Ray runs on one local cluster started
once (its start-up is reported apart: on a real cluster it is paid once, not per query).
Run: python benchmarks/bench_executors.py [--epochs N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import florql  # noqa: E402
from florql.replay.executor import Executor, LocalExecutor  # noqa: E402

LOGGED = '            florql.log("loss", loss.item())\n'
GRAD_NORM = '            florql.log("grad_norm", sum(p.grad.norm() ** 2 for p in net.parameters()).sqrt().item())\n'
QUERY = "SELECT epoch, avg(grad_norm) FROM run_1 GROUP BY epoch ORDER BY epoch"


def record(work: Path, epochs: int) -> Path:
    """A store holding one recorded run, and the script edited with the hindsight statement."""
    home = work / "store"
    script = work / "train.py"
    source = (REPO / "examples" / "train.py").read_text()
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_RUNS", "FLORQL_ARGS")}
    env.update(FLORQL_HOME=str(home), PYTHONPATH=str(REPO))
    subprocess.run(
        [sys.executable, str(script), "--florql-args", f"epochs={epochs}"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
    )
    script.write_text(source.replace(LOGGED, LOGGED + GRAD_NORM))
    return home


def replay_s(home: Path, executor: Executor, scratch: Path) -> tuple[float, float, int]:
    """Seconds to answer QUERY from a fresh copy of the store (nothing replayed yet), the planner's
    estimate for it, and the number of jobs it planned."""
    copy = scratch / f"store-{time.monotonic_ns()}"
    shutil.copytree(home, copy)
    db = florql.connect(copy, executor=executor, workers=executor.workers, progress=False)
    started = time.perf_counter()
    result = db.sql(QUERY)
    elapsed = time.perf_counter() - started
    assert result.plan is not None and result.fetchall(), "the query replayed nothing"
    shutil.rmtree(copy)
    return elapsed, result.plan.est_s, len(result.plan.jobs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    try:
        import ray
    except ImportError:
        print("Ray is not installed: pip install 'florql[ray]'", file=sys.stderr)
        return 1
    from florql.replay.ray_executor import RayExecutor

    work = Path(tempfile.mkdtemp(prefix="florql-bench-executors-"))
    os.chdir(work)  # the query side finds the edited script where the run was recorded
    home = record(work, opts.epochs)
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count() or 1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    executors: dict[str, Executor] = {
        "local, 1 worker": LocalExecutor(1),
        "local, 2 workers": LocalExecutor(2),
        "ray, 1 worker": RayExecutor(workers=1),
        "ray, 2 workers": RayExecutor(workers=2),
    }
    measured: dict[str, list[tuple[float, float, int]]] = {name: [] for name in executors}
    for _ in range(opts.rounds):
        for name, executor in executors.items():
            measured[name].append(replay_s(home, executor, work))
    ray.shutdown()

    print(f"{platform.node()}: {os.cpu_count()} CPUs, python {platform.python_version()}, ray {ray.__version__}")
    print(f"examples/train.py, {opts.epochs} epochs; query: {QUERY}")
    print(f"local Ray cluster start-up: {ray_start:.1f} s (once, not counted below)")
    print(f"{'executor':<18} {'jobs':>4} {'median s':>9} {'min s':>7} {'planner est s':>14}   ({opts.rounds} rounds)")
    for name, runs in measured.items():
        times = [t for t, _, _ in runs]
        print(f"{name:<18} {runs[0][2]:>4} {statistics.median(times):>9.2f} {min(times):>7.2f} {runs[0][1]:>14.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
