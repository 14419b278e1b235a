"""Exact replay on training scripts written in common styles (tests/corpus/), and loud refusals.

Each corpus script is recorded twice into one project: run 1 as written (minimal logging) and run 2
as the ground-truth variant (the same code with the `# +` lines turned into extra `florql.log`
statements at the step and epoch levels). Then `train.py` is the ground-truth variant, and
hindsight values of run 1 over a later range of epochs must equal what run 2 logged, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import florql
from florql.check import check_script
from florql.errors import ReplayFailed

CORPUS = Path(__file__).resolve().parent / "corpus"


def variant(case: str, full: bool) -> str:
    source = (CORPUS / f"{case}.py").read_text()
    return re.sub(r"(?m)^(\s*)# \+", r"\1", source) if full else source


def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS", "FLORQL_REPLAY_JOB")}
    # One thread: the machine is shared and small; the recorded count is what replays use.
    env.update(FLORQL_HOME=str(tmp_path / ".florql"), OMP_NUM_THREADS="1")
    return tmp_path, env


def record_pair(tmp: Path, env: dict[str, str], case: str, *args: str) -> tuple[int, int]:
    """Record run 1 (train.py, minimal) and run 2 (train_full.py, everything logged) side by side,
    then leave the ground-truth variant in train.py for the hindsight queries."""
    (tmp / "train.py").write_text(variant(case, False))
    (tmp / "train_full.py").write_text(variant(case, True))
    procs = [
        subprocess.Popen(
            [sys.executable, script, *args], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for script in ("train.py", "train_full.py")
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{case} failed:\n{out}\n{err}"
    runs = {}
    for manifest in (tmp / ".florql" / "runs").glob("*/run.json"):
        body = json.loads(manifest.read_text())
        runs[body["script_rel"]] = body["run_id"]
    (tmp / "train.py").write_text(variant(case, True))
    return runs["train.py"], runs["train_full.py"]


def hindsight_equals_logged(db, minimal: int, full: int, columns: str, where: str, order: str):
    """Hindsight values of run `minimal` equal the values run `full` logged (Arrow, bit for bit)."""
    sql = "SELECT {cols} FROM run_{run} WHERE {where} ORDER BY {order}"
    got = db.sql(sql.format(cols=columns, run=minimal, where=where, order=order))
    jobs = list(db.last_jobs)
    expected = db.sql(sql.format(cols=columns, run=full, where=where, order=order)).arrow()
    assert got.plan is not None and jobs, "run 1 should have needed a replay"
    assert expected.num_rows > 0
    assert got.arrow().to_pylist() == expected.to_pylist()
    assert got.arrow().equals(expected)
    return got.arrow(), jobs


def connect(tmp: Path):
    # One worker: the jobs of a query run one after the other (the test machine has two shared cores).
    return florql.connect(tmp / ".florql", progress=False, workers=1)


def no_divergence(db, run: int) -> None:
    assert db.sql(f"SELECT count(*) FROM replay_audit WHERE run_id = {run}").fetchall() == [(0,)]


def test_train_test_function_pair(tmp_path):
    """MNIST-example style: the step loop in train(), the metric in test() and a helper it calls."""
    tmp, env = project(tmp_path)
    r1, r2 = record_pair(tmp, env, "mnist_functions")
    db = connect(tmp)
    epoch, _ = hindsight_equals_logged(db, r1, r2, "epoch, test_accuracy, lr", "epoch >= 3", "epoch")
    assert epoch.column("epoch").to_pylist() == [3, 4]
    _, jobs = hindsight_equals_logged(db, r1, r2, "epoch, step, grad_norm", "epoch >= 3", "epoch, step")
    assert all(spec.start >= 1 for spec, _ in jobs), "replays start from checkpoints, not from the beginning"
    no_divergence(db, r1)


def test_word_lm_manual_sgd_with_plateau_annealing(tmp_path):
    """No optimizer object; `lr /= 4.0` on a plateau, `best_val_loss`, `global_step` as module globals."""
    tmp, env = project(tmp_path)
    r1, r2 = record_pair(tmp, env, "word_lm")
    db = connect(tmp)
    epoch, jobs = hindsight_equals_logged(
        db, r1, r2, "epoch, lr, global_step, val_ppl, best_val_loss, hidden_norm", "epoch >= 3", "epoch"
    )
    assert set(epoch.column("lr").to_pylist()) == {5.0}, "the learning rate was annealed before epoch 3"
    assert any(spec.mode == "skip" for spec, _ in jobs), "epoch-level values restore the inner_end checkpoints"
    hindsight_equals_logged(db, r1, r2, "epoch, step, grad_norm", "epoch >= 3", "epoch, step")
    no_divergence(db, r1)


def test_gradient_accumulation_grad_scaler_and_ema(tmp_path):
    """Loops inside main(): plain locals restored there; the scaler's scale changes during the run."""
    tmp, env = project(tmp_path)
    r1, r2 = record_pair(tmp, env, "grad_accum_amp_ema")
    db = connect(tmp)
    hindsight_equals_logged(
        db, r1, r2, "epoch, ema_val, running, optimizer_steps, ema_weight_norm", "epoch >= 3", "epoch"
    )
    steps, _ = hindsight_equals_logged(db, r1, r2, "epoch, step, grad_norm, scale", "epoch >= 3", "epoch, step")
    assert len(set(steps.column("scale").to_pylist())) > 1
    no_divergence(db, r1)


