"""An emulated PostgreSQL system catalog over the store, served by an in-memory DuckDB.

`pg_catalog` and `information_schema` relations are real tables, rebuilt from
`Backend.tables()` when the store changes; the functions clients call are DuckDB
macros. Client SQL is parsed as PostgreSQL by sqlglot and rewritten (schema
qualifiers, `::regclass` casts, `OPERATOR(pg_catalog.~)`, session functions) so that
DuckDB runs it against these tables: no query text is ever matched.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
from sqlglot import exp

from .backend import ArrowResult, TableLike, run_duckdb
from .catalog_tables import CODES, INFORMATION_SCHEMA, PG_CATALOG, PG_CATALOG_VIEWS, layout
from .types import ELEMENT_OF, TYPES, PgType, pg_type_of

PG_CATALOG_NS, PUBLIC_NS, INFORMATION_SCHEMA_NS = 11, 2200, 13000
OWNER = 10
DATABASE_OID = 16384
FIRST_USER_OID = 16385
INFO_SCHEMA = "pg_information_schema"  # DuckDB reserves the name information_schema
PG_CLASS_OID = 1259
SERVER_VERSION = "15.0"
VERSION = f"PostgreSQL {SERVER_VERSION} (florql) on x86_64-pc-linux-gnu, compiled by florql, 64-bit"

_SYSTEM_OIDS = {
    "pg_type": 1247,
    "pg_attribute": 1249,
    "pg_proc": 1255,
    "pg_class": 1259,
    "pg_authid": 1260,
    "pg_auth_members": 1261,
    "pg_database": 1262,
    "pg_namespace": 2615,
    "pg_description": 2609,
    "pg_index": 2610,
    "pg_constraint": 2606,
    "pg_attrdef": 2604,
    "pg_am": 2601,
    "pg_enum": 3501,
    "pg_inherits": 2611,
    "pg_trigger": 2620,
    "pg_rewrite": 2618,
    "pg_depend": 2608,
    "pg_cast": 2605,
    "pg_operator": 2617,
    "pg_language": 2612,
    "pg_collation": 3456,
    "pg_tablespace": 1213,
    "pg_extension": 3079,
    "pg_shdescription": 2396,
    "pg_sequence": 2224,
    "pg_policy": 3256,
    "pg_statistic_ext": 3381,
    "pg_publication": 6104,
    "pg_publication_rel": 6106,
    "pg_publication_namespace": 6237,
    "pg_partitioned_table": 3350,
    "pg_foreign_table": 3118,
    "pg_foreign_server": 1417,
    "pg_foreign_data_wrapper": 2328,
    "pg_range": 3541,
    "pg_event_trigger": 3466,
}

# Functions that only the catalog can answer; a statement calling one is routed here.
MACROS = f"""
version() AS '{VERSION}';
current_schemas(implicit) AS CASE WHEN implicit THEN ['pg_catalog', 'public'] ELSE ['public'] END;
pg_get_userbyid(o) AS 'florql';
pg_table_is_visible(o) AS o IN (SELECT oid FROM pg_class WHERE relnamespace IN ({PG_CATALOG_NS}, {PUBLIC_NS}));
pg_type_is_visible(o) AS true;
pg_function_is_visible(o) AS true;
format_type(o, m) AS (SELECT sql_name FROM florql_type_names WHERE oid = o);
pg_get_expr(e, r) AS e, (e, r, p) AS e;
obj_description(o) AS (SELECT description FROM pg_description WHERE objoid = o AND objsubid = 0 LIMIT 1),
    (o, c) AS (SELECT description FROM pg_description WHERE objoid = o AND objsubid = 0 LIMIT 1);
