"""Recorded hyperparameters and their command-line overrides.

Override a `florql.arg` from the command line after `--florql-args`, e.g.
`python train.py --florql-args lr=0.1 epochs=3`, or with the environment variable
`FLORQL_ARGS="lr=0.1 epochs=3"`. The words after `--florql-args` are removed from `sys.argv`
so the script's own argument parser never sees them.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from florql.errors import UsageError

FLAG = "--florql-args"


def take_overrides(argv: list[str]) -> dict[str, str]:
    """Remove `--florql-args k=v …` from argv (in place) and return the pairs, env pairs first."""
    pairs = shlex.split(os.environ.get("FLORQL_ARGS", ""))
    if FLAG in argv:
        at = argv.index(FLAG)
        rest = argv[at + 1 :]
        end = next((i for i, w in enumerate(rest) if w == "--"), len(rest))
        pairs += rest[:end]
        del argv[at : at + 1 + end + (1 if end < len(rest) else 0)]
    overrides: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"florql: cannot read the override {pair!r}; write it as name=value, e.g. lr=0.1")
        overrides[name] = value
    return overrides


def coerce(name: str, text: str, default: Any) -> Any:
    """Parse an override with the type of the default."""
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if default is None or isinstance(default, str):
            return text
    except ValueError as err:
        raise UsageError(
            f"florql.arg({name!r}): the override {text!r} is not a valid {type(default).__name__} "
            f"(the default is {default!r})"
        ) from err
    raise UsageError(
        f"florql.arg({name!r}): defaults must be int, float, bool, str or None, got {type(default).__name__}"
    )


OVERRIDES: dict[str, str] = take_overrides(sys.argv)
