"""One client session, free of I/O: statement classification, settings, routing.

Every statement is classified before anything reaches the store: transaction
control and session settings are answered here, queries must parse as a read-only
SELECT without file access, and catalog queries go to the emulated catalog.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.tokens import TokenType

from florql.dialect import bind_parameters, ensure_read_only
from florql.errors import FlorqlError, from_duckdb

from .backend import Backend, ResultLike
from .catalog import SERVER_VERSION, Catalog, SessionInfo, is_catalog_query
from .monitor import ServerTables, is_server_query

SERVER_VERSION_TEXT = f"{SERVER_VERSION} (florql)"
SERIALIZATION_RETRIES = 2  # a query failing with 40001 (serialization_failure) runs again before the client hears

# Settings a client can SHOW/SET; those flagged True are reported with ParameterStatus.
DEFAULT_SETTINGS: dict[str, tuple[str, bool]] = {
    "server_version": (SERVER_VERSION_TEXT, True),
    "server_version_num": ("150000", False),
    "server_encoding": ("UTF8", True),
    "client_encoding": ("UTF8", True),
    "DateStyle": ("ISO, MDY", True),
    "IntervalStyle": ("postgres", True),
    "integer_datetimes": ("on", True),
    "standard_conforming_strings": ("on", True),
    "TimeZone": ("UTC", True),
    "application_name": ("", True),
    "is_superuser": ("off", True),
    "in_hot_standby": ("off", True),
    "default_transaction_read_only": ("on", True),
    "transaction_read_only": ("on", False),
    "session_authorization": ("florql", True),
    "search_path": ('"$user", public', False),
    "extra_float_digits": ("1", False),
    "transaction_isolation": ("read committed", False),
    "default_transaction_isolation": ("read committed", False),
    "max_index_keys": ("32", False),
    "max_identifier_length": ("63", False),
    "lc_collate": ("C.UTF-8", False),
    "lc_ctype": ("C.UTF-8", False),
    "bytea_output": ("hex", False),
    "statement_timeout": ("0", False),
    "lock_timeout": ("0", False),
    "idle_in_transaction_session_timeout": ("0", False),
    "row_security": ("on", False),
    "enable_seqscan": ("on", False),
}
_PG_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def pg_duration_s(value: str) -> float | None:
    """A PostgreSQL time setting (`5000` is milliseconds, `'5s'`, `'1min'`) in seconds; None for 0."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|min|h|d)?\s*", str(value))
    if match is None:
        raise SqlError("22023", f"invalid value for statement_timeout: {value!r} (write e.g. 5000, '5s' or '1min')")
    seconds = float(match.group(1)) * _PG_UNITS[match.group(2) or "ms"]
    return seconds or None


CANONICAL = {name.lower(): name for name in DEFAULT_SETTINGS}
ALIASES = {
    "transaction isolation level": "transaction_isolation",
    "time zone": "timezone",
    "session authorization": "session_authorization",
    "names": "client_encoding",
    "schema": "search_path",
}
READ_ONLY = {
    "server_version",
    "server_version_num",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "in_hot_standby",
    "max_index_keys",
    "max_identifier_length",
    "lc_collate",
    "lc_ctype",
}
UTF8_NAMES = {"utf8", "utf-8", "unicode"}


