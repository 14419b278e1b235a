"""Hindsight in the pytorch/examples mnist layout: `train()`/`test()` helpers called from the epoch loop.

    python benchmarks/bench_mnist_layout.py [--epochs 10] [--samples 2000]

Records one run of a small CNN on MNIST-shaped data generated in code (the batch loop inside
`train(...)`, which returns the epoch's averaged loss; `test()` returns the accuracy), logging only
`loss` per step and `test_acc` per epoch. Then adds hindsight statements and retrains from scratch
with the same seed (the ground truth; its time is what a user pays without florql). Each query runs
on a fresh copy of the store, in three kinds of session: *cold* (the store's first query, with no
template fork server up either: its fork server imports torch, and the planner has measured
nothing yet), *new process* (`florql query` run
as a command, timed from launch to exit, after another command's query left the store's fork server
up and measured the costs: a user's next command) and *warm* (a notebook or `florql serve` whose
fork server is up and which replayed one other epoch before),
  (a) epoch-level names over all epochs: the helper's return value and a weight norm
  (b) a step-level name over the last 10 % of the epochs
and prints, side by side: query time against training time, the planner's estimate against the
actual time, training batches executed, and whether the answer is bit-exact.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import florql  # noqa: E402
from florql.replay.warm import TEMPLATE, stop_servers  # noqa: E402

SCRIPT = """
import argparse
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import florql


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(16 * 12 * 12, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = torch.flatten(self.dropout(x), 1)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def train(args, model, train_loader, optimizer, epoch):
    model.train()
    total, batches = 0.0, 0
    for data, target in florql.loop("step", train_loader):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        florql.log("loss", loss.item())
        total += loss.item()
        batches += 1
    return total / batches


def test(model, test_loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            correct += model(data).argmax(dim=1).eq(target).sum().item()
    return correct / len(test_loader.dataset)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default={epochs})
    parser.add_argument("--samples", type=int, default={samples})
    args = parser.parse_args()
    torch.manual_seed(1)
    images = torch.randn(args.samples + 1000, 1, 28, 28)
    labels = (images.mean(dim=(1, 2, 3)) * 40).long().clamp(-5, 4) + 5
    train_loader = DataLoader(TensorDataset(images[1000:], labels[1000:]), batch_size=64, shuffle=True)
    test_loader = DataLoader(TensorDataset(images[:1000], labels[:1000]), batch_size=500)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    with florql.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler):
        for epoch in florql.loop("epoch", range(args.epochs)):
            train_loss = train(args, model, train_loader, optimizer, epoch)
            test_acc = test(model, test_loader)
            florql.log("test_acc", test_acc)
            scheduler.step()


