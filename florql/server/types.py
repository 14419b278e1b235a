"""Arrow ↔ PostgreSQL types: OIDs, vectorised text/binary output, parameter input.

Result batches are encoded column by column with pyarrow compute, and the DataRow
messages of a whole batch are assembled in one vectorised join, so throughput does
not depend on a Python loop per value except for rare types and float edge cases.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .protocol import Field, ProtocolError

PG_EPOCH = dt.datetime(2000, 1, 1)
PG_EPOCH_DATE = dt.date(2000, 1, 1)
_UNIX_TO_PG_DAYS = 10957
_UNIX_TO_PG_MICROS = _UNIX_TO_PG_DAYS * 86_400_000_000


@dataclass(frozen=True)
class PgType:
    oid: int
    name: str  # pg_type.typname
    sql_name: str  # format_type() output
    typlen: int
    category: str
    array_oid: int = 0


# (oid, typname, format_type name, typlen, typcategory, array oid)
_TYPES = [
    PgType(16, "bool", "boolean", 1, "B", 1000),
    PgType(17, "bytea", "bytea", -1, "U", 1001),
    PgType(18, "char", '"char"', 1, "Z", 1002),
    PgType(19, "name", "name", 64, "S", 1003),
    PgType(20, "int8", "bigint", 8, "N", 1016),
    PgType(21, "int2", "smallint", 2, "N", 1005),
    PgType(22, "int2vector", "int2vector", -1, "A", 1006),
    PgType(23, "int4", "integer", 4, "N", 1007),
    PgType(24, "regproc", "regproc", 4, "N", 1008),
    PgType(25, "text", "text", -1, "S", 1009),
    PgType(26, "oid", "oid", 4, "N", 1028),
    PgType(30, "oidvector", "oidvector", -1, "A", 1013),
    PgType(114, "json", "json", -1, "U", 199),
    PgType(194, "pg_node_tree", "pg_node_tree", -1, "Z"),
    PgType(700, "float4", "real", 4, "N", 1021),
    PgType(701, "float8", "double precision", 8, "N", 1022),
    PgType(705, "unknown", "unknown", -2, "X"),
    PgType(1042, "bpchar", "character", -1, "S", 1014),
    PgType(1043, "varchar", "character varying", -1, "S", 1015),
    PgType(1082, "date", "date", 4, "D", 1182),
    PgType(1083, "time", "time without time zone", 8, "D", 1183),
    PgType(1114, "timestamp", "timestamp without time zone", 8, "D", 1115),
    PgType(1184, "timestamptz", "timestamp with time zone", 8, "D", 1185),
    PgType(1186, "interval", "interval", 16, "T", 1187),
    PgType(1700, "numeric", "numeric", -1, "N", 1231),
    PgType(2205, "regclass", "regclass", 4, "N", 2210),
    PgType(2206, "regtype", "regtype", 4, "N", 2211),
    PgType(2249, "record", "record", -1, "P", 2287),
    PgType(2278, "void", "void", 4, "P"),
    PgType(2950, "uuid", "uuid", 16, "U", 2951),
    PgType(3802, "jsonb", "jsonb", -1, "U", 3807),
]
_ARRAYS = [PgType(t.array_oid, "_" + t.name, t.sql_name + "[]", -1, "A") for t in _TYPES if t.array_oid]
TYPES: dict[int, PgType] = {t.oid: t for t in _TYPES + _ARRAYS}
ELEMENT_OF: dict[int, int] = {t.array_oid: t.oid for t in _TYPES if t.array_oid}
BY_NAME: dict[str, PgType] = {t.name: t for t in TYPES.values()}


def pg_type_of(t: pa.DataType) -> PgType:
    """The PostgreSQL type a client sees for an Arrow column type."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        element = pg_type_of(t.value_type)
        return TYPES[element.array_oid] if element.array_oid else TYPES[1009]
    return TYPES[_scalar_oid(t)]


