"""Append-only log segments: Arrow IPC files (zstd-compressed), each written whole and atomically.

A segment holds the records one writer (a trainer or a replay job) buffered since its last flush.
Records are `(seq, name, loop_path, coords, typed value)`; `coords` are the iteration indices of
the enclosing loops, outermost first, named by `loop_path` ("epoch/step").

A segment's name carries the XXH3-128 of its bytes (`00000003.xxh3-<32 hex digits>.arrow`): the
file stays a plain Arrow IPC file, and every read checks it, so a truncated or bit-flipped segment
is reported by name and never answered from. Segments of older florql versions carry the first 32
hex digits of their SHA-256 (`00000003.<32 hex digits>.arrow`), or no checksum.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from florql.storage import digests
from florql.storage.errors import CorruptSegment
from florql.storage.runfiles import RunFiles

SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("name", pa.string()),
        ("loop_path", pa.string()),
        ("coords", pa.list_(pa.int64())),
        ("value_type", pa.string()),
        ("value_float", pa.float64()),
        ("value_int", pa.int64()),
        ("value_bool", pa.bool_()),
        ("value_str", pa.string()),
    ]
)

VALUE_TYPES = {float: "float", int: "int", bool: "bool", str: "str"}


def records_to_batch(first_seq: int, records: Sequence[tuple[str, Any, tuple]]) -> pa.RecordBatch:
    """Columns from `(name, value, position)` records; `position` is `(loop_path, *coords)`.

    Values are already plain Python float/int/bool/str (the hot path converted or rejected the rest).
    Records of one loop iteration share their position tuple, so coordinates are built once per
    run of records and gathered with `take`. Arrays are built from NumPy buffers, never with
    `pa.array`: its first call makes pyarrow import pandas, ~0.3 s of CPU holding the GIL that a
    training process would pay in its writer thread, against the training loop.
    """
    n = len(records)
    positions: list[tuple] = []
    index = [0] * n
    previous: tuple | None = None
    for i, r in enumerate(records):
        if r[2] is not previous:  # consecutive records of one iteration share the tuple
            previous = r[2]
            positions.append(previous)
        index[i] = len(positions) - 1
    take = _numbers(index, np.int32, pa.int32())
    paths = _repeated_strings([p[0] for p in positions]).take(take)
    offsets = [0] * (len(positions) + 1)
    flat: list[int] = []
    for k, p in enumerate(positions):
        flat.extend(p[1:])
        offsets[k + 1] = len(flat)
    coords = pa.ListArray.from_arrays(
        _numbers(offsets, np.int32, pa.int32()), _numbers(flat, np.int64, pa.int64())
    ).take(take)
    vtypes, typed = _typed_columns([r[1] for r in records])
    arrays = [
        _from_numpy(np.arange(first_seq, first_seq + n, dtype=np.int64), pa.int64()),
        _repeated_strings([r[0] for r in records]),
        paths,
        coords,
        vtypes,
        *typed,
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def _typed_columns(values: list[Any]) -> tuple[pa.Array, list[pa.Array]]:
    n = len(values)
    kinds = {type(v) for v in values}
    if kinds == {float}:  # the common case: one vectorised conversion
        nulls = [pa.nulls(n, t) for t in (pa.int64(), pa.bool_(), pa.string())]
        return _repeated_strings(["float"] * n), [_numbers(values, np.float64, pa.float64()), *nulls]
    columns: dict[str, list[Any]] = {k: [None] * n for k in ("float", "int", "bool", "str")}
    vtypes: list[str] = [""] * n
    for i, value in enumerate(values):
        vtype = VALUE_TYPES[type(value)]
        vtypes[i] = vtype
        columns[vtype][i] = value
    return _repeated_strings(vtypes), [
        _optional(columns["float"], np.float64, pa.float64()),
        _optional(columns["int"], np.int64, pa.int64()),
        _optional(columns["bool"], np.bool_, pa.bool_()),
        _strings(columns["str"]),
    ]


def _from_numpy(array: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """A fixed-width numeric array over `array`'s memory (not bool: Arrow packs those into bits)."""
    return pa.Array.from_buffers(arrow_type, len(array), [None, pa.py_buffer(array)])


def _numbers(values: Sequence[Any], np_type: type, arrow_type: pa.DataType) -> pa.Array:
    return _from_numpy(np.fromiter(values, np_type, len(values)), arrow_type)


def _optional(values: list[Any], np_type: type, arrow_type: pa.DataType) -> pa.Array:
    """`values` with None for null."""
    n = len(values)
    present = np.fromiter((v is not None for v in values), np.bool_, n)
    if not present.any():
        return pa.nulls(n, arrow_type)
    dense: np.ndarray = np.fromiter((v if v is not None else 0 for v in values), np_type, n)
    data = pa.py_buffer(np.packbits(dense, bitorder="little") if arrow_type == pa.bool_() else dense)
    return pa.Array.from_buffers(arrow_type, n, [_validity(present), data])


def _validity(present: np.ndarray) -> pa.Buffer | None:
    return None if present.all() else pa.py_buffer(np.packbits(present, bitorder="little"))


