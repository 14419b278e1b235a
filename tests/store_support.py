"""Helpers for tests: a real store in a temporary folder, training scripts run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florql.storage.database import open_store, sync
from florql.storage.layout import StoreLocation, locate_store
from florql.storage.runfiles import RunFiles

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# A small seeded training script (3 epochs of 4 steps, checkpointed) that logs only `loss`, ready to
# write to a file. Tests that ask in hindsight add GRAD_NORM after LOGGED (`with_grad_norm`) once it ran.
TRAIN = textwrap.dedent("""
    import torch
    import florql

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with florql.checkpointing(model=net, optimizer=opt):
        for epoch in florql.loop("epoch", range(3)):
            for step in florql.loop("step", range(4)):
                opt.zero_grad()
                loss = ((net(x[step * 8:(step + 1) * 8]) - y[step * 8:(step + 1) * 8]) ** 2).mean()
                loss.backward()
                opt.step()
                florql.log("loss", loss.item())
""").lstrip("\n")
LOGGED = '            florql.log("loss", loss.item())\n'  # as indented in TRAIN
GRAD_NORM = '            florql.log("grad_norm", net.weight.grad.norm().item())\n'
GRAD_NORM_QUERY = "SELECT epoch, step, grad_norm FROM run_1 ORDER BY epoch, step"


def with_grad_norm(source: str) -> str:
    """`source` (TRAIN, or a variant of it) with a hindsight statement: `grad_norm` after every `loss`."""
    assert LOGGED in source
    return source.replace(LOGGED, LOGGED + GRAD_NORM)


def record_then_add_grad_norm(work: Path, env: dict[str, str], source: str = TRAIN, timeout: float = 120) -> Path:
    """Record `source` as work/train.py (run 1 of the store `env` names), then make the current code log
    `grad_norm` too, so GRAD_NORM_QUERY has to replay. Returns the script."""
    work.mkdir(exist_ok=True)
    script = work / "train.py"
    script.write_text(source)
    subprocess.run([sys.executable, str(script)], cwd=work, env=env, check=True, capture_output=True, timeout=timeout)
    script.write_text(with_grad_norm(source))
    return script


@dataclass
class Store:
    """A store folder plus helpers to run scripts into it and query it."""

    home: Path
    workdir: Path

    @property
    def location(self) -> StoreLocation:
        return locate_store(self.home)

    @property
    def files(self) -> RunFiles:
        return self.location.run_files()

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FLORQL_ARGS", "FLORQL_RUNS")}
        env.update(FLORQL_HOME=str(self.home), **extra)
        return env

    def write_script(self, source: str, name: str = "train.py") -> Path:
        path = self.workdir / name
        path.write_text(textwrap.dedent(source).lstrip("\n"))
        return path

    def popen(self, script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=self.workdir,
            env=env or self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(
        self, source: str | Path, *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 60
    ) -> Finished:
        """Run a script (source text or a path) to completion; returns its output and run id."""
        script = source if isinstance(source, Path) else self.write_script(source)
        before = set(self.run_ids())
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            cwd=self.workdir,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        new = sorted(set(self.run_ids()) - before)
        return Finished(proc, new[-1] if new else None)

    def run_ids(self) -> list[int]:
        return sorted(int(d) for d in self.files.list_dirs("runs") if d.isdigit())

    def sql(self, query: str, params: list[Any] | None = None) -> list[tuple]:
        """Ingest the run files, then answer `query` (the query side's one short operation)."""
        with open_store(self.location.db_path) as conn:
            sync(conn, self.files)
            return conn.execute(query, params or []).fetchall()


@dataclass
class Finished:
    proc: subprocess.CompletedProcess
    run_id: int | None


def write_synthetic_run(
    files: RunFiles, run_id: int, epochs: int, steps: int, status: str = "finished", seed: int = 0
) -> dict[str, list[float]]:
    """A run written as a trainer writes it, without training: a segment per epoch of `loss` per
    step and `acc` per epoch. `status` 'running' names this process as the trainer (alive).
    Returns the values logged, by name, in logging order."""
    import random
    import socket

    from florql.storage import layout, segment_codec
    from florql.storage.manifest import Env, Manifest

    rng = random.Random(seed * 100_003 + run_id)
    now = time.time()
    env = Env(hostname=socket.gethostname(), pid=os.getpid())
    manifest = Manifest(run_id=run_id, status=status, started_at=now, heartbeat_at=now, outer_loop="epoch", env=env)
    manifest.update(outer_completed=epochs, outer_planned=epochs, iteration_s=[1.0] * epochs)
    logged: dict[str, list[float]] = {"loss": [], "acc": []}
    seq = 0
    for epoch in range(epochs):
        records: list[tuple[str, Any, tuple]] = []
        for step in range(steps):
            records.append(("loss", rng.random(), ("epoch/step", epoch, step)))
        records.append(("acc", rng.random(), ("epoch", epoch)))
        for name, value, _ in records:
            logged[name].append(value)
        segment_codec.write_segment(files, layout.segment_path(run_id, layout.MAIN_WRITER, epoch), seq, records, {})
        seq += len(records)
    files.put(layout.manifest_path(run_id), manifest.to_json().encode())
    return logged


def age_folders(root: Path, seconds: float = 60) -> None:
    """Date every folder under `root` (and `root`) `seconds` back, as if written a while ago."""
    then = time.time() - seconds
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, (then, then))