def test_early_stopping_with_patience(tmp_path):
    tmp, env = project(tmp_path)
    r1, r2 = record_pair(tmp, env, "early_stopping")
    db = connect(tmp)
    completed = db.sql(f"SELECT outer_completed, broke_early FROM runs WHERE run_id = {r1}").fetchall()[0]
    assert completed[1] and 4 < completed[0] < 40
    epoch, jobs = hindsight_equals_logged(
        db, r1, r2, "epoch, bad_epochs, lr, best_loss, best_state_norm, stopped_at", "epoch >= 4", "epoch"
    )
    assert epoch.column("epoch").to_pylist()[-1] == completed[0] - 1
    assert epoch.column("stopped_at").to_pylist()[-1] == completed[0] - 1
    assert max(spec.stop for spec, _ in jobs) <= completed[0], "replay never runs past the last iteration"
    hindsight_equals_logged(db, r1, r2, "epoch, step, weight_norm", "epoch >= 4", "epoch, step")
    no_divergence(db, r1)


CONFIG = {"seed": 3, "samples": 256, "dim": 8, "noise": 0.3, "batch_size": 32, "hidden": 16}


def test_loader_workers_generator_split_override_and_config(tmp_path):
    """num_workers=2 with its own generator, a random split, `lr=0.05` from the command line, and a
    config file changed after recording (the replay uses the recorded one)."""
    tmp, env = project(tmp_path)
    (tmp / "config.json").write_text(json.dumps(CONFIG))
    r1, r2 = record_pair(tmp, env, "loader_workers", "--florql-args", "lr=0.05")
    (tmp / "config.json").write_text(json.dumps(dict(CONFIG, seed=4, noise=0.0, batch_size=16)))
    db = connect(tmp)
    epoch, _ = hindsight_equals_logged(db, r1, r2, "epoch, param_sum, lr_used", "epoch >= 2", "epoch")
    assert set(epoch.column("lr_used").to_pylist()) == {0.05}
    hindsight_equals_logged(db, r1, r2, "epoch, step, batch_sum, first_label", "epoch >= 2", "epoch, step")
    no_divergence(db, r1)


