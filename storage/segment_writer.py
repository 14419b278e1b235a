"""The background thread that turns buffered log records into segment files.

The training thread only appends tuples to `buffer`; this thread swaps the list out at least
every `interval` seconds (or sooner under pressure), converts it to Arrow and writes one segment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from florql.storage import segments
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
        self.buffer: list[tuple] = []
        self.has_deferred = False
        self.records_written = 0
        self.segments_written = 0
        self.paths: list[str] = []
        self._segment_seq = 0
        self._wake = threading.Event()
        self.warmed = threading.Event()  # set once pyarrow's one-time costs are paid
        self._drained = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # one flush at a time (thread or an explicit flush())
        self._thread = threading.Thread(target=self._run, name="florql-segment-writer", daemon=True)
        self._thread.start()

    def pressure(self) -> None:
        """Called by the hot path when the buffer is large: wake the writer, wait when too large."""
        self._wake.set()
        if len(self.buffer) >= HARD_LIMIT:
            with self._drained:
                self._drained.wait_for(lambda: len(self.buffer) < HARD_LIMIT or self._stop, timeout=30)

    def flush_soon(self) -> None:
        self._wake.set()

    def flush(self) -> None:
        """Write everything buffered so far, on the calling thread."""
        self._flush_once()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join()
        self._flush_once()
        if self._error is not None:
            raise RuntimeError("florql could not write log segments") from self._error

    def _run(self) -> None:
        # pyarrow's first conversion and encoding cost ~0.15 s of GIL-held work: pay it now, while
        # the script is still setting up, not in the middle of its first training iterations.
        segments.encode([segments.records_to_batch(0, [("warmup", 0.0, ("",)), ("warmup", 0, ("",))])], {})
        self.warmed.set()
        while not self._stop:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                state = self._flush_once(swap_hook=True)
                if self.on_flush is not None:
                    self.on_flush(state)
            except BaseException as exc:  # keep training alive; report at close
                self._error = exc
                time.sleep(self.interval)

    def _flush_once(self, swap_hook: bool = False) -> Any:
        with self._lock:
            state = None
            if swap_hook and self.on_swap is not None:
                try:
                    state = self.on_swap()
                except Exception as exc:  # the records still land; reported at close
                    self._error = exc
            records, self.buffer = self.buffer, []  # atomic under the GIL
            with self._drained:
                self._drained.notify_all()
            if not records:
                return state
            if self.has_deferred:
                self.has_deferred = False
                records = [_resolved(r) for r in records]
            batch = segments.records_to_batch(self.records_written, records)
            self.records_written += len(records)
            path = self.path_for(self._segment_seq)
            self._segment_seq += 1
            segments.write_segment(self.files, path, batch, self.metadata)
            self.paths.append(path)
            self.segments_written += 1
            return state


def _resolved(record: tuple) -> tuple:
    name, value, position = record
    if type(value) is Deferred:
        value = value.resolve()
    return (name, value, position)
