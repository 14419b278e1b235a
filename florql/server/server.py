"""The PostgreSQL v3 protocol on asyncio: start-up, TLS, SCRAM, simple and extended queries.

Everything that can block (parsing with sqlglot, the store, encoding batches) runs in
a thread pool so that the event loop stays responsive with many clients; results
stream batch by batch with write back-pressure, so memory does not grow with size.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import ssl
import struct
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from florql.errors import from_duckdb
from florql.listening import is_loopback

from . import protocol as pg
from .access import Identity, Role, UsersFileError, read_users
from .admission import Activity
from .auth import MECHANISM, AuthFailed, ScramExchange, ScramVerifier
from .backend import Backend, ResultLike
from .catalog import Catalog, SessionInfo
from .monitor import ServerTables, server_tables
from .protocol import Field, ProtocolError
from .served import ServedStore
from .session import DEFAULT_SETTINGS, SqlError, Statement, WireSession, classify, pg_duration_s, split_statements
from .types import decode_param, encode_batch, fields_for

log = logging.getLogger("florql.server")
T = TypeVar("T")
BATCH_ROWS = 10_000


class ServerConfigError(Exception):
    """The server refuses to start with this configuration."""


class PermissionDenied(SqlError):
    def __init__(self, message: str) -> None:
        super().__init__("42501", message)


def check_listen_policy(host: str, has_password: bool) -> None:
    if not has_password and not is_loopback(host):
        raise ServerConfigError(
            f"refusing to listen on {host!r} without a password: anyone who can reach it could read the store. "
            "Pass --users-file FILE or --password-file FILE, or listen on 127.0.0.1 only."
        )


def error_fields(e: BaseException) -> tuple[str, str, int | None]:
    """SQLSTATE, message and position of any error, for an ErrorResponse."""
    if isinstance(e, SqlError):
        return e.sqlstate, str(e), e.position
    if isinstance(e, duckdb.Error):  # a path that did not map it: still the client's SQLSTATE, never XX000 text
        log.warning("unmapped DuckDB error: %s", "".join(traceback.format_exception(e)))
        e = from_duckdb(e)
    elif isinstance(e, OSError):  # reading run files
        log.warning("I/O error: %s", "".join(traceback.format_exception(e)))
        return "58030", f"I/O error: {e}", None
    elif isinstance(e, MemoryError):
        return "53200", "out of memory", None
    sqlstate = getattr(e, "sqlstate", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return sqlstate, str(e) or type(e).__name__, getattr(e, "position", None)
    log.error("internal error: %s", "".join(traceback.format_exception(e)))
    return "XX000", f"internal error: {type(e).__name__}: {e}", None


# -- extended-protocol objects ----------------------------------------------------------


@dataclass
class Prepared:
    statement: Statement
    param_oids: list[int]


class Portal:
    """A bound statement; its result is opened on first Describe/Execute and read in chunks."""

    def __init__(self, session: WireSession, prepared: Prepared, params: list[Any], formats: list[int]) -> None:
        self.session = session
        self.statement = prepared.statement
        self.params = params
        self.formats = formats
        self.opened = False
        self.tag = ""
        self.result: ResultLike | None = None
        self.fields: list[Field] = []
        self.reported: dict[str, str] = {}
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._pending: pa.RecordBatch | None = None
        self.done = False

    def open(self) -> None:
        if self.opened:
            return
        self.opened = True
        outcome = self.session.run(self.statement, self.params)
        self.tag, self.result, self.reported = outcome.tag, outcome.result, outcome.reported
        if self.result is None:
            self.done = True
            return
        self.fields = fields_for(self.result.schema, self.formats)
        self._batches = iter(self.result.batches(BATCH_ROWS))

    def next_chunk(self, limit: int) -> tuple[bytes, int]:
        """Up to `limit` rows (0: one batch) encoded as DataRow messages."""
        batch = self._pending if self._pending is not None else next(self._batches, None)  # type: ignore[arg-type]
        self._pending = None
        if batch is None:
            self.done = True
            return b"", 0
        if limit and batch.num_rows > limit:
            batch, self._pending = batch.slice(0, limit), batch.slice(limit)
        return encode_batch(batch, self.fields), batch.num_rows

    def close(self) -> None:
        if self.result is not None:
            self.result.close()
        self.done = True


# -- the server -------------------------------------------------------------------------


class Server:
    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        *,
        host: str = "127.0.0.1",
        port: int = 5433,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        workers: int = 64,
        served: ServedStore | None = None,
        users_file: str | None = None,
        max_connections: int = 64,
        statement_timeout: float | None = None,
    ) -> None:
        """Sessions query `served` (limits, roles, the shared replay queue) when given, else
        `backend_factory()`. Users log in from `users_file`, else with `password` as analysts.
        At most `max_connections` clients at once; no statement runs longer than
        `statement_timeout` seconds (a client's `statement_timeout` may only be shorter)."""
        if password is not None and users_file is not None:
            raise ServerConfigError(
                "--password-file and --users-file do not go together: put every user in the users file"
            )
        check_listen_policy(host, password is not None or users_file is not None)
        self.backend_factory = backend_factory
        self.served = served
        self.users_file = users_file
        self.max_connections, self.statement_timeout = max_connections, statement_timeout
        self.host, self.port = host, port
        self.verifier = ScramVerifier.from_password(password) if password is not None else None
        self._unknown_user = ScramVerifier.from_password(secrets.token_hex(16))  # fails every proof
        self.ssl_context = ssl_context
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="florql-pg")
        defaults = {name.lower(): value for name, (value, _) in DEFAULT_SETTINGS.items()}
        self._catalog_backend: Backend | None = None
        own = server_tables() if served is not None else []  # a served store answers them (monitor.py)
        self.catalog = Catalog(lambda: [*self._meta_backend().tables(), *own], defaults)
        self.connections: dict[tuple[int, int], ClientConnection] = {}
        self._pids = itertools.count(1000)
        self._server: asyncio.base_events.Server | None = None

    def _meta_backend(self) -> Backend:
        if self._catalog_backend is None:
            self._catalog_backend = self.backend_factory()
        return self._catalog_backend

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("florql PostgreSQL server listening on %s:%s", self.host, self.port)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in list(self.connections.values()):
            conn.writer.close()
        if self.served is not None:
            self.served.queue.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ClientConnection(self, reader, writer, next(self._pids), secrets.randbits(31))
        self.connections[(conn.pid, conn.secret)] = conn
        try:
            await conn.run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("connection %s failed", conn.pid)
        finally:
            self.connections.pop((conn.pid, conn.secret), None)
            conn.close_portals()
            if conn.session is not None:
                conn.session.close()
            writer.close()

    def login(self, user: str) -> tuple[ScramVerifier | None, Role]:
        """The verifier `user` must prove (None: no password asked) and the role it then has."""
        if self.users_file is None:
            return self.verifier, Role.ANALYST
        try:
            known = read_users(self.users_file).get(user)
        except (OSError, UsersFileError) as e:
            log.error("cannot read the users file: %s", e)
            known = None
        return (known.verifier, known.role) if known else (self._unknown_user, Role.READER)

    def cancel(self, pid: int, secret: int) -> None:
        conn = self.connections.get((pid, secret))
        if conn is not None:
            conn.cancel()

    def cancel_pid(self, pid: int, by: Identity) -> bool:
        """pg_cancel_backend: a user cancels their own sessions' queries, an admin anyone's."""
        conn = next((c for (p, _), c in self.connections.items() if p == pid), None)
        if conn is None or conn.activity is None:
            return False
        if by.role is not Role.ADMIN and conn.activity.user != by.user:
            raise PermissionDenied(
                f"must be an admin or the user of session {pid} ({conn.activity.user}) to cancel its query"
            )
        conn.cancel()
        return True

    def sessions(self) -> list[ClientConnection]:
        return [c for c in list(self.connections.values()) if c.started]

    def activities(self) -> list[Activity]:
        return [c.activity for c in list(self.connections.values()) if c.activity is not None]


