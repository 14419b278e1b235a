"""The hand-off between the training thread and the segment writer loses and duplicates nothing.

The stress tests force many hand-offs: a switch interval of a microsecond (the interpreter changes
threads as often as it can), a writer that flushes every 0.1 ms, and a third thread calling
`flush()` as well (as checkpoints and replay commits do). Every record must land exactly once, in
the order it was logged.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from florql.session import TrainingSession
from florql.storage import layout, segment_codec, segments
from florql.storage.errors import WriteFailed
from florql.storage.runfiles import LocalRunFiles
from florql.storage.segment_writer import Deferred, SegmentWriter

RECORDS = 100_000


@pytest.fixture
def busy_switching() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class Session(TrainingSession):
    """The real hot path (`TrainingSession.log`) writing to `writer`."""

    def __init__(self, writer: SegmentWriter) -> None:
        super().__init__()
        self.writer = writer
        self.position = ("epoch", 0)


class CudaLike(Session):
    """Values of `Lazy` are deferred the way CUDA tensors are (`TrainingSession._convert`: the flag
    first, then a `Deferred` resolved on the writer thread), without needing a GPU."""

    def _convert(self, name, value):
        if isinstance(value, Lazy):
            self.writer.has_deferred = True
            return Deferred(torch.tensor(value.v), None)
        return super()._convert(name, value)


class Lazy:
    def __init__(self, v: int) -> None:
        self.v = v


class MemoryRunFiles(LocalRunFiles):
    """Run files kept in memory: the stress tests are about the hand-off, not the disk (no fsync)."""

    def __init__(self) -> None:
        self.url = "memory://"
        self.data: dict[str, bytes] = {}

    def put(self, path: str, data: bytes, *, durable_name: bool = True) -> None:
        self.data[path] = bytes(data)

    def sync_folder(self, folder: str) -> None:
        pass

    def get(self, path: str) -> bytes:
        return self.data[path]

    def list(self, prefix: str) -> list[str]:
        return sorted(p for p in self.data if p.startswith(prefix + "/"))

    def local_path(self, path: str) -> None:
        return None


def _writer(files, interval: float = 1e-4) -> SegmentWriter:
    writer = SegmentWriter(files, lambda seq: f"runs/1/segments/main/{seq:08d}.seg", {"run_id": "1"}, interval=interval)
    return writer


def _landed(files) -> list[tuple[int, int]]:
    rows: list[tuple[int, int]] = []
    for path in files.list("runs/1/segments"):
        table = segments.read_segment(files, path)
        rows.extend(zip(table.column("seq").to_pylist(), table.column("value_int").to_pylist()))
    return rows


def _flusher(writer: SegmentWriter, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            writer.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", [Session, CudaLike])
def test_every_record_lands_exactly_once_under_many_hand_offs(busy_switching, kind):
    files = MemoryRunFiles()
    writer = _writer(files)
    session = kind(writer)
    stop = threading.Event()
    flusher = _flusher(writer, stop)
    make = Lazy if kind is CudaLike else int
    for i in range(RECORDS):
        session.log("x", make(i) if i % 3 == 0 else i)
        if i % 32 == 0:
            time.sleep(0)  # let the writers run: small segments, many hand-offs
    stop.set()
    flusher.join()
    writer.close()
    rows = _landed(files)
    assert len(rows) == RECORDS
    assert rows == [(i, i) for i in range(RECORDS)]  # each once, in order, deferred values resolved
    assert writer.segments_written > 50, "the test did not force many hand-offs"
    print(f"{kind.__name__}: {RECORDS} records in {writer.segments_written} segments")


class FullDisk(LocalRunFiles):
    """Local run files whose writes fail with ENOSPC while `full` is set (a disk filling up and
    emptying again; the file-system version of this is in test_faults.py)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.full = threading.Event()
        self.refused = 0

    def put(self, path: str, data: bytes, *, durable_name: bool = True) -> None:
        if self.full.is_set():
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device", path)
        super().put(path, data, durable_name=durable_name)


def test_a_failed_write_keeps_its_records_and_retries_them(tmp_path, capfd):
    files = FullDisk(tmp_path)
    writer = _writer(files, interval=0.01)
    session = Session(writer)
    for i in range(1000):
        session.log("x", i)
    writer.flush()
    files.full.set()
    for i in range(1000, 3000):
        session.log("x", i)
        if i == 2000:
            with pytest.raises(OSError):
                writer.flush()
    while files.refused < 3:  # the writer thread has tried, and failed, a few times
        threading.Event().wait(0.01)
    files.full.clear()
    while writer.records_written < 3000:  # the writer thread retries and catches up
        threading.Event().wait(0.01)
    for i in range(3000, 4000):
        session.log("x", i)
    writer.close()
    assert _landed(files) == [(i, i) for i in range(4000)]
    err = capfd.readouterr().err
    assert "could not write log records" in err and "No space left on device" in err
    assert "works again; none was lost" in err