col_description(o, n) AS (SELECT description FROM pg_description WHERE objoid = o AND objsubid = n LIMIT 1);
shobj_description(o, c) AS NULL::VARCHAR;
pg_encoding_to_char(e) AS 'UTF8';
pg_char_to_encoding(e) AS 6;
pg_encoding_max_length(e) AS 4;
has_table_privilege(a, b) AS true, (a, b, c) AS true;
has_schema_privilege(a, b) AS true, (a, b, c) AS true;
has_database_privilege(a, b) AS true, (a, b, c) AS true;
has_function_privilege(a, b) AS true, (a, b, c) AS true;
has_sequence_privilege(a, b) AS true, (a, b, c) AS true;
has_any_column_privilege(a, b) AS true, (a, b, c) AS true;
has_column_privilege(a, b, c) AS true, (a, b, c, d) AS true;
pg_has_role(a, b) AS true, (a, b, c) AS true;
_pg_expandarray(arr) AS unnest(list_transform(generate_series(1, len(arr)), lambda i: {{'x': arr[i], 'n': i}}));
pg_get_constraintdef(o) AS NULL::VARCHAR, (o, p) AS NULL::VARCHAR;
pg_get_indexdef(o) AS NULL::VARCHAR, (o, c, p) AS NULL::VARCHAR;
pg_get_viewdef(o) AS NULL::VARCHAR, (o, p) AS NULL::VARCHAR;
pg_get_triggerdef(o) AS NULL::VARCHAR, (o, p) AS NULL::VARCHAR;
pg_get_ruledef(o) AS NULL::VARCHAR, (o, p) AS NULL::VARCHAR;
pg_get_partkeydef(o) AS NULL::VARCHAR;
pg_get_statisticsobjdef_columns(o) AS NULL::VARCHAR;
pg_get_serial_sequence(t, c) AS NULL::VARCHAR;
pg_get_function_arguments(o) AS '';
pg_get_function_identity_arguments(o) AS '';
pg_get_function_result(o) AS '';
pg_relation_size(o) AS 0::BIGINT, (o, f) AS 0::BIGINT;
pg_total_relation_size(o) AS 0::BIGINT;
pg_table_size(o) AS 0::BIGINT;
pg_indexes_size(o) AS 0::BIGINT;
pg_database_size(o) AS 0::BIGINT;
pg_size_pretty(n) AS n::VARCHAR || ' bytes';
pg_tablespace_location(o) AS '';
pg_is_in_recovery() AS false;
to_regtype(n) AS (SELECT oid FROM pg_type WHERE typname = trim(regexp_replace(n, '^.*[.]', ''), '"'));
to_regclass(n) AS (SELECT oid FROM pg_class WHERE relname = trim(regexp_replace(n, '^.*[.]', ''), '"'));
to_regnamespace(n) AS (SELECT oid FROM pg_namespace WHERE nspname = trim(n, '"'));
pg_relation_is_publishable(o) AS false;
pg_postmaster_start_time() AS TIMESTAMPTZ '2000-01-01 00:00:00+00';
txid_current() AS 1::BIGINT;
array_upper(a, d) AS CASE WHEN len(a) > 0 THEN len(a) END;
array_lower(a, d) AS CASE WHEN len(a) > 0 THEN 1 END;
quote_ident(s) AS CASE WHEN regexp_full_match(s, '[a-z_][a-z0-9_$]*') THEN s
    ELSE '"' || replace(s, '"', '""') || '"' END;
