"""florql against flordb 4.0.1 on the same training script, side by side in one go.

flordb lives in a venv of its own (never one of florql's dependencies):

    python -m venv /tmp/flordb_venv && /tmp/flordb_venv/bin/pip install flordb==4.0.1 torch==2.13.0
    python benchmarks/bench_flordb.py --flordb-python /tmp/flordb_venv/bin/python

Both venvs run torch 2.13.0 on the CPU with 1 thread, so the script trains bit-identically in each.
Measured, alternating the tools where it matters:
- per-call cost of logging a float inside a loop (median of batches of calls);
- recording overhead: the whole process (launch to exit) against the same script without any
  logging library, medians of alternating repetitions;
- hindsight: a statement `log("w_norm", …)` added after the batch loop, asked for the last 10 %
  of epochs and for all epochs (florql: `florql query` in a fresh process, i.e. ingest, plan, replay,
  answer; flordb: `python -m flordb replay --apply w_norm --iter epoch=…`, then `flor.dataframe`),
  each answer compared bit for bit with a run that computed w_norm while training;
- storage: bytes of each tool's store after the recorded run (florql: `$FLORQL_HOME`; flordb:
  `.flor/`, and the git objects of its auto-commits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

EPOCHS, SAMPLES, BATCH = 20, 4096, 128

SCRIPT = """\
import json, sys
{import_line}
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn({samples}, 64)
y = (x[:, :32].sum(dim=1) > 0).long() + 2 * (x[:, 32:].sum(dim=1) > 0).long()
net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
opt = torch.optim.SGD(net.parameters(), lr={arg}("lr", 0.05), momentum=0.9)
loss_fn = nn.CrossEntropyLoss()
with {checkpointing}(model=net, optimizer=opt):
    for epoch in {loop}("epoch", range({epochs})):
        net.train()
        order = torch.randperm({samples})
        for start in {loop}("step", range(0, {samples}, {batch})):
            idx = order[start : start + {batch}]
            loss = loss_fn(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            {log}("loss", loss.item())
        # hindsight
        net.eval()
        with torch.no_grad():
            acc = (net(x[:1024]).argmax(dim=1) == y[:1024]).float().mean().item()
        {log}("val_acc", acc)
"""
HINDSIGHT = '{log}("w_norm", net[0].weight.norm().item())'
VARIANTS = {
    "florql": dict(
        import_line="import florql",
        arg="florql.arg",
        checkpointing="florql.checkpointing",
        loop="florql.loop",
        log="florql.log",
    ),
    "flordb": dict(
        import_line="import flordb as flor",
        arg="flor.arg",
        checkpointing="flor.checkpointing",
        loop="flor.loop",
        log="flor.log",
    ),
    # the same script with no library: what the recording overhead is measured against
    "plain": dict(
        import_line="import contextlib\nloop = lambda name, it: it\nlog = lambda name, value: None",
        arg="(lambda name, default: default)",
        checkpointing="(lambda **objects: contextlib.nullcontext())",
        loop="loop",
        log="log",
    ),
}
TRUTH_LOG = 'print(json.dumps(["w_norm", epoch, net[0].weight.norm().item()]))'

LOG_COST = """\
import time, statistics
{import_line}
times = []
for _ in {loop}("epoch", range(1)):
    for _ in range(21):
        began = time.perf_counter_ns()
        for _ in range(2000):
            {log}("x", 1.0)
        times.append((time.perf_counter_ns() - began) / 2000)
print("NS", statistics.median(times[1:]))
"""


def script(variant: str, hindsight: bool = False, truth: bool = False) -> str:
    names = VARIANTS[variant]
    text = SCRIPT.format(samples=SAMPLES, epochs=EPOCHS, batch=BATCH, **names)
    if hindsight:
        text = text.replace("# hindsight", HINDSIGHT.format(log=names["log"]))
    if truth:
        text = text.replace("# hindsight", TRUTH_LOG)
    return text


def run(python: str, args: list[str], cwd: str, env: dict, stdin: str | None = None) -> tuple[float, str]:
    began = time.perf_counter()
    out = subprocess.run([python, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - began
    if out.returncode != 0:
        raise RuntimeError(f"{python} {' '.join(args)} in {cwd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def folder_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


class Tools:
    """Where each tool's script lives and how it runs."""

    def __init__(self, base: str, flordb_python: str) -> None:
        self.ours, self.theirs = sys.executable, flordb_python
        self.florql_dir = os.path.join(base, "florql_project")
        self.flordb_dir = os.path.join(base, "flordb_project")
        self.flordb_scratch = os.path.join(base, "flordb_scratch")  # runs kept out of the measured store
        self.plain_dir = os.path.join(base, "plain")
        self.home = os.path.join(base, "florql_store")
        for d in (self.florql_dir, self.flordb_dir, self.flordb_scratch, self.plain_dir):
            os.makedirs(d)
        self.env_ours = dict(os.environ, FLORQL_HOME=self.home, FLORQL_QUIET="1")
        self.env_ours.pop("FLORQL_ARGS", None)
        # flordb's replay runs `python train.py`: its own venv's python must come first on PATH.
        self.env_theirs = dict(os.environ, PATH=os.path.dirname(flordb_python) + os.pathsep + os.environ["PATH"])
        for key in ("FLORQL_HOME", "FLORQL_QUIET", "VIRTUAL_ENV", "PYTHONPATH"):
            self.env_theirs.pop(key, None)
        for project in (self.flordb_dir, self.flordb_scratch):  # flordb works only inside a git repository
            self._git(project, "init", "-q")
            self._git(project, "config", "user.email", "bench@example.com")
            self._git(project, "config", "user.name", "bench")

    def _git(self, project: str, *args: str) -> None:
        subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)

    def write(self, variant: str, name: str, text: str, scratch: bool = False) -> None:
        flordb = self.flordb_scratch if scratch else self.flordb_dir
        folder = {"florql": self.florql_dir, "flordb": flordb, "plain": self.plain_dir}[variant]
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
        if variant == "flordb":
            self._git(flordb, "add", "-A")
            self._git(flordb, "commit", "-qm", f"bench: {name}")

    def run(self, variant: str, args: list[str], stdin: str | None = None, scratch: bool = False) -> tuple[float, str]:
        """`scratch`: a run outside the stores measured (florql: another store; flordb: no commit)."""
        if variant == "flordb":
            return run(self.theirs, args, self.flordb_scratch if scratch else self.flordb_dir, self.env_theirs, stdin)
        folder = self.florql_dir if variant == "florql" else self.plain_dir
        env = dict(self.env_ours, FLORQL_HOME=self.home + "-scratch") if scratch else self.env_ours
        return run(self.ours, args, folder, env)


