"""Whole-process overhead of recording (logging + adaptive checkpoints) on a training script.

The same script runs with and without florql, each repetition a fresh process (every florql run
is a real run: own run id, manifest, code version, segments, checkpoints), alternating ABAB so
machine noise hits both alike. The time that counts is the whole process, launch to exit, as a
user sees it: importing florql, starting the run, the loop, and what florql does at exit (the
last flush, the last persist). Reported: medians of each, their ratio, the spread, and where
florql's extra time went (start-up, loop, exit).

    python benchmarks/bench_overhead.py                        # both workloads, CPU
    python benchmarks/bench_overhead.py --workload long --reps 5
    python benchmarks/bench_overhead.py --device cuda          # a CUDA loop (needs a GPU)
    python benchmarks/bench_overhead.py --workload long --side-by-side --epochs 3 --reps 6
    python benchmarks/bench_overhead.py --workload long --side-by-side --steady-allocator --epochs 8 --reps 4
    python benchmarks/bench_overhead.py --workload long --side-by-side --steady-allocator --budget 0.000001  # no checkpoints
    python benchmarks/bench_overhead.py --workload long --side-by-side --steady-allocator --control  # the noise floor
    python benchmarks/bench_overhead.py --workload short --side-by-side --steady-allocator --epochs 200 --reps 16 --reference 30

`--side-by-side` starts each pair at the same moment, each process pinned to a core of its own
(swapped every repetition) with one torch thread: what the shared machine does to one, it does to
the other, so the paired ratios no longer carry the ±5–10 % drift between runs minutes apart. It is
the harsher case for florql: its persist and writer threads share the training's only core.

Even so, each process has a speed of its own: two plain processes side by side differ by up to
±4 %, the same in every epoch of the pair (where its memory happens to lie, physically and in the
address space), so one pair says little and four say ±1 %. The report gives the geometric mean of
the paired ratios with its 95 % confidence interval; `--control` runs the plain script on both
sides, to show what the harness itself reads when there is nothing to find.

The report also splits the training thread's loop time into running, waiting for its core (to
florql's threads, to other processes) and blocked (e.g. on the GIL), from `/proc`'s `schedstat`:
where florql's extra time went, beyond what its accounting charges.

`--reference N` has each process time N plain epochs before its loop (the first third uncounted)
and also reports the loop in those units, which takes out the speed a process draws at start; the
whole-process figures then include those epochs on both sides.

`--steady-allocator` runs both processes with glibc's mmap and trim thresholds fixed high
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`). With glibc's default, dynamic thresholds, the
long workload's tensors of 12–38 MB are mapped afresh and faulted in page by page on most steps:
1.6–2.0 M page faults per epoch, ~28 % of its CPU, and how many varies by ±15 % from one epoch to
the next in the same plain process (importing twenty standard-library modules shifts it too). That
noise is the training's own, hides florql's cost, and is gone with fixed thresholds: the same
epochs then take ~6.5 s instead of ~9 s, with no page faults after the first.

Workloads (CPU sizes; about 15 s and 60 s on a 2-core machine):
- `short`: an MLP 64-256-256-4 (0.08 M parameters), loss logged every step;
- `long`:  an MLP 1024-3072-3072-3072-4 (25 M parameters: 100 MB of weights, 300 MB with Adam's
  state), so each checkpoint is large and its persist competes with training for the cores.
Runs go to a temporary store, not yours.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LAUNCHED = time.time()  # in a child: when its interpreter reached this line (before torch)

WORKLOADS = {  # name: (layer widths, samples, batch, epochs) on CPU
    "short": ((64, 256, 256, 4), 8192, 128, 100),
    "long": ((1024, 3072, 3072, 3072, 4), 4096, 128, 6),
}
CUDA_SCALE = 8  # on a GPU the same shapes run too fast to matter: more epochs


def build(widths, device):
    from torch import nn

    layers: list = []
    for n_in, n_out in itertools.pairwise(widths[:-1]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU(), nn.Dropout(0.1)]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers).to(device)


def train(workload: str, device: str, use_florql: bool, threads: int) -> dict:
    """One training script's life; returns its phase times (wall clock, `time.time()`)."""
    phases = {"launched": LAUNCHED}
    if use_florql:
        import florql  # the script's own `import florql` is part of the overhead

        phases["florql_imported"] = time.time()
    import torch

    if threads:
        torch.set_num_threads(threads)
    widths, samples, batch, epochs = WORKLOADS[workload]
    epochs *= CUDA_SCALE if device == "cuda" else 1
    torch.manual_seed(0)
    features = widths[0]
    x = torch.randn(samples, features, device=device)
    y = (x[:, : features // 2].sum(dim=1) > 0).long() + 2 * (x[:, features // 2 :].sum(dim=1) > 0).long()
    net = build(widths, device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 4), gamma=0.5)
    loss_fn = torch.nn.CrossEntropyLoss()
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
            acc = (net(x[:2048]).argmax(dim=1) == y[:2048]).float().mean().item()
        log("val_acc", acc)

    reference = int(os.environ.get("BENCH_REFERENCE", "0"))
    if reference:  # this process's own speed on plain epochs (the first third warm up, uncounted)
        times = []
        for _ in range(reference):
            began = time.perf_counter()
            epoch_body(lambda name, value: None, lambda it: it)
            sync()
            times.append(time.perf_counter() - began)
        phases["reference_epoch"] = statistics.median(times[reference // 3 :])
    sync()
    phases["loop_started"] = time.time()
    cpu_began, main_cpu_began = time.process_time(), time.thread_time()
    sched_began = training_thread_schedule()
    if use_florql:
        epochs = florql.arg("epochs", epochs)  # the run starts here: id, manifest, code version
        budget = float(os.environ["BENCH_BUDGET"]) if os.environ.get("BENCH_BUDGET") else None  # None: florql's default
        with florql.checkpointing(budget=budget, model=net, optimizer=opt, scheduler=sched):
            for _ in florql.loop("epoch", range(epochs)):
                epoch_body(florql.log, lambda it: florql.loop("step", it))
    else:
        for _ in range(epochs):
            epoch_body(lambda name, value: None, lambda it: it)
    sync()
    phases["loop_ended"] = time.time()
    phases["other_threads_cpu"] = (time.process_time() - cpu_began) - (time.thread_time() - main_cpu_began)
    phases["training_thread"] = [b - a for a, b in zip(sched_began, training_thread_schedule())]
    if use_florql:
        policy = florql._session.policy
        phases.update(
            checkpoints=policy.taken,
            considered=policy.considered,
            overhead=policy.overhead,
            run_id=florql.run_id(),
        )
    return phases


def training_thread_schedule() -> list[float]:
    """The calling thread's seconds on a core and waiting for one (`/proc/.../schedstat`); [] where
    the kernel does not say. With the loop's wall time they split the training thread's time into
    running, waiting for its core (other threads, other processes) and blocked (e.g. on the GIL)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return [int(v) / 1e9 for v in f.read().split()[:2]]
    except OSError:
        return []


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


def one(workload: str, device: str, use_florql: bool, home: str, threads: int) -> dict:
    """One fresh process; its phases plus the whole process's wall time as the parent saw it."""
    return together([(workload, device, use_florql, home, threads, None)])[0]


CONTROL = False  # `--control`: the plain script on both sides
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
CHILD_ENV: dict[str, str] = {}  # set for every benchmark process (`--steady-allocator`)


def together(runs: list[tuple[str, str, bool, str, int, int | None]]) -> list[dict]:
    """Fresh processes started at once, each (workload, device, florql?, store, threads, the CPU it
    is pinned to or None); each one's phases plus its whole-process wall and CPU time."""
    results: list[dict] = [{} for _ in runs]

    def run(k: int, workload: str, device: str, use_florql: bool, home: str, threads: int, cpu: int | None) -> None:
        env = dict(os.environ, FLORQL_HOME=home, FLORQL_QUIET="1", **CHILD_ENV)
        env.pop("FLORQL_ARGS", None)
        variant = "florql" if use_florql else "plain"
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--workload", workload]
        cmd += ["--device", device, "--threads", str(threads), "--epochs", str(WORKLOADS[workload][3])]
        with tempfile.TemporaryFile("w+") as out:
            began = time.time()
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.DEVNULL,
                text=True,
                preexec_fn=None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu})),
            )
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, not its sibling's
            ended = time.time()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise subprocess.CalledProcessError(proc.returncode, cmd)
            out.seek(0)
            phases = json.loads(out.read().strip().splitlines()[-1])
        phases.update(began=began, ended=ended, process_cpu=usage.ru_utime + usage.ru_stime)
        results[k] = phases

    threads_ = [threading.Thread(target=run, args=(k, *r)) for k, r in enumerate(runs)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    if any(not r for r in results):
        raise SystemExit("a benchmark process failed")
    return results


def durations(p: dict) -> dict[str, float]:
    """Whole process and its parts, in seconds."""
    return {
        "total": p["ended"] - p["began"],
        "loop": p["loop_ended"] - p["loop_started"],
        "before": p["loop_started"] - p["began"],  # interpreter, imports, data and model set-up
        "exit": p["ended"] - p["loop_ended"],  # atexit: florql's last flush, persist, manifest
        "cpu": p["process_cpu"],  # user + system CPU of every thread: what florql took from other work
    }


T_975 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13]  # by df


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The geometric mean of paired ratios and its 95 % confidence interval (Student's t on the logs)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.nan, math.exp(mean), math.nan
    df = len(logs) - 1
    half = (T_975[df - 1] if df <= len(T_975) else 2.0) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean - half), math.exp(mean), math.exp(mean + half)