current_setting(setting_name) AS (SELECT setting FROM pg_settings WHERE name = lower(setting_name));
"""

# Functions whose value depends on the session: replaced by literals while rewriting.
SESSION_FUNCTIONS = {"pg_backend_pid", "current_user", "session_user", "current_database", "current_schema", "user"}
_SESSION_NODES = (exp.CurrentUser, exp.CurrentSchema, exp.CurrentDatabase)
CATALOG_FUNCTIONS = {line.split("(")[0].strip() for line in MACROS.split(";") if "(" in line} | SESSION_FUNCTIONS
CATALOG_SCHEMAS = {"pg_catalog", "information_schema"}
_OBJECT_LOOKUPS = {  # ::regclass etc: (catalog table, name column)
    "REGCLASS": ("pg_class", "relname"),
    "REGTYPE": ("pg_type", "typname"),
    "REGNAMESPACE": ("pg_namespace", "nspname"),
    "REGPROC": ("pg_proc", "proname"),
    "REGPROCEDURE": ("pg_proc", "proname"),
}


@dataclass
class SessionInfo:
    """What catalog functions need to know about the calling session."""

    user: str = "florql"
    database: str = "florql"
    pid: int = 0
    search_path: str = "public"
    settings: dict[str, str] = field(default_factory=dict)


class OidAssigner:
    """Stable OIDs for user relations for the server's lifetime: clients echo them back."""

    def __init__(self) -> None:
        self.oids: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, name: str) -> int:
        with self.lock:
            if name not in self.oids:
                self.oids[name] = FIRST_USER_OID + 2 * len(self.oids)  # odd neighbour: the row type
            return self.oids[name]


# -- building ------------------------------------------------------------------


def _relation_rows(name: str, oid: int, namespace: int, kind: str, ncols: int) -> dict[str, Any]:
    return {
        "oid": oid,
        "relname": name,
        "relnamespace": namespace,
        "reltype": oid + 1 if oid >= FIRST_USER_OID else 0,
        "relowner": OWNER,
        "relam": 2 if kind == "r" else 0,
        "relpersistence": "p",
        "relkind": kind,
        "relnatts": ncols,
        "relispopulated": True,
        "relreplident": "d",
        "reltuples": -1.0,
    }


def _attribute_row(relid: int, attnum: int, name: str, pt: PgType, notnull: bool) -> dict[str, Any]:
    return {
        "attrelid": relid,
        "attname": name,
        "atttypid": pt.oid,
        "attstattarget": -1,
        "attlen": pt.typlen,
        "attnum": attnum,
        "attndims": 1 if pt.category == "A" else 0,
        "attcacheoff": -1,
        "atttypmod": -1,
        "attbyval": pt.typlen in (1, 2, 4, 8),
        "attalign": "d" if pt.typlen == 8 else "i",
        "attstorage": "p" if pt.typlen > 0 else "x",
        "attnotnull": notnull,
        "attislocal": True,
        "attcollation": 100 if pt.category == "S" else 0,
    }


def _type_row(t: PgType) -> dict[str, Any]:
    is_array = t.category == "A" and t.oid in ELEMENT_OF
    io = "array" if is_array else t.name
    return {
        "oid": t.oid,
        "typname": t.name,
        "typnamespace": PG_CATALOG_NS,
        "typowner": OWNER,
        "typlen": t.typlen,
        "typbyval": t.typlen in (1, 2, 4, 8),
        "typtype": "p" if t.category == "P" else "b",
        "typcategory": t.category,
        "typispreferred": t.name in ("text", "float8", "bool", "oid"),
        "typisdefined": True,
        "typdelim": ",",
        "typelem": ELEMENT_OF.get(t.oid, 0),
        "typarray": t.array_oid,
        "typsubscript": "array_subscript_handler" if is_array else "-",
        "typinput": f"{io}_in",
        "typoutput": f"{io}_out",
        "typreceive": f"{io}_recv",
        "typsend": f"{io}_send",
        "typalign": "d" if t.typlen == 8 else "i",
        "typstorage": "p" if t.typlen > 0 else "x",
        "typtypmod": -1,
        "typcollation": 100 if t.category == "S" else 0,
    }


def _info_data_type(pt: PgType) -> str:
    return "ARRAY" if pt.category == "A" else pt.sql_name


