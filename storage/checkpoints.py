"""Checkpoint files: a payload (pickled skeleton + raw tensor bytes) plus a JSON record written after it.

The record is written only once the payload is durable, so a checkpoint is visible exactly when
it is complete; the record carries the payload's SHA-256, checked on every read.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import pickle
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from florql.storage import layout
from florql.storage.errors import CorruptCheckpoint
from florql.storage.runfiles import RunFiles
from florql.storage.trees import tree_map

if TYPE_CHECKING:  # torch loads only in processes that read or write checkpoints, never on the query side
    import torch


__all__ = ["CheckpointRecord", "CorruptCheckpoint", "list_checkpoints", "read_checkpoint", "write_checkpoint"]


@dataclass(frozen=True)
class CheckpointRecord:
    run_id: int
    name: str
    outer_index: int  # the outer-loop iteration it was taken in
    kind: str  # 'inner_end': after the iteration's first inner loop; 'iter_end': after the whole iteration
    coords: dict[str, int]
    bytes: int  # the payload's size; in this class, annotations name the type `builtins.bytes`
    sha256: str
    stall_s: float  # time the training thread was held
    persist_s: float  # time the background writer took
    created_at: float

    def to_json(self) -> builtins.bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: builtins.bytes) -> CheckpointRecord:
        return cls(**json.loads(data))


def checkpoint_name(outer_index: int, kind: str) -> str:
    return f"{outer_index:08d}-{kind}"


@dataclass(frozen=True)
class _TensorRef:
    """Where a tensor of the payload sits in the file's data section."""

    index: int
    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool = False


MAGIC = b"FLORQLCKPT1\n"


