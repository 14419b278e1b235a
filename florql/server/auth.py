"""Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677), as PostgreSQL speaks it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
ITERATIONS = 4096


class AuthFailed(Exception):
    sqlstate = "28P01"


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


@dataclass(frozen=True)
class ScramVerifier:
    """What the server keeps instead of the password (like pg_authid.rolpassword)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(cls, password: str, iterations: int = ITERATIONS) -> ScramVerifier:
        salt = secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(salt, iterations, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))


def _attributes(message: str) -> dict[str, str]:
    try:
        return dict(part.split("=", 1) for part in message.split(","))
    except ValueError as e:
        raise AuthFailed("malformed SCRAM message") from e


class ScramExchange:
    """One authentication exchange: client-first → server-first → client-final → server-final."""

    def __init__(self, verifier: ScramVerifier) -> None:
        self.verifier = verifier
        self.nonce = ""
        self.client_first_bare = ""
        self.server_first = ""

    def server_first_message(self, client_first: bytes) -> bytes:
        text = client_first.decode(errors="replace")
        if not text.startswith(("n,", "y,")):
            raise AuthFailed("channel binding is not supported")
        self.client_first_bare = text.split(",", 2)[2] if text.count(",") >= 2 else ""
        client_nonce = _attributes(self.client_first_bare).get("r", "")
        if not client_nonce:
            raise AuthFailed("malformed SCRAM message")
        self.nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self.verifier.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={self.verifier.iterations}"
        return self.server_first.encode()

    def server_final_message(self, client_final: bytes) -> bytes:
        text = client_final.decode(errors="replace")
        without_proof, _, proof_part = text.rpartition(",p=")
        if _attributes(without_proof).get("r") != self.nonce:
            raise AuthFailed("SCRAM nonce mismatch")
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except ValueError as e:
            raise AuthFailed("malformed SCRAM proof") from e
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = _hmac(self.verifier.stored_key, auth_message)
        if len(proof) != len(signature):
            raise AuthFailed("malformed SCRAM proof")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.verifier.stored_key):
            raise AuthFailed("password authentication failed")
        return b"v=" + base64.b64encode(_hmac(self.verifier.server_key, auth_message))
