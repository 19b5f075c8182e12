"""Versioned ingestion on a real database (SQLite and PostgreSQL): highest version wins, batches are atomic."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from audience_svc.coercion import Malformed
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import IngestResult, RecordChange, apply_changes
from audience_svc.schema import Attribute, Entity, EntitySchema
from audience_svc.tables import MIGRATIONS
from carillon_chassis.database import Database, as_utc
from carillon_chassis.errors import InvalidArgument

SCHEMA = EntitySchema(
    attributes=(
        Attribute("customer_id", "string"),
        Attribute("version", "integer"),
        Attribute("email", "string"),
        Attribute("age", "integer", nullable=True),
        Attribute("balance", "decimal", nullable=True),
        Attribute("tier", "enum", nullable=True, enum_values=("gold", "silver")),
        Attribute("birthday", "date", nullable=True),
        Attribute("vip", "boolean", nullable=True),
    ),
    primary_key=("customer_id",),
    version_attribute="version",
)


@pytest.fixture
def database(make_database: Callable[[str], Database]) -> Database:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    return database


@pytest.fixture
def entity(database: Database) -> Entity:
    return EntityCatalog(database).create_entity("prod", "customers", SCHEMA)


def upsert(key: str, version: int, **values: Any) -> RecordChange:
    return RecordChange("upsert", {"customer_id": key, "version": version, "email": f"{key}@example.com", **values})


def delete(key: str, version: int) -> RecordChange:
    return RecordChange("delete", {"customer_id": key, "version": version})


def stored(database: Database, entity: Entity) -> dict[str, dict[str, Any]]:
    with database.engine.connect() as conn:
        rows = conn.execute(sa.select(entity.table)).mappings().all()
    return {row["customer_id"]: dict(row) for row in rows}


def test_new_records_are_inserted_with_every_type(database: Database, entity: Entity) -> None:
    change = upsert("c1", 1, age=41, balance=Decimal("12.50"), tier="gold", birthday=dt.date(1983, 5, 1), vip=True)
    assert apply_changes(database, entity, [change]) == IngestResult(upserted=1)
    row = stored(database, entity)["c1"]
    assert (row["age"], row["balance"], row["tier"], row["birthday"], row["vip"]) == (
        41,
        Decimal("12.5"),
        "gold",
        dt.date(1983, 5, 1),
        True,
    )


def test_a_missing_nullable_attribute_is_stored_as_null(database: Database, entity: Entity) -> None:
    apply_changes(database, entity, [upsert("c1", 1)])
    assert stored(database, entity)["c1"]["age"] is None


def test_a_higher_version_replaces_the_record(database: Database, entity: Entity) -> None:
    apply_changes(database, entity, [upsert("c1", 1, age=30)])
    result = apply_changes(database, entity, [upsert("c1", 2, age=31)])
    assert result == IngestResult(upserted=1)
    assert stored(database, entity)["c1"]["age"] == 31


@pytest.mark.parametrize("version", [1, 2])
def test_a_version_not_higher_than_the_stored_one_is_ignored_as_stale(
    database: Database, entity: Entity, version: int
) -> None:
    apply_changes(database, entity, [upsert("c1", 2, age=30)])
    result = apply_changes(database, entity, [upsert("c1", version, age=99)])
    assert result == IngestResult(ignored_stale=1)
    assert stored(database, entity)["c1"]["age"] == 30


def test_duplicates_of_a_key_in_one_batch_keep_the_highest_version(database: Database, entity: Entity) -> None:
    result = apply_changes(database, entity, [upsert("c1", 3, age=3), upsert("c1", 5, age=5), upsert("c1", 4, age=4)])
    assert result == IngestResult(upserted=1, ignored_stale=2)
    assert stored(database, entity)["c1"]["age"] == 5


def test_duplicates_with_the_same_version_keep_the_later_change(database: Database, entity: Entity) -> None:
    apply_changes(database, entity, [upsert("c1", 1, age=1), upsert("c1", 1, age=2)])
    assert stored(database, entity)["c1"]["age"] == 2


def test_a_delete_at_or_above_the_stored_version_deletes(database: Database, entity: Entity) -> None:
    apply_changes(database, entity, [upsert("c1", 2), upsert("c2", 2)])
    result = apply_changes(database, entity, [delete("c1", 2), delete("c2", 3)])
    assert result == IngestResult(deleted=2)
    assert stored(database, entity) == {}


def test_a_delete_below_the_stored_version_is_ignored_as_stale(database: Database, entity: Entity) -> None:
    apply_changes(database, entity, [upsert("c1", 5)])
    result = apply_changes(database, entity, [delete("c1", 4)])
    assert result == IngestResult(ignored_stale=1)
    assert set(stored(database, entity)) == {"c1"}


def test_a_delete_of_an_unknown_record_changes_nothing(database: Database, entity: Entity) -> None:
    assert apply_changes(database, entity, [delete("nobody", 1)]) == IngestResult()


def test_a_later_delete_in_the_same_batch_wins_over_an_upsert(database: Database, entity: Entity) -> None:
    result = apply_changes(database, entity, [upsert("c1", 1), delete("c1", 2)])
    assert result == IngestResult(ignored_stale=1)
    assert stored(database, entity) == {}


def test_a_bad_batch_lists_every_bad_row_and_writes_nothing(database: Database, entity: Entity) -> None:
    changes = [
        upsert("ok1", 1),
        upsert("bad1", 1, age="forty"),
        upsert("ok2", 1),
        RecordChange("upsert", {"customer_id": "bad2", "version": 1, "agee": 3}),
        upsert("bad3", 1, tier="bronze", balance=Malformed("decimal", "'x' is not a decimal number")),
        RecordChange("delete", {"customer_id": "bad4"}),
        RecordChange("", {"customer_id": "bad5", "version": 1}),
    ]
    with pytest.raises(InvalidArgument) as caught:
        apply_changes(database, entity, changes)
    assert caught.value.reason == "INVALID_RECORDS"
    assert sorted(v.field for v in caught.value.violations) == [
        "changes[1].values.age",
        "changes[3].values.agee",
        "changes[3].values.email",
        "changes[4].values.balance",
        "changes[4].values.tier",
        "changes[5].values.version",
        "changes[6].operation",
    ]
    assert stored(database, entity) == {}


def test_null_in_a_non_nullable_attribute_names_that_value(database: Database, entity: Entity) -> None:
    with pytest.raises(InvalidArgument) as caught:
        apply_changes(database, entity, [upsert("c1", 1, email=None)])
    assert [v.field for v in caught.value.violations] == ["changes[0].values.email"]


def test_a_batch_larger_than_one_statement_is_applied_whole(database: Database, entity: Entity) -> None:
    changes = [upsert(f"c{i:05d}", 1, age=i) for i in range(5000)]
    assert apply_changes(database, entity, changes) == IngestResult(upserted=5000)
    assert len(stored(database, entity)) == 5000


COMPOSITE = EntitySchema(
    attributes=(
        Attribute("hotel", "string"),
        Attribute("night", "date"),
        Attribute("updated", "timestamp"),
        Attribute("guests", "integer", nullable=True),
    ),
    primary_key=("hotel", "night"),
    version_attribute="updated",
)


def test_a_composite_key_with_a_timestamp_version_upserts_and_deletes(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    entity = EntityCatalog(database).create_entity("prod", "bookings", COMPOSITE)
    t0 = dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
    stockholm = dt.timezone(dt.timedelta(hours=2))

    def change(op: str, hotel: str, night: int, updated: dt.datetime, guests: int = 1) -> RecordChange:
        return RecordChange(
            op, {"hotel": hotel, "night": dt.date(2024, 6, night), "updated": updated, "guests": guests}
        )

    apply_changes(database, entity, [change("upsert", "paris", 1, t0), change("upsert", "paris", 2, t0)])
    # 13:00 in Stockholm is 11:00 UTC: older than the stored version, so stale.
    late = dt.datetime(2024, 5, 1, 13, tzinfo=stockholm)
    newer = t0 + dt.timedelta(seconds=1)
    result = apply_changes(
        database,
        entity,
        [change("upsert", "paris", 1, late, guests=9), change("upsert", "paris", 2, newer, guests=2)],
    )
    assert result == IngestResult(upserted=1, ignored_stale=1)
    removed = apply_changes(database, entity, [change("delete", "paris", 1, t0)])
    assert removed == IngestResult(deleted=1)
    with database.engine.connect() as conn:
        rows = conn.execute(sa.select(entity.table)).mappings().all()
    assert [(r["night"], r["guests"], as_utc(r["updated"])) for r in rows] == [(dt.date(2024, 6, 2), 2, newer)]