class CatalogData:
    """Rows of every catalog relation, computed from the store's tables."""

    def __init__(self, tables: Sequence[TableLike], oid_of: Callable[[str], int], settings: dict[str, str]) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in [*PG_CATALOG, *INFORMATION_SCHEMA]}
        self._system_relations()
        for t in tables:
            self._user_relation(t, oid_of(t.name))
        self._fixed_rows(settings)

    def add(self, relation: str, **row: Any) -> None:
        self.rows[relation].append(row)

    def _system_relations(self) -> None:
        spare = iter(range(12000, 13000))
        for schema, ns, relations in (
            ("pg_catalog", PG_CATALOG_NS, PG_CATALOG),
            ("information_schema", INFORMATION_SCHEMA_NS, INFORMATION_SCHEMA),
        ):
            for name, spec in relations.items():
                oid = _SYSTEM_OIDS.get(name) or next(spare)
                kind = "v" if name in PG_CATALOG_VIEWS or ns == INFORMATION_SCHEMA_NS else "r"
                columns = [(col, TYPES[CODES[code][1]]) for col, code in layout(spec)]
                self._relation(schema, ns, name, oid, kind, columns, notnull=kind == "r", comments={})

    def _user_relation(self, t: TableLike, oid: int) -> None:
        columns = [(c.name, pg_type_of(c.type)) for c in t.columns]
        comments = {i + 1: c.comment for i, c in enumerate(t.columns) if c.comment}
        kind = "v" if t.kind == "view" else "r"
        self._relation("public", PUBLIC_NS, t.name, oid, kind, columns, notnull=False, comments=comments)
        for i, c in enumerate(t.columns):
            if not c.nullable:
                self.rows["pg_attribute"][-len(t.columns) + i]["attnotnull"] = True
        comment = getattr(t, "comment", "")
        if comment:
            self.add("pg_description", objoid=oid, classoid=PG_CLASS_OID, objsubid=0, description=comment)

    def _relation(
        self,
        schema: str,
        ns: int,
        name: str,
        oid: int,
        kind: str,
        columns: list[tuple[str, PgType]],
        notnull: bool,
        comments: dict[int, str],
    ) -> None:
        self.add("pg_class", **_relation_rows(name, oid, ns, kind, len(columns)))
        table_type = "VIEW" if kind == "v" else "BASE TABLE"
        self.add(
            "tables",
            table_catalog="florql",
            table_schema=schema,
            table_name=name,
            table_type=table_type,
            is_insertable_into="NO",
            is_typed="NO",
        )
        if kind == "v":
            self.add(
                "views",
                table_catalog="florql",
                table_schema=schema,
                table_name=name,
                check_option="NONE",
                is_updatable="NO",
                is_insertable_into="NO",
            )
            if schema == "public":
                self.add("pg_views", schemaname=schema, viewname=name, viewowner="florql")
        elif schema == "public":
            self.add("pg_tables", schemaname=schema, tablename=name, tableowner="florql")
        for attnum, (col, pt) in enumerate(columns, start=1):
            self.add("pg_attribute", **_attribute_row(oid, attnum, col, pt, notnull))
            self.add(
                "columns",
                table_catalog="florql",
                table_schema=schema,
                table_name=name,
                column_name=col,
                ordinal_position=attnum,
                is_nullable="NO" if notnull else "YES",
                data_type=_info_data_type(pt),
                udt_catalog="florql",
                udt_schema="pg_catalog",
                udt_name=pt.name,
                dtd_identifier=str(attnum),
                is_self_referencing="NO",
                is_identity="NO",
                is_generated="NEVER",
                is_updatable="NO",
                numeric_precision={20: 64, 23: 32, 21: 16, 701: 53, 700: 24}.get(pt.oid),
                numeric_precision_radix=2 if pt.oid in (20, 21, 23, 700, 701) else None,
            )
            if attnum in comments:
                self.add(
                    "pg_description", objoid=oid, classoid=PG_CLASS_OID, objsubid=attnum, description=comments[attnum]
                )

    def _fixed_rows(self, settings: dict[str, str]) -> None:
        for oid, name in (
            (PG_CATALOG_NS, "pg_catalog"),
            (PUBLIC_NS, "public"),
            (INFORMATION_SCHEMA_NS, "information_schema"),
        ):
            self.add("pg_namespace", oid=oid, nspname=name, nspowner=OWNER)
            self.add("schemata", catalog_name="florql", schema_name=name, schema_owner="florql")
        for t in TYPES.values():
            self.add("pg_type", **_type_row(t))
        self.add(
            "pg_database",
            oid=DATABASE_OID,
            datname="florql",
            datdba=OWNER,
            encoding=6,
            datlocprovider="c",
            datallowconn=True,
            datconnlimit=-1,
            dattablespace=1663,
            datcollate="C.UTF-8",
            datctype="C.UTF-8",
        )
        role = dict(rolname="florql", rolsuper=False, rolinherit=True, rolcanlogin=True, rolconnlimit=-1, oid=OWNER)
        self.add("pg_roles", **role)
        self.add("pg_authid", **role)
        self.add("pg_user", usename="florql", usesysid=OWNER)
        self.add("pg_am", oid=2, amname="heap", amhandler="heap_tableam_handler", amtype="t")
        self.add("pg_am", oid=403, amname="btree", amhandler="bthandler", amtype="i")
        self.add("pg_tablespace", oid=1663, spcname="pg_default", spcowner=OWNER)
        self.add(
            "pg_collation",
            oid=100,
            collname="default",
            collnamespace=PG_CATALOG_NS,
            collowner=OWNER,
            collprovider="d",
            collisdeterministic=True,
            collencoding=-1,
        )
        self.add("pg_language", oid=12, lanname="internal", lanowner=OWNER)
        self.add("pg_language", oid=14, lanname="sql", lanowner=OWNER, lanpltrusted=True)
        for name, value in sorted(settings.items()):
            self.add(
                "pg_settings",
                name=name,
                setting=value,
                category="florql",
                short_desc=name,
                context="user",
                vartype="string",
                source="default",
                boot_val=value,
                reset_val=value,
            )


