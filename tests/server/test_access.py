"""The access rules alone: users file, verifiers, roles' limits."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from florql.server.access import (
    Limits,
    OverLimit,
    Role,
    UsersFileError,
    add_user,
    decode_verifier,
    encode_verifier,
    read_users,
)
from florql.server.auth import ScramExchange


def client_final(password: str, client_first_bare: str, server_first: str) -> bytes:
    """What a SCRAM client sends last (RFC 5802), to check a stored verifier accepts the password."""
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def test_stored_verifier_accepts_the_password_only(tmp_path):
    path = str(tmp_path / "users")
    add_user(path, "ann", Role.ANALYST, "correct horse")
    add_user(path, "ada", Role.ADMIN, "other")
    add_user(path, "ann", Role.READER, "battery staple")  # replaces ann
    users = read_users(path)
    assert {u: users[u].role for u in users} == {"ann": Role.READER, "ada": Role.ADMIN}
    assert decode_verifier(encode_verifier(users["ann"].verifier)) == users["ann"].verifier
    for password, accepted in [("battery staple", True), ("correct horse", False)]:
        exchange = ScramExchange(users["ann"].verifier)
        server_first = exchange.server_first_message(b"n,,n=ann,r=abc").decode()
        if accepted:
            exchange.server_final_message(client_final(password, "n=ann,r=abc", server_first))
        else:
            with pytest.raises(Exception, match="password authentication failed"):
                exchange.server_final_message(client_final(password, "n=ann,r=abc", server_first))


@pytest.mark.parametrize(
    "line, complaint",
    [
        ("ann analyst", "expected 'name role verifier'"),
        ("ann owner SCRAM-SHA-256$4096:AA==$AA==:AA==", "unknown role 'owner'"),
        ("ann analyst md5abcdef", "not a SCRAM-SHA-256 verifier"),
    ],
)
def test_a_bad_users_file_names_the_line(tmp_path, line, complaint):
    path = tmp_path / "users"
    path.write_text(f"# users\n{line}\n")
    with pytest.raises(UsersFileError, match=complaint):
        read_users(str(path))


def test_limits_are_ceilings_per_role():
    limits = Limits(replay_budget=300, session_budget=60, max_workers=2)
    assert limits.starting_settings() == {"replay": "auto", "replay_budget": 60}
    for role in Role:
        limits.check(role, "replay_budget", 10)
        limits.check(role, "workers", 2)
        limits.check(role, "workers", None)  # 'auto': the server's slots
        with pytest.raises(OverLimit, match="--max-workers 2"):
            limits.check(role, "workers", 3)
        with pytest.raises(OverLimit, match="300 s"):
            limits.check(role, "replay_budget", None)
    with pytest.raises(OverLimit, match="analyst limit of 60 s"):
        limits.check(Role.ANALYST, "replay_budget", 61)
    limits.check(Role.ADMIN, "replay_budget", 300)
    no_replay = Limits(no_replay=True)
    assert no_replay.starting_settings()["replay"] == "never"
    with pytest.raises(OverLimit, match="--no-replay"):
        no_replay.check(Role.ADMIN, "replay", "auto")
    Limits(replay_budget=None).check(Role.ANALYST, "replay_budget", None)  # an unlimited server


def test_replay_accounting_stays_bounded_and_survives_a_line_cut_by_a_crash(tmp_path, monkeypatch):
    from florql.server import admission

    monkeypatch.setattr(admission, "ACCOUNTING_KEPT", 3)
    path = str(tmp_path / "server" / "replay_accounting.jsonl")
    records: list[dict] = []
    for job in range(5):
        records = admission.append_accounting(records, {"job_id": f"j{job}"}, path)
    assert [r["job_id"] for r in records] == ["j0", "j1", "j2", "j3", "j4"]
    records = admission.append_accounting(records, {"job_id": "j5"}, path)  # 2 × 3 reached: the oldest go
    assert [r["job_id"] for r in records] == ["j3", "j4", "j5"]
    assert [r["job_id"] for r in admission.load_accounting(path)] == ["j3", "j4", "j5"]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"job_id": "j6", "run_')  # the server was killed mid-write
    assert [r["job_id"] for r in admission.load_accounting(path)] == ["j3", "j4", "j5"]
    records = admission.append_accounting(admission.load_accounting(path), {"job_id": "j7"}, path)
    assert [r["job_id"] for r in admission.load_accounting(path)][-1] == "j7"
