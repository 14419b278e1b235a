"""Units without sockets: value formats, statement classification, SCRAM, parameter decoding."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import hmac
import struct

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from florql.server import protocol as pg
from florql.server.auth import AuthFailed, ScramExchange, ScramVerifier
from florql.server.session import SqlError, classify, split_statements
from florql.server.types import decode_param, encode_batch, fields_for, numeric_binary, pg_float, text_value


@pytest.mark.parametrize(
    "value, text",
    [
        (0.1, "0.1"),
        (100.0, "100"),
        (1e-05, "1e-05"),
        (1e20, "1e+20"),
        (1e15, "1e+15"),
        (1.5e15, "1.5e+15"),
        (123456789012.5, "123456789012.5"),
        (-0.0, "-0"),
        (float("inf"), "Infinity"),
        (float("nan"), "NaN"),
    ],
)
def test_pg_float(value, text):
    assert pg_float(value) == text


@given(st.lists(st.floats(allow_nan=True) | st.none(), max_size=50))
def test_vectorised_float_text_matches_scalar(values):
    batch = pa.record_batch({"x": pa.array(values, pa.float64())})
    expected = b"".join(pg.data_row([None if v is None else pg_float(v).encode()]) for v in values)
    assert encode_batch(batch, fields_for(batch.schema, [])) == expected


@given(
    st.lists(st.integers(-(2**63), 2**63 - 1) | st.none(), max_size=30), st.lists(st.text() | st.none(), max_size=30)
)
def test_vectorised_rows_match_scalar(ints, texts):
    n = min(len(ints), len(texts))
    batch = pa.record_batch({"i": pa.array(ints[:n], pa.int64()), "t": pa.array(texts[:n], pa.string())})
    expected = b"".join(
        pg.data_row([None if v is None else text_value(v).encode() for v in row.values()]) for row in batch.to_pylist()
    )
    assert encode_batch(batch, fields_for(batch.schema, [])) == expected


def test_binary_ints_and_timestamps():
    batch = pa.record_batch(
        {
            "i": pa.array([1, None], pa.int64()),
            "t": pa.array([dt.datetime(2000, 1, 1, 0, 0, 1), None], pa.timestamp("us")),
        }
    )
    rows = encode_batch(batch, fields_for(batch.schema, [1]))
    assert rows == pg.data_row([struct.pack("!q", 1), struct.pack("!q", 1_000_000)]) + pg.data_row([None, None])


@pytest.mark.parametrize("text", ["12.5", "0.001", "-1234567.891", "0", "100000", "0.50"])
def test_numeric_binary_round_trip(text):
    assert decode_param(numeric_binary(decimal.Decimal(text)), 1700, 1) == decimal.Decimal(text)


def test_decode_params():
    assert decode_param(b"42", 23, 0) == 42
    assert decode_param(struct.pack("!q", -5), 20, 1) == -5
    assert decode_param(b"t", 16, 0) is True
    assert decode_param(b"x", 0, 0) == "x"
    assert decode_param(None, 23, 0) is None
    with pytest.raises(Exception) as err:
        decode_param(b"abc", 23, 0)
    assert err.value.sqlstate == "22P02"


def test_split_statements_respects_quotes_and_comments():
    parts = split_statements("SELECT ';' AS a; -- x; y\nSELECT 2; /* ; */")
    assert [p.strip() for p in parts] == ["SELECT ';' AS a", "-- x; y\nSELECT 2"]


@pytest.mark.parametrize(
    "sql, command, tag",
    [
        ("BEGIN READ ONLY", "begin", "BEGIN"),
        ("COMMIT", "commit", "COMMIT"),
        ("ROLLBACK", "rollback", "ROLLBACK"),
        ("SET extra_float_digits = 3", "set", "SET"),
        ("SHOW transaction isolation level", "show", "SHOW"),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED", "noop", "SET"),
        ("DECLARE c CURSOR FOR SELECT 1", "declare", "DECLARE CURSOR"),
        ("FETCH FORWARD 10 FROM c", "fetch", "FETCH"),
        ("SELECT 1", "query", "SELECT"),
        ("", "empty", ""),
    ],
)
def test_classify(sql, command, tag):
    statement = classify(sql)
    assert (statement.command, statement.tag) == (command, tag)


def test_syntax_error_has_position():
    with pytest.raises(SqlError) as err:
        classify("SELECT (1 +")
    assert err.value.sqlstate == "42601"


def test_catalog_routing():
    assert classify("SELECT * FROM pg_catalog.pg_class").catalog
    assert classify("SELECT version()").catalog
    assert classify("SELECT 'run_1'::regclass").catalog
    assert not classify("SELECT * FROM run_1").catalog


def _client_proof(password: str, salt: bytes, iterations: int, auth_message: bytes) -> bytes:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(client_key, signature))


@pytest.mark.parametrize("password, ok", [("right", True), ("wrong", False)])
def test_scram_exchange(password, ok):
    verifier = ScramVerifier.from_password("right")
    exchange = ScramExchange(verifier)
    first_bare = "n=,r=clientnonce"
    server_first = exchange.server_first_message(("n,," + first_bare).encode()).decode()
    attrs = dict(p.split("=", 1) for p in server_first.split(","))
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    proof = _client_proof(password, base64.b64decode(attrs["s"]), int(attrs["i"]), auth_message)
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    if ok:
        assert exchange.server_final_message(final).startswith(b"v=")
    else:
        with pytest.raises(AuthFailed):
            exchange.server_final_message(final)
