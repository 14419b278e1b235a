"""Column layouts of the emulated `pg_catalog` and `information_schema` relations (PostgreSQL 15).

Each layout is "name:code ..." where the code gives the DuckDB storage type and the
PostgreSQL type reported in pg_attribute (see CODES).
"""

from __future__ import annotations

# code -> (DuckDB type, PostgreSQL type oid, default value for rows that omit it)
CODES: dict[str, tuple[str, int, object]] = {
    "o": ("BIGINT", 26, 0),  # oid
    "n": ("VARCHAR", 19, None),  # name
    "t": ("VARCHAR", 25, None),  # text
    "c": ("VARCHAR", 18, ""),  # "char"
    "b": ("BOOLEAN", 16, False),
    "s": ("SMALLINT", 21, 0),
    "i": ("INTEGER", 23, 0),
    "l": ("BIGINT", 20, 0),
    "f": ("REAL", 700, 0.0),
    "x": ("VARCHAR", 194, None),  # pg_node_tree
    "S": ("SMALLINT[]", 22, None),  # int2vector / int2[]
    "O": ("BIGINT[]", 30, None),  # oidvector / oid[]
    "T": ("VARCHAR[]", 1009, None),  # text[] / aclitem[]
    "C": ("VARCHAR[]", 1002, None),  # "char"[]
    "p": ("VARCHAR", 24, "-"),  # regproc (stored as the function's name)
    "z": ("TIMESTAMP", 1184, None),
}