def _scalar_oid(t: pa.DataType) -> int:
    checks: list[tuple[Callable[[pa.DataType], bool], int]] = [
        (pa.types.is_boolean, 16),
        (lambda t: t in (pa.int8(), pa.int16(), pa.uint8()), 21),
        (lambda t: t in (pa.int32(), pa.uint16()), 23),
        (lambda t: t in (pa.int64(), pa.uint32()), 20),
        (pa.types.is_integer, 1700),  # uint64 does not fit int8
        (lambda t: t in (pa.float16(), pa.float32()), 700),
        (pa.types.is_floating, 701),
        (pa.types.is_decimal, 1700),
        (pa.types.is_date, 1082),
        (pa.types.is_time, 1083),
        (lambda t: pa.types.is_timestamp(t) and t.tz is not None, 1184),
        (pa.types.is_timestamp, 1114),
        (pa.types.is_duration, 1186),
        (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t), 17),
        (lambda t: pa.types.is_struct(t) or pa.types.is_map(t), 114),
    ]
    return next((oid for check, oid in checks if check(t)), 25)


def fields_for(schema: pa.Schema, formats: list[int]) -> list[Field]:
    return [
        Field(f.name, (pt := pg_type_of(f.type)).oid, pt.typlen, result_format(formats, i))
        for i, f in enumerate(schema)
    ]


def result_format(formats: list[int], i: int) -> int:
    """Bind's result-format list: empty = all text, one entry = applies to all."""
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else formats[i]


# -- text output ---------------------------------------------------------------


