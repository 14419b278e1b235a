"""Hindsight on scripts laid out as in pytorch/examples: the files they read and write, closures, hooks.

As in tests/test_corpus.py, each script is recorded twice side by side (minimal, and with the `# +`
lines as extra logs); hindsight values of the minimal run must equal what the full run logged,
bit for bit. Here the scripts also read data by relative path (a > 1 MiB file beside them, a
folder `../data` outside their own), write into a folder of the checkout and into `../out/`, and
log inside an LBFGS closure and a forward hook. The user's files must be byte-for-byte unchanged
by the replays, and nothing may appear outside the replay sandbox.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_corpus import connect, hindsight_equals_logged, no_divergence, project, variant

from florql.check import check_source
from florql.errors import InputChanged


def record_pair(folder: Path, env: dict[str, str], case: str, script: str = "train.py") -> tuple[int, int]:
    """Run 1 (`script`, minimal) and run 2 (its `_full` twin) in `folder`; then `script` holds the
    ground-truth variant, as a user's edited script would."""
    full = script.replace(".py", "_full.py")
    (folder / script).write_text(variant(case, False))
    (folder / full).write_text(variant(case, True))
    procs = [
        subprocess.Popen(
            [sys.executable, name], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name in (script, full)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{case} failed:\n{out}\n{err}"
    home = Path(env["FLORQL_HOME"])
    runs = {
        json.loads(m.read_text())["script_rel"]: json.loads(m.read_text())["run_id"]
        for m in home.glob("runs/*/run.json")
    }
    (folder / script).write_text(variant(case, True))
    return runs[script], runs[full]


def user_files(top: Path) -> dict[str, bytes]:
    """Every file below `top` but the store, by content (links as their targets)."""
    return {
        str(p.relative_to(top)): p.read_bytes()
        for p in sorted(top.rglob("*"))
        if p.is_file() and ".florql" not in p.relative_to(top).parts
    }


def sine_waves(path: Path) -> None:
    """pytorch/examples' generate_sine_wave.py, 160 waves of 1000 points (1.28 MB)."""
    rng = np.random.RandomState(2)
    x = np.empty((160, 1000), "int64")
    x[:] = np.array(range(1000)) + rng.randint(-80, 80, 160).reshape(160, 1)
    torch.save(np.sin(x / 20.0).astype("float64"), path)


@pytest.fixture
def sine_project(tmp_path):
    tmp, env = project(tmp_path)
    folder = tmp / "time_sequence_prediction"
    folder.mkdir()
    sine_waves(folder / "traindata.pt")
    assert (folder / "traindata.pt").stat().st_size > 1 << 20
    r1, r2 = record_pair(folder, env, "time_sequence_prediction")
    return tmp, folder, r1, r2


def test_large_file_by_relative_path_closure_and_forward_hook(sine_project):
    """time_sequence_prediction: `torch.load('traindata.pt')` (> 1 MiB, recorded by hash and used in
    place), values logged inside LBFGS's closure and a forward hook registered before the loop."""
    tmp, folder, r1, r2 = sine_project
    manifest = json.loads((tmp / ".florql" / "runs" / str(r1) / "run.json").read_text())
    data = next(i for i in manifest["inputs"] if i["rel"] == "traindata.pt")
    assert not data["stored"] and data["sha256"] and data["size"] > 1 << 20
    before = user_files(tmp)
    db = connect(tmp)
    hindsight_equals_logged(db, r1, r2, "epoch, grad_norm, cell_norm, loss", "epoch >= 2", "epoch")
    no_divergence(db, r1)
    assert user_files(tmp) == before

    # the digest is cached in the store, keyed by the file's path: runs reading it share one entry
    assert len(list((tmp / ".florql" / "code" / "inputs").glob("*.json"))) == 1


def test_changed_data_file_refuses_and_names_it(sine_project):
    tmp, folder, r1, _ = sine_project
    raw = bytearray((folder / "traindata.pt").read_bytes())
    raw[-100] ^= 0x01  # same size, one bit of one value changed
    (folder / "traindata.pt").write_bytes(bytes(raw))
    db = connect(tmp)
    with pytest.raises(InputChanged, match=r"traindata\.pt .*changed since the run read it"):
        db.sql(f"SELECT epoch, grad_norm FROM run_{r1} WHERE epoch >= 3").fetchall()
    assert db.sql(f"SELECT count(*) FROM logs WHERE run_id = {r1} AND name = 'grad_norm'").fetchall() == [(0,)]


def test_data_in_parent_folder_output_folders_and_writes_to_parent(tmp_path):
    """mnist + vae: `../data` read (never re-downloaded, nothing created beside the user's files),
    `results/` a folder of the checkout, `../out/` written to; replays change none of the user's files."""
    tmp, env = project(tmp_path)
    examples = tmp / "examples"
    (examples / "mnist" / "results").mkdir(parents=True)
    (examples / "mnist" / "results" / ".gitignore").write_text("*\n!.gitignore\n")
    g = torch.Generator().manual_seed(11)
    (examples / "data" / "MNIST").mkdir(parents=True)
    digits = {"images": torch.randn(96, 1, 8, 8, generator=g), "labels": torch.randint(0, 10, (96,), generator=g)}
    torch.save(digits, examples / "data" / "MNIST" / "digits.pt")
    r1, r2 = record_pair(examples / "mnist", env, "mnist_data", script="main.py")
    manifest = json.loads((tmp / ".florql" / "runs" / str(r1) / "run.json").read_text())
    assert "results" in manifest["folders"]
    assert [i["rel"] for i in manifest["inputs"]] == ["../data/MNIST/digits.pt"]
    before = user_files(tmp)
    db = connect(tmp)
    hindsight_equals_logged(db, r1, r2, "epoch, sample_mean", "epoch >= 2", "epoch")
    hindsight_equals_logged(db, r1, r2, "epoch, step, grad_norm, loss", "epoch >= 3", "epoch, step")
    no_divergence(db, r1)
    assert user_files(tmp) == before, "a replay wrote outside its sandbox"


def test_check_on_conditional_state_helpers_after_the_loop_hooks_and_downloads():
    source = (
        "import torch, florql\n"  # 1
        "from torchvision import datasets\n"  # 2
        "model = torch.nn.Linear(2, 2)\n"  # 3
        "if USE_LBFGS:\n"  # 4
        "    opt = torch.optim.LBFGS(model.parameters())\n"  # 5
        "train = datasets.MNIST('../data', download=True)\n"  # 6
        "def hook(m, i, o):\n"  # 7
        "    florql.log('act', o.norm())\n"  # 8
        "def evaluate():\n"  # 9
        "    florql.log('acc', 1.0)\n"  # 10
        "model.register_forward_hook(hook)\n"  # 11
        "with florql.checkpointing(model=model):\n"  # 12
        "    for epoch in florql.loop('epoch', range(3)):\n"  # 13
        "        def closure():\n"  # 14
        "            florql.log('loss', 1.0)\n"  # 15
        "        opt.step(closure)\n"  # 16
        "        evaluate()\n"  # 17
        "evaluate()\n"  # 18
    )
    findings = {(f.lineno, f.code): f.message for f in check_source(source)}
    assert sorted(findings) == [(5, "unregistered-state"), (6, "network-download"), (10, "log-outside-loop")]
    assert "only on some paths" in findings[(5, "unregistered-state")]
    assert "also runs outside every florql.loop" in findings[(10, "log-outside-loop")]