PG_CATALOG: dict[str, str] = {
    "pg_namespace": "oid:o nspname:n nspowner:o nspacl:T",
    "pg_class": (
        "oid:o relname:n relnamespace:o reltype:o reloftype:o relowner:o relam:o relfilenode:o reltablespace:o "
        "relpages:i reltuples:f relallvisible:i reltoastrelid:o relhasindex:b relisshared:b relpersistence:c "
        "relkind:c relnatts:s relchecks:s relhasrules:b relhastriggers:b relhassubclass:b relrowsecurity:b "
        "relforcerowsecurity:b relispopulated:b relreplident:c relispartition:b relrewrite:o relfrozenxid:o "
        "relminmxid:o relacl:T reloptions:T relpartbound:x"
    ),
    "pg_attribute": (
        "attrelid:o attname:n atttypid:o attstattarget:i attlen:s attnum:s attndims:i attcacheoff:i atttypmod:i "
        "attbyval:b attalign:c attstorage:c attcompression:c attnotnull:b atthasdef:b atthasmissing:b "
        "attidentity:c attgenerated:c attisdropped:b attislocal:b attinhcount:i attcollation:o attacl:T "
        "attoptions:T attfdwoptions:T attmissingval:T"
    ),
    "pg_type": (
        "oid:o typname:n typnamespace:o typowner:o typlen:s typbyval:b typtype:c typcategory:c typispreferred:b "
        "typisdefined:b typdelim:c typrelid:o typsubscript:p typelem:o typarray:o typinput:p typoutput:p "
        "typreceive:p typsend:p typmodin:p typmodout:p typanalyze:p typalign:c typstorage:c typnotnull:b "
        "typbasetype:o typtypmod:i typndims:i typcollation:o typdefaultbin:x typdefault:t typacl:T"
    ),
    "pg_database": (
        "oid:o datname:n datdba:o encoding:i datlocprovider:c datistemplate:b datallowconn:b datconnlimit:i "
        "datfrozenxid:o datminmxid:o dattablespace:o datcollate:t datctype:t daticulocale:t datcollversion:t datacl:T"
    ),
    "pg_settings": (
        "name:t setting:t unit:t category:t short_desc:t extra_desc:t context:t vartype:t source:t min_val:t "
        "max_val:t enumvals:T boot_val:t reset_val:t sourcefile:t sourceline:i pending_restart:b"
    ),
    "pg_description": "objoid:o classoid:o objsubid:i description:t",
    "pg_shdescription": "objoid:o classoid:o description:t",
    "pg_index": (
        "indexrelid:o indrelid:o indnatts:s indnkeyatts:s indisunique:b indnullsnotdistinct:b indisprimary:b "
        "indisexclusion:b indimmediate:b indisclustered:b indisvalid:b indcheckxmin:b indisready:b indislive:b "
        "indisreplident:b indkey:S indcollation:O indclass:O indoption:S indexprs:x indpred:x"
    ),
    "pg_constraint": (
        "oid:o conname:n connamespace:o contype:c condeferrable:b condeferred:b convalidated:b conrelid:o "
        "contypid:o conindid:o conparentid:o confrelid:o confupdtype:c confdeltype:c confmatchtype:c conislocal:b "
        "coninhcount:i connoinherit:b conkey:S confkey:S conpfeqop:O conppeqop:O conffeqop:O confdelsetcols:S "
        "conexclop:O conbin:x"
    ),
    "pg_attrdef": "oid:o adrelid:o adnum:s adbin:x",
    "pg_proc": (
        "oid:o proname:n pronamespace:o proowner:o prolang:o procost:f prorows:f provariadic:o prosupport:p "
        "prokind:c prosecdef:b proleakproof:b proisstrict:b proretset:b provolatile:c proparallel:c pronargs:s "
        "pronargdefaults:s prorettype:o proargtypes:O proallargtypes:O proargmodes:C proargnames:T "
        "proargdefaults:x protrftypes:O prosrc:t probin:t prosqlbody:x proconfig:T proacl:T"
    ),
    "pg_authid": (
        "oid:o rolname:n rolsuper:b rolinherit:b rolcreaterole:b rolcreatedb:b rolcanlogin:b rolreplication:b "
        "rolbypassrls:b rolconnlimit:i rolpassword:t rolvaliduntil:z"
    ),
    "pg_roles": (
        "rolname:n rolsuper:b rolinherit:b rolcreaterole:b rolcreatedb:b rolcanlogin:b rolreplication:b "
        "rolconnlimit:i rolpassword:t rolvaliduntil:z rolbypassrls:b rolconfig:T oid:o"
    ),
    "pg_user": (
        "usename:n usesysid:o usecreatedb:b usesuper:b userepl:b usebypassrls:b passwd:t valuntil:z useconfig:T"
    ),
    "pg_auth_members": "oid:o roleid:o member:o grantor:o admin_option:b",
    "pg_am": "oid:o amname:n amhandler:p amtype:c",
    "pg_enum": "oid:o enumtypid:o enumsortorder:f enumlabel:n",
    "pg_sequence": "seqrelid:o seqtypid:o seqstart:l seqincrement:l seqmax:l seqmin:l seqcache:l seqcycle:b",
    "pg_inherits": "inhrelid:o inhparent:o inhseqno:i inhdetachpending:b",
    "pg_trigger": (
        "oid:o tgrelid:o tgparentid:o tgname:n tgfoid:o tgtype:s tgenabled:c tgisinternal:b tgconstrrelid:o "
        "tgconstrindid:o tgconstraint:o tgdeferrable:b tginitdeferred:b tgnargs:s tgattr:S tgargs:t tgqual:x "
        "tgoldtable:n tgnewtable:n"
    ),
    "pg_rewrite": "oid:o rulename:n ev_class:o ev_type:c ev_enabled:c is_instead:b ev_qual:x ev_action:x",
    "pg_policy": "oid:o polname:n polrelid:o polcmd:c polpermissive:b polroles:O polqual:x polwithcheck:x",
    "pg_statistic_ext": (
        "oid:o stxrelid:o stxname:n stxnamespace:o stxowner:o stxstattarget:i stxkeys:S stxkind:C stxexprs:x"
    ),
    "pg_publication": (
        "oid:o pubname:n pubowner:o puballtables:b pubinsert:b pubupdate:b pubdelete:b pubtruncate:b pubviaroot:b"
    ),
    "pg_publication_rel": "oid:o prpubid:o prrelid:o prqual:x prattrs:S",
    "pg_publication_namespace": "oid:o pnpubid:o pnnspid:o",
    "pg_partitioned_table": (
        "partrelid:o partstrat:c partnatts:s partdefid:o partattrs:S partclass:O partcollation:O partexprs:x"
    ),
    "pg_foreign_table": "ftrelid:o ftserver:o ftoptions:T",
    "pg_foreign_server": "oid:o srvname:n srvowner:o srvfdw:o srvtype:t srvversion:t srvacl:T srvoptions:T",
    "pg_foreign_data_wrapper": "oid:o fdwname:n fdwowner:o fdwhandler:o fdwvalidator:o fdwacl:T fdwoptions:T",
    "pg_collation": (
        "oid:o collname:n collnamespace:o collowner:o collprovider:c collisdeterministic:b collencoding:i "
        "collcollate:t collctype:t colliculocale:t collversion:t"
    ),
    "pg_tablespace": "oid:o spcname:n spcowner:o spcacl:T spcoptions:T",
    "pg_extension": (
        "oid:o extname:n extowner:o extnamespace:o extrelocatable:b extversion:t extconfig:O extcondition:T"
    ),
    "pg_language": (
        "oid:o lanname:n lanowner:o lanispl:b lanpltrusted:b lanplcallfoid:o laninline:o lanvalidator:o lanacl:T"
    ),
    "pg_depend": "classid:o objid:o objsubid:i refclassid:o refobjid:o refobjsubid:i deptype:c",
    "pg_range": ("rngtypid:o rngsubtype:o rngmultitypid:o rngcollation:o rngsubopc:o rngcanonical:p rngsubdiff:p"),
    "pg_event_trigger": "oid:o evtname:n evtevent:n evtowner:o evtfoid:o evtenabled:c evttags:T",
    "pg_cast": "oid:o castsource:o casttarget:o castfunc:o castcontext:c castmethod:c",
    "pg_operator": (
        "oid:o oprname:n oprnamespace:o oprowner:o oprkind:c oprcanmerge:b oprcanhash:b oprleft:o oprright:o "
        "oprresult:o oprcom:o oprnegate:o oprcode:p oprrest:p oprjoin:p"
    ),
    "pg_opclass": (
        "oid:o opcmethod:o opcname:n opcnamespace:o opcowner:o opcfamily:o opcintype:o opcdefault:b opckeytype:o"
    ),
    "pg_tables": (
        "schemaname:n tablename:n tableowner:n tablespace:n hasindexes:b hasrules:b hastriggers:b rowsecurity:b"
    ),
    "pg_views": "schemaname:n viewname:n viewowner:n definition:t",
    "pg_matviews": ("schemaname:n matviewname:n matviewowner:n tablespace:n hasindexes:b ispopulated:b definition:t"),
    "pg_indexes": "schemaname:n tablename:n indexname:n tablespace:n indexdef:t",
    "pg_stat_activity": (
        "datid:o datname:n pid:i usesysid:o usename:n application_name:t client_addr:t client_port:i "
        "backend_start:z xact_start:z query_start:z state_change:z wait_event_type:t wait_event:t state:t "
        "backend_xid:o backend_xmin:o query:t backend_type:t"
    ),
}

