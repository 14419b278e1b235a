"""Checkpoints share unchanged state: large tensors and arrays are content-addressed chunks, stored once.

Every test runs real training scripts into a real store; what each checkpoint holds is checked
byte for byte, and hindsight answers against a run that logged everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

import florql
from florql.errors import ReplayFailed
from florql.storage import layout
from florql.storage.checkpoints import (
    CHUNK_MIN_BYTES,
    CorruptCheckpoint,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from florql.storage.manifest import Manifest
from florql.storage.runfiles import TMP_PREFIX, LocalRunFiles
from store_support import Store

# A module-level data set that never changes (the bulk of the state), a frozen layer, a small
# trained model, and a module-level array changed in place every other epoch. Logs only `loss`
# and `total`; the hindsight names are added after LOGGED.
SHARED_STATE = """
import numpy as np
import torch
import florql

torch.manual_seed(0)
data = np.random.default_rng(0).standard_normal((128, 2048)).astype(np.float32)  # 1 MiB
order = np.arange(160_000, dtype=np.int64)  # 1.25 MiB, shuffled in place every other epoch
frozen = torch.nn.Linear(2048, 128)  # 1 MiB of weight, never trained
frozen.requires_grad_(False)
net = torch.nn.Linear(128, 1)
opt = torch.optim.SGD(net.parameters(), lr=0.05)
shuffler = np.random.default_rng(1)
with florql.checkpointing(model=net, frozen=frozen, optimizer=opt):
    for epoch in florql.loop("epoch", range(5)):
        if epoch % 2 == 0:
            shuffler.shuffle(order)
        for step in florql.loop("step", range(4)):
            rows = torch.from_numpy(data[order[step * 4 : (step + 1) * 4] % 128])  # 32 KiB: kept inline
            loss = net(frozen(rows)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            florql.log("loss", loss.item())
        florql.log("total", float(order[:100].sum()))
"""
LOGGED_STEP = '            florql.log("loss", loss.item())\n'
LOGGED_EPOCH = '        florql.log("total", float(order[:100].sum()))\n'
HINDSIGHT_STEP = '            florql.log("grad_norm", net.weight.grad.norm().item())\n'
HINDSIGHT_EPOCH = '        florql.log("order_sum", int(order[:7].dot(np.arange(7))))\n'


def hindsight(source: str) -> str:
    return source.replace(LOGGED_STEP, LOGGED_STEP + HINDSIGHT_STEP).replace(
        LOGGED_EPOCH, LOGGED_EPOCH + HINDSIGHT_EPOCH
    )


def chunk_files(store: Store, run_id: int = 1) -> dict[str, int]:
    """The run's chunks on disk: digest -> size."""
    found = {}
    for path in store.files.list(layout.chunks_dir(run_id)):
        found[path.rsplit("/", 1)[1]] = os.path.getsize(store.home / path)
    return found


def digest_of(array: np.ndarray | torch.Tensor) -> str:
    raw = array.numpy() if isinstance(array, torch.Tensor) else array
    return "xxh3-" + xxhash.xxh3_128_hexdigest(np.ascontiguousarray(raw).tobytes())


def test_a_data_set_and_a_frozen_layer_are_stored_once_and_every_byte_is_accounted_for(store: Store) -> None:
    store.run(SHARED_STATE)
    records = list_checkpoints(store.files, 1)
    assert len(records) == 5
    data = np.random.default_rng(0).standard_normal((128, 2048)).astype(np.float32)
    torch.manual_seed(0)
    frozen_weight = torch.nn.Linear(2048, 128).weight.detach()
    for record in records:  # each refers to the same two chunks, stored once
        assert {digest_of(data), digest_of(frozen_weight)} <= set(record.chunks)
        state = read_checkpoint(store.files, record)
        assert np.array_equal(state["scope"]["plain"]["data"], data)
        assert torch.equal(state["objects"]["frozen"]["weight"], frozen_weight)
    assert len([r for r in records if digest_of(data) in r.chunks]) == 5
    # `order` changes every other epoch: a new chunk after epochs 0, 2, 4 (inner_end snapshots).
    orders = {read_checkpoint(store.files, r)["scope"]["plain"]["order"].tobytes() for r in records}
    on_disk = chunk_files(store)
    assert len(on_disk) == 2 + len(orders) == 5
    # Every byte stored is one some checkpoint added; later checkpoints add only what changed.
    ckpt_files = [p for p in store.files.list(layout.checkpoints_dir(1)) if p.endswith(".ckpt")]
    assert sum(r.stored_bytes for r in records) == sum(on_disk.values()) + sum(
        os.path.getsize(store.home / p) for p in ckpt_files
    )
    assert all(r.bytes > data.nbytes + frozen_weight.numel() * 4 for r in records)
    assert all(r.stored_bytes < CHUNK_MIN_BYTES for r in records[1:] if r.outer_index % 2 == 1)
    rows = store.sql("SELECT name, bytes, stored_bytes, chunks FROM checkpoints WHERE run_id = 1 ORDER BY name")
    assert rows == [(r.name, r.bytes, r.stored_bytes, len(r.chunks)) for r in records]
    runs = subprocess.run(
        [sys.executable, "-m", "florql", "runs"], env=store.env(), capture_output=True, text=True, timeout=120
    )
    assert runs.returncode == 0, runs.stderr
    header, _, first = runs.stdout.splitlines()[:3]
    assert header.split()[-2:] == ["ckpt_bytes", "ckpt_stored_bytes"]
    per_checkpoint = round(sum(r.bytes for r in records) / len(records))
    assert first.split()[-2:] == [str(per_checkpoint), str(sum(r.stored_bytes for r in records))]


SMALL_DATA_SET = """
import numpy as np
import torch
import florql

torch.manual_seed(0)
features = np.random.default_rng(0).standard_normal((4000, 32))  # 1,000 KiB: under CHUNK_MIN_BYTES
net = torch.nn.Linear(32, 1)
opt = torch.optim.SGD(net.parameters(), lr=0.01)
with florql.checkpointing(model=net, optimizer=opt):
    for epoch in florql.loop("epoch", range(4)):
        for step in florql.loop("step", range(3)):
            loss = net(torch.from_numpy(features[step * 100 : (step + 1) * 100]).float()).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            florql.log("loss", loss.item())
"""


def test_a_data_set_under_a_mebibyte_is_stored_once_not_in_every_checkpoint(store: Store) -> None:
    """The demo's data arrays (1,000 KiB each) sat inline in every checkpoint's file: 90 % of its bytes."""
    store.run(SMALL_DATA_SET)
    records = list_checkpoints(store.files, 1)
    features = np.random.default_rng(0).standard_normal((4000, 32))
    assert len(records) == 4 and features.nbytes < CHUNK_MIN_BYTES
    assert all(digest_of(features) in r.chunks for r in records)
    assert chunk_files(store) == {digest_of(features): features.nbytes}
    assert all(r.stored_bytes < features.nbytes / 10 for r in records[1:])
    for record in records:
        assert np.array_equal(read_checkpoint(store.files, record)["scope"]["plain"]["features"], features)


def test_restores_from_shared_chunks_answer_hindsight_bit_exactly(store: Store) -> None:
    store.run(SHARED_STATE)
    truth = store.run(hindsight(SHARED_STATE)).run_id  # the ground truth: logged everything
    assert truth == 2 and len(list_checkpoints(store.files, 1)) == 5
    db = florql.connect(store.home, workers=1, progress=False)
    for query in (
        "SELECT epoch, step, grad_norm FROM run_{} WHERE epoch >= 2 ORDER BY epoch, step",
        "SELECT epoch, order_sum FROM run_{} ORDER BY epoch",  # restored at each epoch's inner_end
    ):
        answer = db.sql(query.format(1)).fetchall()
        assert answer == db.sql(query.format(truth)).fetchall() and answer
    from_checkpoints = store.sql("SELECT count(*) FROM replay_jobs WHERE run_id = 1 AND checkpoint IS NOT NULL")
    assert from_checkpoints[0][0] >= 1  # answered from checkpoints, not from a replay of the whole run
    assert store.sql("SELECT count(*) FROM replay_audit") == [(0,)]


def test_a_corrupt_shared_chunk_is_named_with_every_checkpoint_sharing_it(store: Store) -> None:
    store.run(SHARED_STATE)
    store.workdir.joinpath("train.py").write_text(hindsight(SHARED_STATE))
    records = list_checkpoints(store.files, 1)
    data = np.random.default_rng(0).standard_normal((128, 2048)).astype(np.float32)
    victim = layout.checkpoint_chunk_path(1, digest_of(data))
    with open(store.home / victim, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    for record in records:
        with pytest.raises(CorruptCheckpoint) as err:
            read_checkpoint(store.files, record)
        assert victim in str(err.value) and err.value.sqlstate == "XX001"
        assert ", ".join(r.name for r in records) in str(err.value)  # all of them share it
    db = florql.connect(store.home, workers=1, progress=False)
    with pytest.raises(ReplayFailed) as failed:
        db.sql("SELECT epoch, order_sum FROM run_1 WHERE epoch = 3").fetchall()
    assert "CorruptCheckpoint" in str(failed.value) and victim in str(failed.value)
    assert store.sql("SELECT count(*) FROM logs WHERE source = 'replayed'") == [(0,)]


KILL_DURING_CHUNK_WRITES = """
import time, numpy as np, torch, florql
data = np.ones((2048, 1024), dtype=np.float32)  # 8 MiB, shared by every checkpoint
big = torch.nn.Linear(2048, 2048)  # 16 MiB of weight, a new chunk at every checkpoint
torch.nn.init.zeros_(big.weight)
with florql.checkpointing(budget=0.9, model=big):
    for epoch in florql.loop("epoch", range(100000)):
        florql.log("x", float(epoch))
        time.sleep(0.1)
        with torch.no_grad():
            big.weight.add_(1.0)
"""


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    give_up = time.monotonic() + 120  # a safety net for a broken build, not a timing assertion
    while not condition():
        assert proc.poll() is None, f"the script ended before {what}: {proc.communicate()}"
        assert time.monotonic() < give_up, f"no {what} after 120 s"
        time.sleep(0.005)


def test_kill_9_mid_persist_leaves_no_record_referring_to_a_missing_chunk(store: Store) -> None:
    proc = store.popen(store.write_script(KILL_DURING_CHUNK_WRITES))
    chunks = store.home / "runs" / "1" / "chunks"

    def writing_a_chunk() -> bool:
        return any(p.name.startswith(TMP_PREFIX) for p in chunks.rglob("*"))

    try:
        wait_for(lambda: bool(list_checkpoints(store.files, 1)), proc, "a first complete checkpoint")
        wait_for(writing_a_chunk, proc, "a chunk being written")
        proc.kill()  # SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert writing_a_chunk()  # the kill did land mid-write
    records = list_checkpoints(store.files, 1)
    assert records
    on_disk = chunk_files(store)
    for record in records:
        assert set(record.chunks) <= set(on_disk)
        state = read_checkpoint(store.files, record)
        assert torch.all(state["objects"]["model"]["weight"] == record.outer_index + 1)
        assert np.array_equal(state["scope"]["plain"]["data"], np.ones((2048, 1024), dtype=np.float32))
    assert store.sql("SELECT status FROM runs") == [("killed",)]
    assert re.fullmatch(r"xxh3-[0-9a-f]{32}", next(iter(on_disk)))

    # `florql gc` takes what the kill left (the half-written chunk, any chunk whose record never
    # came) and nothing a checkpoint refers to: every checkpoint still restores.
    out = gc(store, "--older-than", "0")
    assert re.search(r"run 1: removed \d+ files \([\d.]+ MB\) no checkpoint refers to", out), out
    assert not writing_a_chunk()
    referenced = {digest for record in records for digest in record.chunks}
    assert set(chunk_files(store)) == referenced
    for record in list_checkpoints(store.files, 1):
        assert torch.all(read_checkpoint(store.files, record)["objects"]["model"]["weight"] == record.outer_index + 1)


def gc(store: Store, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "florql", "gc", *args], env=store.env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def plant(store: Store, path: str, nbytes: int, age_s: float) -> Path:
    """A file at `path` in the store, last modified `age_s` seconds ago."""
    target = store.home / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(os.urandom(nbytes))
    then = time.time() - age_s
    os.utime(target, (then, then))
    return target


def test_gc_removes_only_old_files_no_checkpoint_refers_to_and_never_touches_a_recording_run(store: Store) -> None:
    store.run(SHARED_STATE)
    records = list_checkpoints(store.files, 1)
    referenced = {digest for record in records for digest in record.chunks}
    assert set(chunk_files(store)) == referenced
    orphan = plant(store, "runs/1/chunks/ab/xxh3-ab" + "0" * 30, 300_000, age_s=7200)  # its record never came
    dead_write = plant(store, f"runs/1/chunks/cd/{TMP_PREFIX}0123", 200_000, age_s=7200)  # a killed write
    young = plant(store, "runs/1/chunks/ef/xxh3-ef" + "0" * 30, 1000, age_s=10)  # a live persist's, maybe

    out = gc(store, "--dry-run")
    assert "run 1: would remove 2 files (0.5 MB) no checkpoint refers to" in out, out
    assert "run 1: kept 1 unreferenced files newer than 3600 s" in out
    assert orphan.exists() and dead_write.exists() and young.exists()

    out = gc(store)
    assert "run 1: removed 2 files (0.5 MB)" in out and out.rstrip().endswith("removed 2 files, 0.5 MB"), out
    assert not orphan.exists() and not dead_write.exists() and young.exists()
    assert set(chunk_files(store)) == referenced | {young.name}
    data = np.random.default_rng(0).standard_normal((128, 2048)).astype(np.float32)
    for record in records:  # every checkpoint still restores, its chunks checked
        assert np.array_equal(read_checkpoint(store.files, record)["scope"]["plain"]["data"], data)
    assert gc(store, "--older-than", "0").rstrip().endswith("removed 1 files, 0.0 MB")
    assert set(chunk_files(store)) == referenced

    # A run whose manifest cannot be read is left alone, and said so.
    plant(store, "runs/2/chunks/ab/xxh3-ab" + "1" * 30, 1000, age_s=7200)
    (store.home / "runs" / "2" / "run.json").write_text("{torn")
    out = gc(store, "--older-than", "0")
    assert "run 2: skipped, its manifest cannot be read" in out and (store.home / "runs" / "2" / "chunks").exists()

    # A run whose process is alive is never collected, whatever the age of its files.
    manifest_path = layout.manifest_path(1)
    manifest = Manifest.from_json(store.files.get(manifest_path))
    manifest.update(status="running", env=replace(manifest.env, pid=os.getpid(), hostname=socket.gethostname()))
    store.files.put(manifest_path, manifest.to_json().encode())
    orphan = plant(store, orphan.relative_to(store.home).as_posix(), 1000, age_s=7200)
    out = gc(store, "--older-than", "0")
    assert "run 1: recording now, skipped" in out and out.rstrip().endswith("nothing to remove")
    assert orphan.exists()


def test_arrays_of_every_dtype_round_trip_and_object_arrays_stay_pickled(tmp_path) -> None:
    files = LocalRunFiles(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {
        "float": rng.standard_normal(160_000),
        "negative_zero_and_nan": np.array([-0.0, np.nan] * 80_000),
        "datetime": np.arange(160_000).astype("datetime64[ns]"),
        "unicode": np.array(["florql"] * 50_000),
        "bool": np.ones(1_100_000, dtype=bool),
        "objects": np.array([None, "a", 1.5] * 5_000, dtype=object),
        "fortran": np.asfortranarray(rng.standard_normal((1000, 200))),
    }
    payload = {"scope": {"plain": arrays}, "position": {"outer_index": 0, "kind": "iter_end"}}
    record = write_checkpoint(files, 1, 0, "iter_end", {"epoch": 0}, payload, 0.0)
    assert len(record.chunks) == 5  # all but the object array and the non-C-contiguous one
    restored = read_checkpoint(files, record)["scope"]["plain"]
    for name, array in arrays.items():
        got = restored[name]
        assert got.dtype == array.dtype and got.shape == array.shape, name
        if array.dtype.hasobject:
            assert got.tolist() == array.tolist()
        else:
            assert got.tobytes(order="A") == array.tobytes(order="A"), name
        got.flat[0] = got.flat[1]  # restored arrays are the script's to write to


def test_chunks_of_an_older_store_named_by_sha256_still_restore_and_are_checked(tmp_path, monkeypatch) -> None:
    from florql.storage import checkpoints

    files = LocalRunFiles(tmp_path)
    weight = torch.randn(512, 512)  # 1 MiB: a chunk
    payload = {"objects": {"model": {"weight": weight}}, "position": {"outer_index": 0, "kind": "iter_end"}}
    with monkeypatch.context() as old_writer:  # how stores written before XXH3 named their chunks
        old_writer.setattr(checkpoints, "chunk_digest", lambda raw: hashlib.sha256(raw).hexdigest())
        record = write_checkpoint(files, 1, 0, "iter_end", {"epoch": 0}, payload, 0.0)
    digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    assert record.chunks == (digest,)
    assert (tmp_path / layout.checkpoint_chunk_path(1, digest)).parent.name == digest[:2]
    assert torch.equal(read_checkpoint(files, record)["objects"]["model"]["weight"], weight)
    with open(tmp_path / layout.checkpoint_chunk_path(1, digest), "r+b") as f:
        f.write(b"\xff\xff")
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        read_checkpoint(files, record)


def test_a_record_of_an_older_store_naming_its_payload_by_sha256_still_restores_and_is_checked(tmp_path) -> None:
    files = LocalRunFiles(tmp_path)
    weight = torch.randn(16, 16)  # small: in the payload itself
    payload = {"objects": {"model": {"weight": weight}}, "position": {"outer_index": 0, "kind": "iter_end"}}
    record = write_checkpoint(files, 1, 0, "iter_end", {"epoch": 0}, payload, 0.0)
    data_path = tmp_path / layout.checkpoints_dir(1) / f"{record.name}.ckpt"
    assert record.digest == "xxh3-" + xxhash.xxh3_128_hexdigest(data_path.read_bytes())
    # How an older florql wrote the record: the payload's SHA-256 under the key `sha256`.
    fields = json.loads(record.to_json())
    del fields["digest"]
    fields["sha256"] = hashlib.sha256(data_path.read_bytes()).hexdigest()
    record_path = f"{layout.checkpoints_dir(1)}/{record.name}.json"
    files.put(record_path, json.dumps(fields).encode())
    [old] = list_checkpoints(files, 1)
    assert old.digest == fields["sha256"]
    assert torch.equal(read_checkpoint(files, old)["objects"]["model"]["weight"], weight)
    raw = bytearray(data_path.read_bytes())
    raw[-1] ^= 0xFF  # a flipped bit in the tensor's bytes
    data_path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        read_checkpoint(files, old)


def test_each_checkpoint_file_is_synced_and_their_folder_once_when_the_writer_finishes(tmp_path, monkeypatch) -> None:
    """Folder syncs wake the persist thread, which then takes the core back from training: a
    checkpoint syncs its two files' bytes before their names appear, and the folder once at the end."""
    from florql.checkpoint_engine import Persister
    from florql.storage import runfiles

    folder_syncs: list[str] = []
    monkeypatch.setattr(runfiles, "_fsync_dir", lambda folder: folder_syncs.append(os.path.basename(folder)))
    file_syncs = 0
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        nonlocal file_syncs
        file_syncs += 1
        real_fsync(fd)

    monkeypatch.setattr(runfiles.os, "fsync", fsync)
    files = LocalRunFiles(tmp_path)
    persister = Persister(files, 1, on_done=lambda record: None)
    for index in range(3):
        payload = {"objects": {"w": torch.full((4,), float(index))}, "position": {"outer_index": index}}
        persister.submit(index, "iter_end", {"epoch": index}, payload, 0.0, None)
        persister.wait()
    assert file_syncs == 6 and folder_syncs == []  # each checkpoint: its payload, then its record
    persister.finish()
    assert folder_syncs == ["checkpoints"]
    persister.finish()  # nothing written since: nothing to sync
    assert folder_syncs == ["checkpoints"] and file_syncs == 6
    assert [r.outer_index for r in list_checkpoints(files, 1)] == [0, 1, 2]