main()
"""
HINDSIGHT = (
    (
        "        loss.backward()\n",
        "        loss.backward()\n"
        '        florql.log("grad_norm", float(torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))))\n',
    ),
    (
        '            florql.log("test_acc", test_acc)\n',
        '            florql.log("test_acc", test_acc)\n'
        '            florql.log("train_loss", train_loss)\n'
        '            florql.log("fc1_norm", float(model.fc1.weight.detach().norm()))\n',
    ),
)


AS_COMMAND = re.compile(r"as a command: ~([\d.]+) s")  # explain's estimate of `florql query`, start included
STEPS_PER_EPOCH = 0  # set from --samples: batches of 64
SESSIONS = ("cold", "new process", "warm")
CALIBRATION = "SELECT epoch, step, grad_norm FROM run_1 WHERE epoch = 4"  # one epoch: not in either query


def run_script(work: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "train.py"], cwd=work, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def ask(home: Path, copy: Path, sql: str, session: str) -> tuple[float, float, int, int, object]:
    """(query seconds, estimate, jobs, training batches executed, answer) on a fresh copy of the store."""
    shutil.copytree(home, copy)
    if session == "new process":
        return ask_in_new_process(copy, sql)
    if session == "cold":
        stop_servers(TEMPLATE, current_only=True)  # no server to fork the store's from: it imports torch
    db = florql.connect(copy, workers=1, progress=False)
    if session == "warm":  # a session whose fork server is up and whose earlier replay measured the costs
        server = getattr(db.executor, "fork_server", None)
        assert server is not None and server.ready()
        db.sql(CALIBRATION).fetchall()
    try:
        started = time.perf_counter()
        result = db.sql(sql)
        answer = result.arrow()
        elapsed = time.perf_counter() - started
        batches = sum(r.summary["inner_iterations"] for _, r in db.last_jobs if r.summary)
        est = result.plan.est_s if result.plan else 0.0
        return elapsed, est, len(result.plan.jobs) if result.plan else 0, batches, answer
    finally:
        db.close()
        stop_servers(str(copy))  # the next session's store is another copy: it must not find this one's


def ask_in_new_process(store: Path, sql: str) -> tuple[float, float, int, int, object]:
    """`florql query` in a new process, after another process's query (the calibration) left the
    store's fork server up: a user's next command. Timed from launch to exit."""
    cli = [sys.executable, "-m", "florql.cli", "--store", str(store)]
    # Bytecode cached as a user's install has it, even where PYTHONDONTWRITEBYTECODE is set here.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"FLORQL_QUIET": "1"}
    subprocess.run([*cli, "query", CALIBRATION, "--workers", "1"], env=env, check=True, capture_output=True)
    explained = subprocess.run([*cli, "explain", sql, "--workers", "1"], env=env, check=True, capture_output=True)
    est = float(AS_COMMAND.search(explained.stdout.decode()).group(1))  # type: ignore[union-attr]
    before = stored_jobs(store)
    started = time.perf_counter()
    subprocess.run([*cli, "query", sql, "--workers", "1", "--format", "csv"], env=env, check=True, capture_output=True)
    elapsed = time.perf_counter() - started
    db = florql.connect(store, progress=False, replay="never")
    try:
        answer = db.sql(sql).arrow()
        jobs = [
            (j, n) for j, n in db.sql("SELECT job_id, len(executed) FROM replay_jobs").fetchall() if j not in before
        ]
        return elapsed, est, len(jobs), sum(n for _, n in jobs) * STEPS_PER_EPOCH, answer
    finally:
        db.close()
        stop_servers(str(store))


def stored_jobs(store: Path) -> set[str]:
    db = florql.connect(store, progress=False, replay="never")
    try:
        return {j for (j,) in db.sql("SELECT job_id FROM replay_jobs").fetchall()}
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)  # at least 6: the calibration replays epoch 4
    parser.add_argument("--samples", type=int, default=2000)
    opts = parser.parse_args()
    global STEPS_PER_EPOCH
    STEPS_PER_EPOCH = -(-opts.samples // 64)
    tmp = Path(tempfile.mkdtemp(prefix="florql-bench-mnist-"))
    try:
        work, home = tmp / "work", tmp / "work" / ".florql"
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS")}
        env["FLORQL_HOME"] = str(home)
        source = SCRIPT.format(epochs=opts.epochs, samples=opts.samples)
        (work / "train.py").write_text(source)
        record_s = run_script(work, env)
        for old, new in HINDSIGHT:
            assert old in source
            source = source.replace(old, new)
        (work / "train.py").write_text(source)
        retrain_s = run_script(work, env)  # run 2: the ground truth, logging everything
        truth_db = florql.connect(home, progress=False)
        ckpts = truth_db.sql("SELECT kind, count(*) FROM checkpoints WHERE run_id = 1 GROUP BY kind").fetchall()
        last = opts.epochs - max(1, round(opts.epochs * 0.1))
        cases = [
            ("(a) epoch-level, all epochs", "SELECT epoch, train_loss, fc1_norm FROM run_{} ORDER BY epoch"),
            (
                f"(b) step-level, epochs {last}..{opts.epochs - 1}",
                f"SELECT epoch, step, grad_norm FROM run_{{}} WHERE epoch >= {last} ORDER BY epoch, step",
            ),
        ]
        print(
            f"mnist layout (CNN, {opts.samples} samples, {opts.epochs} epochs), {os.cpu_count()} CPU cores; "
            f"run 1 recorded in {record_s:.1f} s, checkpoints {dict(ckpts)}"
        )
        print(f"retraining from scratch (same seed, logging everything): {retrain_s:.1f} s\n")
        header = (
            f"{'query':<32} {'session':<11} {'jobs':>4} {'batches':>7} {'est s':>6} {'query s':>8} "
            f"{'est/actual':>10} {'vs retrain':>10}  exact"
        )
        print(header)
        print("-" * len(header))
        for n, (label, sql) in enumerate(cases):
            truth = truth_db.sql(sql.format(2)).arrow()
            for session in SESSIONS:
                copy = tmp / f"store-{n}-{session.replace(' ', '-')}"
                elapsed, est, jobs, batches, answer = ask(home, copy, sql.format(1), session)
                print(
                    f"{label:<32} {session:<11} {jobs:>4} {batches:>7} {est:>6.2f} {elapsed:>8.2f} "
                    f"{est / elapsed:>10.2f} {elapsed / retrain_s:>9.3f}x  {'yes' if answer.equals(truth) else 'NO'}"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
