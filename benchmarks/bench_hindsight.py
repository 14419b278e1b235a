"""Hindsight query time against retraining from scratch.

    python benchmarks/bench_hindsight.py [--epochs 10] [--samples 24000] [--hidden 512]

Records one run of an MLP (dropout, shuffled DataLoader, SGD with momentum, StepLR) that logs only
`loss` per step and `val_acc` per epoch. Then adds two hindsight statements to the script and
retrains it from scratch with the same seed (the ground truth, and the time a user would pay
without florql). Then, each on a fresh copy of the store (nothing cached), asks
  (a) an outer-level value over all epochs:   SELECT epoch, w_norm FROM run_1
  (b) an inner-level value, last 20 % epochs: SELECT epoch, step, grad_norm FROM run_1 WHERE epoch >= …
with 1 and 2 workers, checks every answer bit-exact against the ground truth, and prints a table.
Times are wall-clock seconds of the whole query (planning, worker processes, ingest, answer).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import florql  # noqa: E402
from florql.replay.warm import stop_shared_fork_server  # noqa: E402

SCRIPT = """
import random
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import florql

epochs = florql.arg("epochs", {epochs})
samples = florql.arg("samples", {samples})
hidden = florql.arg("hidden", {hidden})
seed = florql.arg("seed", 0)
random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
data = np.random.default_rng(seed)
x_all = torch.tensor(data.normal(size=(samples, 64)), dtype=torch.float32)
y_all = torch.tensor(data.integers(0, 10, samples), dtype=torch.int64)
n_val = samples // 10
loader = DataLoader(TensorDataset(x_all[n_val:], y_all[n_val:]), batch_size=128, shuffle=True)
net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, hidden // 2), nn.ReLU(),
                    nn.Dropout(0.2), nn.Linear(hidden // 2, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
criterion = nn.CrossEntropyLoss()
with florql.checkpointing(model=net, optimizer=opt, scheduler=sched):
    for epoch in florql.loop("epoch", range(epochs)):
        net.train()
        for x, y in florql.loop("step", loader):
            opt.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            opt.step()
            florql.log("loss", loss.item())
        sched.step()
        net.eval()
        with torch.no_grad():
            val_acc = (net(x_all[:n_val]).argmax(1) == y_all[:n_val]).float().mean().item()
        florql.log("val_acc", val_acc)
"""
GRAD = (
    "            loss.backward()\n",
    "            loss.backward()\n"
    '            florql.log("grad_norm", float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))))\n',
)
WNORM = (
    '        florql.log("val_acc", val_acc)\n',
    '        florql.log("val_acc", val_acc)\n        florql.log("w_norm", float(net[0].weight.detach().norm()))\n',
)


def run_script(work: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "train.py"], cwd=work, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=24000)
    parser.add_argument("--hidden", type=int, default=512)
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="florql-bench-hindsight-"))
    try:
        work, home = tmp / "work", tmp / "work" / ".florql"
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS")}
        env["FLORQL_HOME"] = str(home)
        source = SCRIPT.format(epochs=opts.epochs, samples=opts.samples, hidden=opts.hidden)
        (work / "train.py").write_text(source)
        record_s = run_script(work, env)
        for old, new in (GRAD, WNORM):
            assert old in source
            source = source.replace(old, new)
        (work / "train.py").write_text(source)
        retrain_s = run_script(work, env)  # run 2: the ground truth, logging everything
        truth_db = florql.connect(home, progress=False)
        ckpts = truth_db.sql("SELECT count(*) FROM checkpoints WHERE run_id = 1").fetchall()[0][0]
        first = opts.epochs - max(1, round(opts.epochs * 0.2))
        cases = [
            ("(a) outer w_norm, all epochs", "SELECT epoch, w_norm FROM run_{} ORDER BY epoch"),
            (
                f"(b) inner grad_norm, epochs {first}..{opts.epochs - 1}",
                f"SELECT epoch, step, grad_norm FROM run_{{}} WHERE epoch >= {first} ORDER BY epoch, step",
            ),
        ]
        print(
            f"model 64-{opts.hidden}-{opts.hidden // 2}-10, {opts.samples} samples, {opts.epochs} epochs, "
            f"{os.cpu_count()} CPU cores; run 1 recorded in {record_s:.1f} s with {ckpts} checkpoints"
        )
        print(f"retraining from scratch (same seed, logging everything): {retrain_s:.1f} s\n")
        header = (
            f"{'query':<34} {'workers':>7} {'jobs':>4} {'executed':>8} {'restored':>8} {'est s':>6} "
            f"{'query s':>8} {'est/actual':>10} {'vs retrain':>10}  exact"
        )
        print(header)
        print("-" * len(header))
        for label, sql in cases:
            truth = truth_db.sql(sql.format(2)).arrow()
            for workers in (1, 2):
                copy = tmp / f"store-{len(label)}-{workers}"
                shutil.copytree(home, copy)
                stop_shared_fork_server()  # each query in a new session, as `florql query` runs it
                db = florql.connect(copy, workers=workers, progress=False)
                started = time.perf_counter()
                result = db.sql(sql.format(1))
                answer = result.arrow()
                elapsed = time.perf_counter() - started
                rows = db.sql("SELECT executed, restored FROM replay_jobs WHERE run_id = 1").fetchall()
                executed = sum(len(e) for e, _ in rows)
                restored = sum(len(r) for _, r in rows)
                est = result.plan.est_s if result.plan else 0.0
                exact = answer.equals(truth)
                print(
                    f"{label:<34} {workers:>7} {len(rows):>4} {executed:>8} {restored:>8} {est:>6.1f} "
                    f"{elapsed:>8.2f} {est / elapsed:>10.2f} {retrain_s / elapsed:>9.1f}x  {'yes' if exact else 'NO'}"
                )
                db.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
