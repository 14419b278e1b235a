"""`florql demo`: record the example run, add a hindsight statement, ask for it in SQL."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
import time
from importlib import resources

import florql
from florql.replay.executor import warm_start_enabled
from florql.replay.launcher import base_env
from florql.replay.warm import shared_fork_server

HINDSIGHT_STEP = (
    '            florql.log("grad_norm", nn.utils.clip_grad_norm_(net.parameters(), float("inf")).item())\n'
)
EPOCHS = 40
# 12,000 samples: 150 steps per epoch, ~3 s of training on 2 cores. Shorter, the run's 2 % budget
# (~20 ms in 1 s) is mostly taken by the log writer and leaves the query few checkpoints to start from.
SAMPLES = 12_000
FIRST = 36  # the hindsight query asks for the last 10 % of epochs
QUERY = (
    f"SELECT epoch, avg(grad_norm) AS mean_grad_norm, max(grad_norm) AS max_grad_norm, any_value(val_acc) AS val_acc "
    f"FROM run_1 WHERE epoch >= {FIRST} GROUP BY epoch ORDER BY epoch"
)
TRY = [
    "florql runs",
    'florql query "SELECT epoch, val_acc FROM run_1"',
    'florql explain "SELECT epoch, step, grad_norm FROM run_1 WHERE epoch BETWEEN 3 AND 4"',
    'florql query "SELECT epoch, step, loss, grad_norm FROM run_1 WHERE epoch = 2" --format csv',
    'florql serve   # then: psql "host=127.0.0.1 port=5433 dbname=florql user=florql"',
]


def _example() -> str:
    """The demo's training script, shipped inside the package as `florql.examples`."""
    return str(resources.files("florql.examples") / "train.py")


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _add_hindsight_statement(source: str) -> str:
    anchor = "            loss.backward()\n"
    if anchor not in source:
        raise RuntimeError("the example changed: cannot find `loss.backward()` in its step loop")
    return source.replace(anchor, anchor + HINDSIGHT_STEP, 1)


def _start_replay_server(store: str) -> None:
    """Start the store's replay server before training, as a session that will ask hindsight
    queries would (a notebook, `florql serve`, the UI): it imports torch once, and the query's
    replay forks from it. Started and waited for here, so that neither the training time nor the
    query time includes it."""
    if not warm_start_enabled():
        return
    os.makedirs(store, exist_ok=True)  # a store's server stops when its folder is gone
    started = time.perf_counter()
    up = shared_fork_server(base_env(), store).ready()
    state = f"up in {time.perf_counter() - started:.1f} s" if up else "could not start: replays start cold"
    print(f"(florql's replay server for this store, which keeps torch imported for replays: {state})", flush=True)


def run_demo(folder: str) -> int:
    folder = os.path.abspath(folder)
    if os.path.exists(os.path.join(folder, ".florql")):
        shutil.rmtree(os.path.join(folder, ".florql"))
    os.makedirs(folder, exist_ok=True)
    script = os.path.join(folder, "train.py")
    shutil.copy(_example(), script)
    env = dict(os.environ, FLORQL_HOME=os.path.join(folder, ".florql"))

    _say(f"1. Training {script}: it logs only `loss` per step and `val_acc` per epoch")
    _start_replay_server(env["FLORQL_HOME"])
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "train.py", "--florql-args", f"epochs={EPOCHS}", f"samples={SAMPLES}"],
        cwd=folder,
        env=env,
        check=True,
    )
    train_s = time.perf_counter() - started
    db = florql.connect(env["FLORQL_HOME"], progress=True)
    print(
        db.sql(
            "SELECT run_id, status, outer_completed AS epochs, checkpoints_taken AS checkpoints, "
            "round(100 * checkpoint_overhead, 2) AS checkpoint_overhead_pct FROM runs"
        )
        .df()
        .to_string(index=False)
    )

    _say("2. Later you want the gradient norm, which was never logged. Add one line to train.py:")
    with open(script) as f:
        old = f.read()
    new = _add_hindsight_statement(old)
    with open(script, "w") as f:
        f.write(new)
    sys.stdout.writelines(
        line
        for line in difflib.unified_diff(
            old.splitlines(True), new.splitlines(True), "train.py (recorded)", "train.py (now)", n=1
        )
    )

    _say(f"3. Ask for it in SQL:\n   {QUERY}")
    print("\nThe plan (florql explain):")
    print(db.explain(QUERY))
    started = time.perf_counter()
    result = db.sql(QUERY)
    query_s = time.perf_counter() - started
    print()
    print(result.df().to_string(index=False))
    print(
        f"\nanswered in {query_s:.2f} s by replaying only epochs {FIRST}.. from the nearest checkpoint "
        f"(training from scratch took {train_s:.2f} s: {train_s / query_s:.1f}x)"
    )
    print("Asking again replays nothing: the values are stored now (source = 'replayed' in the logs table).")

    _say(f"Try these (cd {folder}):")
    for line in TRY:
        print(f"   {line}")
    return 0
