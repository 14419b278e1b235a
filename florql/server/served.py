"""The store as the server serves it: one florql connection per session, under its user's limits,
running replays on the server's one queue."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sqlglot import exp

from florql import reads
from florql.api import Connection, Result
from florql.replay.planner import Plan
from florql.storage.layout import StoreLocation, locate_store

from .access import Identity, Limits, OverLimit, Role
from .admission import Activity, ReplayQueue, SessionReplays

ACCOUNTING_FILE = os.path.join("server", "replay_accounting.jsonl")  # in the store's home


class ServedConnection(Connection):
    """A florql connection whose settings stay within `limits` for its user's role."""

    def __init__(self, location: StoreLocation, identity: Identity, limits: Limits, replays: SessionReplays) -> None:
        self.identity, self.limits, self.replays = identity, limits, replays
        start = limits.starting_settings()
        super().__init__(location, replay=start["replay"], replay_budget=start["replay_budget"], executor=replays)
        self.progress = False

    def set(self, name: str, value: Any) -> None:
        limits = getattr(self, "limits", None)  # None while Connection.__init__ sets its defaults
        previous = dict(self.settings)
        super().set(name, value)  # parses the value, or says what a valid one looks like
        if limits is not None:
            try:
                limits.check(self.identity.role, name.lower(), self.settings[name.lower()])
            except OverLimit:
                self.settings.update(previous)
                raise

    def sql(self, sql: str, params: Sequence[Any] | None = None, *, dialect: str = "duckdb") -> Result:
        try:
            result = super().sql(sql, params, dialect=dialect)
        finally:
            notes = self.replays.take_notes()
        result.warnings.extend(notes)
        return result

    def _check_budget(self, replay_plan: Plan, statement: exp.Expr) -> None:
        self.replays.activity.estimate_s = replay_plan.est_s
        if self.identity.role is Role.READER:
            raise OverLimit(
                f'user "{self.identity.user}" has the role reader, which reads stored values only, and this query '
                f"needs values that were never logged:\n{replay_plan.describe()}\n"
                "Ask for them without replay (SET replay = 'never': they are NULL), or as an analyst."
            )
        super()._check_budget(replay_plan, statement)


class ServedStore:
    """What `florql serve` serves: the store, the operator's limits and the shared replay queue."""

    def __init__(self, path: str | None, limits: Limits) -> None:
        reads.stop()  # the server records no run
        self.location = locate_store(path)
        self.limits = limits
        self.queue = ReplayQueue(
            limits.max_workers, os.path.join(self.location.home, ACCOUNTING_FILE), store=self.location.home
        )

    def open(self, identity: Identity, activity: Activity) -> ServedConnection:
        # The budget is read when the jobs run: SET may have lowered it since the session began.
        replays = SessionReplays(self.queue, activity, lambda: connection.settings["replay_budget"])
        connection = ServedConnection(self.location, identity, self.limits, replays)
        return connection

    def catalog_backend(self) -> Connection:
        """For the catalog: lists tables, never replays."""
        return Connection(self.location, replay="never", progress=False)