def log_cost(tools: Tools) -> dict[str, float]:
    costs: dict[str, list[float]] = {"florql": [], "flordb": []}
    for variant in costs:
        tools.write(variant, "log_cost.py", LOG_COST.format(**VARIANTS[variant]), scratch=True)
    for _ in range(3):
        for variant in costs:
            _, out = tools.run(variant, ["log_cost.py"], scratch=True)
            costs[variant].append(float(out.split("NS")[-1].split()[0]))
    return {variant: statistics.median(ns) for variant, ns in costs.items()}


def recording(tools: Tools, reps: int) -> dict[str, list[float]]:
    """Whole-process seconds of each variant, alternating; the recorded runs stay for hindsight."""
    for variant in VARIANTS:
        tools.write(variant, "train.py", script(variant))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for rep in range(reps):
        for variant in order if rep % 2 == 0 else order[::-1]:
            seconds, _ = tools.run(variant, ["train.py"])
            times[variant].append(seconds)
    return times


def truth(tools: Tools) -> dict[int, float]:
    tools.write("plain", "truth.py", script("plain", truth=True))
    _, out = tools.run("plain", ["truth.py"])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('["w_norm"')]
    return {epoch: value for _, epoch, value in rows}


def florql_hindsight(tools: Tools, epochs: list[int], run_id: int) -> tuple[float, dict[int, float]]:
    sql = f"SELECT epoch, w_norm FROM run_{run_id} WHERE epoch >= {epochs[0]} ORDER BY epoch"
    seconds, out = tools.run("florql", ["-m", "florql", "query", sql, "--format", "json"])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return seconds, {r["epoch"]: r["w_norm"] for r in rows}


