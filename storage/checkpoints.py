"""Checkpoint files: a payload (pickled skeleton + raw tensor bytes) plus a JSON record written after it.

Large tensors and NumPy arrays (≥ `CHUNK_MIN_BYTES`; read-only snapshot arrays from
`SNAPSHOT_CHUNK_MIN_BYTES`) are stored apart, as content-addressed chunks
(`runs/<id>/chunks/<xx>/xxh3-<hash>`) that every checkpoint holding the same bytes refers to: a data set,
a frozen layer or an unchanged buffer is stored once per run. A chunk already present is not
written again. A chunk that lost its last record (a kill -9 mid-persist) is unused space, never a
wrong restore; `find_garbage` finds such chunks (and dead writes' temporary files) for `florql gc`.

Chunks first, then the payload, then the record: a checkpoint is visible exactly when it is
complete. The record carries the payload's XXH3-128 and the payload each chunk's, checked on
every read. XXH3-128 rather than SHA-256 because a checkpoint hashes every byte it holds, on cores
training wants: 14 GB/s against 1.4 GB/s here (0.02 s against 0.19 s for a 265 MB state; 0.5 ms of
a small MLP's 1.8 ms persist). Payloads and chunks of older stores, named by SHA-256, still read.
"""

from __future__ import annotations

import builtins
import json
import pickle
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from florql.storage import digests, layout
from florql.storage.errors import CorruptCheckpoint
from florql.storage.runfiles import RunFiles
from florql.storage.trees import tree_map

if TYPE_CHECKING:  # torch loads only in processes that read or write checkpoints, never on the query side
    import numpy as np
    import torch


__all__ = [
    "CHUNK_MIN_BYTES",
    "CheckpointRecord",
    "ChunkCache",
    "CorruptCheckpoint",
    "Garbage",
    "chunk_digest",
    "find_garbage",
    "list_checkpoints",
    "read_checkpoint",
    "write_checkpoint",
]

# Smaller leaves stay in the checkpoint's own file: a file (and two fsyncs) per small tensor costs
# more than storing its bytes again (a small CNN's checkpoint: 5 files and 25 ms of persist with
# 64 KiB here, 2 files with 1 MiB).
CHUNK_MIN_BYTES = 1 << 20
# Read-only snapshot arrays (a frame's data set, see `florql.scope`) are re-snapshotted only when
# their bytes change, so an unchanged one costs nothing after its first write: chunking pays from
# the second checkpoint on. The demo's two 1,000 KB data arrays, stored inline, were 90 % of each
# checkpoint's bytes and most of its persist CPU.
SNAPSHOT_CHUNK_MIN_BYTES = 64 << 10


@dataclass(frozen=True)
class CheckpointRecord:
    run_id: int
    name: str
    outer_index: int  # the outer-loop iteration it was taken in
    kind: str  # 'inner_end': after the iteration's first inner loop; 'iter_end': after the whole iteration
    coords: dict[str, int]
    bytes: int  # the state's size: its file and the chunks it refers to (what a restore reads)
    digest: str  # of its file: `xxh3-…`, or an older florql's SHA-256 hex digits
    stall_s: float  # time the training thread was held
    persist_s: float  # time the background writer took
    created_at: float
    file_bytes: int = 0  # its file's size; in this class, annotations name the type `builtins.bytes`
    stored_bytes: int = 0  # what it added to the store: its file and the chunks it was first to write
    chunks: tuple[str, ...] = ()  # the digest of each chunk it refers to

    def to_json(self) -> builtins.bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: builtins.bytes) -> CheckpointRecord:
        fields = json.loads(data)
        # Records written before chunks existed: the whole state sits in the file.
        fields.setdefault("file_bytes", fields.get("bytes"))
        fields.setdefault("stored_bytes", fields.get("bytes"))
        fields["chunks"] = tuple(fields.get("chunks", ()))
        if "sha256" in fields:  # written before payloads were named by XXH3
            fields["digest"] = fields.pop("sha256")
        return cls(**fields)


def checkpoint_name(outer_index: int, kind: str) -> str:
    return f"{outer_index:08d}-{kind}"


@dataclass(frozen=True)
class _TensorRef:
    """Where a tensor of the payload sits in the file's data section."""

    index: int
    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool = False