def thread_split(durs: list[dict], phases: list[dict]) -> tuple[float, float, float]:
    """Medians of the training thread's seconds running, waiting for its core, and blocked."""
    ran = statistics.median(p["training_thread"][0] for p in phases)
    waited = statistics.median(p["training_thread"][1] for p in phases)
    blocked = statistics.median(d["loop"] - sum(p["training_thread"]) for d, p in zip(durs, phases))
    return ran, waited, blocked


def bench(workload: str, device: str, reps: int, threads: int, side_by_side: bool) -> None:
    home = tempfile.mkdtemp(prefix="florql-bench-")
    try:  # every florql run leaves its checkpoints there: gigabytes for the long workload
        one(workload, device, False, home, threads)  # warm the page cache (and CUDA's kernel cache)
        plain: list[dict] = []
        recorded: list[dict] = []
        for rep in range(reps):
            if side_by_side:  # at once, one core each (swapped every repetition): the machine's noise hits both
                cores = (0, 1) if rep % 2 == 0 else (1, 0)
                runs = [(workload, device, use, home, threads, core) for use, core in zip((False, not CONTROL), cores)]
                a, b = together(runs)
                plain.append(a)
                recorded.append(b)
                continue
            for second in [False, True] if rep % 2 == 0 else [True, False]:  # ABBA...: neither always first
                (recorded if second else plain).append(one(workload, device, second and not CONTROL, home, threads))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    a = [durations(p) for p in plain]
    b = [durations(p) for p in recorded]
    widths, samples, batch, epochs = WORKLOADS[workload]
    params = sum(i * o + o for i, o in itertools.pairwise(widths))
    epochs *= CUDA_SCALE if device == "cuda" else 1
    print(
        f"\n== {workload}: MLP {'-'.join(map(str, widths))} ({params / 1e6:.1f} M parameters), Adam + StepLR, "
        f"{epochs} epochs x {samples // batch} steps on {device}, torch threads {threads or 'default'}; "
        + (
            f"{reps} repetitions, each pair at once on a core each"
            if side_by_side
            else f"{reps} alternating repetitions of each"
        )
    )
    med = {part: (statistics.median(d[part] for d in a), statistics.median(d[part] for d in b)) for part in a[0]}
    print(f"{'':28}{'without':>10}{'plain again' if CONTROL else 'with florql':>13}{'extra':>9}")
    for part, label in [
        ("total", "whole process (launch→exit)"),
        ("before", "  launch → loop start"),
        ("loop", "  the loop"),
        ("exit", "  loop end → exit"),
        ("cpu", "CPU time (user + system)"),
    ]:
        without, with_ = med[part]
        print(f"{label:28}{without:9.2f}s{with_:12.2f}s{with_ - without:+8.2f}s")
    totals_a = sorted(d["total"] for d in a)
    totals_b = sorted(d["total"] for d in b)
    paired = sorted(y["total"] / x["total"] for x, y in zip(a, b))
    cpu = [statistics.median(p["other_threads_cpu"] for p in group) for group in (plain, recorded)]
    print(f"CPU of threads other than the training thread during the loop: {cpu[0]:.2f} s, {cpu[1]:.2f} s")
    if all(len(p.get("training_thread", [])) == 2 for p in plain + recorded):
        split = [thread_split(a, plain), thread_split(b, recorded)]
        print(
            "training thread during the loop (ran / waited for its core / blocked): "
            + ", ".join(f"{x:.2f} / {y:.2f} / {z:.2f} s" for x, y, z in split)
        )
    print(f"whole-process ratio of medians: {med['total'][1] / med['total'][0]:.3f}")
    print(f"CPU-time ratio of medians: {med['cpu'][1] / med['cpu'][0]:.3f}")
    how = "at the same time" if side_by_side else "back to back"
    print(f"paired ratios (each pair run {how}): {', '.join(f'{r:.3f}' for r in paired)}")
    if side_by_side:  # one core may be quicker than the other: swapping cores every repetition cancels it
        ratios = [y["total"] / x["total"] for x, y in zip(a, b)]
        by_core = {core: [r for k, r in enumerate(ratios) if k % 2 == core] for core in (0, 1)}
        print(
            f"  by the core {'the second process' if CONTROL else 'florql'} ran on: "
            + "; ".join(f"core {1 - c}: {', '.join(f'{r:.3f}' for r in rs)}" for c, rs in by_core.items() if rs)
        )
        print(f"  geometric mean of the paired ratios (cores balanced): {statistics.geometric_mean(ratios):.3f}")
    low, mean, high = ratio_interval([y["total"] / x["total"] for x, y in zip(a, b)])
    print(f"geometric mean of the paired ratios: {mean:.4f}, 95 % confidence interval {low:.4f}–{high:.4f}")
    print(
        f"spread of totals: without {totals_a[0]:.2f}–{totals_a[-1]:.2f} s, with {totals_b[0]:.2f}–{totals_b[-1]:.2f} s"
    )
    if all("reference_epoch" in p for p in plain + recorded):
        # Each process's loop in units of its own plain epochs: what it does beyond the plain script,
        # without the ±4 % speed a process draws at start (where its memory happens to lie).
        normalized = [
            (y["loop"] / q["reference_epoch"]) / (x["loop"] / p["reference_epoch"])
            for x, y, p, q in zip(a, b, plain, recorded)
        ]
        low, mean, high = ratio_interval(normalized)
        print(
            f"the loop in each process's own plain epochs, paired: {mean:.4f}, 95 % confidence interval "
            f"{low:.4f}–{high:.4f}"
        )
    if CONTROL:
        return
    print(
        f"checkpoints per run: {statistics.median(p['checkpoints'] for p in recorded):.0f} of "
        f"{statistics.median(p['considered'] for p in recorded):.0f} opportunities; florql's own accounting "
        f"(stall + persist CPU + interference): {100 * statistics.median(p['overhead'] for p in recorded):.2f} % "
        "of training time"
    )