class ClientConnection:
    """One client connection: the protocol state machine around a `WireSession`."""

    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int, secret: int
    ) -> None:
        self.server = server
        self.reader, self.writer = reader, writer
        self.pid, self.secret = pid, secret
        self.session: WireSession | None = None
        self.statements: dict[str, Prepared] = {}
        self.portals: dict[str, Portal] = {}
        self.skip_until_sync = False
        self.cancelled = False
        self.started = False  # past the startup packet: a session, not a cancel request
        self.deadline: float | None = None  # when the running statement times out (event-loop time)
        self.activity: Activity | None = None

    def cancel(self) -> None:
        """A cancel request: stop streaming, and stop the query's replay jobs."""
        self.cancelled = True
        if self.activity is not None:
            self.activity.cancel()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.server.pool, fn, *args)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    # start-up

    async def run(self) -> None:
        startup = await self._negotiate()
        if startup is None:
            return
        if len(self.server.sessions()) >= self.server.max_connections:
            self.send(
                pg.error_response(
                    "53300",
                    f"sorry, too many clients already: this server takes {self.server.max_connections} "
                    "connections at once (florql serve --max-connections)",
                )
            )
            await self.writer.drain()
            return
        self.started = True
        user = startup.params.get("user", "florql")
        verifier, role = self.server.login(user)
        if verifier is not None and not await self._authenticate(user, verifier):
            return
        info = SessionInfo(user=user, database=startup.params.get("database", user), pid=self.pid)
        self.session = await self.blocking(self._open_session, Identity(user, role), info)
        try:
            self.session.startup_settings(startup.params)
        except SqlError as e:
            self.send(pg.error_response("22023", str(e)))
            return
        self.send(pg.AUTH_OK)
        for name, value in self.session.reported().items():
            self.send(pg.parameter_status(name, value))
        self.send(pg.backend_key_data(self.pid, self.secret))
        await self._ready()
        await self._message_loop()

    async def _negotiate(self) -> pg.Startup | None:
        while True:
            (length,) = struct.unpack("!i", await self.reader.readexactly(4))
            if not 8 <= length <= pg.MAX_STARTUP_SIZE:
                raise ProtocolError("invalid startup packet length")
            msg = pg.parse_startup(await self.reader.readexactly(length - 4))
            if msg.code == pg.SSL_REQUEST:
                await self._ssl_request()
            elif msg.code == pg.GSSENC_REQUEST:
                self.send(b"N")
            elif msg.code == pg.CANCEL_REQUEST:
                self.server.cancel(msg.pid, msg.secret)
                return None
            else:
                return msg

    def _open_session(self, identity: Identity, info: SessionInfo) -> WireSession:
        served = self.server.served
        if served is None:
            return WireSession(self.server.backend_factory(), self.server.catalog, info)
        self.activity = Activity(self.pid, identity.user, identity.role.value)
        tables = ServerTables(
            identity, self.server.activities, lambda: list(served.queue.accounting), self.server.cancel_pid
        )
        return WireSession(served.open(identity, self.activity), self.server.catalog, info, tables)

    async def _ssl_request(self) -> None:
        if self.server.ssl_context is None or self.writer.get_extra_info("ssl_object") is not None:
            self.send(b"N")
            return
        self.send(b"S")
        await self.writer.drain()
        await self.writer.start_tls(self.server.ssl_context)

    async def _authenticate(self, user: str, verifier: ScramVerifier) -> bool:
        exchange = ScramExchange(verifier)
        self.send(pg.auth(10, pg.cstr(MECHANISM) + b"\0"))
        try:
            mechanism, first = pg.parse_sasl_initial(await self._password_message())
            if mechanism != MECHANISM:
                raise AuthFailed(f"unsupported SASL mechanism {mechanism!r}")
            self.send(pg.auth(11, exchange.server_first_message(first)))
            final = exchange.server_final_message(await self._password_message())
        except (AuthFailed, ProtocolError) as e:
            log.info("authentication failed for %s: %s", user, e)
            self.send(pg.error_response("28P01", f'password authentication failed for user "{user}"'))
            await self.writer.drain()
            return False
        self.send(pg.auth(12, final))
        return True

    async def _password_message(self) -> bytes:
        kind, body = await self._read_message()
        if kind != b"p":
            raise ProtocolError("expected a password message")
        return body

    async def _read_message(self) -> tuple[bytes, bytes]:
        head = await self.reader.readexactly(5)
        (length,) = struct.unpack("!i", head[1:])
        if not 4 <= length <= pg.MAX_MESSAGE_SIZE:
            raise ProtocolError("invalid message length")
        return head[:1], await self.reader.readexactly(length - 4)

    # the message loop

    async def _message_loop(self) -> None:
        while True:
            kind, body = await self._read_message()
            try:
                msg = pg.parse_message(kind, body)
            except ProtocolError as e:
                self.send(pg.error_response(e.sqlstate, str(e)))
                await self.writer.drain()
                return
            if isinstance(msg, pg.Terminate):
                return
            await self._dispatch(msg)

    async def _dispatch(self, msg: pg.Message) -> None:
        if isinstance(msg, pg.Query):
            await self._simple_query(msg.sql)
        elif isinstance(msg, pg.Sync):
            self.skip_until_sync = False
            await self._ready()
        elif isinstance(msg, pg.Flush):
            await self.writer.drain()
        elif isinstance(msg, pg.Password):
            raise ProtocolError("unexpected password message")
        elif not self.skip_until_sync:
            try:
                await getattr(self, f"_on_{type(msg).__name__.lower()}")(msg)
            except Exception as e:  # the client sees it; the session goes on after Sync
                self._fail(e)
                self.skip_until_sync = True

    async def _ready(self) -> None:
        assert self.session is not None
        if not self.session.in_transaction:
            self.close_portals(unnamed_only=False)
        if self.activity is not None:
            self.activity.finish()
        status = "E" if self.session.failed else "T" if self.session.in_transaction else "I"
        self.send(pg.ready_for_query(status))
        await self.writer.drain()

    def _fail(self, e: BaseException) -> None:
        code, text, position = error_fields(e)
        self.send(pg.error_response(code, text, position))
        if self.session is not None and self.session.in_transaction:
            self.session.failed = True

    def close_portals(self, unnamed_only: bool = False) -> None:
        for name in [n for n in self.portals if not unnamed_only or n == ""]:
            self.portals.pop(name).close()

    # simple query protocol

    async def _simple_query(self, sql: str) -> None:
        try:
            for text in await self.blocking(split_statements, sql):
                await self._simple_statement(text)
        except Exception as e:
            self._fail(e)
        await self._ready()

    async def _simple_statement(self, text: str) -> None:
        assert self.session is not None
        statement = await self.blocking(classify, text)
        if statement.command == "empty":
            self.send(pg.EMPTY_QUERY)
            return
        portal = Portal(self.session, Prepared(statement, []), [], [])
        try:
            await self._open(portal)
            if portal.result is not None:
                self.send(pg.row_description(portal.fields))
            await self._execute(portal, 0)
        finally:
            portal.close()

    # extended query protocol

    async def _on_parse(self, msg: pg.Parse) -> None:
        if msg.name and msg.name in self.statements:
            raise SqlError("42P05", f'prepared statement "{msg.name}" already exists')
        statement = await self.blocking(classify, msg.sql)
        self.statements[msg.name] = Prepared(statement, msg.param_oids)
        self.send(pg.PARSE_COMPLETE)

    async def _on_bind(self, msg: pg.Bind) -> None:
        assert self.session is not None
        prepared = self._statement(msg.statement)
        wanted = max(prepared.statement.param_count, len(prepared.param_oids))
        if len(msg.params) != wanted:
            raise SqlError(
                "08P01", f"bind message supplies {len(msg.params)} parameters, but prepared statement requires {wanted}"
            )
        oids = prepared.param_oids + [0] * (wanted - len(prepared.param_oids))
        formats = (
            msg.param_formats * len(msg.params) if len(msg.param_formats) == 1 else msg.param_formats or [0] * wanted
        )
        values = [decode_param(data, oid, fmt) for data, oid, fmt in zip(msg.params, oids, formats)]
        if msg.portal in self.portals:
            if msg.portal:
                raise SqlError("42P03", f'portal "{msg.portal}" already exists')
            self.portals.pop("").close()
        self.portals[msg.portal] = Portal(self.session, prepared, values, msg.result_formats)
        self.send(pg.BIND_COMPLETE)

    async def _on_describe(self, msg: pg.Describe) -> None:
        assert self.session is not None
        if msg.kind == "P" and msg.name not in self.portals and msg.name in self.session.cursors:
            self.send(pg.row_description(fields_for(self.session.cursors[msg.name].schema, [])))
            return  # DECLARE CURSOR made a portal of that name, as in PostgreSQL
        if msg.kind == "P":
            portal = self._portal(msg.name)
            await self._open(portal)
            self.send(pg.row_description(portal.fields) if portal.result is not None else pg.NO_DATA)
            return
        prepared = self._statement(msg.name)
        count = max(prepared.statement.param_count, len(prepared.param_oids))
        oids = [oid or 25 for oid in prepared.param_oids + [0] * (count - len(prepared.param_oids))]
        self.send(pg.parameter_description(oids))
        schema = await self.blocking(self.session.describe, prepared.statement)
        self.send(pg.row_description(fields_for(schema, [])) if schema is not None else pg.NO_DATA)

    async def _on_execute(self, msg: pg.Execute) -> None:
        portal = self._portal(msg.portal)
        await self._open(portal)
        await self._execute(portal, max(msg.max_rows, 0))

    async def _on_close(self, msg: pg.Close) -> None:
        if msg.kind == "S":
            self.statements.pop(msg.name, None)
        elif msg.name in self.portals:
            self.portals.pop(msg.name).close()
        self.send(pg.CLOSE_COMPLETE)

    def _statement(self, name: str) -> Prepared:
        if name not in self.statements:
            raise SqlError("26000", f'prepared statement "{name}" does not exist')
        return self.statements[name]

    def _portal(self, name: str) -> Portal:
        if name not in self.portals:
            raise SqlError("34000", f'portal "{name}" does not exist')
        return self.portals[name]

    # running a portal

    def _timeout_s(self) -> float | None:
        """The statement time limit: the client's `statement_timeout` under the server's ceiling."""
        limits = [self.server.statement_timeout]
        if self.session is not None:
            limits.append(pg_duration_s(self.session.settings.get("statement_timeout", "0")))
        chosen = [t for t in limits if t]
        return min(chosen) if chosen else None

    async def _within_deadline(self, portal: Portal, fn: Callable[..., T], *args: Any) -> T:
        """`fn` on the worker pool; past the statement's deadline, the statement is cancelled."""
        if self.deadline is None:
            return await self.blocking(fn, *args)
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self.blocking(fn, *args), max(remaining, 0.0))
        except TimeoutError:
            self.cancel()  # stops its replay jobs; what the thread still does is never sent
            portal.done = True
            raise SqlError("57014", f"canceling statement due to statement timeout ({self._timeout_s():g} s)") from None

    async def _open(self, portal: Portal) -> None:
        if portal.opened:
            return
        self.cancelled = False
        timeout = self._timeout_s()
        self.deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        if self.activity is not None:
            self.activity.begin(portal.statement.sql)
        await self._within_deadline(portal, portal.open)
        for name, value in portal.reported.items():
            self.send(pg.parameter_status(name, value))
        for warning in getattr(portal.result, "warnings", None) or []:
            self.send(pg.notice_response(warning))

    async def _execute(self, portal: Portal, max_rows: int) -> None:
        """Stream rows; with a row limit, stop at it and leave the portal suspended."""
        sent = 0
        while not portal.done and (max_rows == 0 or sent < max_rows):
            if self.cancelled:
                portal.close()
                raise SqlError("57014", "canceling statement due to user request")
            chunk, n = await self._within_deadline(portal, portal.next_chunk, max_rows - sent if max_rows else 0)
            sent += n
            if chunk:
                self.send(chunk)
                await self.writer.drain()
        if max_rows and not portal.done:
            self.send(pg.PORTAL_SUSPENDED)  # like PostgreSQL, even if the limit was exactly the rest
        elif portal.result is not None:
            self.send(pg.command_complete(portal.tag if portal.tag == "SHOW" else f"{portal.tag} {sent}"))
        else:
            self.send(pg.command_complete(portal.tag))


class BackgroundServer:
    """A server on its own event loop in a daemon thread (tests, benchmarks, notebooks)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="florql-pg-server", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