@dataclass(frozen=True)
class _ChunkRef:
    """A tensor or NumPy array of the payload stored as the chunk named by its bytes' digest."""

    digest: str
    nbytes: int
    dtype: str  # torch's name for a tensor ("float32"), NumPy's dtype.str for an array ("<f8")
    shape: tuple[int, ...]
    array: bool  # a NumPy array, else a tensor
    requires_grad: bool = False


MAGIC = b"FLORQLCKPT1\n"


def chunk_digest(raw: memoryview | builtins.bytes) -> str:
    """A chunk's name: the XXH3-128 of its bytes (`storage.digests`)."""
    return digests.xxh3(raw)


@dataclass
class ChunkCache:
    """What one writer knows of a run's chunks, so that unchanged state costs neither a hash nor a write.

    `stored`: digests known to be on disk. `_by_object`: the digests of the read-only NumPy arrays
    that own their data (snapshots no one writes to, see `florql.scope`) met in the last
    checkpoint; the next checkpoint holding the very same object reuses its digest unhashed.
    """

    stored: set[str] = field(default_factory=set)
    _by_object: dict[int, tuple[Any, str]] = field(default_factory=dict)
    _met: dict[int, tuple[Any, str]] = field(default_factory=dict)

    def digest(self, leaf: Any, raw: memoryview) -> str:
        known, digest = self._by_object.get(id(leaf), (None, ""))
        if known is not leaf:
            digest = chunk_digest(raw)
        if _immutable_array(leaf):
            self._met[id(leaf)] = (leaf, digest)
        return digest

    def checkpoint_done(self) -> None:
        self._by_object, self._met = self._met, {}


def _immutable_array(leaf: Any) -> bool:
    flags = getattr(leaf, "flags", None)
    return type(leaf).__module__ == "numpy" and flags is not None and flags.owndata and not flags.writeable


def _chunkable_array(leaf: Any) -> bool:
    import numpy as np

    return (
        type(leaf) is np.ndarray
        and leaf.nbytes >= (SNAPSHOT_CHUNK_MIN_BYTES if _immutable_array(leaf) else CHUNK_MIN_BYTES)
        and leaf.flags.c_contiguous
        and not leaf.dtype.hasobject  # object arrays hold pointers: they are pickled
        and leaf.dtype.fields is None
        and np.dtype(leaf.dtype.str) == leaf.dtype  # the bytes and dtype.str are the whole value
    )


