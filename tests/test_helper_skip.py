"""A helper whose locals no checkpoint restores exactly: epoch-level names re-execute its loop,
`explain` says why, and the answer is still bit-exact (the skipping case itself is in
tests/test_differential.py, `test_k_…`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import florql

SCRIPT = """
import torch
import florql

torch.manual_seed(0)
torch.set_num_threads(1)
net = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
data = torch.randn(6, 4)


def train():
    rows = iter(range(6))  # an iterator: not plain data, no checkpoint holds it
    total = 0.0
    for step in florql.loop("step", range(3)):
        opt.zero_grad()
        loss = net(data[next(rows)]).pow(2).sum()
        loss.backward()
        opt.step()
        total += loss.item()
    return total + next(rows)


with florql.checkpointing(model=net, optimizer=opt):
    for epoch in florql.loop("epoch", range(4)):
        train_loss = train()
        florql.log("val", float(net.weight.sum()))
        #HINDSIGHT
"""
HINDSIGHT = 'florql.log("train_loss", train_loss)'


def _record(work: Path, source: str) -> None:
    work.mkdir(exist_ok=True)
    (work / "train.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS", "FLORQL_REPLAY_JOB")}
    env["FLORQL_HOME"] = str(work / ".florql")
    proc = subprocess.run([sys.executable, "train.py"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_helper_that_cannot_be_restored_exactly_is_re_executed_and_explain_says_why(tmp_path: Path):
    full = SCRIPT.replace("#HINDSIGHT", HINDSIGHT)
    _record(tmp_path / "truth", full)
    _record(tmp_path / "recorded", SCRIPT)
    (tmp_path / "recorded" / "train.py").write_text(full)  # the current code logs train_loss

    db = florql.connect(tmp_path / "recorded" / ".florql", progress=False, workers=1)
    assert db.sql("SELECT count(*) FROM checkpoints WHERE kind = 'inner_end'").fetchall() == [(0,)]
    plan = db.explain("SELECT epoch, train_loss FROM run_1")
    assert "re-execute" in plan and " skip " not in plan, plan
    assert "train_loss re-executes: the inner loop runs in a helper" in plan, plan
    assert "train() holds 'rows', which no checkpoint captures" in plan, plan

    answer = db.sql("SELECT epoch, train_loss FROM run_1 ORDER BY epoch").fetchall()
    truth = florql.connect(tmp_path / "truth" / ".florql", progress=False)
    assert answer == truth.sql("SELECT epoch, train_loss FROM run_1 ORDER BY epoch").fetchall()
    assert len(answer) == 4