def pg_float(x: float, single: bool = False) -> str:
    """float8out/float4out with extra_float_digits > 0: shortest round-trip digits."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    text = str(np.float32(x)) if single else repr(x)
    if "e" in text or x == 0 or 1e-4 <= abs(x) < 1e15:
        return text.removesuffix(".0")
    digits = text.lstrip("-").replace(".", "").strip("0")
    return _exp_form(x, len(digits))  # Python prints 1e15..1e16 positionally, PostgreSQL does not


def _exp_form(x: float, ndigits: int) -> str:
    mantissa, exp = f"{x:.{ndigits - 1}e}".split("e")
    return f"{mantissa}e{exp[0]}{int(exp[1:]):02d}"


def _text_floats(arr: pa.Array) -> pa.Array:
    single = arr.type != pa.float64()
    out = pc.cast(arr, pa.string())
    values = pc.abs(pc.fill_null(pc.cast(arr, pa.float64()), 1.0)).to_numpy(zero_copy_only=False)
    # Arrow and PostgreSQL print the same digits in [1e-4, 1e10); fix up the rest in Python.
    odd = ~(((values >= 1e-4) & (values < 1e10)) | (values == 0))
    if not odd.any():
        return out
    fixed = [pg_float(v, single) for v in pc.filter(arr, pa.array(odd)).to_pylist()]
    return pc.replace_with_mask(out, pa.array(odd & ~np.asarray(arr.is_null())), pa.array(fixed, pa.string()))


def _text_timestamps(arr: pa.Array) -> pa.Array:
    if arr.type.tz is not None:
        arr = pc.cast(arr, pa.timestamp("us", "UTC"))
    text = pc.cast(pc.cast(arr, pa.timestamp("us", arr.type.tz)), pa.string())
    text = pc.replace_substring_regex(text, r"Z$", "")
    text = pc.replace_substring_regex(text, r"\.0+$", "")
    text = pc.replace_substring_regex(text, r"(\.\d*[1-9])0+$", r"\1")
    return pc.binary_join_element_wise(text, "+00", "") if arr.type.tz is not None else text


def _text_bool(arr: pa.Array) -> pa.Array:
    return pc.if_else(arr, "t", "f")


def text_value(v: Any) -> str:
    """Text form of one Python value, for the rare types encoded one by one."""
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, float):
        return pg_float(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return "{" + ",".join(_array_item(x) for x in v) + "}"
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    if isinstance(v, dt.timedelta):
        return _interval(v)
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ").replace("+00:00", "+00")
    return str(v)


def _array_item(v: Any) -> str:
    if v is None:
        return "NULL"
    s = text_value(v)
    if s == "" or any(c in s for c in '{},"\\ ') or s.upper() == "NULL":
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def _interval(v: dt.timedelta) -> str:
    days, rest = v.days, v - dt.timedelta(days=v.days)
    hours, rem = divmod(rest.total_seconds(), 3600)
    minutes, seconds = divmod(rem, 60)
    clock = f"{int(hours):02d}:{int(minutes):02d}:{seconds:09.6f}".rstrip("0").rstrip(".")
    return f"{days} days {clock}" if days else clock


def _text_python(arr: pa.Array) -> pa.Array:
    return pa.array([None if v is None else text_value(v) for v in arr.to_pylist()], pa.string())


def _text_column(arr: pa.Array) -> pa.Array:
    t = arr.type
    if pa.types.is_boolean(t):
        return _text_bool(arr)
    if pa.types.is_floating(t):
        return _text_floats(arr)
    if pa.types.is_timestamp(t):
        return _text_timestamps(arr)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr
    if pa.types.is_integer(t) or pa.types.is_decimal(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return pc.cast(arr, pa.string())
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_dictionary(t):
        return _text_column(arr.dictionary_decode())
    return _text_python(arr)


# -- binary output -------------------------------------------------------------

_FIXED = {16: "?", 21: ">i2", 23: ">i4", 20: ">i8", 700: ">f4", 701: ">f8"}


def _fixed_width(values: np.ndarray, arr: pa.Array) -> pa.Array:
    width = values.dtype.itemsize
    raw = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values.tobytes())])
    return pc.if_else(arr.is_valid(), raw.cast(pa.binary()), pa.scalar(None, pa.binary()))


def _binary_column(arr: pa.Array, oid: int) -> pa.Array:
    if oid in _FIXED:
        zero = False if oid == 16 else 0
        filled = pc.fill_null(arr, zero).to_numpy(zero_copy_only=False)
        return _fixed_width(filled.astype(_FIXED[oid]), arr)
    if oid == 1082:
        days = pc.fill_null(pc.cast(arr, pa.int32()), 0).to_numpy(zero_copy_only=False)
        return _fixed_width((days - _UNIX_TO_PG_DAYS).astype(">i4"), arr)
    if oid in (1114, 1184):
        micros = pc.fill_null(pc.cast(pc.cast(arr, pa.timestamp("us", arr.type.tz)), pa.int64()), 0)
        return _fixed_width((micros.to_numpy(zero_copy_only=False) - _UNIX_TO_PG_MICROS).astype(">i8"), arr)
    if oid in (25, 1043, 114, 17):
        return _text_column(arr).cast(pa.binary()) if oid != 17 else arr.cast(pa.binary())
    if oid == 1700:
        return pa.array(
            [None if v is None else numeric_binary(decimal.Decimal(v)) for v in arr.to_pylist()], pa.binary()
        )
    raise NotSupported(f"binary output is not supported for type {TYPES[oid].name}")


def numeric_binary(d: decimal.Decimal) -> bytes:
    """numeric_send: base-10000 digit groups around the decimal point."""
    if d.is_nan():
        return struct.pack("!hhHH", 0, 0, 0xC000, 0)
    sign, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    text = "".join(map(str, digits)) + "0" * max(exp, 0)
    point = len(text) + min(exp, 0)
    text = text.zfill(len(text) - point) if point < 0 else text
    point = max(point, 0)
    whole, frac = text[:point].lstrip("0"), text[point:]
    whole = whole.zfill(-(-len(whole) // 4) * 4)
    frac = frac + "0" * (-len(frac) % 4)
    groups = [int(whole[i : i + 4]) for i in range(0, len(whole), 4)] + [
        int(frac[i : i + 4]) for i in range(0, len(frac), 4)
    ]
    weight = len(whole) // 4 - 1
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    return struct.pack(
        f"!hhHH{len(groups)}H", len(groups), weight if groups else 0, 0x4000 if sign else 0, max(-exp, 0), *groups
    )


class NotSupported(Exception):
    sqlstate = "0A000"


# -- DataRow assembly ------------------------------------------------------------


def _be32(values: np.ndarray) -> pa.Array:
    raw = values.astype(">i4").tobytes()
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(4), len(values), [None, pa.py_buffer(raw)]).cast(pa.binary())


def encode_batch(batch: pa.RecordBatch, fields: list[Field]) -> bytes:
    """All DataRow messages of a batch as one buffer."""
    n = batch.num_rows
    if n == 0:
        return b""
    total = np.full(n, 4 + 2, dtype=np.int64)
    parts: list[pa.Array | pa.Scalar] = []
    for column, f in zip(batch.columns, fields):
        values = _text_column(column) if f.format == 0 else _binary_column(column, f.type_oid)
        values = values.cast(pa.binary())
        lengths = pc.fill_null(pc.binary_length(values), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        total += 4 + np.maximum(lengths, 0)
        parts += [_be32(lengths), pc.fill_null(values, b"")]
    head = [pa.scalar(b"D"), _be32(total), pa.scalar(struct.pack("!h", len(fields)))]
    rows = pc.binary_join_element_wise(*head, *parts, pa.scalar(b""))
    return _concatenated(rows)


def _concatenated(arr: pa.Array) -> bytes:
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    return arr.buffers()[2][int(offsets[0]) : int(offsets[-1])].to_pybytes()


# -- parameter input ---------------------------------------------------------------

_INT_OIDS = {20, 21, 23, 26}
_FLOAT_OIDS = {700, 701}
_TRUE = {"t", "true", "y", "yes", "on", "1"}
_FALSE = {"f", "false", "n", "no", "off", "0"}


def decode_param(data: bytes | None, oid: int, fmt: int) -> Any:
    """A bound parameter as a Python value; errors are the client's (22P02/08P01)."""
    if data is None:
        return None
    try:
        return _decode_binary(data, oid) if fmt == 1 else _decode_text(data.decode(), oid)
    except (ValueError, struct.error, decimal.InvalidOperation, UnicodeDecodeError) as e:
        raise InvalidParameter(f"invalid input for parameter of type {_type_name(oid)}: {e}") from e