def _strip(value: Any, tensors: list[torch.Tensor], chunks: dict[str, memoryview | None], cache: ChunkCache) -> Any:
    """The payload with tensors replaced by references (pickled small; bytes written raw or as chunks)."""
    import torch

    def ref(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            nbytes = leaf.numel() * leaf.element_size()
            if nbytes < CHUNK_MIN_BYTES:
                tensors.append(leaf)
                dtype = str(leaf.dtype).removeprefix("torch.")
                return _TensorRef(len(tensors) - 1, dtype, tuple(leaf.shape), leaf.requires_grad)
            return _chunk(leaf, _raw(leaf), str(leaf.dtype).removeprefix("torch."), False, leaf.requires_grad)
        if _chunkable_array(leaf):
            import numpy as np

            raw = memoryview(leaf.reshape(-1).view(np.uint8))  # any dtype: datetimes export no buffer
            return _chunk(leaf, raw, leaf.dtype.str, True, False)
        return leaf

    def _chunk(leaf: Any, raw: memoryview, dtype: str, array: bool, requires_grad: bool) -> _ChunkRef:
        digest = cache.digest(leaf, raw)
        chunks[digest] = None if digest in cache.stored else raw
        return _ChunkRef(digest, raw.nbytes, dtype, tuple(leaf.shape), array, requires_grad)

    return tree_map(ref, value)


def _raw(t: torch.Tensor) -> memoryview:
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")  # .data: the array's buffer


def _write_chunks(files: RunFiles, run_id: int, chunks: dict[str, memoryview | None], cache: ChunkCache) -> int:
    """Writes the chunks not yet on disk (each atomically); returns the bytes written."""
    written = 0
    for digest, raw in chunks.items():
        if raw is None or digest in cache.stored:
            continue
        path = layout.checkpoint_chunk_path(run_id, digest)
        if not files.exists(path):  # another checkpoint of the run (a replay's, say) may hold it
            files.put_uncached(path, raw)
            written += raw.nbytes
        cache.stored.add(digest)
    return written


def write_checkpoint(
    files: RunFiles,
    run_id: int,
    outer_index: int,
    kind: str,
    coords: dict[str, int],
    payload: dict[str, Any],
    stall_s: float,
    folder: str | None = None,
    cache: ChunkCache | None = None,
) -> CheckpointRecord:
    """Persist `payload` (CPU tensors, NumPy arrays and plain data); returns the record made visible last.

    `folder`: where the files go, the run's checkpoints folder unless a replay job names its own.

    Tensor bytes are hashed and written straight from their buffers: both release the GIL on
    large buffers, so the training thread keeps running while a checkpoint is persisted. Pass the
    same `cache` to each checkpoint of a writer to skip re-hashing and re-checking unchanged state.
    """
    started = time.perf_counter()
    cache = cache if cache is not None else ChunkCache()
    name = checkpoint_name(outer_index, kind)
    folder = folder or layout.checkpoints_dir(run_id)
    data_path = f"{folder}/{name}.ckpt"
    tensors: list[torch.Tensor] = []
    chunks: dict[str, memoryview | None] = {}
    sizes: dict[str, int] = {}
    skeleton = _strip(payload, tensors, chunks, cache)
    tree_map(lambda leaf: sizes.setdefault(leaf.digest, leaf.nbytes) if isinstance(leaf, _ChunkRef) else None, skeleton)
    chunks_written = _write_chunks(files, run_id, chunks, cache)
    header = pickle.dumps(skeleton, protocol=pickle.HIGHEST_PROTOCOL)
    digest = digests.Hasher()
    size = 0
    # Neither name is synced here: the caller syncs the folder once, when it has written its last
    # checkpoint (`RunFiles.sync_folder`). Each folder sync woke the persist thread, which took the
    # core and the GIL back from training. A power loss can then cost the latest checkpoints, never
    # a wrong one: each file's bytes are durable before its name appears, and the record's rename
    # follows the payload's in the same folder.
    with files.writer(data_path, durable_name=False) as f:
        parts: tuple[builtins.bytes | memoryview, ...] = (
            MAGIC,
            len(header).to_bytes(8, "little"),
            header,
            *(_raw(t) for t in tensors),
        )
        for part in parts:
            digest.update(part)
            f.write(part)
            size += len(part) if not isinstance(part, memoryview) else part.nbytes
    cache.checkpoint_done()
    record = CheckpointRecord(
        run_id=run_id,
        name=name,
        outer_index=outer_index,
        kind=kind,
        coords=coords,
        bytes=size + sum(sizes.values()),
        digest=digest.hexdigest(),
        stall_s=stall_s,
        persist_s=time.perf_counter() - started,
        created_at=time.time(),
        file_bytes=size,
        stored_bytes=size + chunks_written,
        chunks=tuple(sorted(sizes)),
    )
    try:
        files.put(f"{folder}/{name}.json", record.to_json(), durable_name=False)
    except BaseException:
        files.delete(data_path)  # without its record the payload is invisible: do not leave it taking space
        raise
    return record


def _load(data: builtins.bytes, chunk: Any) -> dict[str, Any]:
    """The payload of a checkpoint file; `chunk(ref)` gives a chunk's verified bytes (a bytearray)."""
    import torch

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
        if isinstance(value, _ChunkRef):
            return _from_chunk(value, chunk(value))
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


def _from_chunk(ref: _ChunkRef, data: bytearray) -> torch.Tensor | np.ndarray:
    """A writable tensor or array of its own over a copy of the chunk's bytes."""
    if ref.array:
        import numpy as np

        return np.frombuffer(bytearray(data), dtype=np.dtype(ref.dtype)).reshape(ref.shape)
    import torch

    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, ref.dtype)).reshape(ref.shape)
    return t.requires_grad_(ref.requires_grad) if ref.requires_grad else t


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
    """The payload, its size and digest (and each chunk's) checked; `CorruptCheckpoint` naming the file.

    `folder`: where it was written (`write_checkpoint`), the run's checkpoints folder by default."""
    path = f"{folder or layout.checkpoints_dir(record.run_id)}/{record.name}.ckpt"
    data = files.get(path)
    if len(data) != record.file_bytes or not digests.matches(data, record.digest):
        why = (
            f"{len(data)} bytes, {record.file_bytes} written" if len(data) != record.file_bytes else "checksum mismatch"
        )
        raise CorruptCheckpoint(
            f"checkpoint {record.name} of run {record.run_id} is corrupt ({why}): {path}; {_REMEDY}"
        )
    chunks: dict[str, bytearray] = {}

    def chunk(ref: _ChunkRef) -> bytearray:
        if ref.digest not in chunks:
            chunks[ref.digest] = _read_chunk(files, record, ref)
        return chunks[ref.digest]

    if not data.startswith(MAGIC):
        raise CorruptCheckpoint(
            f"checkpoint {record.name} of run {record.run_id} ({path}) is not a florql checkpoint file; {_REMEDY}"
        )
    payload = _load(data, chunk)
    position = payload.get("position") if isinstance(payload, dict) else None
    if position is not None and position != {"outer_index": record.outer_index, "kind": record.kind}:
        raise CorruptCheckpoint(
            f"checkpoint {record.name} of run {record.run_id} ({path}) holds the state of {position}, "
            f"not of its record; {_REMEDY}"
        )
    return payload