def compile_florql() -> None:
    """Byte-compile florql's modules, as installing a package does: where PYTHONDONTWRITEBYTECODE
    is set (as on this project's machines) and the sources are newer than their bytecode, every
    florql process would otherwise compile them at import (~15-30 ms), a cost no install pays."""
    import compileall

    import florql
    import florql.replay
    import florql.storage

    for package in (florql, florql.storage, florql.replay):
        compileall.compile_dir(os.path.dirname(package.__file__), quiet=1, maxlevels=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each variant")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--epochs", type=int, default=0, help="override the workload's epochs (a loaded machine)")
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="run each pair at once, pinned to a core each, 1 torch thread (needs 2 cores): noise hits both",
    )
    parser.add_argument(
        "--steady-allocator",
        action="store_true",
        help="fix glibc's mmap/trim thresholds in both processes: no page-fault noise from the training itself",
    )
    parser.add_argument("--budget", type=float, default=0.0, help="checkpoint overhead budget (default: florql's)")
    parser.add_argument(
        "--control",
        action="store_true",
        help="the plain script on both sides: what the harness reads with nothing to find",
    )
    parser.add_argument(
        "--reference",
        type=int,
        default=0,
        help="time N plain epochs in each process before its loop, and report the loop in those units",
    )
    parser.add_argument("--child", choices=["plain", "florql"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.epochs:
        for name, (widths, samples, batch, _) in list(WORKLOADS.items()):
            WORKLOADS[name] = (widths, samples, batch, opts.epochs)
    if opts.child:
        print(json.dumps(train(opts.workload, opts.device, opts.child == "florql", opts.threads)))
        return 0
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here; run with --device cpu", file=sys.stderr)
            return 2
    if opts.control:
        global CONTROL
        CONTROL = True
        print("control: the plain script on both sides")
    if opts.budget:
        CHILD_ENV["BENCH_BUDGET"] = str(opts.budget)
        print(f"checkpoint budget {opts.budget:g}")
    if opts.reference:
        CHILD_ENV["BENCH_REFERENCE"] = str(opts.reference)
    if opts.steady_allocator:
        CHILD_ENV.update(STEADY_ALLOCATOR)
        print(f"both processes with {' '.join(f'{k}={v}' for k, v in STEADY_ALLOCATOR.items())}")
    print(f"machine: {machine(opts.device)}; load average {os.getloadavg()[0]:.1f} at start")
    compile_florql()
    if opts.side_by_side:
        if len(os.sched_getaffinity(0)) < 2:
            print("--side-by-side needs 2 cores", file=sys.stderr)
            return 2
        opts.threads = 1
    for workload in WORKLOADS if opts.workload == "both" else [opts.workload]:
        bench(workload, opts.device, opts.reps, opts.threads, opts.side_by_side)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
