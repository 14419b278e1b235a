"""Checkpoint files: a torch-serialised payload plus a JSON record written after it.

The record is written only once the payload is durable, so a checkpoint is visible exactly when
it is complete; the record carries the payload's SHA-256, checked on every read.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import torch

from storage import layout
from storage.runfiles import RunFiles


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose bytes do not match the checksum recorded when it was written."""


@dataclass(frozen=True)
class CheckpointRecord:
    run_id: int
    name: str
    outer_index: int  # the outer-loop iteration it was taken in
    kind: str  # 'inner_end': after the iteration's first inner loop; 'iter_end': after the whole iteration
    coords: dict[str, int]
    bytes: int
    sha256: str
    stall_s: float  # time the training thread was held
    persist_s: float  # time the background writer took
    created_at: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "CheckpointRecord":
        return cls(**json.loads(data))


def checkpoint_name(outer_index: int, kind: str) -> str:
    return f"{outer_index:08d}-{kind}"


class _HashingWriter(io.RawIOBase):
    """Hashes and counts bytes on their way to the real file."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b)
        self.digest.update(view)
        self.target.write(view)
        self.size += view.nbytes
        return view.nbytes


def write_checkpoint(
    files: RunFiles, run_id: int, outer_index: int, kind: str, coords: dict[str, int],
    payload: dict[str, Any], stall_s: float,
) -> CheckpointRecord:
    """Persist `payload` (CPU tensors and plain data); returns the record made visible last."""
    started = time.perf_counter()
    name = checkpoint_name(outer_index, kind)
    with files.writer(layout.checkpoint_data_path(run_id, name)) as raw:
        hashing = _HashingWriter(raw)
        buffered = io.BufferedWriter(hashing, buffer_size=8 << 20)
        torch.save(payload, buffered)
        buffered.flush()
    record = CheckpointRecord(
        run_id=run_id, name=name, outer_index=outer_index, kind=kind, coords=coords,
        bytes=hashing.size, sha256=hashing.digest.hexdigest(), stall_s=stall_s,
        persist_s=time.perf_counter() - started, created_at=time.time(),
    )
    files.put(layout.checkpoint_meta_path(run_id, name), record.to_json())
    return record


def list_checkpoints(files: RunFiles, run_id: int) -> list[CheckpointRecord]:
    """Complete checkpoints of a run (those whose record was written), in order."""
    records = []
    for path in files.list(layout.checkpoints_dir(run_id)):
        if path.endswith(".json"):
            records.append(CheckpointRecord.from_json(files.get(path)))
    return sorted(records, key=lambda r: (r.outer_index, r.kind != "inner_end"))


def read_checkpoint(files: RunFiles, record: CheckpointRecord) -> dict[str, Any]:
    data = files.get(layout.checkpoint_data_path(record.run_id, record.name))
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        raise CorruptCheckpoint(
            f"checkpoint {record.name} of run {record.run_id} is corrupt (checksum mismatch); "
            "delete it and the planner will replay from an earlier one"
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
