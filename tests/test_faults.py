"""Fault injection: every case ends with the store consistent, every committed row present exactly
once, and the next query answering correctly.

- `kill -9` of a trainer during a checkpoint persist, of the query process during ingest, of a
  replay worker between writing its segments and committing them, of `florql serve` mid-stream;
- a disk that fills up during segment writes and during a checkpoint persist: a real tmpfs of a few
  MiB mounted by the test (CI runs as root; elsewhere these tests skip, and the ENOSPC handling is
  also covered without a mount in test_segment_writer.py);
- a truncated or bit-flipped segment and checkpoint: detected by checksum, reported with the file
  name, never answered from.
Kills land at a chosen point, not after a sleep: the victim announces the point on stdout (a hook
of the test, never of florql) or the test waits until the files show it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import florql
from florql.errors import CorruptCheckpoint, CorruptSegment, ReplayFailed
from florql.replay.executor import Executor
from florql.replay.jobs import JobResult, JobSpec
from florql.replay.launcher import worker_env
from florql.storage import layout, segments
from florql.storage.checkpoints import list_checkpoints, read_checkpoint
from florql.storage.database import rebuild
from florql.storage.runfiles import TMP_PREFIX
from store_support import GRAD_NORM_QUERY, Store, record_then_add_grad_norm


# ---- helpers --------------------------------------------------------------------------------------
class Watched:
    """A process whose output lines are collected as they come, so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._threads = [
            threading.Thread(target=self._read, args=(proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, "err"), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self.lines[name].append(line)

    def text(self, name: str = "err") -> str:
        return "".join(self.lines[name])

    def wait_for(self, pattern: str, name: str = "err", timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text(name))
            if found:
                return found
            if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                break
            time.sleep(0.01)
        raise AssertionError(f"no {pattern!r} in the {name} of the process:\n{self.text('out')}\n{self.text('err')}")

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return code


def wait_until(predicate: Callable[[], bool], timeout: float = 60, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def rows_exactly_once(store: Store, run_id: int, expected: int) -> None:
    """The run's logged rows: `expected` of them, seq 0..expected-1 each once (nothing lost, nothing twice)."""
    assert store.sql(
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM logs WHERE run_id = ? AND source = 'logged'",
        [run_id],
    ) == [(expected, expected, 0 if expected else None, expected - 1 if expected else None)]


def no_temporary_files(root: Path) -> None:
    left = [p for p in root.rglob(f"{TMP_PREFIX}*")]
    assert not left, left


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - max(1, len(data) // 5)])


CORRUPT = {"flip": flip_a_bit, "truncate": truncate}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs mounted for the test: a disk that really fills up (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root, as CI has): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk`; returns the file holding them (delete it to free the disk)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    return filler


# ---- kill -9 of a trainer during a checkpoint persist -------------------------------------------
KILL_DURING_PERSIST = """
import time, torch, florql
big = torch.nn.Linear(4096, 4096)  # 64 MiB of state: each persist takes a while
torch.nn.init.zeros_(big.weight)
with florql.checkpointing(budget=0.9, model=big):
    for epoch in florql.loop("epoch", range(100000)):
        florql.log("x", float(epoch))
        time.sleep(0.2)
        with torch.no_grad():
            big.weight.add_(1.0)
"""


def test_kill_9_of_a_trainer_during_a_checkpoint_persist(store):
    proc = store.popen(store.write_script(KILL_DURING_PERSIST))
    folder = store.home / "runs" / "1" / "checkpoints"
    chunks = store.home / "runs" / "1" / "chunks"  # the weight's bytes: the bulk of each persist

    def names() -> list[str]:
        return os.listdir(folder) if folder.exists() else []

    def writing() -> bool:
        return any(n.startswith(TMP_PREFIX) for n in names() + [p.name for p in chunks.rglob("*")])

    try:
        wait_until(lambda: any(n.endswith(".json") for n in names()), 60, "a first complete checkpoint")
        wait_until(writing, 60, "a persist in progress")
        kill_9(proc)
    finally:
        proc.kill()
    left = names()
    assert writing()  # the kill did land mid-write
    files = store.files
    records = list_checkpoints(files, 1)
    assert records
    listed = {r.name for r in records}
    for name in left:
        stem, ext = os.path.splitext(name)
        if ext == ".ckpt" and not os.path.exists(folder / f"{stem}.json"):
            assert stem not in listed
    assert not any(p.rsplit("/", 1)[1].startswith(TMP_PREFIX) for p in files.list(layout.checkpoints_dir(1)))
    for record in records:  # every chunk a record refers to is there, whole
        weight = read_checkpoint(files, record)["objects"]["model"]["weight"]
        assert torch.all(weight == record.outer_index + 1)  # the state at the end of that iteration
    assert store.sql("SELECT name FROM checkpoints WHERE run_id = 1 ORDER BY name") == sorted((n,) for n in listed)
    assert store.sql("SELECT status FROM runs") == [("killed",)]
    flushed = sum(segments.read_segment(files, p).num_rows for p in files.list(layout.segments_dir(1)))
    rows_exactly_once(store, 1, flushed)
    db = florql.connect(store.home, progress=False)
    assert db.sql("SELECT epoch, x FROM run_1 ORDER BY epoch").fetchall() == [(i, float(i)) for i in range(flushed)]


# ---- kill -9 of the query process during ingest -------------------------------------------------
MANY_SEGMENTS = """
import florql
for epoch in florql.loop("epoch", range(120)):
    for step in florql.loop("step", range(10)):
        florql.log("loss", float(epoch * 10 + step))
    florql.log("lr", 0.1 + epoch)
    florql._session.writer.flush()  # a segment per epoch
"""

# The query process, with a hook of the test that announces the chosen point and waits there to be killed.
INGEST = """
import sys, time
from florql.storage import database, segments
from florql.storage.layout import locate_store

def hold():
    print("at the point", flush=True)
    time.sleep(600)

if sys.argv[1] == "mid-transaction":  # 60 of the run's segments inserted, not committed
    read, calls = segments.read_segment, [0]
    def read_segment(files, path, *rest, **named):
        calls[0] += 1
        if calls[0] == 60:
            hold()
        return read(files, path, *rest, **named)
    segments.read_segment = read_segment
else:  # "before-views": the run's rows committed, the views not refreshed yet
    database.refresh_views = lambda *args: hold()
location = locate_store()
with database.open_store(location.db_path) as conn:
    database.sync(conn, location.run_files())
"""


@pytest.mark.parametrize("point", ["mid-transaction", "before-views"])
def test_kill_9_of_the_query_process_during_ingest(store, point):
    run = store.run(MANY_SEGMENTS)
    assert len(store.files.list(layout.segments_dir(run.run_id))) == 120
    proc = store.popen(store.write_script(INGEST, name="ingest.py"), point)
    try:
        assert proc.stdout.readline().strip() == "at the point", proc.stderr.read()
        kill_9(proc)
    finally:
        proc.kill()
    rows_exactly_once(store, run.run_id, 120 * 11)
    assert store.sql("SELECT count(*), count(DISTINCT path) FROM segments_ingested") == [(120, 120)]
    db = florql.connect(store.home, progress=False)
    assert db.sql("SELECT epoch, step, loss FROM run_1 ORDER BY ALL").fetchall() == [
        (e, s, float(e * 10 + s)) for e in range(120) for s in range(10)
    ]
    assert db.sql("SELECT run_id, max(lr) FROM metrics GROUP BY ALL").fetchall() == [(1, 119.1)]
    assert db.sql("SELECT run_id, status FROM runs").fetchall() == [(1, "finished")]


# ---- kill -9 of a replay worker between its segments and its commit ---------------------------
# The worker, with a hook of the test: it announces its commit and waits there to be killed.
WORKER_HELD_AT_COMMIT = """
import runpy, sys, time
from florql.storage.runfiles import LocalRunFiles

create = LocalRunFiles.create

def held(self, path, data):
    if path.endswith("COMMITTED.json"):
        print("segments written, committing", flush=True)
        time.sleep(600)
    return create(self, path, data)

LocalRunFiles.create = held
sys.argv = ["florql.replay.worker", sys.argv[1]]
runpy.run_module("florql.replay.worker", run_name="__main__")
"""


class KilledAtCommit(Executor):
    """Runs each job in a real worker process and kills it (SIGKILL) once its segments are written."""

    workers = 1

    def __init__(self) -> None:
        self.killed: list[JobSpec] = []

    def run(self, jobs, on_done=None):
        results = []
        for spec in jobs:
            spec.threads = spec.threads or 1
            with tempfile.TemporaryDirectory(prefix="florql-test-job-") as tmp:
                path = os.path.join(tmp, "spec.json")
                Path(path).write_text(spec.to_json())
                proc = subprocess.Popen(
                    [sys.executable, "-c", WORKER_HELD_AT_COMMIT, path],
                    env=worker_env(spec),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                try:
                    assert "committing" in proc.stdout.readline(), proc.stderr.read()
                    kill_9(proc)
                finally:
                    proc.kill()
            self.killed.append(spec)
            results.append(JobResult(spec.job_id, ok=False, error="killed (SIGKILL) before its commit"))
        return results


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Run 1: store_support.TRAIN, logging `loss` only (the current code logs `grad_norm` too);
    run 2 (TRUTH): the same seeded training with the current code. Recorded once for the module."""
    base = tmp_path_factory.mktemp("recorded")
    origin = Store(base / "store", base / "work")
    script = record_then_add_grad_norm(origin.workdir, origin.env())
    assert origin.run(script).run_id == TRUTH
    return origin


@pytest.fixture
def replayable(recorded: Store, tmp_path: Path) -> Store:
    """A copy of `recorded`'s store for one test (the current code stays where it was recorded)."""
    shutil.copytree(recorded.home, tmp_path / "store")
    return Store(tmp_path / "store", recorded.workdir)


TRUTH = 2


def test_kill_9_of_a_replay_worker_between_its_segments_and_its_commit(replayable):
    store, truth = replayable, TRUTH
    killer = KilledAtCommit()
    with pytest.raises(ReplayFailed, match="killed"):
        florql.connect(store.home, progress=False, executor=killer).sql(GRAD_NORM_QUERY)
    assert killer.killed
    for spec in killer.killed:
        folder = store.home / layout.replay_dir(spec.run_id, spec.job_id)
        assert list((folder / "segments").glob("*.seg")), "the kill landed before the segments were written"
        assert not (folder / layout.REPLAY_COMMITTED).exists()
    assert store.sql("SELECT count(*) FROM logs WHERE source = 'replayed'") == [(0,)]
    assert store.sql("SELECT count(*) FROM replay_jobs") == [(0,)]

    db = florql.connect(store.home, workers=1, progress=False)
    answer = db.sql(GRAD_NORM_QUERY).fetchall()
    assert answer == db.sql(GRAD_NORM_QUERY.replace("run_1", f"run_{truth}")).fetchall()
    assert len(answer) == 12
    assert store.sql(
        "SELECT count(*), count(DISTINCT (epoch, step)) FROM logs WHERE run_id = 1 AND name = 'grad_norm'"
    ) == [(12, 12)]


# ---- kill -9 of florql serve mid-stream -----------------------------------------------------------
ROWS = """
import florql
for epoch in florql.loop("epoch", range(50)):
    for step in florql.loop("step", range(400)):
        florql.log("loss", float(epoch * 400 + step))
"""
STREAM = "SELECT epoch, step, loss FROM run_1 ORDER BY epoch, step"


def _serve(store: Store) -> tuple[Watched, int]:
    server = Watched(
        subprocess.Popen(
            [sys.executable, "-m", "florql.cli", "serve", "--port", "0"],
            cwd=store.workdir,
            env=store.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    return server, port


def test_kill_9_of_florql_serve_mid_stream(store):
    psycopg = pytest.importorskip("psycopg")
    store.run(ROWS)
    server, port = _serve(store)
    dsn = f"host=127.0.0.1 port={port} dbname=florql user=florql connect_timeout=10"
    try:
        with psycopg.connect(dsn) as conn:
            with conn.cursor(name="stream") as cursor:
                cursor.itersize = 500
                cursor.execute(STREAM)
                assert cursor.fetchmany(500) == [(0, s, float(s)) for s in range(400)] + [
                    (1, s, float(400 + s)) for s in range(100)
                ]
                kill_9(server.proc)  # the server holds the result open (and the store) mid-stream
                with pytest.raises(psycopg.OperationalError):
                    while cursor.fetchmany(500):
                        pass
    finally:
        server.proc.kill()
    server, port = _serve(store)
    try:
        dsn = f"host=127.0.0.1 port={port} dbname=florql user=florql connect_timeout=10"
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(STREAM).fetchall()
        assert rows == [(e, s, float(e * 400 + s)) for e in range(50) for s in range(400)]
    finally:
        server.proc.terminate()
        server.finish(timeout=30)
    rows_exactly_once(store, 1, 50 * 400)


# ---- a full disk ---------------------------------------------------------------------------------
FILLED_MIDWAY = """
import os, sys, florql
gate = sys.argv[1]
last = int(sys.argv[2])
for epoch in florql.loop("epoch", range(last)):
    for step in florql.loop("step", range(100)):
        florql.log("loss", float(epoch * 100 + step))
    if epoch == 9:  # the first 1000 records are on disk; the test fills the disk now
        florql._session.writer.flush()
        open(gate + ".ready", "w").close()
        while not os.path.exists(gate + ".full"):
            pass
    if epoch == 19 and last > 20:  # 1000 more logged on the full disk: the test frees it once a write failed
        while not os.path.exists(gate + ".freed"):
            pass
"""


def _fill_when_ready(store: Store, disk: Path, gate: Path) -> Path:
    wait_until(lambda: Path(f"{gate}.ready").exists(), 120, "the trainer's first 10 epochs")
    filler = fill(disk)
    Path(f"{gate}.full").touch()
    return filler


def test_a_disk_full_during_segment_writes_loses_nothing_once_space_returns(store, small_disk, monkeypatch):
    monkeypatch.setenv("FLORQL_RUNS", str(small_disk))
    gate = store.workdir / "gate"
    script = store.write_script(FILLED_MIDWAY)
    trainer = Watched(store.popen(script, str(gate), "40", env=store.env(FLORQL_RUNS=str(small_disk))))
    try:
        filler = _fill_when_ready(store, small_disk, gate)
        trainer.wait_for(r"could not write log records \(.*No space left on device")  # training goes on
        filler.unlink()
        Path(f"{gate}.freed").touch()
        assert trainer.finish() == 0, trainer.text()
    finally:
        trainer.proc.kill()
    assert "Traceback" not in trainer.text()
    no_temporary_files(small_disk)
    rows_exactly_once(store, 1, 40 * 100)
    db = florql.connect(store.home, progress=False)
    assert db.sql("SELECT epoch, step, loss FROM run_1 ORDER BY ALL").fetchall() == [
        (e, s, float(e * 100 + s)) for e in range(40) for s in range(100)
    ]
    assert db.sql("SELECT status FROM runs").fetchall() == [("finished",)]


def test_a_disk_that_stays_full_ends_the_run_with_a_clear_message(store, small_disk, monkeypatch):
    monkeypatch.setenv("FLORQL_RUNS", str(small_disk))
    gate = store.workdir / "gate"
    script = store.write_script(FILLED_MIDWAY)
    trainer = Watched(store.popen(script, str(gate), "20", env=store.env(FLORQL_RUNS=str(small_disk))))
    try:
        filler = _fill_when_ready(store, small_disk, gate)
        trainer.finish()
    finally:
        trainer.proc.kill()
    err = trainer.text()
    assert "Traceback" not in err
    assert re.search(r"florql: run 1: could not write the last 1,000 log records to .*No space left on device", err)
    assert "florql: run 1: could not write its manifest" in err
    no_temporary_files(small_disk)
    filler.unlink()
    rows_exactly_once(store, 1, 10 * 100)  # what was written before the disk filled; nothing half-written
    db = florql.connect(store.home, progress=False)
    assert db.sql("SELECT count(*), max(loss) FROM run_1").fetchall() == [(1000, 999.0)]
    assert db.sql("SELECT status FROM runs").fetchall() == [("killed",)]


CHECKPOINTS_FILL_THE_DISK = """
import torch, florql
net = torch.nn.Linear(512, 512)  # 1 MiB of state: a 3 MiB disk holds two checkpoints
with florql.checkpointing(model=net):
    for epoch in florql.loop("epoch", range(6)):
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        florql.log("w", float(epoch))
"""


def test_a_disk_full_during_checkpoint_persists_keeps_training_and_shows_no_partial_checkpoint(
    store, small_disk, monkeypatch
):
    monkeypatch.setenv("FLORQL_RUNS", str(small_disk))
    run = store.run(CHECKPOINTS_FILL_THE_DISK, env=store.env(FLORQL_RUNS=str(small_disk)))
    err = run.proc.stderr
    assert "Traceback" not in err
    assert re.search(r"checkpoint 0000000\d-iter_end could not be written \(.*No space left on device", err), err
    no_temporary_files(small_disk)
    folder = small_disk / "runs" / "1" / "checkpoints"
    data = sorted(p.stem for p in folder.glob("*.ckpt"))
    records = list_checkpoints(store.files, 1)
    assert [r.name for r in records] == data  # no payload without its record, no record without its payload
    assert 1 <= len(records) < 6
    for record in records:  # the visible ones are whole
        assert torch.all(read_checkpoint(store.files, record)["objects"]["model"]["weight"] == record.outer_index)
    rows_exactly_once(store, 1, 6)
    assert store.sql("SELECT name FROM checkpoints ORDER BY name") == [(n,) for n in data]
    assert store.sql("SELECT checkpoints_taken, status FROM runs") == [(len(records), "finished")]
    db = florql.connect(store.home, progress=False)
    assert db.sql("SELECT epoch, w FROM run_1 ORDER BY epoch").fetchall() == [(e, float(e)) for e in range(6)]


# ---- corrupt files -------------------------------------------------------------------------------
FEW_SEGMENTS = """
import florql
for epoch in florql.loop("epoch", range(4)):
    for step in florql.loop("step", range(5)):
        florql.log("loss", float(epoch * 5 + step))
    florql._session.writer.flush()  # a segment per epoch
"""


@pytest.mark.parametrize("damage", sorted(CORRUPT))
def test_a_corrupt_segment_is_reported_by_name_and_never_answered_from(store, damage):
    store.run(FEW_SEGMENTS)
    paths = store.files.list(layout.segments_dir(1))
    assert len(paths) == 4
    victim = paths[2]
    CORRUPT[damage](store.home / victim)
    db = florql.connect(store.home, progress=False)
    for _ in range(2):  # and again: a failed ingest leaves nothing behind
        with pytest.raises(CorruptSegment) as err:
            db.sql("SELECT count(*) FROM logs").fetchall()
        assert victim in str(err.value) and err.value.sqlstate == "XX001"
    psycopg = pytest.importorskip("psycopg")
    from florql.server import BackgroundServer, Server

    with BackgroundServer(Server(lambda: florql.connect(store.home, progress=False), port=0)) as running:
        with psycopg.connect(f"host=127.0.0.1 port={running.port} dbname=florql user=florql") as conn:
            with pytest.raises(psycopg.Error) as wire:
                conn.execute("SELECT loss FROM run_1").fetchall()
    assert wire.value.sqlstate == "XX001" and victim in str(wire.value)
    (store.home / victim).unlink()  # the remedy the message gives: go on without its rows
    rows = db.sql("SELECT epoch, step, loss FROM run_1 ORDER BY ALL").fetchall()
    assert rows == [(e, s, float(e * 5 + s)) for e in (0, 1, 3) for s in range(5)]


@pytest.mark.parametrize("damage", sorted(CORRUPT))
def test_a_corrupt_checkpoint_is_reported_by_name_and_never_restored(replayable, damage):
    store, truth = replayable, TRUTH
    ckpts = sorted((store.home / "runs" / "1" / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for path in ckpts:
        CORRUPT[damage](path)
    db = florql.connect(store.home, workers=1, progress=False)
    with pytest.raises(ReplayFailed) as err:
        db.sql(GRAD_NORM_QUERY.replace("ORDER BY", "WHERE epoch = 2 ORDER BY"))
    message = str(err.value)
    assert "CorruptCheckpoint" in message and re.search(r"runs/1/checkpoints/\d{8}-\w+\.ckpt", message), message
    assert store.sql("SELECT count(*) FROM logs WHERE source = 'replayed'") == [(0,)]
    if damage != "flip":
        return
    for path in ckpts:  # the remedy the message gives
        path.unlink()
        path.with_suffix(".json").unlink()
    rebuild(store.location.db_path, store.files)
    answer = db.sql(GRAD_NORM_QUERY).fetchall()
    assert answer == db.sql(GRAD_NORM_QUERY.replace("run_1", f"run_{truth}")).fetchall() and len(answer) == 12


def test_a_corrupt_checkpoint_record_is_reported_by_name(replayable):
    store = replayable
    record = sorted((store.home / "runs" / "1" / "checkpoints").glob("*.json"))[0]
    record.write_text(record.read_text()[:-7])
    with pytest.raises(CorruptCheckpoint, match=re.escape(str(record.relative_to(store.home)))):
        florql.connect(store.home, progress=False).sql("SELECT 1").fetchall()
