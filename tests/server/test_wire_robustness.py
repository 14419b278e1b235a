"""Malformed protocol traffic: the server answers or drops the connection, and keeps serving."""

from __future__ import annotations

import socket
import struct

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from florql.server import protocol as pg


def startup(user: str = "florql") -> bytes:
    body = struct.pack("!i", pg.PROTOCOL_V3) + b"user\0" + user.encode() + b"\0database\0florql\0\0"
    return struct.pack("!i", len(body) + 4) + body


def exchange(port: int, payload: bytes, after_startup: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if after_startup:
            s.sendall(startup())
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def assert_alive(server) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "payload",
    [
        b"Z\x00\x00\x00\x04",  # unknown message type
        b"Q\x00\x00\x00\x02",  # length shorter than itself
        b"Q\x7f\xff\xff\xff",  # absurd length
        b"Q\x00\x00\x00\x08abcd",  # no terminating NUL
        b"B\x00\x00\x00\x0a\x00\x00\xff\xff\x00\x00",  # negative parameter-format count
        b"P\x00\x00\x00\x07s\x00q",  # truncated Parse
        b"D\x00\x00\x00\x06X\x00",  # bad describe target
        b"E\x00\x00\x00\x05",  # truncated Execute
        b"Q\x00\x00\x00\x06\xff\x00",  # invalid UTF-8
    ],
)
def test_malformed_messages(server, payload):
    answer = exchange(server.port, payload)
    assert b"08P01" in answer or answer.endswith(b"Z\x00\x00\x00\x05I")
    assert_alive(server)


def test_malformed_startup(server):
    for payload in [b"\x00\x00\x00\x03", b"\x00\x00\x00\x08\x00\x09\x00\x00", b"\x7f\xff\xff\xff"]:
        exchange(server.port, payload, after_startup=False)
    assert_alive(server)


def test_bind_errors_skip_until_sync(server):
    parse = pg.message(b"P", b"s1\0SELECT $1::int\0\0\0")
    bad_bind = pg.message(b"B", b"\0nope\0\0\0\0\0\0\0")  # unknown statement
    execute = pg.message(b"E", b"\0\0\0\0\0")
    sync = pg.message(b"S")
    query = pg.message(b"Q", b"SELECT 7\0")
    answer = exchange(server.port, parse + bad_bind + execute + sync + query + pg.message(b"X"))
    assert b"26000" in answer and answer.count(b"E\x00") >= 1
    assert b"\x00\x00\x00\x017" in answer  # the query after Sync ran


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(b"QPBDECSHXpdfFZ")), body=st.binary(max_size=64))
def test_fuzz_message_parser(kind, body):
    """Any bytes either parse or raise ProtocolError; nothing else escapes."""
    try:
        pg.parse_message(bytes([kind]), body)
    except pg.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=0, max_size=64))
def test_fuzz_startup_parser(body):
    try:
        pg.parse_startup(body)
    except pg.ProtocolError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(st.sampled_from(list(b"QPBDECSH")), st.binary(max_size=40)), max_size=6))
def test_fuzz_live_server(server, messages):
    payload = b"".join(bytes([k]) + struct.pack("!i", len(b) + 4) + b for k, b in messages)
    exchange(server.port, payload + pg.message(b"X"))
    assert_alive(server)


def test_cancel_request_is_accepted(server):
    body = struct.pack("!iii", pg.CANCEL_REQUEST, 1, 2)
    exchange(server.port, struct.pack("!i", len(body) + 4) + body, after_startup=False)
    assert_alive(server)