def flordb_hindsight(tools: Tools, epochs: list[int]) -> tuple[float, dict[int, float]]:
    spec = ",".join(map(str, epochs))
    seconds, _ = tools.run("flordb", ["-m", "flordb", "replay", "--apply", "w_norm", "--iter", f"epoch={spec}"], "y\n")
    reader = (  # `python -c`: flordb records no run for it
        "import json, flordb as flor\n"
        "df = flor.dataframe('w_norm')\n"
        "df = df[df['w_norm'].notna()]\n"
        "print('ROWS', json.dumps([[int(e), float(v)] for e, v in zip(df['epoch'], df['w_norm'])]))\n"
    )
    _, out = tools.run("flordb", ["-c", reader])
    line = next(line for line in out.splitlines() if line.startswith("ROWS "))
    rows = json.loads(line[len("ROWS ") :])
    return seconds, {epoch: value for epoch, value in rows if epoch in epochs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flordb-python", default="/tmp/flordb_venv/bin/python")
    parser.add_argument("--reps", type=int, default=3, help="recorded runs of each tool (alternating)")
    parser.add_argument("--keep", action="store_true", help="keep the projects and stores (to look at)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of the training script")
    opts = parser.parse_args()
    globals()["EPOCHS"] = opts.epochs
    if not os.path.exists(opts.flordb_python):
        print(f"no flordb venv at {opts.flordb_python}; see this script's docstring", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="florql-vs-flordb-")
    tools = Tools(base, opts.flordb_python)
    print(f"workload: MLP 64-256-256-4, SGD, {EPOCHS} epochs x {SAMPLES // BATCH} steps, 1 torch thread; CPU")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    ns = log_cost(tools)
    times = recording(tools, opts.reps)
    med = {v: statistics.median(t) for v, t in times.items()}
    florql_bytes = folder_bytes(tools.home)
    flordb_bytes = folder_bytes(os.path.join(tools.flordb_dir, ".flor"))
    git_bytes = folder_bytes(os.path.join(tools.flordb_dir, ".git"))
    expected = truth(tools)

    # The newest recorded run of each tool is the one asked about: add the hindsight statement.
    run_id = opts.reps
    tools.write("florql", "train.py", script("florql", hindsight=True))
    tools.write("flordb", "train.py", script("flordb", hindsight=True))
    last = list(range(EPOCHS - max(1, EPOCHS // 10), EPOCHS))
    every = list(range(EPOCHS))
    answers = {}
    for label, epochs in (("last 10 %", last), ("all epochs", every)):
        answers[("florql", label)] = florql_hindsight(tools, epochs, run_id)
        answers[("flordb", label)] = flordb_hindsight(tools, epochs)

    print(f"\n{'':46}{'florql':>14}{'flordb 4.0.1':>16}")
    print(f"{'log(name, float), ns per call (median)':46}{ns['florql']:14,.0f}{ns['flordb']:16,.0f}")
    print(f"{'whole process without logging (median)':46}{med['plain']:13.2f}s{med['plain']:15.2f}s")
    print(f"{'whole process recording (median)':46}{med['florql']:13.2f}s{med['flordb']:15.2f}s")
    print(
        f"{'recording overhead':46}{100 * (med['florql'] / med['plain'] - 1):13.1f}%"
        f"{100 * (med['flordb'] / med['plain'] - 1):15.1f}%"
    )
    for label in ("last 10 %", "all epochs"):
        row = []
        for tool in ("florql", "flordb"):
            seconds, got = answers[(tool, label)]
            wanted = last if label == "last 10 %" else every
            exact = [got.get(e) for e in wanted] == [expected[e] for e in wanted]
            row.append(f"{seconds:7.2f}s ({seconds / med['plain']:.2f}x) {'=' if exact else '≠'}")
        print(f"{'hindsight w_norm, ' + label + ' (x training)':46}{row[0]:>14}{row[1]:>16}")
    print(f"{'store bytes after ' + str(opts.reps) + ' runs':46}{florql_bytes:14,}{flordb_bytes:16,}")
    print(f"{'  flordb: its git repository (auto-commits)':46}{'':14}{git_bytes:16,}")
    print("= : bit-exact against a run that computed w_norm while training; ≠ : differs or missing")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; files in {base}")
    if not opts.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