def _strings(items: list[str | None]) -> pa.Array:
    """A string array, None for null."""
    n = len(items)
    encoded = [b"" if s is None else s.encode() for s in items]
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, n), out=offsets[1:], dtype=np.int32)
    present = np.fromiter((s is not None for s in items), np.bool_, n)
    if n and not present.any():
        return pa.nulls(n, pa.string())
    buffers = [_validity(present), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), n, buffers)


def _repeated_strings(items: list[str]) -> pa.Array:
    """A string array of few distinct values (names, loop paths, types): each encoded once."""
    codes: dict[str, int] = {}
    index = [codes.setdefault(s, len(codes)) for s in items]
    dictionary = pa.DictionaryArray.from_arrays(_numbers(index, np.int32, pa.int32()), _strings(list(codes)))
    return dictionary.cast(pa.string())


# On disk the repetitive strings are dictionary-encoded and buffers zstd-compressed (Arrow IPC's own
# encodings: every Arrow reader opens them); readers get SCHEMA back. Segments written before,
# plain and uncompressed, read the same way.
_DICTIONARY = ("name", "loop_path", "value_type")
STORED_SCHEMA = pa.schema(
    [pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if f.name in _DICTIONARY else f for f in SCHEMA]
)
WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def encode(batches: Iterable[pa.RecordBatch], metadata: dict[str, str]) -> bytes:
    sink = io.BytesIO()
    schema = STORED_SCHEMA.with_metadata(metadata)
    with pa.ipc.new_file(sink, schema, options=WRITE_OPTIONS) as writer:
        for batch in batches:
            writer.write_batch(batch.cast(STORED_SCHEMA))
    return sink.getvalue()


_CHECKED = re.compile(r"\.((?:xxh3-)?[0-9a-f]{32})\.arrow$")


def checked_path(path: str, data: bytes) -> str:
    """`…/00000003.arrow` → `…/00000003.xxh3-<the XXH3-128 of data>.arrow`."""
    assert path.endswith(".arrow") and not _CHECKED.search(path), path
    return f"{path.removesuffix('.arrow')}.{digests.xxh3(data)}.arrow"


def write_segment(files: RunFiles, path: str, batch: pa.RecordBatch, metadata: dict[str, str]) -> str:
    """Write one batch as a segment; returns its path, `path` with the checksum in the name."""
    return write_table(files, path, [batch], metadata)


def write_table(files: RunFiles, path: str, batches: Iterable[pa.RecordBatch], metadata: dict[str, str]) -> str:
    data = encode(batches, metadata)
    final = checked_path(path, data)
    files.put(final, data)
    return final


# Decompressed segments go to malloc, not pyarrow's default mimalloc: mimalloc hands freed buffers
# back to the OS and faults them in again as zeroed huge pages, which took a quarter of an ingest's
# CPU time (a first ingest of 10M values: 2.0 M values/s with mimalloc, 3.8 M values/s with malloc).
_DECODE_POOL = pa.system_memory_pool()
# Decompressing a segment's columns on Arrow's thread pool pays off for large segments only: for a
# small one (a short run's epoch) handing the work to the pool costs more than decompressing it.
_THREADED_MIN_BYTES = 1 << 20


def read_segment(files: RunFiles, path: str, decoded: bool = True) -> pa.Table:
    """A whole segment, its checksum verified; `CorruptSegment` (naming the file) when it is not intact.

    `decoded=False`: the repetitive strings stay dictionary-encoded as stored (STORED_SCHEMA; the
    ingest maps dictionaries to ids, which costs far less than decoding every row)."""
    local = files.local_path(path)
    try:
        buffer = pa.memory_map(local).read_buffer() if local else pa.py_buffer(files.get(path))
    except FileNotFoundError:
        raise
    except OSError as err:
        raise CorruptSegment(f"log segment {path} cannot be read: {err}") from err
    checked = _CHECKED.search(path)
    if checked and not digests.matches(buffer, checked.group(1)):
        raise CorruptSegment(
            f"log segment {path} is corrupt: its {buffer.size} bytes do not match the checksum in its name "
            f"(truncated or altered since it was written). {_REMEDY}"
        )
    try:
        options = pa.ipc.IpcReadOptions(use_threads=buffer.size >= _THREADED_MIN_BYTES)
        with pa.ipc.open_file(buffer, options=options, memory_pool=_DECODE_POOL) as reader:
            table = reader.read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
        raise CorruptSegment(f"log segment {path} is not a readable Arrow file ({err}). {_REMEDY}") from err
    if table.schema.equals(STORED_SCHEMA, check_metadata=False):
        return table.cast(SCHEMA.with_metadata(table.schema.metadata)) if decoded else table
    if not table.schema.equals(SCHEMA, check_metadata=False):
        raise CorruptSegment(f"log segment {path} does not hold florql log records (schema {table.schema}). {_REMEDY}")
    return table


_REMEDY = (
    "Restore it from a copy, or delete it to go on without its rows (a replay job's folder can be deleted "
    "whole: the next query that needs it replays it)."
)
