"""Append-only log segments: Arrow IPC files, each written whole and atomically.

A segment holds the records one writer (a trainer or a replay job) buffered since its last flush.
Records are `(seq, name, loop_path, coords, typed value)`; `coords` are the iteration indices of
the enclosing loops, outermost first, named by `loop_path` ("epoch/step").
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

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
    run of records and gathered with `take`.
    """
    n = len(records)
    names = [r[0] for r in records]
    values = [r[1] for r in records]
    positions: list[tuple] = []
    index = [0] * n
    previous: tuple | None = None
    for i, r in enumerate(records):
        if r[2] is not previous:  # consecutive records of one iteration share the tuple
            previous = r[2]
            positions.append(previous)
        index[i] = len(positions) - 1
    take = pa.array(index, pa.int32())
    paths = pa.array([p[0] for p in positions], pa.string()).take(take)
    offsets = [0] * (len(positions) + 1)
    flat: list[int] = []
    for k, p in enumerate(positions):
        flat.extend(p[1:])
        offsets[k + 1] = len(flat)
    coords = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int64())).take(take)
    vtypes, typed = _typed_columns(values)
    arrays = [
        pa.array(range(first_seq, first_seq + n), pa.int64()),
        pa.array(names, pa.string()),
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
        return pa.array(["float"] * n, pa.string()), [pa.array(values, pa.float64()), *nulls]
    columns: dict[str, list[Any]] = {k: [None] * n for k in ("float", "int", "bool", "str")}
    vtypes: list[str] = [""] * n
    for i, value in enumerate(values):
        vtype = VALUE_TYPES[type(value)]
        vtypes[i] = vtype
        columns[vtype][i] = value
    return pa.array(vtypes, pa.string()), [
        pa.array(columns["float"], pa.float64()),
        pa.array(columns["int"], pa.int64()),
        pa.array(columns["bool"], pa.bool_()),
        pa.array(columns["str"], pa.string()),
    ]


def encode(batches: Iterable[pa.RecordBatch], metadata: dict[str, str]) -> bytes:
    sink = io.BytesIO()
    schema = SCHEMA.with_metadata(metadata)
    with pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def write_segment(files: RunFiles, path: str, batch: pa.RecordBatch, metadata: dict[str, str]) -> None:
    files.put(path, encode([batch], metadata))


def read_segment(files: RunFiles, path: str) -> pa.Table:
    """A whole segment; a truncated or foreign file raises `pa.ArrowInvalid`."""
    local = files.local_path(path)
    source: Any = pa.memory_map(local) if local else pa.BufferReader(files.get(path))
    with pa.ipc.open_file(source) as reader:
        return reader.read_all()