def build_connection(data: CatalogData) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute(f"CREATE SCHEMA {INFO_SCHEMA}")
    for schema, relations in (("main", PG_CATALOG), (INFO_SCHEMA, INFORMATION_SCHEMA)):
        for name, spec in relations.items():
            _create_table(con, f"{schema}.{name}", layout(spec), data.rows[name])
    names = pa.table({"oid": [t.oid for t in TYPES.values()], "sql_name": [t.sql_name for t in TYPES.values()]})
    _insert(con, "CREATE TABLE florql_type_names AS", names)
    for macro in filter(str.strip, MACROS.split(";\n")):
        con.execute(f"CREATE MACRO {macro.strip().rstrip(';')}")
    # The catalog connection reads nothing but itself.
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _create_table(con: duckdb.DuckDBPyConnection, name: str, columns: list[tuple[str, str]], rows: list[dict]) -> None:
    ddl = ", ".join(f'"{col}" {CODES[code][0]}' for col, code in columns)
    con.execute(f"CREATE TABLE {name} ({ddl})")
    if not rows:
        return
    defaults = {col: CODES[code][2] for col, code in columns}
    data = {col: [row.get(col, defaults[col]) for row in rows] for col, _ in columns}
    table = pa.table({col: pa.array(values, _arrow_type(code)) for (col, code), values in zip(columns, data.values())})
    _insert(con, f"INSERT INTO {name}", table)


def _insert(con: duckdb.DuckDBPyConnection, prefix: str, table: pa.Table) -> None:
    con.register("florql_rows", table)
    con.execute(f"{prefix} SELECT * FROM florql_rows")
    con.unregister("florql_rows")


def _arrow_type(code: str) -> pa.DataType:
    return {
        "o": pa.int64(),
        "l": pa.int64(),
        "i": pa.int32(),
        "s": pa.int16(),
        "b": pa.bool_(),
        "f": pa.float32(),
        "S": pa.list_(pa.int16()),
        "O": pa.list_(pa.int64()),
        "T": pa.list_(pa.string()),
        "C": pa.list_(pa.string()),
        "z": pa.timestamp("us", "UTC"),
    }.get(code, pa.string())