class InvalidParameter(Exception):
    sqlstate = "22P02"


def _type_name(oid: int) -> str:
    return TYPES[oid].name if oid in TYPES else str(oid)


def _decode_text(s: str, oid: int) -> Any:
    if oid in _INT_OIDS:
        return int(s)
    if oid in _FLOAT_OIDS:
        return float(s)
    if oid == 1700:
        return decimal.Decimal(s)
    if oid == 16:
        low = s.strip().lower()
        if low not in _TRUE | _FALSE:
            raise ValueError(s)
        return low in _TRUE
    if oid == 17:
        return bytes.fromhex(s[2:]) if s.startswith("\\x") else s.encode()
    if oid == 1082:
        return dt.date.fromisoformat(s)
    if oid in (1114, 1184):
        return dt.datetime.fromisoformat(s.replace(" ", "T", 1))
    return s


def _decode_binary(b: bytes, oid: int) -> Any:
    fixed = {20: "!q", 21: "!h", 23: "!i", 26: "!I", 700: "!f", 701: "!d"}
    if oid in fixed:
        return struct.unpack(fixed[oid], b)[0]
    if oid == 16:
        return b != b"\0"
    if oid == 17:
        return b
    if oid == 1082:
        return PG_EPOCH_DATE + dt.timedelta(days=struct.unpack("!i", b)[0])
    if oid in (1114, 1184):
        value = PG_EPOCH + dt.timedelta(microseconds=struct.unpack("!q", b)[0])
        return value.replace(tzinfo=dt.UTC) if oid == 1184 else value
    if oid == 1700:
        return _decode_numeric(b)
    if oid in (0, 25, 1043, 1042, 19, 114, 705):
        return b.decode()
    raise ProtocolError(f"binary input is not supported for parameter type {_type_name(oid)}")


def _decode_numeric(b: bytes) -> decimal.Decimal:
    ndigits, weight, sign, dscale = struct.unpack("!hhHH", b[:8])
    digits = struct.unpack(f"!{ndigits}H", b[8 : 8 + 2 * ndigits])
    if sign == 0xC000:
        return decimal.Decimal("NaN")
    value = sum(decimal.Decimal(d) * decimal.Decimal(10000) ** (weight - i) for i, d in enumerate(digits))
    value = value.quantize(decimal.Decimal(1).scaleb(-dscale)) if digits else decimal.Decimal(0)
    return -value if sign == 0x4000 else value