def _read_chunk(files: RunFiles, record: CheckpointRecord, ref: _ChunkRef) -> bytearray:
    path = layout.checkpoint_chunk_path(record.run_id, ref.digest)
    try:
        data = files.get(path)
    except FileNotFoundError:
        why = "missing"
    else:
        if len(data) == ref.nbytes and digests.matches(data, ref.digest):
            return bytearray(data)
        why = f"{len(data)} bytes, {ref.nbytes} written" if len(data) != ref.nbytes else "checksum mismatch"
    sharing = [r.name for r in list_checkpoints(files, record.run_id) if ref.digest in r.chunks]
    raise CorruptCheckpoint(
        f"the chunk {path} of checkpoint {record.name} of run {record.run_id} is corrupt ({why}); "
        f"checkpoints referring to it: {', '.join(sharing) or record.name}. Delete the .ckpt and .json files of "
        "those checkpoints and the chunk, and run `florql rebuild`: replays then start from another checkpoint"
    )


@dataclass(frozen=True)
class Garbage:
    """A run's files that no checkpoint needs (`find_garbage`)."""

    paths: tuple[str, ...]  # removable: old enough, and referred to by no checkpoint record
    bytes: int
    young: int  # unreferenced too, but newer than the minimum age (or of unknown age): kept


def find_garbage(files: RunFiles, run_id: int, min_age_s: float) -> Garbage:
    """Chunks of run `run_id` that no checkpoint record refers to (the run's own and every replay
    job's), and the temporary files of writes that never finished (a writer killed mid-write).

    A file younger than `min_age_s`, or whose age the backend does not tell, is kept: a persist
    writes its chunks before the record that refers to them, so a young unreferenced chunk may be
    one a live writer is about to publish. `CorruptCheckpoint` when a record cannot be read (the
    chunks it refers to are unknown, so none is garbage)."""
    folders = [layout.checkpoints_dir(run_id)]
    folders += [layout.replay_checkpoints_dir(run_id, job) for job in files.list_dirs(layout.replays_dir(run_id))]
    referenced = {
        digest
        for folder in folders
        for path in files.list(folder)
        if path.endswith(".json")
        for digest in read_record(files, path).chunks
    }
    candidates = [p for p in files.list(layout.chunks_dir(run_id)) if p.rsplit("/", 1)[-1] not in referenced]
    candidates += files.list_unfinished(layout.run_dir(run_id))
    now = time.time()
    paths: list[str] = []
    size = young = 0
    for path in candidates:
        try:
            nbytes, modified = files.file_info(path)
        except FileNotFoundError:  # a temporary file renamed into place since the listing
            continue
        if modified is None or now - modified < min_age_s:
            young += 1
        else:
            paths.append(path)
            size += nbytes or 0
    return Garbage(tuple(paths), size, young)


_REMEDY = "delete its .ckpt and .json files and run `florql rebuild`: replays then start from an earlier checkpoint"
