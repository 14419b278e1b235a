"""Append-only log segments: Arrow IPC files, each written whole and atomically.

A segment holds the records one writer (a trainer or a replay job) buffered since its last flush.
Records are `(seq, name, loop_path, coords, typed value)`; `coords` are the iteration indices of
the enclosing loops, outermost first, named by `loop_path` ("epoch/step").
"""
from __future__ import annotations

import io
from typing import Any, Iterable, Sequence

import pyarrow as pa

from storage.runfiles import RunFiles

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
    """
    n = len(records)
    names: list[str] = [None] * n  # type: ignore[list-item]
    paths: list[str] = [None] * n  # type: ignore[list-item]
    coords: list[tuple] = [None] * n  # type: ignore[list-item]
    vtypes: list[str] = [None] * n  # type: ignore[list-item]
    floats: list[Any] = [None] * n
    ints: list[Any] = [None] * n
    bools: list[Any] = [None] * n
    strs: list[Any] = [None] * n
    columns = {"float": floats, "int": ints, "bool": bools, "str": strs}
    for i, (name, value, position) in enumerate(records):
        names[i] = name
        paths[i] = position[0]
        coords[i] = position[1:]
        vtype = VALUE_TYPES[type(value)]
        vtypes[i] = vtype
        columns[vtype][i] = value
    arrays = [
        pa.array(range(first_seq, first_seq + n), pa.int64()),
        pa.array(names, pa.string()),
        pa.array(paths, pa.string()),
        pa.array(coords, pa.list_(pa.int64())),
        pa.array(vtypes, pa.string()),
        pa.array(floats, pa.float64()),
        pa.array(ints, pa.int64()),
        pa.array(bools, pa.bool_()),
        pa.array(strs, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


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
