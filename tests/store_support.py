"""Helpers for tests: a real store in a temporary folder, training scripts run as real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from storage.database import open_store, sync
from storage.layout import StoreLocation, locate_store
from storage.runfiles import RunFiles

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
            [sys.executable, str(script), *args], cwd=self.workdir, env=env or self.env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def run(self, source: str | Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 60) -> "Finished":
        """Run a script (source text or a path) to completion; returns its output and run id."""
        script = source if isinstance(source, Path) else self.write_script(source)
        before = set(self.run_ids())
        proc = subprocess.run(
            [sys.executable, str(script), *args], cwd=self.workdir, env=env or self.env(),
            capture_output=True, text=True, timeout=timeout,
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


