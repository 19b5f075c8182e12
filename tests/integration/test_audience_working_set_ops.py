"""Working-set operations beyond build, with exact membership, on SQLite and PostgreSQL.

Combine (union / intersection / exclusion) and change dimension (through N-1 and 1-N links, with
unmatched source records counted).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest

from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import Aggregate, AudienceQuery, Condition
from audience_svc.schema import MANY_TO_ONE, ONE_TO_MANY, Attribute, EntitySchema, JoinPair, Link
from audience_svc.tables import MIGRATIONS
from audience_svc.working_sets import Subset, WorkingSetStore
from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument

RUN = "campaigns/c1/runs/r1"
CUSTOMERS = EntitySchema(
    attributes=(Attribute("id", "string"), Attribute("version", "integer"), Attribute("age", "integer")),
    primary_key=("id",),
    version_attribute="version",
)
BOOKINGS = EntitySchema(
    attributes=(
        Attribute("id", "string"),
        Attribute("version", "integer"),
        Attribute("customer_id", "string"),
        Attribute("nights", "integer"),
    ),
    primary_key=("id",),
    version_attribute="version",
    links=(Link("customer", "customers", MANY_TO_ONE, (JoinPair("customer_id", "id"),)),),
)
AGES = {"a": 20, "b": 30, "c": 40, "d": 50, "e": 60}
# Booking → (customer, nights); "zz" is a customer that does not exist.
BOOKED = {"b1": ("a", 1), "b2": ("a", 2), "b3": ("c", 3), "b4": ("zz", 4)}


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> WorkingSetStore:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    catalog = EntityCatalog(database)
    customers = catalog.create_entity("prod", "customers", CUSTOMERS)
    bookings = catalog.create_entity("prod", "bookings", BOOKINGS)
    catalog.add_links(
        "prod", "customers", (Link("bookings", "bookings", ONE_TO_MANY, (JoinPair("id", "customer_id"),)),)
    )
    apply_changes(
        database, customers, [RecordChange("upsert", {"id": k, "version": 1, "age": v}) for k, v in AGES.items()]
    )
    apply_changes(
        database,
        bookings,
        [
            RecordChange("upsert", {"id": k, "version": 1, "customer_id": c, "nights": n})
            for k, (c, n) in BOOKED.items()
        ],
    )
    return WorkingSetStore(catalog)


def keys(store: WorkingSetStore, working_set_id: str) -> list[str]:
    plan = store.open_stream("prod", working_set_id, [])
    records = store.read_batch(plan, 0, 1000)
    assert [r.position for r in records] == list(range(1, len(records) + 1))
    return [r.entity_key for r in records]


def ages(store: WorkingSetStore, activity: str, low: int, high: int) -> str:
    query = AudienceQuery("customers", Condition("age", "between", (low, high)))
    return store.build("prod", RUN, activity, query).working_set_id


@pytest.mark.parametrize(
    ("operation", "expected"),
    [("union", ["a", "b", "c", "d", "e"]), ("intersection", ["c"]), ("exclusion", ["a", "b"])],
)
def test_combine_keeps_exactly_the_expected_records(
    store: WorkingSetStore, operation: str, expected: list[str]
) -> None:
    primary = ages(store, "p", 20, 40)
    others = [ages(store, "o1", 40, 50), ages(store, "o2", 40, 60)]
    combined = store.combine("prod", RUN, "combined", primary, others, operation)
    assert combined.count == len(expected)
    assert keys(store, combined.working_set_id) == expected


def test_combining_another_dimension_is_refused(store: WorkingSetStore) -> None:
    primary = ages(store, "p", 20, 40)
    bookings = store.build("prod", RUN, "b", AudienceQuery("bookings")).working_set_id
    with pytest.raises(InvalidArgument) as caught:
        store.combine("prod", RUN, "combined", primary, [bookings], "union")
    assert caught.value.reason == "DIMENSION_MISMATCH"


def test_change_dimension_through_n1_counts_the_unmatched(store: WorkingSetStore) -> None:
    bookings = store.build("prod", RUN, "b", AudienceQuery("bookings")).working_set_id
    changed, unmatched = store.change_dimension("prod", RUN, "owners", bookings, "customer")
    assert (keys(store, changed.working_set_id), changed.dimension, unmatched) == (["a", "c"], "entities/customers", 1)


def test_change_dimension_through_1n_reaches_every_linked_record(store: WorkingSetStore) -> None:
    customers = ages(store, "young", 20, 30)
    changed, unmatched = store.change_dimension("prod", RUN, "their-bookings", customers, "bookings")
    assert (keys(store, changed.working_set_id), unmatched) == (["b1", "b2"], 1)
    again, unmatched_again = store.change_dimension("prod", RUN, "their-bookings", customers, "bookings")
    assert (again.working_set_id, unmatched_again) == (changed.working_set_id, 1)


def test_change_dimension_through_an_unknown_link_is_refused(store: WorkingSetStore) -> None:
    customers = ages(store, "young", 20, 30)
    with pytest.raises(InvalidArgument) as caught:
        store.change_dimension("prod", RUN, "x", customers, "orders")
    assert caught.value.reason == "UNKNOWN_LINK"


def test_split_gives_each_record_to_the_first_subset_that_takes_it(store: WorkingSetStore) -> None:
    everyone = store.build("prod", RUN, "all", AudienceQuery("customers")).working_set_id
    subsets, complement = store.split(
        "prod",
        RUN,
        everyone,
        [
            Subset("oldest-two", limit=2, order_by=(("age", True),)),
            Subset("over-25", filter=Condition("age", "greater", (25,))),
        ],
        complement_activity="rest",
    )
    assert [keys(store, w.working_set_id) for w in subsets] == [["d", "e"], ["b", "c"]]
    assert complement is not None and keys(store, complement.working_set_id) == ["a"]


def test_split_with_overlap_lets_subsets_share_records(store: WorkingSetStore) -> None:
    everyone = store.build("prod", RUN, "all", AudienceQuery("customers")).working_set_id
    subsets, complement = store.split(
        "prod",
        RUN,
        everyone,
        [Subset("over-45", filter=Condition("age", "greater", (45,))), Subset("half", limit_percent=50)],
        complement_activity="rest",
        overlap=True,
    )
    assert [keys(store, w.working_set_id) for w in subsets] == [["d", "e"], ["a", "b"]]
    assert complement is not None and keys(store, complement.working_set_id) == ["c"]


def test_a_retried_split_returns_the_same_subsets(store: WorkingSetStore) -> None:
    everyone = store.build("prod", RUN, "all", AudienceQuery("customers")).working_set_id
    plan = [Subset("first", limit=1), Subset("second", limit=1)]
    first, _ = store.split("prod", RUN, everyone, plan)
    again, _ = store.split("prod", RUN, everyone, plan)
    assert [w.working_set_id for w in first] == [w.working_set_id for w in again]
    assert [keys(store, w.working_set_id) for w in again] == [["a"], ["b"]]


def test_a_split_sorted_by_an_unknown_attribute_is_refused(store: WorkingSetStore) -> None:
    everyone = store.build("prod", RUN, "all", AudienceQuery("customers")).working_set_id
    with pytest.raises(InvalidArgument) as caught:
        store.split("prod", RUN, everyone, [Subset("s", order_by=(("nope", False),))])
    assert [v.field for v in caught.value.violations] == ["subsets[0].order_by[0].attribute"]


@pytest.mark.parametrize(
    ("method", "attribute", "priority", "kept"),
    [
        ("lowest", "nights", (), ["b1", "b3", "b4"]),
        ("highest", "nights", (), ["b2", "b3", "b4"]),
        ("priority", "nights", (2, 1), ["b2", "b3", "b4"]),
        ("non_empty", "nights", (), ["b1", "b3", "b4"]),
    ],
)
def test_deduplication_keeps_the_chosen_record_per_group_and_the_complement_holds_the_rest(
    store: WorkingSetStore, method: str, attribute: str, priority: tuple[int, ...], kept: list[str]
) -> None:
    bookings = store.build("prod", RUN, "b", AudienceQuery("bookings")).working_set_id
    result, complement = store.deduplicate(
        "prod",
        RUN,
        "dedup",
        bookings,
        ["customer_id"],
        method=method,
        attribute=attribute,
        priority=priority,
        complement_activity="dupes",
    )
    assert keys(store, result.working_set_id) == kept
    assert complement is not None
    assert keys(store, complement.working_set_id) == sorted(set(BOOKED) - set(kept))


def test_random_deduplication_keeps_one_per_group_and_a_disjoint_complement(store: WorkingSetStore) -> None:
    bookings = store.build("prod", RUN, "b", AudienceQuery("bookings")).working_set_id
    result, complement = store.deduplicate(
        "prod", RUN, "dedup", bookings, ["customer_id"], method="random", complement_activity="dupes"
    )
    kept = keys(store, result.working_set_id)
    assert complement is not None
    removed = keys(store, complement.working_set_id)
    assert {"b3", "b4"} <= set(kept) and len(kept) == 3
    assert sorted(kept + removed) == sorted(BOOKED)


def test_deduplication_keeps_up_to_n_per_group(store: WorkingSetStore) -> None:
    bookings = store.build("prod", RUN, "b", AudienceQuery("bookings")).working_set_id
    result, _ = store.deduplicate("prod", RUN, "dedup", bookings, ["customer_id"], keep=2, attribute="nights")
    assert keys(store, result.working_set_id) == ["b1", "b2", "b3", "b4"]


def test_deduplication_on_an_unknown_field_is_refused(store: WorkingSetStore) -> None:
    bookings = store.build("prod", RUN, "b", AudienceQuery("bookings")).working_set_id
    with pytest.raises(InvalidArgument) as caught:
        store.deduplicate("prod", RUN, "dedup", bookings, ["nope"], attribute="nights")
    assert caught.value.reason == "UNKNOWN_ATTRIBUTE"


def test_streaming_enriches_rows_with_many_to_one_attributes(store: WorkingSetStore) -> None:
    bookings = store.build("prod", RUN, "b", AudienceQuery("bookings")).working_set_id
    plan = store.open_stream("prod", bookings, ["nights", "customer.age"])
    rows = {r.entity_key: r.values for r in store.read_batch(plan, 0, 100)}
    assert rows == {
        "b1": {"nights": 1, "customer.age": 20},
        "b2": {"nights": 2, "customer.age": 20},
        "b3": {"nights": 3, "customer.age": 40},
        "b4": {"nights": 4, "customer.age": None},
    }


def test_streaming_through_a_one_to_many_link_is_refused_naming_the_attribute(store: WorkingSetStore) -> None:
    customers = store.build("prod", RUN, "c", AudienceQuery("customers")).working_set_id
    with pytest.raises(InvalidArgument) as caught:
        store.open_stream("prod", customers, ["age", "bookings.nights"])
    assert [v.field for v in caught.value.violations] == ["attributes[1]"]


def test_streaming_enriches_rows_with_aggregates_of_linked_records(store: WorkingSetStore) -> None:
    customers = store.build("prod", RUN, "c", AudienceQuery("customers")).working_set_id
    plan = store.open_stream(
        "prod",
        customers,
        ["age"],
        aggregates=(
            Aggregate("long_stays", "bookings", "count", filter=Condition("nights", "greater", (1,))),
            Aggregate("most_nights", "bookings", "max", attribute="nights"),
            Aggregate("mean_nights", "bookings", "avg", attribute="nights"),
        ),
    )
    rows = {r.entity_key: r.values for r in store.read_batch(plan, 0, 100)}
    assert rows["a"] == {"age": 20, "long_stays": 1, "most_nights": 2, "mean_nights": Decimal("1.5")}
    assert rows["c"] == {"age": 40, "long_stays": 1, "most_nights": 3, "mean_nights": Decimal(3)}
    assert rows["b"] == {"age": 30, "long_stays": 0, "most_nights": None, "mean_nights": None}


def test_a_bad_enrichment_is_refused_naming_its_field(store: WorkingSetStore) -> None:
    customers = store.build("prod", RUN, "c", AudienceQuery("customers")).working_set_id
    with pytest.raises(InvalidArgument) as caught:
        store.open_stream("prod", customers, [], aggregates=(Aggregate("x", "bookings", "sum", attribute="id"),))
    assert [v.field for v in caught.value.violations] == ["enrichments[0].attribute"]
    with pytest.raises(InvalidArgument) as caught:
        store.open_stream("prod", customers, ["age"], aggregates=(Aggregate("age", "bookings", "count"),))
    assert [v.field for v in caught.value.violations] == ["enrichments[0].alias"]