class Catalog:
    """The catalog database, rebuilt from the backend's tables when they change."""

    def __init__(
        self, tables: Callable[[], Sequence[TableLike]], settings: dict[str, str], refresh_s: float = 2.0
    ) -> None:
        self._tables = tables
        self._settings = settings
        self._refresh_s = refresh_s
        self._oid_of = OidAssigner()
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._signature: object = None
        self._checked = 0.0

    def connection(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._con is None or time.monotonic() - self._checked > self._refresh_s:
                self._refresh()
            return self._con  # type: ignore[return-value]

    def _refresh(self) -> None:
        tables = list(self._tables())
        signature = zlib.crc32(
            repr(
                [(t.name, t.kind, [(c.name, str(c.type), c.nullable, c.comment) for c in t.columns]) for t in tables]
            ).encode()
        )
        if signature != self._signature or self._con is None:
            self._con = build_connection(CatalogData(tables, self._oid_of, self._settings))
            self._signature = signature
        self._checked = time.monotonic()

    def execute(self, ast: exp.Expr, session: SessionInfo) -> ArrowResult:
        sql = rewrite_catalog_query(with_output_names(ast), session).sql("duckdb")
        return run_duckdb(self.connection(), sql)


# -- routing and rewriting ----------------------------------------------------------


def _function_name(node: exp.Func) -> str:
    if type(node) in _PG_FUNCTION_NAMES:
        return _PG_FUNCTION_NAMES[type(node)]
    return (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()


def is_catalog_query(ast: exp.Expr) -> bool:
    """Whether a statement reads catalog relations or calls catalog functions."""
    for node in ast.walk():
        if isinstance(node, exp.Table) and _catalog_table(node):
            return True
        if isinstance(node, _SESSION_NODES) or (
            isinstance(node, exp.Func) and _function_name(node) in CATALOG_FUNCTIONS
        ):
            return True
        if isinstance(node, exp.Cast) and node.to.this in {exp.DType.USERDEFINED} | set(_OBJECT_LOOKUPS):
            return True
        if isinstance(node, exp.Cast) and isinstance(node.to, exp.ObjectIdentifier):
            return True
    return False


def _catalog_table(table: exp.Table) -> bool:
    db = table.db.lower()
    return db in CATALOG_SCHEMAS or (not db and table.name.lower() in PG_CATALOG)


def rewrite_catalog_query(ast: exp.Expr, session: SessionInfo) -> exp.Expr:
    # Bottom-up, so that rebuilt nodes (operators) keep rewritten children; casts go
    # top-down afterwards because `x::regclass::text` must be seen whole.
    return _rewrite_casts(_bottom_up(ast.copy(), lambda node: _rewrite_node(node, session)))


def _bottom_up(tree: exp.Expr, fn: Callable[[exp.Expr], exp.Expr]) -> exp.Expr:
    for node in reversed(list(tree.walk(bfs=False))):
        new = fn(node)
        if new is not node:
            if node is tree:
                return new
            node.replace(new)
    return tree


def _rewrite_casts(tree: exp.Expr) -> exp.Expr:
    return tree.transform(lambda node: _rewrite_cast(node) if isinstance(node, exp.Cast) else node)


def _rewrite_node(node: exp.Expr, session: SessionInfo) -> exp.Expr:
    if isinstance(node, exp.Table):
        return _rewrite_table(node)
    if isinstance(node, exp.Column) and node.args.get("db") and node.text("db").lower() in CATALOG_SCHEMAS:
        return exp.column(node.this, table=node.args.get("table"))
    if (
        isinstance(node, exp.Dot)
        and node.this.name.lower() in CATALOG_SCHEMAS
        and isinstance(node.expression, exp.Func)
    ):
        return _rewrite_node(node.expression, session)
    if isinstance(node, exp.DataType) and node.this == exp.DType.USERDEFINED:
        kind = node.args["kind"]  # pg_catalog.int2 parses as a user-defined type
        if isinstance(kind, exp.Dot) and kind.this.name.lower() in CATALOG_SCHEMAS:
            return exp.DataType.build(kind.expression.name, dialect="postgres")
    if isinstance(node, exp.Collate):
        return node.this  # pg_catalog."default", "C": DuckDB compares bytes anyway
    if isinstance(node, exp.Operator):
        return _rewrite_operator(node)
    if isinstance(node, _SESSION_NODES) or (isinstance(node, exp.Func) and _function_name(node) in SESSION_FUNCTIONS):
        return _session_value(node, session)
    if isinstance(node, exp.Anonymous) and node.name.lower() == "json_build_object":
        return exp.Anonymous(this="json_object", expressions=node.expressions)
    if isinstance(node, exp.Anonymous) and node.name.lower() == "current_setting" and node.expressions:
        name = node.expressions[0]
        if isinstance(name, exp.Literal) and name.name.lower() in session.settings:
            return exp.Literal.string(session.settings[name.name.lower()])
    return node


def _rewrite_table(table: exp.Table) -> exp.Expr:
    db, name = table.db.lower(), table.name.lower()
    if db not in CATALOG_SCHEMAS:
        return table
    new = table.copy()
    new.set("catalog", None)
    new.set("db", exp.to_identifier(INFO_SCHEMA) if db == "information_schema" else None)
    if db == "information_schema" and isinstance(table.this, exp.Identifier) and not table.alias:
        new.set("alias", exp.TableAlias(this=exp.to_identifier(name)))
    return new


_OPERATORS: dict[str, Callable[[exp.Expr, exp.Expr], exp.Expr]] = {
    "~": lambda a, b: exp.RegexpLike(this=a, expression=b),
    "!~": lambda a, b: exp.not_(exp.RegexpLike(this=a, expression=b)),
    "~*": lambda a, b: exp.RegexpILike(this=a, expression=b),
    "!~*": lambda a, b: exp.not_(exp.RegexpILike(this=a, expression=b)),
    "~~": lambda a, b: exp.Like(this=a, expression=b),
    "!~~": lambda a, b: exp.not_(exp.Like(this=a, expression=b)),
    "~~*": lambda a, b: exp.ILike(this=a, expression=b),
    "=": lambda a, b: exp.EQ(this=a, expression=b),
    "<>": lambda a, b: exp.NEQ(this=a, expression=b),
    "<": lambda a, b: exp.LT(this=a, expression=b),
    ">": lambda a, b: exp.GT(this=a, expression=b),
    "<=": lambda a, b: exp.LTE(this=a, expression=b),
    ">=": lambda a, b: exp.GTE(this=a, expression=b),
}


def _rewrite_operator(node: exp.Operator) -> exp.Expr:
    op = str(node.args.get("operator", "")).split(".")[-1]
    build = _OPERATORS.get(op)
    if build is None:
        return node
    return exp.Paren(this=build(node.this, node.expression))


def _type_name(to: exp.DataType) -> str:
    if isinstance(to, exp.ObjectIdentifier):
        return to.name.upper()
    if to.this == exp.DType.USERDEFINED:
        kind = to.args["kind"]  # pg_catalog.text parses as a Dot
        return (kind.expression if isinstance(kind, exp.Dot) else kind).name.upper()
    return to.this.name if isinstance(to.this, exp.DType) else str(to.this).upper()


def _rewrite_cast(node: exp.Cast) -> exp.Expr:
    target = _type_name(node.to)
    inner = _rewrite_casts(node.this)
    if (
        isinstance(inner, exp.Cast)
        and _type_name(inner.to) in _OBJECT_LOOKUPS
        and target in ("TEXT", "VARCHAR", "NAME")
    ):
        table, column = _OBJECT_LOOKUPS[_type_name(inner.to)]
        value = _rewrite_casts(inner.this)
        if not (isinstance(value, exp.Literal) and value.is_string):
            return _lookup(table, column, "oid", value)  # oid::regclass::text -> name
        return value
    if target in _OBJECT_LOOKUPS:
        table, column = _OBJECT_LOOKUPS[target]
        if isinstance(inner, exp.Literal) and inner.is_string:
            if target in ("REGPROC", "REGPROCEDURE"):
                return exp.Literal.string(_unqualified(inner.name))
            return _lookup(table, "oid", column, exp.Literal.string(_unqualified(inner.name)))
        return inner
    simple = {
        "OID": "BIGINT",
        "NAME": "VARCHAR",
        "CHAR": "VARCHAR",
        "XID": "BIGINT",
        "PG_NODE_TREE": "VARCHAR",
        "INT2VECTOR": None,
        "OIDVECTOR": None,
        "ACLITEM": "VARCHAR",
        "REGROLE": None,
    }
    if target in simple:
        to = simple[target]
        return inner if to is None else exp.cast(inner, to)
    return exp.Cast(this=inner, to=node.to)


def _unqualified(name: str) -> str:
    return name.split(".")[-1].strip('"')


def _lookup(table: str, want: str, key: str, value: exp.Expr) -> exp.Expr:
    query = exp.select(want).from_(table).where(exp.EQ(this=exp.column(key), expression=value)).limit(1)
    return exp.Subquery(this=query)


def _session_value(node: exp.Expr, session: SessionInfo) -> exp.Expr:
    name = type(node).__name__ if not isinstance(node, exp.Anonymous) else node.name.lower()
    values: dict[str, exp.Expr] = {
        "CurrentUser": exp.Literal.string(session.user),
        "current_user": exp.Literal.string(session.user),
        "session_user": exp.Literal.string(session.user),
        "user": exp.Literal.string(session.user),
        "CurrentDatabase": exp.Literal.string(session.database),
        "current_database": exp.Literal.string(session.database),
        "CurrentSchema": exp.Literal.string(session.search_path),
        "current_schema": exp.Literal.string(session.search_path),
        "pg_backend_pid": exp.Literal.number(session.pid),
    }
    return values.get(name, node)


def with_output_names(ast: exp.Expr) -> exp.Expr:
    """Name unaliased result columns the way PostgreSQL does (`version()` -> "version")."""
    select = ast.copy()
    target = select if isinstance(select, exp.Select) else select.find(exp.Select)
    if target is None:
        return select
    target.set("expressions", [_named(e) for e in target.expressions])
    return select


def _named(e: exp.Expr) -> exp.Expr:
    if isinstance(e, (exp.Alias, exp.Column, exp.Star)):
        return e
    return exp.alias_(e, figure_column_name(e), quoted=True)


def figure_column_name(e: exp.Expr) -> str:
    """PostgreSQL's FigureColname: the name a result column gets without an alias."""
    if isinstance(e, exp.Column):
        return e.name
    if isinstance(e, (exp.Paren, exp.Bracket)):
        return figure_column_name(e.this)
    if isinstance(e, exp.Dot) and isinstance(e.expression, exp.Func):
        return figure_column_name(e.expression)
    if isinstance(e, exp.Dot):
        return e.expression.name
    if isinstance(e, exp.Cast):
        inner = figure_column_name(e.this)
        return inner if inner != "?column?" else _type_name(e.to).lower()
    if isinstance(e, exp.Case):
        return "case"
    if isinstance(e, exp.Func) and not isinstance(e, exp.Binary):
        return _function_name(e)
    return "?column?"


_PG_FUNCTION_NAMES: dict[type, str] = {
    exp.CurrentUser: "current_user",
    exp.CurrentSchema: "current_schema",
    exp.CurrentDatabase: "current_database",
    exp.CurrentVersion: "version",
    exp.Count: "count",
}