def test_the_writer_threads_cpu_time_is_its_own(tmp_path):
    """What the checkpoint budget charges for logging: the writer thread's CPU clock, which grows
    with its flushes and not with the caller's work; a closed writer's clock is not read."""
    writer = _writer(LocalRunFiles(str(tmp_path)), interval=10)
    before = writer.cpu_s
    spin_until = time.thread_time() + 0.2
    while time.thread_time() < spin_until:  # the caller's own CPU
        pass
    assert writer.cpu_s - before < 0.1
    session = Session(writer)
    for i in range(200_000):
        session.log("x", float(i))
    flushed = writer.records_written + 200_000
    writer._wake.set()  # the writer thread flushes now
    while writer.records_written < flushed:
        time.sleep(0.01)
    assert writer.cpu_s > before
    writer.close()
    assert writer.cpu_s == 0.0


def test_records_that_cannot_be_written_at_the_end_fail_the_close_clearly(tmp_path):
    files = FullDisk(tmp_path)
    writer = _writer(files, interval=10)
    session = Session(writer)
    for i in range(10):
        session.log("x", i)
    files.full.set()
    with pytest.raises(WriteFailed, match="could not write the last 10 log records .*No space left on device"):
        writer.close()
    assert files.list("runs") == []  # nothing half-written is visible


def test_training_stops_with_a_clear_message_when_memory_fills_and_writes_keep_failing(tmp_path, monkeypatch):
    """Records wait in memory while the disk is full, up to HARD_LIMIT (made small here); past it
    `florql.log` raises `WriteFailed` rather than waiting forever or growing without bound."""
    from florql import session as session_module
    from florql.storage import segment_writer

    monkeypatch.setattr(segment_writer, "HARD_LIMIT", 500)
    monkeypatch.setattr(session_module, "SOFT_LIMIT", 100)
    files = FullDisk(tmp_path)
    files.full.set()
    writer = _writer(files, interval=0.01)
    session = Session(writer)
    with pytest.raises(WriteFailed, match=r"cannot write log records .*No space left on device.* 500 records wait"):
        for i in range(10_000):
            session.log("x", i)
    kept = len(writer.buffer)
    assert 500 <= kept < 10_000
    files.full.clear()  # space again: what was kept is written, once
    writer.close()
    assert _landed(files) == [(i, i) for i in range(kept)]


_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.text(max_size=12),
)
_POSITIONS = st.one_of(
    st.just(("",)),
    st.tuples(st.just("epoch"), st.integers(0, 2**40)),
    st.tuples(st.just("epoch/step"), st.integers(0, 99), st.integers(0, 99)),
)


@given(st.integers(0, 2**40), st.lists(st.tuples(st.sampled_from(["loss", "acc", "ü"]), _VALUES, _POSITIONS)))
def test_a_segment_reads_back_exactly_the_records_written(first_seq, records):
    """Encoded with NumPy alone, read back as the Arrow table pyarrow would build: same rows, bit for bit."""
    table = segments.records_table(first_seq, records)
    expected = [
        {
            "seq": first_seq + i,
            "name": name,
            "loop_path": position[0],
            "coords": list(position[1:]),
            "value_type": segments.VALUE_TYPES[type(value)],
            **{
                f"value_{t}": value if segments.VALUE_TYPES[type(value)] == t else None
                for t in segments.VALUE_TYPES.values()
            },
        }
        for i, (name, value, position) in enumerate(records)
    ]
    reference = pa.Table.from_pylist(expected, schema=segments.SCHEMA)
    assert table.schema.equals(segments.SCHEMA)
    floats = ["value_float"]  # NaN is not equal to itself: compared apart, by their bits
    assert table.drop_columns(floats).equals(reference.drop_columns(floats))
    got, want = table.column("value_float").combine_chunks(), reference.column("value_float").combine_chunks()
    assert got.is_null().equals(want.is_null())
    assert got.to_numpy(zero_copy_only=False).tobytes() == want.to_numpy(zero_copy_only=False).tobytes()


_NUMBERS = st.one_of(st.floats(allow_nan=False), st.integers(-(2**63), 2**63 - 1), st.booleans(), st.text(max_size=5))


