"""End-to-end overhead of recording (logging + adaptive checkpoints) on a training loop.

The same loop runs with and without florql, each repetition in a fresh process so every florql
run is a real run (own run id, manifest, segments, checkpoints), interleaved so machine noise hits
both alike. Reported: median loop time of each, their ratio, and the median of paired ratios.

    python benchmarks/bench_overhead.py                 # CPU
    python benchmarks/bench_overhead.py --device cuda   # a CUDA training loop (needs a GPU)

The florql side logs the loss every step (the tensor itself on CUDA: no synchronisation) and the
validation accuracy every epoch, under `florql.checkpointing(model=…, optimizer=…, scheduler=…)`.
Runs go to a temporary store, not yours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {  # device: (features, hidden, samples, batch, epochs)
    "cpu": (64, 256, 8192, 128, 12),
    "cuda": (512, 2048, 131072, 512, 4),
}


def train(device: str, use_florql: bool, threads: int) -> dict:
    """One training run; returns the loop's wall time (and florql's own accounting)."""
    import torch
    from torch import nn

    if threads:
        torch.set_num_threads(threads)

    features, hidden, samples, batch, epochs = SIZES[device]
    torch.manual_seed(0)
    x = torch.randn(samples, features, device=device)
    y = (x[:, : features // 2].sum(dim=1) > 0).long() + 2 * (x[:, features // 2 :].sum(dim=1) > 0).long()
    net = nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, 4),
    ).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def epoch_body(log, steps) -> None:
        net.train()
        order = torch.randperm(samples, device=device)
        for start in steps(range(0, samples, batch)):
            idx = order[start : start + batch]
            loss = loss_fn(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log("loss", loss if device == "cuda" else loss.item())
        sched.step()
        net.eval()
        with torch.no_grad():
            acc = (net(x[:4096]).argmax(dim=1) == y[:4096]).float().mean().item()
        log("val_acc", acc)

    startup = 0.0
    if use_florql:
        import florql  # importing is not recording: keep it out of the timed loop

        began = time.perf_counter()
        florql.arg("bench", device)  # the run starts: id, manifest, code version (a one-off cost)
        startup = time.perf_counter() - began
    sync()
    started = time.perf_counter()
    if use_florql:
        with florql.checkpointing(model=net, optimizer=opt, scheduler=sched):
            for _ in florql.loop("epoch", range(epochs)):
                epoch_body(florql.log, lambda it: florql.loop("step", it))
        sync()
        seconds = time.perf_counter() - started
        policy = florql._session.policy
        return {
            "seconds": seconds,
            "startup": startup,
            "checkpoints": policy.taken,
            "considered": policy.considered,
            "overhead": policy.overhead,
        }
    for _ in range(epochs):
        epoch_body(lambda name, value: None, lambda it: it)
    sync()
    return {"seconds": time.perf_counter() - started}


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    text = f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return text


def one(device: str, use_florql: bool, home: str, threads: int) -> dict:
    env = dict(os.environ, FLORQL_HOME=home)
    env.pop("FLORQL_ARGS", None)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "florql" if use_florql else "plain",
        "--device",
        device,
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--reps", type=int, default=7, help="repetitions of each variant")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--child", choices=["plain", "florql"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(train(opts.device, opts.child == "florql", opts.threads)))
        return 0
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here; run with --device cpu", file=sys.stderr)
            return 2
    home = tempfile.mkdtemp(prefix="florql-bench-")
    plain, recorded, ratios = [], [], []
    one(opts.device, False, home, opts.threads)  # warm the page cache and CUDA's kernel cache
    for rep in range(opts.reps):
        pair = [False, True] if rep % 2 == 0 else [True, False]
        result = {use: one(opts.device, use, home, opts.threads) for use in pair}
        plain.append(result[False]["seconds"])
        recorded.append(result[True])
        ratios.append(result[True]["seconds"] / result[False]["seconds"])
    florql_s = [r["seconds"] for r in recorded]
    print(f"machine: {machine(opts.device)}")
    features, hidden, samples, batch, epochs = SIZES[opts.device]
    print(
        f"loop: MLP {features}-{hidden}-{hidden}-4 with dropout, Adam + StepLR, {epochs} epochs x "
        f"{samples // batch} steps on {opts.device}, torch threads {opts.threads or 'default'}; "
        f"{opts.reps} interleaved repetitions"
    )
    print(f"without florql: median {statistics.median(plain):.3f} s")
    print(f"with florql:    median {statistics.median(florql_s):.3f} s  (logging every step + adaptive checkpoints)")
    print(
        f"ratio of medians: {statistics.median(florql_s) / statistics.median(plain):.3f}; "
        f"median paired ratio: {statistics.median(ratios):.3f}"
    )
    print(
        f"run start-up (once per run, not in the loop times above): median "
        f"{statistics.median(r['startup'] for r in recorded):.3f} s"
    )
    print(
        f"checkpoints per run: {statistics.median(r['checkpoints'] for r in recorded):.0f} of "
        f"{statistics.median(r['considered'] for r in recorded):.0f} opportunities; florql's own stall "
        f"accounting: {100 * statistics.median(r['overhead'] for r in recorded):.2f} % of training time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
