"""PostgreSQL v3 wire format: parse frontend messages, build backend messages.

Pure functions over bytes so that the parser can be fuzzed without sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

PROTOCOL_V3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_SIZE = 10_000
MAX_MESSAGE_SIZE = 64 << 20


class ProtocolError(Exception):
    """A malformed message; the connection is closed after reporting it."""

    sqlstate = "08P01"


class Reader:
    """Cursor over one message body; every read is bounds-checked."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("message too short")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int16(self) -> int:
        return struct.unpack("!h", self.take(2))[0]

    def int32(self) -> int:
        return struct.unpack("!i", self.take(4))[0]

    def cstr(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError as e:
            raise ProtocolError("invalid UTF-8 in message") from e

    def count(self) -> int:
        n = self.int16()
        if n < 0:
            raise ProtocolError("negative count")
        return n

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes in message")


# -- frontend messages -------------------------------------------------------


@dataclass
class Startup:
    code: int
    params: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    secret: int = 0


@dataclass
class Query:
    sql: str


@dataclass
class Parse:
    name: str
    sql: str
    param_oids: list[int]


@dataclass
class Bind:
    portal: str
    statement: str
    param_formats: list[int]
    params: list[bytes | None]
    result_formats: list[int]


@dataclass
class Describe:
    kind: str  # 'S' statement or 'P' portal
    name: str


@dataclass
class Execute:
    portal: str
    max_rows: int


@dataclass
class Close:
    kind: str
    name: str


@dataclass
class Sync:
    pass


@dataclass
class Flush:
    pass


@dataclass
class Terminate:
    pass


@dataclass
class Password:
    """Any 'p' message; its meaning (SASL initial/continue) depends on the auth step."""

    data: bytes


Message = Query | Parse | Bind | Describe | Execute | Close | Sync | Flush | Terminate | Password


def parse_startup(body: bytes) -> Startup:
    r = Reader(body)
    code = r.int32()
    if code == CANCEL_REQUEST:
        msg = Startup(code, pid=r.int32(), secret=r.int32())
    elif code in (SSL_REQUEST, GSSENC_REQUEST):
        msg = Startup(code)
    elif code >> 16 == 3:
        msg = Startup(code, _startup_params(r))
    else:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    r.done()
    return msg


def _startup_params(r: Reader) -> dict[str, str]:
    params: dict[str, str] = {}
    while (key := r.cstr()) != "":
        params[key] = r.cstr()
    return params


def parse_message(kind: bytes, body: bytes) -> Message:
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(f"invalid frontend message type {kind!r}")
    r = Reader(body)
    msg = parser(r)
    r.done()
    return msg


def _parse(r: Reader) -> Parse:
    name, sql = r.cstr(), r.cstr()
    return Parse(name, sql, [r.int32() for _ in range(r.count())])


def _bind(r: Reader) -> Bind:
    portal, statement = r.cstr(), r.cstr()
    formats = [r.int16() for _ in range(r.count())]
    params: list[bytes | None] = []
    for _ in range(r.count()):
        n = r.int32()
        params.append(None if n == -1 else r.take(n))
    results = [r.int16() for _ in range(r.count())]
    if any(f not in (0, 1) for f in formats + results):
        raise ProtocolError("invalid format code")
    return Bind(portal, statement, formats, params, results)


def _kind_and_name(r: Reader) -> tuple[str, str]:
    kind = r.take(1).decode("latin-1")
    if kind not in ("S", "P"):
        raise ProtocolError(f"invalid describe/close target {kind!r}")
    return kind, r.cstr()


_PARSERS: dict[bytes, Callable[[Reader], Message]] = {
    b"Q": lambda r: Query(r.cstr()),
    b"P": _parse,
    b"B": _bind,
    b"D": lambda r: Describe(*_kind_and_name(r)),
    b"E": lambda r: Execute(r.cstr(), r.int32()),
    b"C": lambda r: Close(*_kind_and_name(r)),
    b"S": lambda r: Sync(),
    b"H": lambda r: Flush(),
    b"X": lambda r: Terminate(),
    b"p": lambda r: Password(r.take(len(r.data))),
}


def parse_sasl_initial(data: bytes) -> tuple[str, bytes]:
    r = Reader(data)
    mechanism = r.cstr()
    n = r.int32()
    payload = b"" if n == -1 else r.take(n)
    r.done()
    return mechanism, payload


# -- backend messages --------------------------------------------------------


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def auth(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!i", code) + payload)


AUTH_OK = auth(0)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", struct.pack("!ii", pid, secret))


def ready_for_query(status: str) -> bytes:
    return message(b"Z", status.encode())


@dataclass(frozen=True)
class Field:
    name: str
    type_oid: int
    typlen: int
    format: int = 0
    typmod: int = -1
    table_oid: int = 0
    attnum: int = 0


def row_description(fields: list[Field]) -> bytes:
    body = struct.pack("!h", len(fields))
    for f in fields:
        body += cstr(f.name) + struct.pack("!ihihih", f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, f.format)
    return message(b"T", body)


def data_row(values: list[bytes | None]) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return message(b"D", body)


def parameter_description(oids: list[int]) -> bytes:
    return message(b"t", struct.pack(f"!h{len(oids)}i", len(oids), *oids))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def _fields_message(
    kind: bytes, severity: str, code: str, text: str, position: int | None, extra: dict[str, str]
) -> bytes:
    parts = {"S": severity, "V": severity, "C": code, "M": text, **extra}
    if position:
        parts["P"] = str(position)
    body = b"".join(k.encode() + cstr(v) for k, v in parts.items())
    return message(kind, body + b"\0")


def error_response(code: str, text: str, position: int | None = None, **extra: str) -> bytes:
    severity = "FATAL" if code.startswith(("08", "28")) else "ERROR"
    return _fields_message(b"E", severity, code, text, position, extra)


def notice_response(text: str, code: str = "01000", severity: str = "WARNING") -> bytes:
    return _fields_message(b"N", severity, code, text, None, {})


PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
CLOSE_COMPLETE = message(b"3")
NO_DATA = message(b"n")
PORTAL_SUSPENDED = message(b"s")
EMPTY_QUERY = message(b"I")
