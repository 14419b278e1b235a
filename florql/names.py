"""Rules for log names, loop names and args: they become SQL column names."""

from __future__ import annotations

import re

from florql.errors import UsageError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Columns of the long-form `logs` table and the wide views that a loop or log name would shadow.
RESERVED = frozenset(
    {
        "run_id",
        "name",
        "source",
        "seq",
        "loop_path",
        "value_type",
        "value_float",
        "value_int",
        "value_bool",
        "value_str",
        "job_id",
        "segment",
    }
)

RESERVED_PREFIX = "__seq__"  # the wide tables' columns of sequence numbers (storage.long_form.SEQ_PREFIX)


def check_name(kind: str, name: object) -> str:
    if not isinstance(name, str):
        raise UsageError(f"florql.{kind}: the name must be a string, got {type(name).__name__} {name!r}")
    if not _IDENTIFIER.match(name):
        raise UsageError(
            f"florql.{kind}({name!r}): names must start with a letter or '_' and contain only letters, "
            "digits and '_' (at most 63 characters), since they become SQL column names"
        )
    if name.lower() in RESERVED or name.lower().startswith(RESERVED_PREFIX):
        raise UsageError(
            f"florql.{kind}({name!r}): '{name}' is reserved (it is a column of florql's tables); pick another name"
        )
    return name
