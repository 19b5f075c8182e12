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


@pytest.mark.parametrize("unlikely", [False, True], ids=["on-conflict", "conflicts-unlikely"])
def test_insert_rows_replacing_conflicts_where_a_condition_holds_keeps_the_other_existing_rows(
    table: tuple[Database, sa.Table], unlikely: bool
) -> None:
    database, keys = table
    with database.engine.begin() as conn:
        insert_rows(conn, keys, [{"key": "small", "n": 1}, {"key": "large", "n": 10}])
        counted = insert_rows(
            conn,
            keys,
            [{"key": "small", "n": 2}, {"key": "large", "n": 20}, {"key": "new", "n": 3}],
            replace_conflicts=True,
            replace_where=keys.c.n < 5,
            conflicts_unlikely=unlikely,
        )

    with database.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(keys.c.key, keys.c.n))) == [("large", 10), ("new", 3), ("small", 2)]
    assert counted == (2 if database.is_postgres else 3)  # (SQLite counts the rows given)


@pytest.mark.parametrize("mode", ["skip", "replace"])
def test_insert_rows_expecting_no_conflict_gives_the_rows_of_the_on_conflict_insert_when_a_key_exists(
    table: tuple[Database, sa.Table], mode: str
) -> None:
    database, keys = table
    with database.engine.begin() as conn:
        insert_rows(conn, keys, [{"key": "plain", "n": 1}])
    rows = [{"key": "new", "n": 2}, {"key": "plain", "n": 3}, {"key": "other", "n": 4}]
    with database.engine.begin() as conn:
        counted = insert_rows(
            conn,
            keys,
            rows,
            conflicts_unlikely=True,
            skip_conflicts=mode == "skip",
            replace_conflicts=mode == "replace",
        )
        insert_rows(conn, keys, [{"key": "after", "n": 5}])  # the transaction goes on after the fallback

    with database.engine.connect() as conn:
        found = sorted(conn.execute(sa.select(keys.c.key, keys.c.n)))
    plain = 3 if mode == "replace" else 1
    assert found == [("after", 5), ("new", 2), ("other", 4), ("plain", plain)]
    if database.is_postgres:  # (SQLite counts the rows given)
        assert counted == (3 if mode == "replace" else 2)


def test_insert_rows_expecting_no_conflict_inserts_new_rows_with_a_plain_insert(
    table: tuple[Database, sa.Table],
) -> None:
    database, keys = table
    seen: list[str] = []
    sa.event.listen(database.engine, "before_cursor_execute", lambda *args: seen.append(str(args[2]).upper()))
    with database.engine.begin() as conn:
        counted = insert_rows(
            conn, keys, [{"key": "a", "n": 1}, {"key": "b", "n": 2}], skip_conflicts=True, conflicts_unlikely=True
        )

    inserts = [s for s in seen if s.startswith("INSERT")]
    assert len(inserts) == 1
    assert ("ON CONFLICT" in inserts[0]) == (not database.is_postgres)
    assert counted == 2


def test_custom_plans_reads_the_settings_once_per_connection_and_sets_only_those_it_lacks(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("profile")  # the chassis opens PostgreSQL connections with custom plans
    seen: list[str] = []
    sa.event.listen(database.engine, "before_cursor_execute", lambda *args: seen.append(str(args[2]).upper()))
    jit = ""
    for _ in range(3):
        with database.engine.begin() as conn:
            custom_plans(conn)
            if database.is_postgres:
                assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_custom_plan"
                assert conn.exec_driver_sql("SHOW jit").scalar() == "off"
        if database.is_postgres:
            with database.engine.connect() as conn:
                jit = str(conn.exec_driver_sql("SHOW jit").scalar())  # the connection's own, outside

    # (once, for the one pooled connection)
    assert len([s for s in seen if "CURRENT_SETTING('PLAN_CACHE_MODE')" in s]) == (1 if database.is_postgres else 0)
    # One statement per transaction when the server compiles with JIT (the plan cache mode is the connection's)
    assert len([s for s in seen if "SET_CONFIG" in s or s.startswith("SET")]) == (3 if jit == "on" else 0)


@pytest.mark.postgres
def test_custom_plans_sets_them_for_the_transaction_on_a_connection_opened_without() -> None:
    from tests.conftest import POSTGRES_URL

    engine = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.StaticPool)
    try:
        for _ in range(2):
            with engine.begin() as conn:
                custom_plans(conn)
                assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_custom_plan"
                assert conn.exec_driver_sql("SHOW jit").scalar() == "off"
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "auto"
    finally:
        engine.dispose()