@given(st.lists(st.tuples(st.sampled_from(["loss", "acc"]), _NUMBERS, _POSITIONS), min_size=1))
def test_a_segment_reads_as_an_older_arrow_segment_of_the_same_records_does(records):
    """Segments florql wrote as Arrow IPC files before (`.arrow`) read into the same table, stored
    encodings included (what the ingest maps to ids)."""
    files = MemoryRunFiles()
    table = segments.records_table(7, records)
    older = segments.write_table(files, "runs/1/segments/main/00000000.arrow", table.to_batches(), {})
    newer = segment_codec.write_segment(files, "runs/1/segments/main/00000001.seg", 7, records, {})
    for decoded in (True, False):
        a, b = (segments.read_segment(files, p, decoded=decoded) for p in (older, newer))
        assert a.equals(b)


def test_recording_imports_neither_pyarrow_nor_pandas(tmp_path):
    """A training process pays for what florql imports: pyarrow's import and first encode were
    ~77 ms of a run's start, pandas' import ~0.3 s of CPU holding the GIL. Its segments still read."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch, florql\n"
        "net = torch.nn.Linear(4, 2)\n"
        "opt = torch.optim.SGD(net.parameters(), lr=0.1)\n"
        "with florql.checkpointing(model=net, optimizer=opt):\n"
        "    for epoch in florql.loop('epoch', range(3)):\n"
        "        for step in florql.loop('step', range(5)):\n"
        "            florql.log('loss', float(step)); florql.log('n', step); florql.log('ok', True); florql.log('s', 'x')\n"
        "        florql.log('acc', 0.5)\n"
        "florql._session.writer.flush()\n"
        "print('pyarrow' in sys.modules, 'pandas' in sys.modules)\n"
    )
    env = dict(os.environ, FLORQL_HOME=str(tmp_path / "store"), FLORQL_QUIET="1")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    store = tmp_path / "store"
    logged = [p for p in store.rglob("*") if layout.is_segment(p.name)]
    rows = [
        r for p in logged for r in segments.read_segment(LocalRunFiles(store), str(p.relative_to(store))).to_pylist()
    ]
    assert sorted(r["name"] for r in rows) == sorted(["loss", "n", "ok", "s"] * 15 + ["acc"] * 3)


def test_segments_are_named_by_their_xxh3_and_older_sha256_names_are_still_checked(tmp_path) -> None:
    import hashlib
    import re

    files = LocalRunFiles(tmp_path)
    records = [("loss", 0.5, ("epoch", 0)), ("loss", 0.25, ("epoch", 1))]
    path = segment_codec.write_segment(files, "runs/1/segments/main/00000000.seg", 0, records, {})
    assert re.search(r"/00000000\.xxh3-[0-9a-f]{32}\.seg$", path)
    assert segments.read_segment(files, path).column("value_float").to_pylist() == [0.5, 0.25]
    arrow = segments.encode(segments.records_table(0, records).to_batches(), {})
    older = f"runs/1/segments/main/00000001.{hashlib.sha256(arrow).hexdigest()[:32]}.arrow"
    files.put(older, arrow)  # as an older florql wrote and named it
    assert segments.read_segment(files, older).num_rows == 2
    for name, data in ((path, files.get(path)), (older, arrow)):
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 1
        files.put(name, bytes(damaged))
        with pytest.raises(segments.CorruptSegment, match="do not match the checksum in its name"):
            segments.read_segment(files, name)


@pytest.mark.parametrize("cut", [0, 5, 30, -3])
def test_a_damaged_segment_without_a_checksum_is_reported_by_name(tmp_path, cut) -> None:
    """Older segments carry no checksum in their name: a cut-short one is still never answered from."""
    files = LocalRunFiles(tmp_path)
    data = segment_codec.encode(0, [("loss", float(i), ("epoch", i)) for i in range(100)], {})
    files.put("runs/1/segments/main/00000000.seg", data[:cut])
    with pytest.raises(segments.CorruptSegment, match=r"00000000\.seg is not a readable florql segment"):
        segments.read_segment(files, "runs/1/segments/main/00000000.seg")


def test_each_segment_is_synced_and_their_folder_once_when_the_writer_closes(tmp_path, monkeypatch) -> None:
    from florql.storage import runfiles

    folder_syncs: list[str] = []
    monkeypatch.setattr(runfiles, "_fsync_dir", lambda folder: folder_syncs.append(folder))
    file_syncs = 0
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        nonlocal file_syncs
        file_syncs += 1
        real_fsync(fd)

    monkeypatch.setattr(runfiles.os, "fsync", fsync)
    files = LocalRunFiles(tmp_path)
    writer = _writer(files, interval=3600)  # flushed by hand below
    for k in range(3):
        writer.buffer.append(("step", k, ("",)))
        writer.flush()
    assert writer.segments_written == 3 and file_syncs == 3 and folder_syncs == []
    writer.close()
    assert folder_syncs == [str(tmp_path / "runs" / "1" / "segments" / "main")]
    assert _landed(files) == [(0, 0), (1, 1), (2, 2)]
