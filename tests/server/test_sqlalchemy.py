"""SQLAlchemy's PostgreSQL dialect: reflection and pandas.read_sql, the path Superset takes."""

from __future__ import annotations

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool


@pytest.fixture
def engine(server):
    engine = sa.create_engine(server.url(), poolclass=NullPool)  # a new connection per use, like Superset
    yield engine
    engine.dispose()


def test_table_names(engine, store):
    names = sa.inspect(engine).get_table_names() + sa.inspect(engine).get_view_names()
    assert "runs" in names and store.run_table in names


def test_schema_names(engine):
    assert "public" in sa.inspect(engine).get_schema_names()


def test_columns(engine, store):
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns(store.run_table)}
    assert {"epoch", "step", "loss", "val_acc"} <= set(columns)
    assert isinstance(columns["loss"]["type"], sa.Float)
    assert columns["loss"]["nullable"]


def test_constraints_and_indexes_are_empty(engine, store):
    inspector = sa.inspect(engine)
    assert inspector.get_pk_constraint(store.run_table)["constrained_columns"] == []
    assert inspector.get_foreign_keys(store.run_table) == []
    assert inspector.get_indexes(store.run_table) == []
    assert inspector.get_unique_constraints(store.run_table) == []
    assert inspector.get_table_comment(store.run_table)["text"] is None


def test_pandas_read_sql(engine, store):
    frame = pd.read_sql(
        f"SELECT epoch, MAX(loss) AS max_loss FROM {store.run_table} GROUP BY epoch ORDER BY epoch", engine
    )
    assert list(frame["epoch"]) == [0, 1, 2]
    assert frame["max_loss"].iloc[0] == pytest.approx(1.0)


def test_superset_style_search_path_and_public_schema(engine, store):
    with engine.connect() as c:
        c.execute(sa.text('set search_path = "public"'))
        rows = c.execute(sa.text(f"SELECT epoch, step, loss FROM public.{store.run_table} LIMIT 1001")).fetchall()
    assert len(rows) == store.rows