# Views over the catalog, answered like tables (relkind 'v').
PG_CATALOG_VIEWS = {
    "pg_roles",
    "pg_user",
    "pg_settings",
    "pg_tables",
    "pg_views",
    "pg_matviews",
    "pg_indexes",
    "pg_stat_activity",
}

INFORMATION_SCHEMA: dict[str, str] = {
    "schemata": (
        "catalog_name:n schema_name:n schema_owner:n default_character_set_catalog:n "
        "default_character_set_schema:n default_character_set_name:n sql_path:t"
    ),
    "tables": (
        "table_catalog:n table_schema:n table_name:n table_type:t self_referencing_column_name:n "
        "reference_generation:t user_defined_type_catalog:n user_defined_type_schema:n "
        "user_defined_type_name:n is_insertable_into:t is_typed:t commit_action:t"
    ),
    "columns": (
        "table_catalog:n table_schema:n table_name:n column_name:n ordinal_position:i column_default:t "
        "is_nullable:t data_type:t character_maximum_length:i character_octet_length:i numeric_precision:i "
        "numeric_precision_radix:i numeric_scale:i datetime_precision:i interval_type:t interval_precision:i "
        "character_set_catalog:n character_set_schema:n character_set_name:n collation_catalog:n "
        "collation_schema:n collation_name:n domain_catalog:n domain_schema:n domain_name:n udt_catalog:n "
        "udt_schema:n udt_name:n scope_catalog:n scope_schema:n scope_name:n maximum_cardinality:i "
        "dtd_identifier:n is_self_referencing:t is_identity:t identity_generation:t identity_start:t "
        "identity_increment:t identity_maximum:t identity_minimum:t identity_cycle:t is_generated:t "
        "generation_expression:t is_updatable:t"
    ),
    "views": (
        "table_catalog:n table_schema:n table_name:n view_definition:t check_option:t is_updatable:t "
        "is_insertable_into:t is_trigger_updatable:t is_trigger_deletable:t is_trigger_insertable_into:t"
    ),
    "table_constraints": (
        "constraint_catalog:n constraint_schema:n constraint_name:n table_catalog:n table_schema:n "
        "table_name:n constraint_type:t is_deferrable:t initially_deferred:t enforced:t nulls_distinct:t"
    ),
    "key_column_usage": (
        "constraint_catalog:n constraint_schema:n constraint_name:n table_catalog:n table_schema:n "
        "table_name:n column_name:n ordinal_position:i position_in_unique_constraint:i"
    ),
    "referential_constraints": (
        "constraint_catalog:n constraint_schema:n constraint_name:n unique_constraint_catalog:n "
        "unique_constraint_schema:n unique_constraint_name:n match_option:t update_rule:t delete_rule:t"
    ),
    "routines": "specific_catalog:n specific_schema:n specific_name:n routine_catalog:n routine_schema:n "
    "routine_name:n routine_type:t data_type:t",
}


def layout(spec: str) -> list[tuple[str, str]]:
    return [tuple(part.split(":")) for part in spec.split()]  # type: ignore[misc]
