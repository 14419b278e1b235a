"""The background thread that turns buffered log records into segment files.

The hand-off is race-free by construction. The training thread only appends tuples to `buffer`,
one list that is never replaced. The writer takes the prefix that is there (`buffer[:n]`, one
atomic copy under the GIL), writes it as one segment, and only then deletes that prefix
(`del buffer[:n]`, one atomic step). Nothing else ever removes from the list, so a record appended
at any moment is either in the prefix taken or still there for the next flush: none is lost, none
is written twice, and they land in the order they were logged.

Each segment's bytes are durable before its name appears; the names are made durable together when
the writer closes (a power loss mid-run can cost the latest segments, never leave a partial one).
A write that fails (a full disk) keeps its records in memory: the same bytes go to the same path
at the next attempt, at least every `interval` seconds, so a retried segment never lands twice.
Past `HARD_LIMIT` buffered records the training thread waits for the writer; while writes keep
failing it stops with `WriteFailed` instead of waiting forever.
"""

from __future__ import annotations

import posixpath
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from florql.storage import segment_codec
from florql.storage.errors import WriteFailed
from florql.storage.runfiles import RunFiles

SOFT_LIMIT = 200_000  # records: wake the writer early
HARD_LIMIT = 2_000_000  # records: the training thread waits (memory stays bounded)


class Deferred:
    """A value that is resolved off the training thread (a CUDA tensor: `.item()` synchronises)."""

    __slots__ = ("event", "tensor")

    def __init__(self, tensor: Any, event: Any) -> None:
        self.tensor, self.event = tensor, event

    def resolve(self) -> Any:
        if self.event is not None:
            self.event.synchronize()
        value = self.tensor.item()
        return value


class SegmentWriter:
    def __init__(
        self,
        files: RunFiles,
        path_for: Callable[[int], str],
        metadata: dict[str, str],
        interval: float = 1.0,
        on_flush: Callable[[Any], None] | None = None,
        on_swap: Callable[[], Any] | None = None,
    ) -> None:
        """`on_swap()` runs on the writer thread just before it takes the buffered records, and
        `on_flush(what on_swap returned)` once they are written: a manifest taken by `on_swap`
        describes nothing that is not in a written segment when `on_flush` writes it."""
        self.files, self.path_for, self.metadata = files, path_for, metadata
        self.interval, self.on_flush, self.on_swap = interval, on_flush, on_swap
        self.buffer: list[tuple] = []  # only ever appended to (training) and cut at the front (writer)
        # Set by the training thread *before* it appends a Deferred, never cleared: a flush that
        # finds a Deferred in its prefix always sees the flag, whatever the interleaving.
        self.has_deferred = False
        self.records_written = 0
        self.segments_written = 0
        self.paths: list[str] = []
        self._segment_seq = 0
        self._pending: tuple[str, bytes, int] | None = None  # a segment encoded but not yet written
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._drained = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None  # the last write failure, until a write succeeds
        self._lock = threading.Lock()  # one flush at a time (thread or an explicit flush())
        self._thread = threading.Thread(target=self._run, name="florql-segment-writer", daemon=True)
        self._thread.start()

    @property
    def cpu_s(self) -> float:
        """The writer thread's CPU time so far, its warm-up included (0 once it has stopped, or
        where the platform has no per-thread clock). Read it from the thread that closes the
        writer: a stopped thread's clock must not be read."""
        if not self._thread.is_alive():
            return 0.0
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident or 0))
        except (AttributeError, OSError):
            return 0.0

    def pressure(self) -> None:
        """Called by the hot path when the buffer is large: wake the writer, wait when too large."""
        if not self._wake.is_set():
            self._wake.set()
        if len(self.buffer) >= HARD_LIMIT:
            with self._drained:
                self._drained.wait_for(
                    lambda: len(self.buffer) < HARD_LIMIT or self._stop or self._error is not None, timeout=30
                )
            if self._error is not None and len(self.buffer) >= HARD_LIMIT:
                raise WriteFailed(
                    f"florql cannot write log records to {self.files.url} ({self._error}); "
                    f"{len(self.buffer):,} records wait in memory, the most it keeps: stopping. "
                    "Free some space (or fix the store) and run again."
                ) from self._error

    def flush(self) -> None:
        """Write everything buffered so far, on the calling thread."""
        self._flush_once()

    def close(self) -> None:
        """Stop the thread and write what is left; `WriteFailed` when that cannot be written."""
        self._stop = True
        self._closing.set()
        self._wake.set()
        self._thread.join()
        try:
            self._flush_once()
        except Exception as exc:
            raise WriteFailed(
                f"could not write the last {len(self.buffer):,} log records to {self.files.url}: {exc}"
            ) from exc
        if self.paths:
            self.files.sync_folder(posixpath.dirname(self.paths[-1]))

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                state = self._flush_once(swap_hook=True)
            except Exception as exc:  # keep training alive and the records in memory; retry
                if self._error is None:
                    self._say(
                        f"could not write log records ({exc}); they stay in memory and the write is "
                        f"retried every {self.interval:g} s"
                    )
                self._error = exc
                with self._drained:
                    self._drained.notify_all()
                self._closing.wait(self.interval)  # not a busy loop while the hot path keeps waking us
                continue
            if self._error is not None:
                self._error = None
                self._say("writing log records works again; none was lost")
            if self.on_flush is not None:
                try:
                    self.on_flush(state)
                except Exception:  # the heartbeat is rewritten at the next flush
                    pass

    def _say(self, message: str) -> None:
        run = self.metadata.get("run_id")
        print(f"florql: run {run}: {message}" if run else f"florql: {message}", file=sys.stderr, flush=True)

    def _flush_once(self, swap_hook: bool = False) -> Any:
        with self._lock:
            state = self.on_swap() if swap_hook and self.on_swap is not None else None
            if self._pending is not None:  # a segment an earlier attempt could not write: first
                self._write_pending()
            buffer = self.buffer
            n = len(buffer)
            if n:
                records = buffer[:n]  # the prefix: appends after this point stay for the next flush
                if self.has_deferred:
                    records = [_resolved(r) for r in records]
                data = segment_codec.encode(self.records_written, records, self.metadata)
                self._pending = (segment_codec.checked_path(self.path_for(self._segment_seq), data), data, n)
                self._write_pending()
            with self._drained:
                self._drained.notify_all()
            return state

    def _write_pending(self) -> None:
        assert self._pending is not None
        path, data, n = self._pending
        # Atomic; raises (the records kept) when it cannot be written. The folder is synced once, at
        # `close`: a sync a second woke this thread to take the core and the GIL back from training.
        self.files.put(path, data, durable_name=False)
        self._pending = None
        del self.buffer[:n]
        self.records_written += n
        self._segment_seq += 1
        self.paths.append(path)
        self.segments_written += 1


def _resolved(record: tuple) -> tuple:
    name, value, position = record
    if type(value) is Deferred:
        value = value.resolve()
    return (name, value, position)
