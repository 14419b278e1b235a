"""The binder's range analysis, as a pure function: a superset of the selected outer iterations."""

from __future__ import annotations

import pytest
import sqlglot

from florql.binder import _analyse

EPOCHS = range(8)


def selected(where: str) -> set[int]:
    condition = sqlglot.parse_one(f"SELECT 1 FROM run_1 WHERE {where}", read="duckdb").args["where"].this
    return _analyse(condition, "epoch", "run_1", EPOCHS)[0]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("epoch > 5", {6, 7}),
        ("epoch > 5.9999999999999999999", {6, 7}),  # exact, as DuckDB compares decimals: never rounded
        ("epoch >= 5.5", {6, 7}),
        ("5 < epoch", {6, 7}),
        ("epoch BETWEEN 2 AND 3", {2, 3}),
        ("epoch BETWEEN SYMMETRIC 7 AND 6", {6, 7}),
        ("epoch IN (1, 3, 1e1)", {1, 3}),
        ("NOT (epoch < 6)", {6, 7}),
        ("NOT (NOT (epoch = 3))", {3}),
        ("epoch = 1 OR epoch = 6", {1, 6}),
        ("epoch > 2 AND epoch < 5", {3, 4}),
        ("epoch = -1", set()),
    ],
)
def test_predicates_it_reads_select_exactly(where: str, expected: set[int]):
    assert selected(where) == expected


@pytest.mark.parametrize(
    "where",
    [
        "epoch % 2 = 0",  # an expression it does not read: everything
        "epoch > (SELECT 3)",
        "epoch IN (SELECT epoch FROM run_2)",
        "NOT (epoch > 3 AND w_norm > 1)",  # NOT of an inexact set must not narrow
        "epoch > 5 OR w_norm > 1",
        "epoch > '5'",
        "other.epoch > 5",  # another table's column
    ],
)
def test_what_it_cannot_read_widens_to_everything(where: str):
    assert selected(where) == set(EPOCHS)
