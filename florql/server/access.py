"""Who may do what on a shared store: users, roles and the operator's limits.

Free of the wire protocol so that any front end (the PostgreSQL server, a web UI) applies the
same rules. A users file holds one user per line — `name role verifier` — where the verifier is
PostgreSQL's SCRAM-SHA-256 form (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`),
never the password. Roles:

- `reader`  reads stored values only: a query that needs a replay is refused;
- `analyst` replays within the session budget (`--session-budget`, default the server's ceiling);
- `admin`   may raise a session's budget up to the server's ceiling (`--replay-budget`), sees every
            session's query and the whole replay accounting, and may cancel anyone's query.

Whatever the operator sets on the command line is a ceiling: `SET` may lower it, never raise it.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from florql.errors import FlorqlError

from .auth import ScramVerifier


class Role(StrEnum):
    READER = "reader"
    ANALYST = "analyst"
    ADMIN = "admin"


class OverLimit(FlorqlError):
    """A session asked for more than the server or its role allows."""

    sqlstate = "42501"


class UsersFileError(FlorqlError):
    sqlstate = "F0000"


@dataclass(frozen=True)
class Identity:
    """An authenticated session's user and role."""

    user: str
    role: Role


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    verifier: ScramVerifier


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode_verifier(verifier: ScramVerifier) -> str:
    return (
        f"SCRAM-SHA-256${verifier.iterations}:{_b64(verifier.salt)}"
        f"${_b64(verifier.stored_key)}:{_b64(verifier.server_key)}"
    )


def decode_verifier(text: str) -> ScramVerifier:
    try:
        mechanism, head, keys = text.split("$")
        iterations, salt = head.split(":")
        stored, server = keys.split(":")
        if mechanism != "SCRAM-SHA-256":
            raise ValueError(mechanism)
        return ScramVerifier(
            base64.b64decode(salt, validate=True),
            int(iterations),
            base64.b64decode(stored, validate=True),
            base64.b64decode(server, validate=True),
        )
    except (ValueError, binascii.Error) as e:
        raise UsersFileError(f"not a SCRAM-SHA-256 verifier: {text[:40]!r}") from e


def _role(text: str, where: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise UsersFileError(f"{where}: unknown role {text!r}; roles: {roles}") from None


def read_users(path: str) -> dict[str, User]:
    """The users file at `path` (read on every login, so `--add-user` needs no restart)."""
    users: dict[str, User] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 3:
                raise UsersFileError(f"{path}:{number}: expected 'name role verifier'; add users with --add-user")
            name, role, verifier = parts
            users[name] = User(name, _role(role, f"{path}:{number}"), decode_verifier(verifier))
    return users


def add_user(path: str, name: str, role: Role, password: str) -> None:
    """Add or replace `name` in the users file, written whole (temporary file, rename), mode 0600."""
    if not name or any(c.isspace() for c in name):
        raise UsersFileError(f"user name {name!r} must be non-empty and without spaces")
    if not password:
        raise UsersFileError("the password is empty")
    users = read_users(path) if os.path.exists(path) else {}
    users[name] = User(name, role, ScramVerifier.from_password(password))
    lines = ["# florql serve users: name role SCRAM-SHA-256 verifier (florql serve --add-user NAME)\n"]
    lines += [f"{u.name} {u.role.value} {encode_verifier(u.verifier)}\n" for u in users.values()]
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".users-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _seconds(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:g} s"


@dataclass(frozen=True)
class Limits:
    """The operator's ceilings (`florql serve` options)."""

    replay_budget: float | None = 60.0  # --replay-budget: no session goes above it
    session_budget: float | None = None  # --session-budget: where sessions start (default: replay_budget)
    max_workers: int | None = None  # --max-workers: replay slots, and the most a session may plan for
    no_replay: bool = False  # --no-replay: stored values only

    def starting_budget(self) -> float | None:
        if self.session_budget is None:
            return self.replay_budget
        return _lower(self.session_budget, self.replay_budget)

    def budget_limit(self, role: Role) -> float | None:
        return self.replay_budget if role is Role.ADMIN else self.starting_budget()

    def starting_settings(self) -> dict[str, Any]:
        return {"replay": "never" if self.no_replay else "auto", "replay_budget": self.starting_budget()}

    def check(self, role: Role, name: str, value: Any) -> None:
        """Raise OverLimit when setting `name` to `value` (already parsed) would lift a limit."""
        if name == "replay_budget":
            limit = self.budget_limit(role)
            if limit is not None and (value is None or value > limit):
                raise OverLimit(f"replay_budget {_seconds(value)} is over {self._budget_source(role, limit)}")
        elif name == "workers":
            if self.max_workers is not None and value is not None and value > self.max_workers:
                raise OverLimit(
                    f"workers = {value} is over this server's limit of {self.max_workers} "
                    f"(florql serve --max-workers {self.max_workers}); SET workers to {self.max_workers} or fewer"
                )
        elif name == "replay" and value != "never" and self.no_replay:
            raise OverLimit(
                "this server serves stored values only (florql serve --no-replay): replay stays 'never'; "
                "values never logged are NULL, and a NOTICE names what a replay would compute"
            )

    def _budget_source(self, role: Role, limit: float) -> str:
        if limit == self.replay_budget:
            return f"this server's limit of {_seconds(limit)} (florql serve --replay-budget); SET it to {_seconds(limit)} or less"
        return (
            f"the {role.value} limit of {_seconds(limit)} (florql serve --session-budget); "
            f"an admin may raise a session up to {_seconds(self.replay_budget)}"
        )


def _lower(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)
