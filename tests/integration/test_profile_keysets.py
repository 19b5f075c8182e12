"""profile_stub's batch helpers on both backends: key conditions and bulk inserts, awkward values included."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database
from profile_stub.keysets import custom_plans, insert_rows, key_chunks, one_of

VALUES = ["", "plain", "with,comma", 'with "quotes" and \\', "with\x1funit separator", "ünïcode"]


@pytest.fixture
def table(make_database: Callable[[str], Database]) -> tuple[Database, sa.Table]:
    database = make_database("profile")
    metadata = sa.MetaData()
    keys = sa.Table("keys", metadata, sa.Column("key", sa.String(100), primary_key=True), sa.Column("n", sa.Integer))
    with database.engine.begin() as conn:
        metadata.create_all(conn)
    return database, keys


def matching(database: Database, keys: sa.Table, wanted: list[str]) -> list[str]:
    with database.engine.begin() as conn:
        custom_plans(conn)
        found: list[str] = []
        for chunk in key_chunks(wanted, database.is_postgres):
            found += conn.execute(
                sa.select(keys.c.key).where(one_of(keys.c.key, chunk, database.is_postgres))
            ).scalars()
    return sorted(found)


@pytest.mark.parametrize(
    "wanted",
    [[""], ["plain"], ["", "plain"], ["with\x1funit separator"], VALUES, ["absent"], []],
    ids=["lone-empty", "one", "empty-and-one", "separator", "all", "absent", "none"],
)
def test_one_of_matches_exactly_the_keys_asked_for(table: tuple[Database, sa.Table], wanted: list[str]) -> None:
    database, keys = table
    with database.engine.begin() as conn:
        insert_rows(conn, keys, [{"key": value, "n": i} for i, value in enumerate(VALUES)])

    assert matching(database, keys, wanted) == sorted(v for v in wanted if v in VALUES)


def test_insert_rows_writes_every_value_as_given(table: tuple[Database, sa.Table]) -> None:
    database, keys = table
    with database.engine.begin() as conn:
        insert_rows(conn, keys, [{"key": value, "n": i} for i, value in enumerate(VALUES)])

    with database.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(keys.c.key, keys.c.n))) == sorted((v, i) for i, v in enumerate(VALUES))


def test_insert_rows_skipping_conflicts_keeps_the_existing_rows(table: tuple[Database, sa.Table]) -> None:
    database, keys = table
    with database.engine.begin() as conn:
        insert_rows(conn, keys, [{"key": "plain", "n": 1}])
        insert_rows(conn, keys, [{"key": "plain", "n": 2}, {"key": "new", "n": 3}], skip_conflicts=True)

    with database.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(keys.c.key, keys.c.n))) == [("new", 3), ("plain", 1)]