def test_generators_held_by_data_loaders_are_restored():
    """`DataLoader(..., generator=torch.Generator().manual_seed(0))` and a custom sampler's own
    generator are reachable only through the loader: the scope capture restores them in place."""
    import sys as _sys

    import torch
    from torch.utils.data import DataLoader, Sampler

    from florql.scope import capture_scope, restore_scope

    class Shuffled(Sampler):
        def __init__(self, n):
            self.n, self.rng = n, torch.Generator().manual_seed(5)

        def __iter__(self):
            return iter(torch.randperm(self.n, generator=self.rng).tolist())

        def __len__(self):
            return self.n

    def orders(frame_holder):
        loader = DataLoader(list(range(8)), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
        custom = DataLoader(list(range(8)), batch_size=8, sampler=Shuffled(8))
        frame = _sys._getframe()
        next(iter(loader)), next(iter(custom))
        captured = capture_scope(frame, set(), set(), {})
        first = (next(iter(loader)).tolist(), next(iter(custom)).tolist())
        restore_scope(frame, captured)
        again = (next(iter(loader)).tolist(), next(iter(custom)).tolist())
        return captured, first, again

    captured, first, again = orders(None)
    assert {"loader.generator", "custom.sampler.rng"} <= set(captured["generators"])
    assert first == again


# ---- refusals ---------------------------------------------------------------------------------
def test_state_that_cannot_be_captured_is_reported_and_divergence_stops_replay(tmp_path):
    """An unregistered optimizer: a warning at record time, a `florql check` finding, and a replay
    that stops at the first re-logged value that differs (ReplayFailed, a replay_audit row)."""
    tmp, env = project(tmp_path)
    (tmp / "train.py").write_text(variant("unregistered_optimizer", False))
    proc = subprocess.run([sys.executable, "train.py"], cwd=tmp, env=env, check=True, capture_output=True, text=True)
    assert "'opt' (Adam) holds training state but is not registered" in proc.stderr

    findings = check_script(tmp / "train.py")
    opt_line = (
        variant("unregistered_optimizer", False)
        .splitlines()
        .index("opt = torch.optim.Adam(model.parameters(), lr=0.05)")
        + 1
    )
    assert [(f.code, f.lineno) for f in findings] == [("unregistered-state", opt_line)]
    assert "'opt' (optimizer)" in findings[0].message

    (tmp / "train.py").write_text(variant("unregistered_optimizer", True))
    db = connect(tmp)
    with pytest.raises(ReplayFailed) as failure:
        db.sql("SELECT epoch, step, bias FROM run_1 WHERE epoch >= 3")
    message = str(failure.value)
    assert re.search(
        r"diverged from the original run at epoch/step \[\d, \d\]: loss was [-0-9.e]+, "
        r"replay gave [-0-9.e]+ \(\|diff\| [0-9.e-]+\)",
        message,
    ), message
    audit = db.sql("SELECT name, loop_path, logged, replayed, abs_diff FROM replay_audit WHERE run_id = 1").fetchall()
    assert audit and all(row[0] == "loss" and row[1] == "epoch/step" and row[4] > 0 for row in audit)
    assert db.sql("SELECT count(*) FROM logs WHERE run_id = 1 AND name = 'bias'").fetchall() == [(0,)], (
        "no rows of a diverged replay become visible"
    )


def test_check_script_findings(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import json, copy\n"  # 1
        "import torch\n"  # 2
        "from torch import nn\n"  # 3
        "import florql\n"  # 4
        "cfg = json.load(open('/etc/project/config.json'))\n"  # 5
        "florql.log('setup', 1)\n"  # 6
        "model = nn.Sequential(nn.Linear(2, 2)).to('cpu')\n"  # 7
        "ema = copy.deepcopy(model)\n"  # 8
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"  # 9
        "sched = torch.optim.lr_scheduler.StepLR(opt, 2)\n"  # 10
        "scaler = torch.amp.GradScaler('cpu')\n"  # 11
        "criterion = nn.CrossEntropyLoss()\n"  # 12
        "loader = torch.utils.data.DataLoader([1], num_workers=2, persistent_workers=True)\n"  # 13
        "with open('/tmp/out.txt', 'w') as f:\n"  # 14
        "    pass\n"  # 15
        "name = 'x'\n"  # 16
        "with florql.checkpointing(model=model, optimizer=opt):\n"  # 17
        "    for epoch in florql.loop('epoch', range(3)):\n"  # 18
        "        florql.log(name, 1)\n"  # 19
        "        florql.log('fine', 2)\n"  # 20
    )
    got = [(f.lineno, f.code) for f in check_script(script)]
    assert got == [
        (5, "absolute-path"),
        (6, "log-outside-loop"),
        (8, "unregistered-state"),
        (10, "unregistered-state"),
        (11, "unregistered-state"),
        (13, "persistent-workers"),
        (19, "dynamic-name"),
    ]
    for case in ("mnist_functions", "word_lm", "grad_accum_amp_ema", "early_stopping", "loader_workers"):
        assert check_script(CORPUS / f"{case}.py") == [], case


def test_config_read_before_any_florql_call(tmp_path):
    tmp, env = project(tmp_path)
    (tmp / "config.json").write_text(json.dumps({"scale": 2.0}))
    source = (
        "import json\n"
        "import florql\n"
        "with open('config.json') as f:\n"
        "    config = json.load(f)\n"
        "for epoch in florql.loop('epoch', range(3)):\n"
        "    for step in florql.loop('step', range(2)):\n"
        "        florql.log('x', step * config['scale'])\n"
        "    # +florql.log('scale', config['scale'])\n"
    )
    (tmp / "train.py").write_text(source)
    subprocess.run([sys.executable, "train.py"], cwd=tmp, env=env, check=True, capture_output=True)
    (tmp / "config.json").write_text(json.dumps({"scale": 3.0}))
    (tmp / "train.py").write_text(re.sub(r"(?m)^(\s*)# \+", r"\1", source))
    db = connect(tmp)
    assert db.sql("SELECT epoch, scale FROM run_1 WHERE epoch >= 1 ORDER BY epoch").fetchall() == [(1, 2.0), (2, 2.0)]
