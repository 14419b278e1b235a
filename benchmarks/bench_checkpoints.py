"""Checkpoint bytes and snapshot stall: this tree against a baseline git ref (main), side by side.

The workload: a 15 MiB module-level NumPy data set that never changes, a small MLP trained with
SGD and momentum, 20 epochs of 10 steps, a checkpoint at every opportunity (20 checkpoints). Each
epoch ends with 0.5 s of sleep, so that a snapshot never waits for the previous persist and the
stall is the snapshot's own. Each round records it once with the baseline (exported with `git archive`, laid out as the installed
package) and once with this tree, alternating; reported: the bytes of all checkpoint files on disk
(payloads, records and chunks), the median snapshot stall and persist time per checkpoint. Run:
python benchmarks/bench_checkpoints.py [--baseline main] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKLOAD = textwrap.dedent("""
    import time
    import numpy as np
    import torch
    import florql

    torch.manual_seed(0)
    dataset = np.random.default_rng(0).standard_normal((15 * 1024, 256)).astype(np.float32)  # 15 MiB
    labels = np.random.default_rng(1).integers(0, 10, len(dataset))
    net = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    with florql.checkpointing(model=net, optimizer=opt):
        for epoch in florql.loop("epoch", range(20)):
            for step in florql.loop("step", range(10)):
                at = (epoch * 10 + step) * 64 % len(dataset)
                x = torch.from_numpy(dataset[at : at + 64])
                y = torch.from_numpy(labels[at : at + 64])
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                florql.log("loss", loss.item())
            time.sleep(0.5)  # the rest of an epoch (evaluation, say): the persist ends before the next snapshot
""")


def export(ref: str, into: Path) -> Path:
    """`ref` of this repository laid out as the installed package (see pyproject's package-dir)."""
    tree = into / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = into / "site" / "florql"
    shutil.copytree(tree / "florql", package)
    for sub in ("storage", "replay", "examples"):
        shutil.copytree(tree / sub, package / sub)
    return into / "site"


def record(workdir: Path, pythonpath: str | None) -> dict[str, float]:
    """Record the workload into a fresh store; its checkpoint bytes and per-checkpoint times."""
    home = workdir / ".florql"
    shutil.rmtree(home, ignore_errors=True)
    (workdir / "train.py").write_text(WORKLOAD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLORQL_") and k != "PYTHONPATH"}
    env.update(FLORQL_HOME=str(home), FLORQL_CHECKPOINTS="every", FLORQL_QUIET="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    probe = "import florql, sys; print(florql.__file__)"
    used = subprocess.run(
        [sys.executable, "-c", probe], cwd=workdir, env=env, capture_output=True, text=True, check=True
    )
    assert (pythonpath or str(REPO)) in used.stdout, used.stdout  # the florql meant, not the other
    subprocess.run([sys.executable, "train.py"], cwd=workdir, env=env, check=True, timeout=600)
    run = home / "runs" / "1"
    records = [json.loads(p.read_text()) for p in sorted((run / "checkpoints").glob("*.json"))]
    stored = sum(
        p.stat().st_size for folder in ("checkpoints", "chunks") for p in (run / folder).rglob("*") if p.is_file()
    )
    return {
        "checkpoints": len(records),
        "bytes": stored,
        "stall_ms": 1000 * statistics.median(r["stall_s"] for r in records),
        "persist_ms": 1000 * statistics.median(r["persist_s"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="main", help="the git ref to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline_path = str(export(args.baseline, Path(tmp)))
        work = Path(tmp) / "work"
        work.mkdir()
        results: dict[str, list[dict[str, float]]] = {args.baseline: [], "this tree": []}
        for _ in range(args.rounds):
            results[args.baseline].append(record(work, baseline_path))
            results["this tree"].append(record(work, None))
    cores = os.cpu_count()
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores, no GPU; {args.rounds} rounds (medians)"
    )
    print(f"{'':>12}  {'checkpoints':>11}  {'bytes on disk':>13}  {'stall ms':>8}  {'persist ms':>10}")
    summary = {}
    for label, rounds in results.items():
        row = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        summary[label] = row
        print(
            f"{label:>12}  {row['checkpoints']:>11.0f}  {row['bytes']:>13,.0f}  {row['stall_ms']:>8.2f}"
            f"  {row['persist_ms']:>10.1f}"
        )
    before, after = summary[args.baseline], summary["this tree"]
    print(
        f"bytes: {before['bytes'] / after['bytes']:.1f}x fewer; stall: {after['stall_ms'] / before['stall_ms']:.2f}x;"
    )
    print(f"persist: {after['persist_ms'] / before['persist_ms']:.2f}x (this tree / {args.baseline})")


if __name__ == "__main__":
    main()
