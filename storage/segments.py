"""Append-only log segments, read into Arrow tables; the Arrow IPC files florql writes on the query side.

A segment holds the records one writer (a trainer or a replay job) buffered since its last flush.
Records are `(seq, name, loop_path, coords, typed value)`; `coords` are the iteration indices of
the enclosing loops, outermost first, named by `loop_path` ("epoch/step").

Writers write `segment_codec`'s format (`.seg`: NumPy buffers, no pyarrow in a training process).
Segments of florql versions before it, and the recorded values a replay job audits against, are
Arrow IPC files (`.arrow`, zstd-compressed); both read the same way.

A segment's name carries the XXH3-128 of its bytes (`00000003.xxh3-<32 hex digits>.seg`), and
every read checks it, so a truncated or bit-flipped segment is reported by name and never answered
from. Segments of older florql versions carry the first 32 hex digits of their SHA-256
(`00000003.<32 hex digits>.arrow`), or no checksum.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from florql.storage import digests, segment_codec
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

VALUE_TYPES = segment_codec.VALUE_TYPES

# The repetitive strings are dictionary-encoded (as stored in both formats); readers get SCHEMA back.
_DICTIONARY = ("name", "loop_path", "value_type")
STORED_SCHEMA = pa.schema(
    [pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if f.name in _DICTIONARY else f for f in SCHEMA]
)
WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def records_table(first_seq: int, records: Sequence[tuple[str, Any, tuple]]) -> pa.Table:
    """Records as a reader gets them back from a segment (SCHEMA)."""
    return _table(segment_codec.decode(segment_codec.encode(first_seq, records, {}))).cast(SCHEMA)


def _table(columns: segment_codec.Columns) -> pa.Table:
    """A decoded segment as an Arrow table of STORED_SCHEMA (its header's metadata attached)."""
    header, arrays = columns.header, columns.arrays
    n = columns.rows
    position = arrays["position"]
    depth = arrays["depth"].astype(np.int32)
    position_offsets = np.zeros(len(depth) + 1, np.int32)
    np.cumsum(depth, out=position_offsets[1:])
    coords = pa.ListArray.from_arrays(_numeric(position_offsets), _numeric(arrays["coords"]))
    types = header["types"]
    type_codes = arrays["value_type"] if "value_type" in arrays else np.zeros(n, np.int32)
    values = [_typed(arrays, type_codes, types.index(t) if t in types else -1, t) for t in VALUE_TYPES.values()]
    table = pa.table(
        [
            _numeric(np.arange(header["first_seq"], header["first_seq"] + n, dtype=np.int64)),
            _dictionary(arrays["name"], header["names"]),
            _dictionary(arrays["path"][position], header["paths"]),
            coords.take(_numeric(position)),
            _dictionary(type_codes, types),
            *values,
        ],
        schema=STORED_SCHEMA,
    )
    return table.replace_schema_metadata(header["metadata"])


def _numeric(array: np.ndarray) -> pa.Array:
    """A fixed-width numeric array over `array`'s memory (not bool: Arrow packs those into bits)."""
    array = np.ascontiguousarray(array)
    return pa.Array.from_buffers(pa.from_numpy_dtype(array.dtype), len(array), [None, pa.py_buffer(array)])


def _dictionary(codes: np.ndarray, dictionary: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(_numeric(codes.astype(np.int32, copy=False)), _strings(dictionary))


def _strings(items: list[str]) -> pa.Array:
    """A string array built from buffers (`pa.array` would import pandas)."""
    encoded = [s.encode() for s in items]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:], dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(items), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    )


def _typed(arrays: dict[str, np.ndarray], type_codes: np.ndarray, code: int, kind: str) -> pa.Array:
    """The value column of type `kind`: the rows of that type hold their values, the others null."""
    n = len(type_codes)
    arrow_type = SCHEMA.field(f"value_{kind}").type
    if code < 0:
        return pa.nulls(n, arrow_type)
    present = type_codes == code
    validity = None if present.all() else pa.py_buffer(np.packbits(present, bitorder="little"))
    if kind == "str":
        lengths = np.zeros(n, np.int64)
        lengths[present] = np.diff(arrays["str_offsets"])
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:], dtype=np.int32)
        data = pa.py_buffer(arrays["str_data"])
        return pa.Array.from_buffers(arrow_type, n, [validity, pa.py_buffer(offsets), data])
    dense = arrays[kind]
    full = dense if validity is None else np.zeros(n, dense.dtype)
    if validity is not None:
        full[present] = dense
    data = pa.py_buffer(np.packbits(full, bitorder="little") if kind == "bool" else full)
    return pa.Array.from_buffers(arrow_type, n, [validity, data])


def encode(batches: Iterable[pa.RecordBatch], metadata: dict[str, str]) -> bytes:
    """An Arrow IPC file of `batches` (SCHEMA), stored dictionary-encoded and zstd-compressed."""
    sink = io.BytesIO()
    schema = STORED_SCHEMA.with_metadata(metadata)
    with pa.ipc.new_file(sink, schema, options=WRITE_OPTIONS) as writer:
        for batch in batches:
            writer.write_batch(batch.cast(STORED_SCHEMA))
    return sink.getvalue()


def write_table(files: RunFiles, path: str, batches: Iterable[pa.RecordBatch], metadata: dict[str, str]) -> str:
    """Write `batches` as an Arrow IPC file at `path` (`….arrow`) with its checksum in the name."""
    data = encode(batches, metadata)
    final = segment_codec.checked_path(path, data)
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
    checksum = segment_codec.checksum_in_name(path)
    if checksum and not digests.matches(buffer, checksum):
        raise CorruptSegment(
            f"log segment {path} is corrupt: its {buffer.size} bytes do not match the checksum in its name "
            f"(truncated or altered since it was written). {_REMEDY}"
        )
    table = _read_arrow(path, buffer) if path.endswith(".arrow") else _read_codec(path, buffer)
    if table.schema.equals(STORED_SCHEMA, check_metadata=False):
        return table.cast(SCHEMA.with_metadata(table.schema.metadata)) if decoded else table
    if not table.schema.equals(SCHEMA, check_metadata=False):
        raise CorruptSegment(f"log segment {path} does not hold florql log records (schema {table.schema}). {_REMEDY}")
    return table


def _read_codec(path: str, buffer: pa.Buffer) -> pa.Table:
    try:
        return _table(segment_codec.decode(memoryview(buffer)))
    except (segment_codec.MalformedSegment, KeyError, IndexError, TypeError, ValueError, pa.ArrowException) as err:
        raise CorruptSegment(f"log segment {path} is not a readable florql segment ({err}). {_REMEDY}") from err


def _read_arrow(path: str, buffer: pa.Buffer) -> pa.Table:
    try:
        options = pa.ipc.IpcReadOptions(use_threads=buffer.size >= _THREADED_MIN_BYTES)
        with pa.ipc.open_file(buffer, options=options, memory_pool=_DECODE_POOL) as reader:
            return reader.read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
        raise CorruptSegment(f"log segment {path} is not a readable Arrow file ({err}). {_REMEDY}") from err


_REMEDY = (
    "Restore it from a copy, or delete it to go on without its rows (a replay job's folder can be deleted "
    "whole: the next query that needs it replays it)."
)