def _strip(value: Any, tensors: list[torch.Tensor]) -> Any:
    """The payload with tensors replaced by references (pickled small; bytes written raw)."""
    import torch

    def ref(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        tensors.append(leaf)
        return _TensorRef(
            len(tensors) - 1, str(leaf.dtype).removeprefix("torch."), tuple(leaf.shape), leaf.requires_grad
        )

    return tree_map(ref, value)


def _raw(t: torch.Tensor) -> memoryview:
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")  # .data: the array's buffer


def write_checkpoint(
    files: RunFiles,
    run_id: int,
    outer_index: int,
    kind: str,
    coords: dict[str, int],
    payload: dict[str, Any],
    stall_s: float,
    folder: str | None = None,
) -> CheckpointRecord:
    """Persist `payload` (CPU tensors and plain data); returns the record made visible last.

    `folder`: where the files go, the run's checkpoints folder unless a replay job names its own.

    Tensor bytes are written straight from their buffers: hashing and writing large buffers
    release the GIL, so the training thread keeps running while a checkpoint is persisted.
    """
    started = time.perf_counter()
    name = checkpoint_name(outer_index, kind)
    folder = folder or layout.checkpoints_dir(run_id)
    data_path = f"{folder}/{name}.ckpt"
    tensors: list[torch.Tensor] = []
    header = pickle.dumps(_strip(payload, tensors), protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.sha256()
    size = 0
    with files.writer(data_path) as f:
        chunks: tuple[bytes | memoryview, ...] = (
            MAGIC,
            len(header).to_bytes(8, "little"),
            header,
            *(_raw(t) for t in tensors),
        )
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
            size += len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
    record = CheckpointRecord(
        run_id=run_id,
        name=name,
        outer_index=outer_index,
        kind=kind,
        coords=coords,
        bytes=size,
        sha256=digest.hexdigest(),
        stall_s=stall_s,
        persist_s=time.perf_counter() - started,
        created_at=time.time(),
    )
    try:
        files.put(f"{folder}/{name}.json", record.to_json())
    except BaseException:
        files.delete(data_path)  # without its record the payload is invisible: do not leave it taking space
        raise
    return record


def _load(data: bytes) -> dict[str, Any]:
    import torch

    if not data.startswith(MAGIC):
        raise CorruptCheckpoint("not a florql checkpoint file")
    at = len(MAGIC)
    header_len = int.from_bytes(data[at : at + 8], "little")
    at += 8
    skeleton = pickle.loads(data[at : at + header_len])
    at += header_len
    buffer = bytearray(data[at:])

    def nbytes(ref: _TensorRef) -> int:
        numel = 1
        for d in ref.shape:
            numel *= d
        return numel * torch.empty((), dtype=getattr(torch, ref.dtype)).element_size()

    # Tensors are laid out in the order _strip met them, which is their index: a set of them
    # unpickles in another iteration order, so offsets go by index, not by the order met here.
    refs: list[_TensorRef] = []

    def collect(leaf: Any) -> Any:
        if isinstance(leaf, _TensorRef):
            refs.append(leaf)
        return leaf  # unchanged: containers such as torch.Size rebuild only from their own items

    tree_map(collect, skeleton)
    offsets, offset = {}, 0
    for r in sorted(refs, key=lambda r: r.index):
        offsets[r.index] = offset
        offset += nbytes(r)

    def build(value: Any) -> Any:
        if not isinstance(value, _TensorRef):
            return value
        dtype = getattr(torch, value.dtype)
        size = nbytes(value)
        if size:
            t = torch.frombuffer(buffer, dtype=torch.uint8, count=size, offset=offsets[value.index])
            t = t.view(dtype).reshape(value.shape)
        else:
            t = torch.empty(value.shape, dtype=dtype)
        return t.requires_grad_(value.requires_grad) if value.requires_grad else t

    return tree_map(build, skeleton)


def read_record(files: RunFiles, path: str) -> CheckpointRecord:
    """The record at `path` (`…/<name>.json`); `CorruptCheckpoint` naming the file when it cannot be read."""
    try:
        record = CheckpointRecord.from_json(files.get(path))
    except (ValueError, TypeError) as err:  # JSONDecodeError, missing or unexpected fields
        raise CorruptCheckpoint(f"the checkpoint record {path} cannot be read ({err}); {_REMEDY}") from err
    if path.rsplit("/", 1)[-1] != f"{record.name}.json" or record.name != checkpoint_name(
        record.outer_index, record.kind
    ):
        raise CorruptCheckpoint(f"the checkpoint record {path} does not describe its own checkpoint; {_REMEDY}")
    return record


def list_checkpoints(files: RunFiles, run_id: int) -> list[CheckpointRecord]:
    """Complete checkpoints of a run (those whose record was written), in order."""
    records = []
    for path in files.list(layout.checkpoints_dir(run_id)):
        if path.endswith(".json"):
            records.append(read_record(files, path))
    return sorted(records, key=lambda r: (r.outer_index, r.kind != "inner_end"))


def read_checkpoint(files: RunFiles, record: CheckpointRecord, folder: str | None = None) -> dict[str, Any]:
    """The payload, its size and SHA-256 checked against the record; `CorruptCheckpoint` naming the file.

    `folder`: where it was written (`write_checkpoint`), the run's checkpoints folder by default."""
    path = f"{folder or layout.checkpoints_dir(record.run_id)}/{record.name}.ckpt"
    data = files.get(path)
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        why = f"{len(data)} bytes, {record.bytes} written" if len(data) != record.bytes else "checksum mismatch"
        raise CorruptCheckpoint(
            f"checkpoint {record.name} of run {record.run_id} is corrupt ({why}): {path}; {_REMEDY}"
        )
    try:
        payload = _load(data)
    except CorruptCheckpoint as err:
        raise CorruptCheckpoint(f"checkpoint {record.name} of run {record.run_id} ({path}): {err}; {_REMEDY}") from err
    position = payload.get("position") if isinstance(payload, dict) else None
    if position is not None and position != {"outer_index": record.outer_index, "kind": record.kind}:
        raise CorruptCheckpoint(
            f"checkpoint {record.name} of run {record.run_id} ({path}) holds the state of {position}, "
            f"not of its record; {_REMEDY}"
        )
    return payload


_REMEDY = "delete its .ckpt and .json files and run `florql rebuild`: replays then start from an earlier checkpoint"
