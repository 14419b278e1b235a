"""Tables and functions about the server itself: `florql_activity`, `florql_replay_accounting`,
`pg_cancel_backend(pid)`. Answered by a private in-memory DuckDB over what the server knows now."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

import duckdb
import pyarrow as pa
from sqlglot import exp

from florql.api import ColumnInfo, TableInfo
from florql.errors import QueryFailed

from .access import Identity, Role
from .admission import Activity

SERVER_TABLES = ("florql_activity", "florql_replay_accounting")
CANCEL_FUNCTIONS = ("pg_cancel_backend",)
HIDDEN = "<insufficient privilege>"

ACTIVITY_SCHEMA = pa.schema(
    [
        ("pid", pa.int32()),
        ("usename", pa.string()),
        ("role", pa.string()),
        ("backend_start", pa.timestamp("us", "UTC")),
        ("query_start", pa.timestamp("us", "UTC")),
        ("state", pa.string()),
        ("query", pa.string()),
        ("estimate_s", pa.float64()),
        ("jobs_done", pa.int32()),
        ("jobs_total", pa.int32()),
    ]
)
ACCOUNTING_SCHEMA = pa.schema(
    [
        ("job_id", pa.string()),
        ("run_id", pa.int64()),
        ("names", pa.string()),
        ("first_iteration", pa.int64()),
        ("last_iteration", pa.int64()),
        ("asked_by", pa.string()),
        ("queued_at", pa.timestamp("us", "UTC")),
        ("started_at", pa.timestamp("us", "UTC")),
        ("ended_at", pa.timestamp("us", "UTC")),
        ("wait_s", pa.float64()),
        ("run_s", pa.float64()),
        ("slot", pa.int32()),
        ("gpu", pa.int32()),
        ("threads", pa.int32()),
        ("warm", pa.bool_()),  # forked from the store's fork server already up (else it paid a cold start)
        ("outcome", pa.string()),
    ]
)


def server_tables() -> list[TableInfo]:
    """The server's own tables as the catalog lists them: BI tools browse them like the runs."""
    return [
        TableInfo(name, "table", [ColumnInfo(f.name, f.type) for f in schema])
        for name, schema in (("florql_activity", ACTIVITY_SCHEMA), ("florql_replay_accounting", ACCOUNTING_SCHEMA))
    ]


def is_server_query(ast: exp.Expr) -> bool:
    for node in ast.walk():
        if isinstance(node, exp.Table) and not node.db and node.name.lower() in SERVER_TABLES:
            return True
        if isinstance(node, exp.Anonymous) and node.name.lower() in CANCEL_FUNCTIONS:
            return True
    return False


def _time(seconds: float | None) -> datetime.datetime | None:
    return None if seconds is None else datetime.datetime.fromtimestamp(seconds, datetime.UTC)


class ServerTables:
    """The server's own tables as one session (`identity`) may see them."""

    def __init__(
        self,
        identity: Identity,
        sessions: Callable[[], Iterable[Activity]],
        accounting: Callable[[], list[dict[str, Any]]],
        cancel: Callable[[int, Identity], bool],
    ) -> None:
        self.identity = identity
        self._sessions, self._accounting, self._cancel = sessions, accounting, cancel

    def execute(self, ast: exp.Expr, describing: bool = False) -> pa.Table:
        """Answer `ast`; `describing` only finds the result's columns (pg_cancel_backend cancels nothing)."""
        ast = ast.copy().transform(lambda node: self._call_cancel(node, describing))
        con = duckdb.connect(":memory:")
        try:
            con.register("florql_activity", self.activity())
            con.register("florql_replay_accounting", self.accounting())
            con.execute("SET enable_external_access = false")
            return con.sql(ast.sql("duckdb")).to_arrow_table()
        finally:
            con.close()

    def _call_cancel(self, node: exp.Expr, describing: bool) -> exp.Expr:
        if not (isinstance(node, exp.Anonymous) and node.name.lower() in CANCEL_FUNCTIONS):
            return node
        args = node.expressions
        if describing:
            return exp.Boolean(this=False)
        if len(args) != 1 or not (isinstance(args[0], exp.Literal) and args[0].is_int):
            raise QueryFailed(f"{node.name}(pid) takes one literal process id, as florql_activity shows it", "22023")
        return exp.Boolean(this=self._cancel(int(args[0].name), self.identity))

    def _sees(self, user: str) -> bool:
        return self.identity.role is Role.ADMIN or user == self.identity.user

    def activity(self) -> pa.Table:
        rows = [
            {
                "pid": a.pid,
                "usename": a.user,
                "role": a.role,
                "backend_start": _time(a.backend_start),
                "query_start": _time(a.query_start),
                "state": a.state,
                "query": a.query if self._sees(a.user) else HIDDEN,
                "estimate_s": a.estimate_s,
                "jobs_done": a.jobs_done,
                "jobs_total": a.jobs_total,
            }
            for a in sorted(self._sessions(), key=lambda a: a.pid)
        ]
        return pa.Table.from_pylist(rows, ACTIVITY_SCHEMA)

    def accounting(self) -> pa.Table:
        """Every replay job for an admin; a user's own jobs otherwise."""
        rows = [
            {**r, **{k: _time(r[k]) for k in ("queued_at", "started_at", "ended_at")}}
            for r in self._accounting()
            if self.identity.role is Role.ADMIN or self.identity.user in r["asked_by"].split(",")
        ]
        return pa.Table.from_pylist(rows, ACCOUNTING_SCHEMA)
