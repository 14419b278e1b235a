"""The FlorQL dialect: DuckDB's SQL, read-only, over florql's tables.

Parsing and the read-only guard live here; binding and planning live in `florql.query`.
"""
from __future__ import annotations

import re

import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import ParseError

from florql.errors import ForbiddenStatement, QuerySyntaxError

FLORQL_SETTINGS = ("replay", "replay_budget", "workers")

_FILE_FUNCTIONS = re.compile(
    r"^(read_\w+|\w+_scan|glob|sniff_csv|parquet_\w+|load_extension|getenv|query|query_table|pg_read_\w+|"
    r"lo_\w+|copy_\w+|write_\w+|export_\w+|import_\w+|install_\w+|attach\w*|detach\w*)$",
    re.IGNORECASE,
)
_FILE_EXPRESSIONS: tuple[type[exp.Expression], ...] = tuple(
    getattr(exp, n) for n in ("ReadCSV", "ReadParquet", "ReadJSON") if hasattr(exp, n)
)
_UNPARSED_FORBIDDEN = frozenset({"EXPORT", "IMPORT", "LOAD", "INSTALL", "ATTACH", "DETACH", "COPY", "PRAGMA",
                                 "CHECKPOINT", "VACUUM", "CALL", "FORCE"})
_READING_ROOTS = (exp.Select, exp.SetOperation, exp.Subquery, exp.Values)


class Florql(DuckDB):
    """DuckDB's grammar; florql's tables are bound by `florql.query`, not by the dialect."""


def parse(sql: str, read: str = "duckdb") -> list[exp.Expression]:
    dialect = Florql if read in ("duckdb", "florql") else read
    keyword = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
    if keyword in _UNPARSED_FORBIDDEN:
        raise ForbiddenStatement(f"{keyword} statements are not allowed: florql queries are read-only")
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except ParseError as err:
        first = err.errors[0] if err.errors else {}
        line, col = first.get("line"), first.get("col")
        where = f" at line {line}, column {col}" if line else ""
        detail = first.get("description") or str(err).splitlines()[0]
        raise QuerySyntaxError(f"syntax error{where}: {detail}", line, col) from None
    if not statements:
        raise QuerySyntaxError("empty query: write a SELECT, e.g. SELECT * FROM runs")
    return statements


def florql_setting(statement: exp.Expression) -> tuple[str, str] | None:
    """`SET replay = 'never'` → ('replay', 'never'); None for any other statement."""
    if not isinstance(statement, exp.Set):
        return None
    items = statement.expressions
    if len(items) != 1 or not isinstance(items[0].this, exp.EQ):
        return None
    target, value = items[0].this.this, items[0].this.expression
    name = target.name.lower()
    if name not in FLORQL_SETTINGS:
        raise ForbiddenStatement(
            f"SET {name}: only florql's settings can be changed ({', '.join(FLORQL_SETTINGS)}); queries are read-only"
        )
    return name, value.name if isinstance(value, (exp.Literal, exp.Column, exp.Identifier)) else value.sql()


def ensure_read_only(statement: exp.Expression) -> None:
    """Refuse anything but reading florql's tables."""
    if not isinstance(statement, _READING_ROOTS):
        kind = statement.key.upper() if not isinstance(statement, exp.Command) else statement.name.upper()
        raise ForbiddenStatement(
            f"{kind} statements are not allowed: florql queries are read-only (SELECT, WITH … SELECT, "
            "UNION, VALUES, and SET of florql's settings)"
        )
    for node in statement.walk():
        if isinstance(node, (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Command)):
            raise ForbiddenStatement(f"{node.key.upper()} is not allowed: florql queries are read-only")
        if isinstance(node, _FILE_EXPRESSIONS):
            raise ForbiddenStatement(f"{node.key.upper()}: reading files is not allowed in florql queries")
        if isinstance(node, exp.Func):
            name = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
            if name and _FILE_FUNCTIONS.match(name):
                raise ForbiddenStatement(f"{name}(): reading files or the environment is not allowed in florql queries")
