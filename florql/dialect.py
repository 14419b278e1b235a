"""The FlorQL dialect: DuckDB's SQL, read-only, over florql's tables.

Parsing, the read-only guard and parameter binding live here, shared by the Python API and the
wire server; binding florql's tables and planning live in `florql.query`.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import ParseError
from sqlglot.parsers.duckdb import DuckDBParser
from sqlglot.tokens import TokenType

from florql.errors import ForbiddenAccess, ForbiddenStatement, ParameterError, QuerySyntaxError

FLORQL_SETTINGS = ("replay", "replay_budget", "workers")

# Functions that read or list files, read the environment, load code or reach other databases.
_FILE_FUNCTIONS = re.compile(
    r"^(read_\w+|\w+_scan|glob|sniff_csv|parquet_\w+|load_extension|getenv|query|query_table|"
    r"pg_read_\w+|pg_ls_\w+|pg_stat_file|pg_file_\w+|lo_\w+|dblink\w*|sqlite_attach|postgres_attach|"
    r"load_aws_credentials|copy_\w+|write_\w+|export_\w+|import_\w+|install_\w+|attach\w*|detach\w*)$",
    re.IGNORECASE,
)
_FILE_EXPRESSIONS: tuple[type[exp.Expr], ...] = tuple(
    getattr(exp, n) for n in ("ReadCSV", "ReadParquet", "ReadJSON") if hasattr(exp, n)
)
_UNPARSED_FORBIDDEN = frozenset(
    {
        "EXPORT",
        "IMPORT",
        "LOAD",
        "INSTALL",
        "ATTACH",
        "DETACH",
        "COPY",
        "PRAGMA",
        "CHECKPOINT",
        "VACUUM",
        "CALL",
        "FORCE",
    }
)
_READING_ROOTS = (exp.Query, exp.Values)  # Select, SetOperation, Subquery; VALUES
_WRITES = (
    exp.DML,
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Create,
    exp.Drop,
    exp.Alter,
    exp.Command,
    exp.Into,
    exp.Copy,
)


class Florql(DuckDB):
    """DuckDB's grammar; florql's tables are bound by `florql.query`, not by the dialect."""

    class Parser(DuckDBParser):  # DuckDB.Parser: a class attribute, which mypy does not take as a base
        def _parse_table_part(self, schema: bool = False) -> exp.Expr | None:
            # DuckDB reads `FROM 'file.csv'` as a file; sqlglot would make it a quoted name, the same
            # as `FROM "file.csv"`. Keep the string a Literal so that `ensure_read_only` can refuse it.
            if not schema and self._curr is not None and self._curr.token_type == TokenType.STRING:
                self._advance()
                return exp.Literal.string(self._prev.text)
            return super()._parse_table_part(schema=schema)

        def _parse_placeholder(self) -> exp.Expr | None:
            # Remember where each `?` stands: DuckDB numbers them in the order of the text.
            placeholder = super()._parse_placeholder()
            if isinstance(placeholder, exp.Placeholder) and not placeholder.args.get("this") and self._prev:
                placeholder.meta["start"] = self._prev.start
            return placeholder


def parse(sql: str, read: str = "duckdb") -> list[exp.Expr]:
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
        detail = plain_syntax_error(first.get("description") or str(err).splitlines()[0])
        if first.get("highlight") and "Unexpected token" in detail:
            detail = f"unexpected {first['highlight']!r}"
        raise QuerySyntaxError(f"syntax error{where}: {detail}", line, col) from err
    if not statements:
        raise QuerySyntaxError("empty query: write a SELECT, e.g. SELECT * FROM runs")
    return statements


def florql_setting(statement: exp.Expr) -> tuple[str, str] | None:
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


def ensure_read_only(statement: exp.Expr) -> None:
    """Refuse anything but reading florql's tables: the one guard of the Python API and the wire server.

    Writes, DDL and other commands raise `ForbiddenStatement` (SQLSTATE 25006); reading files or the
    environment, loading code and reaching other databases raise `ForbiddenAccess` (42501).
    """
    if not isinstance(statement, _READING_ROOTS):
        kind = statement.key.upper() if not isinstance(statement, exp.Command) else statement.name.upper()
        raise ForbiddenStatement(
            f"{kind} statements are not allowed: florql queries are read-only (SELECT, WITH … SELECT, "
            "UNION, VALUES, and SET of florql's settings)"
        )
    for node in statement.walk():
        if isinstance(node, _WRITES) or (isinstance(node, exp.Select) and node.args.get("into")):
            kind = (
                node.name.upper()
                if isinstance(node, exp.Command)
                else "SELECT … INTO"
                if isinstance(node, (exp.Select, exp.Into))
                else node.key.upper()
            )
            raise ForbiddenStatement(f"{kind} is not allowed: florql queries are read-only")
        if isinstance(node, _FILE_EXPRESSIONS) or (isinstance(node, exp.Table) and isinstance(node.this, exp.Literal)):
            raise ForbiddenAccess("reading files is not allowed in florql queries: query florql's tables instead")
        if isinstance(node, exp.Func):
            name = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
            if name and _FILE_FUNCTIONS.match(name):
                raise ForbiddenAccess(f"{name}(): reading files or the environment is not allowed in florql queries")


# ---- parameters -------------------------------------------------------------------------------
def bind_parameters(statement: exp.Expr, values: Sequence[Any] | None) -> exp.Expr:
    """Inline `?` (numbered in order) and `$n` parameters as typed literals, on a copy of `statement`.

    Named parameters (`$name`, `:name`) are left alone. A parameter without a value raises
    `ParameterError` (SQLSTATE 08P01).
    """
    given = list(values or ())
    found = [node for node in statement.find_all(exp.Placeholder, exp.Parameter) if _parameter_kind(node)]
    if not found:
        return statement
    statement = statement.copy()
    positional = [node for node in statement.find_all(exp.Placeholder) if _parameter_kind(node) == "?"]
    if all("start" in node.meta for node in positional):  # parsed by `parse`: in the order of the text
        positional.sort(key=lambda node: node.meta["start"])
    numbers_ = {id(node): i for i, node in enumerate(positional, 1)}

    def substitute(node: exp.Expr) -> exp.Expr:
        kind = _parameter_kind(node) if isinstance(node, (exp.Placeholder, exp.Parameter)) else None
        if kind is None:
            return node
        if kind == "?":
            number = numbers_[id(node)]
            where = f"{number} (the {_ordinal(number)} ?)"
        else:
            number, where = int(kind), f"${kind}"
        if not 1 <= number <= len(given):
            raise ParameterError(f"there is no value for parameter {where}: the query was given {len(given)} value(s)")
        return literal(given[number - 1])

    return statement.transform(substitute, copy=False)


def _parameter_kind(node: exp.Expr) -> str | None:
    """'?' for a positional `?`, the digits of `$n`, None for a named parameter."""
    if isinstance(node, exp.Placeholder) and not node.args.get("this"):
        return "?"
    return node.name if node.name.isdigit() else None


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def literal(value: Any) -> exp.Expr:
    """A bound parameter as a SQL literal; untyped text stays an untyped string literal."""
    if value is None:
        return exp.Null()
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, numbers.Integral):
        return _number(str(int(value)), value < 0)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return exp.cast(exp.Literal.string(str(value)), "DECIMAL")
        return _number(str(value), value < 0)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            return exp.cast(exp.Literal.string(str(value)), "DOUBLE")
        return exp.cast(_number(repr(value), value < 0), "DOUBLE")
    if isinstance(value, dt.datetime):
        return exp.cast(exp.Literal.string(value.isoformat(sep=" ")), "TIMESTAMPTZ" if value.tzinfo else "TIMESTAMP")
    if isinstance(value, dt.date):
        return exp.cast(exp.Literal.string(value.isoformat()), "DATE")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return exp.Unhex(this=exp.Literal.string(bytes(value).hex()))
    if isinstance(value, (list, tuple)):
        return exp.Array(expressions=[literal(v) for v in value])
    return exp.Literal.string(str(value))


def _number(text: str, negative: bool) -> exp.Expr:
    node = exp.Literal.number(text.lstrip("-"))
    return exp.Paren(this=exp.Neg(this=node)) if negative else node


_ENGINE_CONTEXT = re.compile(r"\n*LINE (\d+): (.*)\n( *)(\^+)\s*$")
_MISSING_KEYWORD = re.compile(r"Required keyword: '(\w+)' missing for <class '[\w.]*\.(\w+)'>")


def plain_syntax_error(detail: str) -> str:
    """sqlglot's description of a parse error, in the words of SQL rather than of its classes."""
    match = _MISSING_KEYWORD.search(detail)
    if match:
        clause = re.sub(r"(?<!^)(?=[A-Z])", " ", match.group(2)).upper()
        return f"{clause} is incomplete: something is missing after it"
    return re.sub(r"<class '[\w.]*\.(\w+)'>", r"\1", detail)


def in_user_terms(message: str, user_sql: str) -> str:
    """An engine error about the rewritten query, told about the user's own SQL.

    DuckDB quotes the SQL it ran (florql's rewrite of the user's) and underlines the culprit.
    The quote goes; where the underlined text also stands in the user's SQL, the error says where.
    """
    match = _ENGINE_CONTEXT.search(message)
    if match is None:
        return message
    head = message[: match.start()].rstrip()
    quoted, start = f"LINE {match.group(1)}: {match.group(2)}", len(match.group(3))
    culprit = quoted[start : start + len(match.group(4))]
    at = user_sql.find(culprit) if culprit.strip() else -1
    if at < 0:
        return head
    line = user_sql.count("\n", 0, at) + 1
    column = at - (user_sql.rfind("\n", 0, at) + 1) + 1
    text = user_sql.splitlines()[line - 1]
    return f"{head}\nat line {line}, column {column}:\n  {text}\n  {' ' * (column - 1)}{'^' * len(culprit)}"