class SqlError(Exception):
    """An error reported to the client with a SQLSTATE (and optionally a cursor position)."""

    def __init__(self, sqlstate: str, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.position = position


@dataclass
class Statement:
    """One parsed statement: its command, and for queries the tree and routing."""

    sql: str
    command: str  # 'query', 'set', 'show', 'reset', 'begin', 'commit', 'rollback', 'noop', 'empty'
    tag: str = ""
    ast: exp.Expr | None = None
    catalog: bool = False
    param_count: int = 0
    name: str = ""  # for set/show/reset
    value: str | None = None  # for set


@dataclass
class Outcome:
    """What running a statement produced: rows (a streamed result) or just a tag."""

    tag: str
    result: ResultLike | None = None
    reported: dict[str, str] = field(default_factory=dict)


# -- splitting and classification ----------------------------------------------------


def split_statements(sql: str) -> list[str]:
    """Split on top-level semicolons using sqlglot's tokenizer (quotes and comments respected)."""
    try:
        tokens = sqlglot.tokenize(sql, read="postgres")
    except sqlglot.errors.TokenError as e:
        raise SqlError("42601", f"syntax error: {e}") from e
    pieces, start = [], 0
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            pieces.append(sql[start : token.start])
            start = token.end + 1
    pieces.append(sql[start:])
    return [p for p in pieces if _significant(p)] or [""]


def _significant(piece: str) -> bool:
    try:
        return bool(sqlglot.tokenize(piece, read="postgres"))
    except sqlglot.errors.TokenError:
        return True


_TX = {
    "BEGIN": ("begin", "BEGIN"),
    "START": ("begin", "BEGIN"),
    "COMMIT": ("commit", "COMMIT"),
    "END": ("commit", "COMMIT"),
    "ROLLBACK": ("rollback", "ROLLBACK"),
    "ABORT": ("rollback", "ROLLBACK"),
    "SAVEPOINT": ("noop", "SAVEPOINT"),
    "RELEASE": ("noop", "RELEASE"),
}
_SET = re.compile(
    r"^SET\s+(?:SESSION\s+|LOCAL\s+)?(?:(?P<alias>TIME\s+ZONE|NAMES|SCHEMA)\s+|(?P<name>[A-Za-z_][\w.]*)\s*(?:=|\s+TO\s+))"
    r"\s*(?P<value>.*?)\s*$",
    re.IGNORECASE | re.DOTALL,
)
_QUERY_STARTS = {"SELECT", "WITH", "VALUES", "TABLE", "("}
_WRITE_COMMANDS = set(
    [
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "UPSERT",
        "REPLACE",
        "CREATE",
        "DROP",
        "ALTER",
        "TRUNCATE",
        "COPY",
        "GRANT",
        "REVOKE",
        "ATTACH",
        "DETACH",
        "INSTALL",
        "LOAD",
        "FORCE",
        "PRAGMA",
        "CALL",
        "VACUUM",
        "CHECKPOINT",
        "EXPORT",
        "IMPORT",
        "COMMENT",
        "LOCK",
        "PREPARE",
        "EXECUTE",
        "DO",
        "EXPLAIN",
        "ANALYZE",
        "REINDEX",
        "CLUSTER",
        "LISTEN",
        "NOTIFY",
        "REFRESH",
        "SECURITY",
        "USE",
        "DESCRIBE",
        "SUMMARIZE",
        "REASSIGN",
    ]
)
_FROM_CLAUSE_ENDS = {
    TokenType.WHERE,
    TokenType.GROUP_BY,
    TokenType.ORDER_BY,
    TokenType.HAVING,
    TokenType.LIMIT,
    TokenType.SELECT,
    TokenType.ON,
    TokenType.USING,
    TokenType.WINDOW,
    TokenType.UNION,
}


def classify(sql: str) -> Statement:
    text = sql.strip()
    words = _leading_words(text)
    if not words:
        return Statement(sql, "empty")
    first = words[0]
    if first in _TX and not (first == "ROLLBACK" and "PREPARED" in words[:2]):
        command, tag = _TX[first]
        if first == "ROLLBACK" and "TO" in words[:3]:
            command = "noop"
        return Statement(sql, command, tag)
    if first == "SET":
        return _classify_set(sql, text, words)
    if first == "SHOW":
        return Statement(sql, "show", "SHOW", name=_setting_name(" ".join(words[1:])))
    if first == "RESET":
        return Statement(sql, "reset", "RESET", name=_setting_name(" ".join(words[1:2])))
    if first in ("DECLARE", "FETCH", "MOVE") or (first == "CLOSE" and words[1:2] != ["ALL"]):
        return _classify_cursor(sql, first)
    if first in ("DISCARD", "DEALLOCATE", "CLOSE", "UNLISTEN"):
        return Statement(sql, "noop", {"DISCARD": "DISCARD ALL"}.get(first, first))
    if first in _QUERY_STARTS:
        return _classify_query(sql)
    if first in _WRITE_COMMANDS:
        raise SqlError("25006", f"cannot execute {first} in a read-only florql session: only queries are allowed")
    raise SqlError("42601", f'syntax error at or near "{words[0]}"', 1)


def _leading_words(text: str) -> list[str]:
    try:
        tokens = sqlglot.tokenize(text, read="postgres")[:4]
    except sqlglot.errors.TokenError as e:
        raise SqlError("42601", f"syntax error: {e}") from e
    return [t.text.upper() for t in tokens]


_DECLARE = re.compile(
    r"^DECLARE\s+(?P<name>\"[^\"]+\"|\w+)\s+(?P<options>(?:\w+\s+)*?)CURSOR\s+"
    r"(?:(?P<hold>WITH|WITHOUT)\s+HOLD\s+)?FOR\s+(?P<query>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_FETCH = re.compile(
    r"^(?P<verb>FETCH|MOVE)\s+(?:(?P<direction>NEXT|ALL|FORWARD\s+ALL|FORWARD\s+\d+|FORWARD|\d+)\s+)?"
    r"(?:(?:FROM|IN)\s+)?(?P<name>\"[^\"]+\"|\w+)$",
    re.IGNORECASE,
)


def _classify_cursor(sql: str, verb: str) -> Statement:
    text = _strip_comments(sql)
    if verb == "DECLARE":
        match = _DECLARE.match(text)
        if not match or ("SCROLL" in match["options"].upper().split() and "NO" not in match["options"].upper().split()):
            raise SqlError(
                "0A000", "florql cursors are declared as: DECLARE name [NO SCROLL] CURSOR [WITH HOLD] FOR query"
            )
        inner = _classify_query(match["query"])
        hold = (match["hold"] or "").upper() == "WITH"
        return Statement(
            match["query"],
            "declare",
            "DECLARE CURSOR",
            inner.ast,
            inner.catalog,
            inner.param_count,
            name=_cursor_name(match["name"]),
            value="hold" if hold else None,
        )
    if verb == "CLOSE":
        return Statement(sql, "close", "CLOSE CURSOR", name=_cursor_name(text.split(None, 1)[1]))
    match = _FETCH.match(text)
    if not match:
        raise SqlError(
            "0A000", "florql cursors only move forward: FETCH [NEXT | n | ALL | FORWARD [n | ALL]] FROM name"
        )
    direction = " ".join((match["direction"] or "NEXT").upper().split())
    count = {"NEXT": "1", "FORWARD": "1", "ALL": "0", "FORWARD ALL": "0"}.get(direction, direction.split()[-1])
    return Statement(sql, "fetch", match["verb"].upper(), name=_cursor_name(match["name"]), value=count)


def _cursor_name(raw: str) -> str:
    raw = raw.strip()
    return raw[1:-1] if raw.startswith('"') else raw.lower()


def _classify_set(sql: str, text: str, words: list[str]) -> Statement:
    if words[1:2] == ["TRANSACTION"] or words[1:3] == ["SESSION", "CHARACTERISTICS"]:
        return Statement(sql, "noop", "SET")
    match = _SET.match(_strip_comments(text))
    if not match:
        raise SqlError("42601", f"syntax error in SET: {text[:200]}")
    name = _setting_name(match["alias"] or match["name"])
    return Statement(sql, "set", "SET", name=name, value=_setting_value(match["value"]))


def _strip_comments(text: str) -> str:
    return re.sub(r"--[^\n]*|/\*.*?\*/", " ", text, flags=re.DOTALL).strip().rstrip(";")


def _setting_name(raw: str) -> str:
    name = " ".join(raw.lower().split())
    return ALIASES.get(name, name)


def _setting_value(raw: str) -> str | None:
    if raw.upper() in ("DEFAULT", "LOCAL"):
        return None
    parts = [p.strip() for p in re.split(r",(?=(?:[^']*'[^']*')*[^']*$)", raw)]
    return ", ".join(_unquote(p) for p in parts)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value.lower() if re.fullmatch(r"[A-Za-z_]\w*", value) else value


def _classify_query(sql: str) -> Statement:
    _refuse_file_tables(sql)
    try:
        ast = sqlglot.parse_one(sql, read="postgres")
    except sqlglot.errors.ParseError as e:
        raise SqlError("42601", _parse_message(e), _error_position(sql, e)) from e
    try:
        ensure_read_only(ast)  # the guard of the Python API too: writes → 25006, files/environment → 42501
    except FlorqlError as err:
        raise SqlError(err.sqlstate, str(err)) from err
    params = [int(p.name) for p in ast.find_all(exp.Parameter) if p.name.isdigit()]
    return Statement(sql, "query", "SELECT", ast, is_catalog_query(ast), max(params, default=0))


def _refuse_file_tables(sql: str) -> None:
    """DuckDB reads `FROM 'file.csv'`; sqlglot parses it like a quoted name, so look at tokens."""
    depth = 0
    from_depths: list[int] = []  # parenthesis depths with an open FROM
    previous: TokenType | None = None
    for token in sqlglot.tokenize(sql, read="postgres"):
        kind = token.token_type
        if kind == TokenType.L_PAREN:
            depth += 1
        elif kind == TokenType.R_PAREN:
            depth -= 1
            from_depths = [d for d in from_depths if d <= depth]
        elif kind in (TokenType.FROM, TokenType.JOIN) and from_depths[-1:] != [depth]:
            from_depths.append(depth)
        elif kind in _FROM_CLAUSE_ENDS:
            from_depths = [d for d in from_depths if d < depth]
        elif kind == TokenType.STRING and from_depths[-1:] == [depth] and previous in _TABLE_BEFORE:
            raise SqlError("42501", "reading files is not allowed in a florql session")
        previous = kind


_TABLE_BEFORE = {TokenType.FROM, TokenType.JOIN, TokenType.COMMA}


def _parse_message(e: sqlglot.errors.ParseError) -> str:
    detail = e.errors[0]["description"] if e.errors else str(e)
    return f"syntax error: {detail}"


def _error_position(sql: str, e: sqlglot.errors.ParseError) -> int | None:
    if not e.errors or not e.errors[0].get("line"):
        return None
    lines = sql.split("\n")
    line, col = e.errors[0]["line"], e.errors[0]["col"]
    return sum(len(x) + 1 for x in lines[: line - 1]) + max(col, 1)


# -- the session ---------------------------------------------------------------------


class WireSession:
    """Settings and statement execution for one connection (called from worker threads)."""

    def __init__(
        self, backend: Backend, catalog: Catalog, info: SessionInfo, server_tables: ServerTables | None = None
    ) -> None:
        self.backend = backend
        self.catalog = catalog
        self.server_tables = server_tables
        self.info = info
        self.settings = {name.lower(): value for name, (value, _) in DEFAULT_SETTINGS.items()}
        self.settings["session_authorization"] = info.user
        self.in_transaction = False
        self.failed = False
        self.cursors: dict[str, Cursor] = {}

    # settings

    def startup_settings(self, params: dict[str, str]) -> None:
        for name, value in params.items():
            if name.lower() in self.settings and name.lower() not in READ_ONLY:
                self._set(name.lower(), value)
        for option in re.findall(r"-c\s*([\w.]+)=(\S+)", params.get("options", "")):
            self._set(_setting_name(option[0]), option[1])

    def reported(self) -> dict[str, str]:
        return {name: self.settings[name.lower()] for name, (_, report) in DEFAULT_SETTINGS.items() if report}

    def _set(self, name: str, value: str | None) -> dict[str, str]:
        if name in READ_ONLY:
            raise SqlError("55P02", f'parameter "{name}" cannot be changed')
        if value is None:
            value = DEFAULT_SETTINGS[CANONICAL[name]][0] if name in CANONICAL else ""
        if name == "statement_timeout":
            pg_duration_s(value)  # refused now, not at the next query
        if name == "client_encoding":
            if value.lower() not in UTF8_NAMES:
                raise SqlError("22023", f"florql supports only client_encoding UTF8, not {value!r}")
            value = "UTF8"
        self.settings[name] = value
        if name == "search_path":
            self.info.search_path = next((p.strip().strip('"') for p in value.split(",") if "$user" not in p), "public")
        canonical = CANONICAL.get(name, name)
        return {canonical: value} if DEFAULT_SETTINGS.get(canonical, ("", False))[1] else {}

    def show(self, name: str) -> pa.Table:
        if name == "all":
            names = sorted(self.settings)
            return pa.table(
                {"name": names, "setting": [self.settings[n] for n in names], "description": [""] * len(names)}
            )
        florql_settings = getattr(self.backend, "settings", {}) or {}
        if name in florql_settings:
            value = florql_settings[name]
        elif name in self.settings:
            value = self.settings[name]
        else:
            raise SqlError("42704", f'unrecognized configuration parameter "{name}"')
        return pa.table({name: ["" if value is None else str(value)]})

    # execution

    def run(self, statement: Statement, params: Sequence[Any] = ()) -> Outcome:
        """Run one classified statement; a query's rows are left to stream from the result."""
        if self.failed and statement.command not in ("commit", "rollback"):
            raise SqlError("25P02", "current transaction is aborted, commands ignored until end of transaction block")
        handler = getattr(self, f"_run_{statement.command}")
        return handler(statement, params)

    def _run_empty(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        return Outcome("")

    def _run_noop(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        return Outcome(statement.tag)

    def _run_begin(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        self.in_transaction = True
        return Outcome("BEGIN")

    def _run_commit(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        tag = "ROLLBACK" if self.failed else "COMMIT"
        self.end_transaction()
        return Outcome(tag)

    def _run_rollback(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        self.end_transaction()
        return Outcome("ROLLBACK")

    def end_transaction(self) -> None:
        self.in_transaction = self.failed = False
        for name in [n for n, c in self.cursors.items() if not c.hold]:
            self.cursors.pop(name).close()

    def close(self) -> None:
        for cursor in self.cursors.values():
            cursor.close()
        self.cursors.clear()

    def _run_declare(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        if statement.name in self.cursors:
            raise SqlError("42P03", f'cursor "{statement.name}" already exists')
        if not self.in_transaction and statement.value != "hold":
            raise SqlError("25P01", "DECLARE CURSOR can only be used in transaction blocks")
        outcome = self._run_query(statement, params)
        assert outcome.result is not None
        self.cursors[statement.name] = Cursor(outcome.result, hold=statement.value == "hold")
        return Outcome("DECLARE CURSOR")

    def _run_fetch(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        cursor = self._cursor(statement.name)
        rows = cursor.take(int(statement.value or 0))
        if statement.tag == "MOVE":
            return Outcome(f"MOVE {rows.num_rows}")
        return Outcome("FETCH", TableResult(rows))

    def _run_close(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        self._cursor(statement.name).close()
        del self.cursors[statement.name]
        return Outcome("CLOSE CURSOR")

    def _cursor(self, name: str) -> Cursor:
        if name not in self.cursors:
            raise SqlError("34000", f'cursor "{name}" does not exist')
        return self.cursors[name]

    def _run_set(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        if statement.name in (getattr(self.backend, "settings", {}) or {}):
            self.backend.sql(statement.sql, dialect="postgres").close()
            return Outcome("SET")
        return Outcome("SET", reported=self._set(statement.name, statement.value))

    def _run_reset(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        reported: dict[str, str] = {}
        names = [n for n in self.settings if n not in READ_ONLY] if statement.name == "all" else [statement.name]
        for name in names:
            reported |= self._set(name, None)
        return Outcome("RESET", reported=reported)

    def _run_show(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        return Outcome("SHOW", TableResult(self.show(statement.name)))

    def _run_query(self, statement: Statement, params: Sequence[Any]) -> Outcome:
        assert statement.ast is not None
        try:
            ast = bind_parameters(statement.ast, params) if statement.param_count else statement.ast
        except FlorqlError as err:  # ParameterError: 08P01
            raise SqlError(err.sqlstate, str(err)) from err
        if self.server_tables is not None and is_server_query(ast):
            return Outcome("SELECT", TableResult(self.server_tables.execute(ast)))
        if statement.catalog:
            return Outcome("SELECT", self.catalog.execute(ast, self.info))
        public = [t for t in ast.find_all(exp.Table) if t.db.lower() == "public" and not t.catalog]
        if public:  # the catalog shows the store's tables in schema public; the store has no schemas
            ast = ast if statement.param_count else ast.copy()
            for table in (t for t in ast.find_all(exp.Table) if t.db.lower() == "public" and not t.catalog):
                table.set("db", None)
        sql = ast.sql("postgres") if statement.param_count or public else statement.sql
        for attempt in range(SERIALIZATION_RETRIES + 1):
            try:
                try:
                    return Outcome("SELECT", self.backend.sql(sql, dialect="postgres"))
                except duckdb.Error as err:  # a backend that let DuckDB's own error through
                    raise from_duckdb(err) from err
            except Exception as err:  # a statement that met a concurrent change runs again first
                if getattr(err, "sqlstate", None) != "40001" or attempt == SERIALIZATION_RETRIES:
                    raise
                time.sleep(0.02 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def describe(self, statement: Statement) -> pa.Schema | None:
        """The result schema of a statement before its parameters are known."""
        if statement.command == "show":
            return self.show(statement.name).schema
        if statement.command == "fetch" and statement.tag == "FETCH":
            return self._cursor(statement.name).schema
        if statement.command != "query":
            return None
        if self.server_tables is not None and statement.ast is not None and is_server_query(statement.ast):
            return self.server_tables.execute(statement.ast, describing=True).schema  # cancels nobody
        outcome = self._run_query(statement, [None] * statement.param_count)
        assert outcome.result is not None
        try:
            return outcome.result.schema
        finally:
            outcome.result.close()


class TableResult:
    """A small in-memory result (SHOW) with the same interface as a query result."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.schema = table.schema
        self.warnings: list[str] = []

    def batches(self, batch_size: int = 10_000) -> Iterator[pa.RecordBatch]:
        return iter(self.table.to_batches(batch_size))

    def close(self) -> None:
        pass


class Cursor:
    """A SQL-level cursor (DECLARE ... CURSOR): an open result read forward on FETCH."""

    def __init__(self, result: ResultLike, hold: bool) -> None:
        self.result = result
        self.schema = result.schema
        self.hold = hold
        self._batches = iter(result.batches(10_000))
        self._pending: pa.RecordBatch | None = None

    def take(self, count: int) -> pa.Table:
        """The next `count` rows (0: all the rest)."""
        taken: list[pa.RecordBatch] = []
        wanted = count or math.inf
        while wanted > 0:
            batch = self._pending if self._pending is not None else next(self._batches, None)
            self._pending = None
            if batch is None:
                break
            if batch.num_rows > wanted:
                batch, self._pending = batch.slice(0, int(wanted)), batch.slice(int(wanted))
            taken.append(batch)
            wanted -= batch.num_rows
        return pa.Table.from_batches(taken, self.schema)

    def close(self) -> None:
        self.result.close()
