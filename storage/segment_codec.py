"""florql's log segment format, encoded and decoded with NumPy alone.

Training and replay processes write segments; they never import pyarrow: its import and its first
encode cost a run ~60 ms of CPU at start and ~1.2 ms per flush, against ~0.2 ms here (on the
training's own core, where it shares one). The query side reads segments into Arrow tables
(`segments.read_segment`).

A segment holds the records one writer buffered since its last flush, `(name, value, position)`
with `position = (loop_path, *coords)` and values already plain float/int/bool/str. On disk:

    MAGIC | u32 header length | JSON header | zlib stream of the column buffers, back to back

The header carries the dictionaries (names, loop paths, value types, in order of first
appearance), the first sequence number (a segment's records are numbered consecutively) and each
column's dtype and length. A record's position is an index into the segment's distinct positions:
records of one loop iteration share their position tuple, so it is stored once.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from florql.storage import digests, layout
from florql.storage.runfiles import RunFiles

MAGIC = b"FLORQL-SEGMENT-1\n"
VALUE_TYPES = {float: "float", int: "int", bool: "bool", str: "str"}
_HEADER_LENGTH = struct.Struct("<I")


class MalformedSegment(ValueError):
    """The bytes are not a segment of this format (the reader names the file)."""


@dataclass
class Columns:
    """A decoded segment: per record `name`, `position`, `value_type` (codes into the header's
    dictionaries); per distinct position `path` and `depth` (its number of coordinates) with their
    coordinates in `coords`; the values of each type, in record order, in `float`/`int`/`bool`, and
    strings as `str_offsets` into `str_data`."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return int(self.header["rows"])


def encode(first_seq: int, records: Sequence[tuple[str, Any, tuple]], metadata: dict[str, str]) -> bytes:
    n = len(records)
    names: dict[str, int] = {}
    name_codes = [names.setdefault(r[0], len(names)) for r in records]
    positions: list[tuple] = []
    position_index = [0] * n
    previous: tuple | None = None
    for i, r in enumerate(records):
        if r[2] is not previous:  # consecutive records of one iteration share the tuple
            previous = r[2]
            positions.append(previous)
        position_index[i] = len(positions) - 1
    paths: dict[str, int] = {}
    path_codes = [paths.setdefault(p[0], len(paths)) for p in positions]
    flat = [c for p in positions for c in p[1:]]
    arrays = {
        "name": _codes(name_codes, len(names)),
        "position": np.fromiter(position_index, np.int32, n),
        "path": _codes(path_codes, len(paths)),
        "depth": np.fromiter((len(p) - 1 for p in positions), np.uint8, len(positions)),  # loops nest < 256 deep
        "coords": np.fromiter(flat, np.int64, len(flat)),
    }
    values = [r[1] for r in records]
    types: dict[str, int] = {}
    if n and all(type(v) is float for v in values):  # the common case: one vectorised conversion
        types["float"] = 0
        arrays["float"] = np.fromiter(values, np.float64, n)
    else:
        type_codes = [types.setdefault(VALUE_TYPES[type(v)], len(types)) for v in values]
        arrays["value_type"] = _codes(type_codes, len(types))
        _typed_values(values, arrays)
    header = {
        "first_seq": first_seq,
        "rows": n,
        "metadata": metadata,
        "names": list(names),
        "paths": list(paths),
        "types": list(types),
        "columns": [[key, array.dtype.str, len(array)] for key, array in arrays.items()],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = zlib.compress(b"".join(a.tobytes() for a in arrays.values()), 1)
    return b"".join((MAGIC, _HEADER_LENGTH.pack(len(head)), head, body))


def _codes(codes: list[int], distinct: int) -> np.ndarray:
    dtype = np.uint8 if distinct <= 1 << 8 else np.uint16 if distinct <= 1 << 16 else np.int32
    return np.fromiter(codes, dtype, len(codes))


def _typed_values(values: list[Any], arrays: dict[str, np.ndarray]) -> None:
    by_type: dict[type, list[Any]] = {float: [], int: [], bool: [], str: []}
    for v in values:
        by_type[type(v)].append(v)
    for kind, dtype in ((float, np.float64), (int, np.int64), (bool, np.bool_)):
        if by_type[kind]:
            arrays[VALUE_TYPES[kind]] = np.fromiter(by_type[kind], dtype, len(by_type[kind]))
    if by_type[str]:
        encoded = [s.encode() for s in by_type[str]]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        arrays["str_offsets"] = offsets
        arrays["str_data"] = np.frombuffer(b"".join(encoded), np.uint8)


def decode(data: bytes | memoryview) -> Columns:
    """The columns of a segment; `MalformedSegment` saying what is wrong when it is not one."""
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise MalformedSegment("it does not start as a florql log segment")
    start = len(MAGIC) + _HEADER_LENGTH.size
    if len(view) < start:
        raise MalformedSegment("it ends inside its header")
    (head_length,) = _HEADER_LENGTH.unpack(view[len(MAGIC) : start])
    try:
        header = json.loads(bytes(view[start : start + head_length]))
        body = zlib.decompress(view[start + head_length :])
    except (ValueError, zlib.error) as err:
        raise MalformedSegment(f"its header or body cannot be read ({err})") from err
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    try:
        for key, dtype, length in header["columns"]:
            array = np.frombuffer(body, np.dtype(dtype), length, offset)
            arrays[key] = array
            offset += array.nbytes
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedSegment(f"its columns do not match its header ({err})") from err
    if offset != len(body):
        raise MalformedSegment(f"its body holds {len(body)} bytes, its columns {offset}")
    return Columns(header, arrays)


_CHECKED = re.compile(r"\.((?:xxh3-)?[0-9a-f]{32})\.(?:arrow|seg)$")


def checksum_in_name(path: str) -> str | None:
    """The checksum a segment's name carries (`xxh3-…`, or 32 hex digits of an old SHA-256)."""
    found = _CHECKED.search(path)
    return found.group(1) if found else None


def checked_path(path: str, data: bytes) -> str:
    """`…/00000003.seg` → `…/00000003.xxh3-<the XXH3-128 of data>.seg` (likewise `.arrow`)."""
    assert layout.is_segment(path) and checksum_in_name(path) is None, path
    stem, _, suffix = path.rpartition(".")
    return f"{stem}.{digests.xxh3(data)}.{suffix}"


def write_segment(
    files: RunFiles, path: str, first_seq: int, records: Sequence[tuple[str, Any, tuple]], metadata: dict[str, str]
) -> str:
    """Write records as one segment; returns its path, `path` with the checksum in the name."""
    data = encode(first_seq, records, metadata)
    final = checked_path(path, data)
    files.put(final, data)
    return final
