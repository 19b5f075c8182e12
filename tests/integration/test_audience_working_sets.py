"""Working sets on SQLite and PostgreSQL: one INSERT … SELECT build, idempotency, keyset streaming, purge."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

import pytest
import sqlalchemy as sa

from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import AudienceQuery, Condition
from audience_svc.schema import Attribute, EntitySchema, IdentityBinding
from audience_svc.tables import MIGRATIONS
from audience_svc.working_sets import WorkingSetStore
from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import InvalidArgument, NotFound

CUSTOMERS = EntitySchema(
    attributes=(
        Attribute("customer_id", "integer"),
        Attribute("version", "integer"),
        Attribute("email", "string"),
        Attribute("age", "integer", nullable=True),
        Attribute("balance", "decimal", nullable=True),
    ),
    primary_key=("customer_id",),
    version_attribute="version",
    identity=IdentityBinding("email", "email"),
)
BOOKINGS = EntitySchema(
    attributes=(
        Attribute("hotel", "string"),
        Attribute("night", "date"),
        Attribute("version", "integer"),
        Attribute("position", "integer", nullable=True),
    ),
    primary_key=("hotel", "night"),
    version_attribute="version",
)
RUN = "campaigns/spring/runs/r1"
EVERYONE = AudienceQuery("customers")


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> WorkingSetStore:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    catalog = EntityCatalog(database)
    customers = catalog.create_entity("prod", "customers", CUSTOMERS)
    changes = [
        RecordChange(
            "upsert",
            {
                "customer_id": i,
                "version": 1,
                "email": f"c{i}@example.com",
                "age": 20 + i,
                "balance": Decimal(i) / 4,
            },
        )
        for i in range(1, 26)
    ]
    apply_changes(database, customers, changes)
    return WorkingSetStore(catalog, retention=dt.timedelta(days=5))


def ws_tables(store: WorkingSetStore) -> set[str]:
    return {n for n in sa.inspect(store.database.engine).get_table_names() if n.startswith("ws_")}


def test_building_materializes_the_matching_keys_with_positions(store: WorkingSetStore) -> None:
    query = AudienceQuery("customers", Condition("age", "greater", (40,)))
    working_set = store.build("prod", RUN, "target", query)
    assert working_set.count == 5
    assert working_set.dimension == "entities/customers"
    assert working_set.expire_time - working_set.create_time == dt.timedelta(days=5)
    plan = store.open_stream("prod", working_set.working_set_id, [])
    rows = store.read_batch(plan, 0, 100)
    assert [(r.position, r.entity_key) for r in rows] == [(1, "21"), (2, "22"), (3, "23"), (4, "24"), (5, "25")]


def test_building_again_returns_the_same_working_set_unchanged(store: WorkingSetStore) -> None:
    first = store.build("prod", RUN, "target", EVERYONE)
    again = store.build("prod", RUN, "target", AudienceQuery("customers", Condition("age", "less", (0,))))
    assert again == first
    assert len(ws_tables(store)) == 1


def test_another_activity_of_the_run_gets_its_own_working_set(store: WorkingSetStore) -> None:
    first = store.build("prod", RUN, "target", EVERYONE)
    second = store.build("prod", RUN, "split", EVERYONE)
    assert first.working_set_id != second.working_set_id
    assert len(ws_tables(store)) == 2


def test_an_empty_audience_builds_an_empty_working_set(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "target", AudienceQuery("customers", Condition("age", "less", (0,))))
    assert working_set.count == 0
    assert store.read_batch(store.open_stream("prod", working_set.working_set_id, []), 0, 10) == []


def test_a_bad_query_builds_nothing(store: WorkingSetStore) -> None:
    with pytest.raises(InvalidArgument):
        store.build("prod", RUN, "target", AudienceQuery("customers", Condition("agee", "equal", (1,))))
    assert ws_tables(store) == set()


@pytest.mark.parametrize(("run", "activity", "field"), [("runs/r1", "target", "run"), (RUN, "Bad Id", "activity")])
def test_a_malformed_run_or_activity_is_invalid_argument(
    store: WorkingSetStore, run: str, activity: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.build("prod", run, activity, EVERYONE)
    assert [v.field for v in caught.value.violations] == [field]


def test_streaming_resumes_after_a_position_with_the_requested_attributes(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "target", EVERYONE)
    plan = store.open_stream("prod", working_set.working_set_id, ["age", "balance"])
    rows = store.read_batch(plan, 10, 2)
    assert [r.position for r in rows] == [11, 12]
    assert rows[0].entity_key == "11"
    assert rows[0].identity == ("email", "c11@example.com")
    assert rows[0].values == {"age": 31, "balance": Decimal("2.75")}


def test_reading_batch_after_batch_visits_every_row_once(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "target", EVERYONE)
    plan = store.open_stream("prod", working_set.working_set_id, [])
    seen: list[int] = []
    after = 0
    while batch := store.read_batch(plan, after, 7):
        seen += [r.position for r in batch]
        after = batch[-1].position
    assert seen == list(range(1, 26))


def test_a_record_deleted_after_the_build_is_skipped(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "target", EVERYONE)
    customers = store.catalog.get_entity("prod", "customers")
    apply_changes(store.database, customers, [RecordChange("delete", {"customer_id": 2, "version": 9})])
    rows = store.read_batch(store.open_stream("prod", working_set.working_set_id, []), 0, 3)
    assert [(r.position, r.entity_key) for r in rows] == [(1, "1"), (3, "3"), (4, "4")]


def test_an_unknown_requested_attribute_names_its_index(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "target", EVERYONE)
    with pytest.raises(InvalidArgument) as caught:
        store.open_stream("prod", working_set.working_set_id, ["age", "agee", "nope"])
    assert [v.field for v in caught.value.violations] == ["attributes[1]", "attributes[2]"]


def test_a_working_set_of_another_sandbox_is_not_found(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "target", EVERYONE)
    with pytest.raises(NotFound):
        store.get("staging", working_set.working_set_id)


def test_a_composite_key_is_streamed_as_its_values_joined_by_a_bar(store: WorkingSetStore) -> None:
    bookings = store.catalog.create_entity("prod", "bookings", BOOKINGS)
    apply_changes(
        store.database,
        bookings,
        [
            RecordChange("upsert", {"hotel": hotel, "night": dt.date(2024, 6, day), "version": 1, "position": day})
            for hotel, day in [("rome", 1), ("paris", 2), ("paris", 1)]
        ],
    )
    working_set = store.build("prod", RUN, "bookings", AudienceQuery("bookings"))
    rows = store.read_batch(store.open_stream("prod", working_set.working_set_id, ["position"]), 0, 10)
    assert [(r.position, r.entity_key, r.identity, r.values) for r in rows] == [
        (1, "paris|2024-06-01", None, {"position": 1}),
        (2, "paris|2024-06-02", None, {"position": 2}),
        (3, "rome|2024-06-01", None, {"position": 1}),
    ]


def test_purging_drops_expired_working_sets_and_their_tables(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "target", EVERYONE)
    assert store.purge_expired(utcnow()) == 0
    assert store.purge_expired(working_set.expire_time) == 1
    assert ws_tables(store) == set()
    with pytest.raises(NotFound):
        store.get("prod", working_set.working_set_id)


def test_a_purged_run_activity_can_be_built_again(store: WorkingSetStore) -> None:
    first = store.build("prod", RUN, "target", EVERYONE)
    store.purge_expired(first.expire_time)
    second = store.build("prod", RUN, "target", EVERYONE)
    assert second.working_set_id != first.working_set_id
    assert second.count == 25
