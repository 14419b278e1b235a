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


# ---- skip jobs leave out an evaluation helper no asked name needs (replay/skip_tail.py) -----------
MNIST_LAYOUT = """
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import florql

HELD = []


def train(model, loader, optimizer):
    model.train()
    total = 0.0
    for data, target in florql.loop("step", loader):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total


def test(model, loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in loader:
            correct += model(data).argmax(dim=1).eq(target).sum().item()
    return correct / len(loader.dataset)


torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randn(96, 6)
y = (x.sum(dim=1) > 0).long()
train_loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True)
test_loader = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
with florql.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler):
    for epoch in florql.loop("epoch", range(4)):
        train_loss = train(model, train_loader, optimizer)
        test_acc = test(model, test_loader)
        florql.log("test_acc", test_acc)
        #HINDSIGHT
        scheduler.step()
"""
EPOCH_NAMES = (
    'florql.log("train_loss", train_loss)\n        florql.log("w_norm", float(model[0].weight.detach().norm()))'
)


def _layout(tmp_path: Path, hindsight: str, test_body: str | None = None) -> tuple[florql.Connection, list]:
    """A recorded run of the layout and its truth (every statement logged while training)."""
    source = MNIST_LAYOUT if test_body is None else MNIST_LAYOUT.replace("    model.eval()\n", test_body, 1)
    full = source.replace("#HINDSIGHT", hindsight)
    _record(tmp_path / "truth", full)
    _record(tmp_path / "recorded", source)
    (tmp_path / "recorded" / "train.py").write_text(full)
    truth = florql.connect(tmp_path / "truth" / ".florql", progress=False)
    return florql.connect(tmp_path / "recorded" / ".florql", progress=False, workers=1), truth


def test_a_skip_job_leaves_out_the_test_helper_and_the_answer_stays_exact(tmp_path: Path):
    db, truth = _layout(tmp_path, EPOCH_NAMES)
    sql = "SELECT epoch, train_loss, w_norm FROM run_1 ORDER BY epoch"
    plan = db.explain(sql)
    assert " skip " in plan and "skip jobs leave out `test_acc = test(model, test_loader)`" in plan, plan
    assert db.sql(sql).fetchall() == truth.sql(sql).fetchall()
    [(spec, result)] = db.last_jobs
    assert result.ok and result.summary is not None and result.summary["inner_iterations"] == 0
    assert "test(model, test_loader)" not in spec.patched["train.py"]  # what the job ran
    assert 'florql.log("test_acc"' not in spec.patched["train.py"]


def test_the_helper_runs_when_an_asked_name_needs_what_it_changes(tmp_path: Path):
    """A forward pass after test() depends on the mode and the RNG test() leaves: not left out."""
    hindsight = 'florql.log("train_loss", train_loss)\n        florql.log("out", float(model(x[:4]).sum()))'
    db, truth = _layout(tmp_path, hindsight)
    sql = "SELECT epoch, train_loss, out FROM run_1 ORDER BY epoch"
    assert "leave out" not in db.explain(sql)
    assert db.sql(sql).fetchall() == truth.sql(sql).fetchall()
    [(spec, _)] = db.last_jobs
    assert "test(model, test_loader)" in spec.patched["train.py"]


def test_a_helper_that_changes_state_no_restore_resets_runs(tmp_path: Path):
    body = "    model.eval()\n    HELD.append(len(HELD))\n"  # module state: no checkpoint holds it
    db, truth = _layout(tmp_path, EPOCH_NAMES, body)
    sql = "SELECT epoch, train_loss, w_norm FROM run_1 ORDER BY epoch"
    assert "leave out" not in db.explain(sql)
    assert db.sql(sql).fetchall() == truth.sql(sql).fetchall()
