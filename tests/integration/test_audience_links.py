"""Links and rule queries over linked entities, on SQLite and PostgreSQL, with the exact matching keys.

The model: bookings N-1 customers, bookings N-1 hotels, hotels N-1 chains, and customers 1-N bookings
(added after both entities exist, as two entities that link to each other must be).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from audience_svc.audiences import AudienceEvaluator
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import (
    AllOf,
    AudienceQuery,
    Bindings,
    Condition,
    Filter,
    FilterLimits,
    LinkCondition,
    Negate,
)
from audience_svc.schema import MANY_TO_ONE, ONE_TO_MANY, Attribute, EntitySchema, JoinPair, Link
from audience_svc.tables import MIGRATIONS
from audience_svc.working_sets import WorkingSetStore
from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument

UTC = dt.UTC
REF = dt.datetime(2025, 6, 15, 12, tzinfo=UTC)


def _schema(*attributes: Attribute, links: tuple[Link, ...] = ()) -> EntitySchema:
    return EntitySchema(
        attributes=(Attribute("id", "string"), Attribute("version", "integer"), *attributes),
        primary_key=("id",),
        version_attribute="version",
        links=links,
    )


def _n1(name: str, target: str, attribute: str) -> Link:
    return Link(name, target, MANY_TO_ONE, (JoinPair(attribute, "id"),))


CHAINS = _schema(Attribute("name", "string"))
HOTELS = _schema(
    Attribute("city", "string"),
    Attribute("chain_id", "string", nullable=True),
    links=(_n1("chain", "chains", "chain_id"),),
)
CUSTOMERS = _schema(
    Attribute("country", "string"), Attribute("tier", "enum", nullable=True, enum_values=("gold", "silver"))
)
BOOKINGS = _schema(
    Attribute("customer_id", "string"),
    Attribute("hotel_id", "string", nullable=True),
    Attribute("amount", "decimal"),
    Attribute("nights", "integer"),
    Attribute("booked", "timestamp"),
    Attribute("stay", "date", nullable=True),
    links=(_n1("customer", "customers", "customer_id"), _n1("hotel", "hotels", "hotel_id")),
)
CUSTOMER_BOOKINGS = Link("bookings", "bookings", ONE_TO_MANY, (JoinPair("id", "customer_id"),))

DATA: dict[str, list[dict[str, Any]]] = {
    "chains": [{"id": "c1", "name": "Ritz"}, {"id": "c2", "name": "Budget"}],
    "hotels": [
        {"id": "h1", "city": "Paris", "chain_id": "c1"},
        {"id": "h2", "city": "Paris", "chain_id": None},
        {"id": "h3", "city": "Miami", "chain_id": "c2"},
    ],
    "customers": [
        {"id": "a", "country": "SE", "tier": "gold"},
        {"id": "b", "country": "FR", "tier": "silver"},
        {"id": "c", "country": "US", "tier": None},
        {"id": "d", "country": "SE", "tier": None},
    ],
    "bookings": [
        {
            "id": "b1",
            "customer_id": "a",
            "hotel_id": "h1",
            "amount": Decimal("100.00"),
            "nights": 2,
            "booked": REF - dt.timedelta(days=10),
            "stay": REF.date() + dt.timedelta(days=3),
        },
        {
            "id": "b2",
            "customer_id": "a",
            "hotel_id": "h3",
            "amount": Decimal("50.50"),
            "nights": 1,
            "booked": REF - dt.timedelta(days=100),
            "stay": None,
        },
        {
            "id": "b3",
            "customer_id": "b",
            "hotel_id": "h2",
            "amount": Decimal(200),
            "nights": 5,
            "booked": REF - dt.timedelta(days=1),
            "stay": REF.date() + dt.timedelta(days=20),
        },
        {
            "id": "b4",
            "customer_id": "c",
            "hotel_id": None,
            "amount": Decimal(10),
            "nights": 1,
            "booked": REF - dt.timedelta(days=40),
            "stay": None,
        },
    ],
}


@pytest.fixture
def catalog(make_database: Callable[[str], Database]) -> EntityCatalog:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    catalog = EntityCatalog(database)
    for entity_id, schema in [("chains", CHAINS), ("hotels", HOTELS), ("customers", CUSTOMERS), ("bookings", BOOKINGS)]:
        entity = catalog.create_entity("prod", entity_id, schema)
        apply_changes(database, entity, [RecordChange("upsert", {"version": 1, **row}) for row in DATA[entity_id]])
    catalog.add_links("prod", "customers", (CUSTOMER_BOOKINGS,))
    return catalog


def members(catalog: EntityCatalog, dimension: str, node: Filter, bindings: Bindings | None = None) -> set[str]:
    evaluation = AudienceEvaluator(catalog).evaluate(
        "prod", AudienceQuery(dimension, node), sample=1000, bindings=bindings or Bindings(reference_time=REF)
    )
    assert evaluation.count == len(evaluation.sample_keys)
    return set(evaluation.sample_keys)


def exists_bookings(node: Filter | None = None) -> LinkCondition:
    return LinkCondition("bookings", "exists", filter=node)


CASES: list[tuple[str, str, Filter, set[str]]] = [
    ("N-1 path", "bookings", Condition("hotel.city", "equal", ("Paris",)), {"b1", "b3"}),
    ("chained N-1 path", "bookings", Condition("hotel.chain.name", "equal", ("Ritz",)), {"b1"}),
    (
        "is_null through a path includes records without a linked record",
        "bookings",
        Condition("hotel.chain.name", "is_null"),
        {"b3", "b4"},
    ),
    ("is_not_null through a path", "bookings", Condition("hotel.chain.name", "is_not_null"), {"b1", "b2"}),
    (
        "negate of a path includes records without a linked record",
        "bookings",
        Negate(Condition("hotel.city", "equal", ("Paris",))),
        {"b2", "b4"},
    ),
    (
        "exists with a nested path filter",
        "customers",
        exists_bookings(Condition("hotel.city", "equal", ("Paris",))),
        {"a", "b"},
    ),
    ("exists without a filter", "customers", exists_bookings(), {"a", "b", "c"}),
    ("not_exists", "customers", LinkCondition("bookings", "not_exists"), {"d"}),
    (
        "not_exists with a nested filter",
        "customers",
        LinkCondition("bookings", "not_exists", filter=Condition("nights", "greater", (1,))),
        {"c", "d"},
    ),
    (
        "count at least",
        "customers",
        LinkCondition("bookings", "count", operator="greater_or_equal", values=(2,)),
        {"a"},
    ),
    ("count zero", "customers", LinkCondition("bookings", "count", operator="equal", values=(0,)), {"d"}),
    (
        "count with a nested filter",
        "customers",
        LinkCondition(
            "bookings", "count", operator="equal", values=(1,), filter=Condition("amount", "less", (Decimal(60),))
        ),
        {"a", "c"},
    ),
    (
        "sum skips records without linked records",
        "customers",
        LinkCondition("bookings", "sum", attribute="amount", operator="greater", values=(Decimal(100),)),
        {"a", "b"},
    ),
    (
        "avg between",
        "customers",
        LinkCondition("bookings", "avg", attribute="nights", operator="between", values=(Decimal("1.5"), 5)),
        {"a", "b"},
    ),
    (
        "min",
        "customers",
        LinkCondition("bookings", "min", attribute="nights", operator="equal", values=(1,)),
        {"a", "c"},
    ),
    (
        "max of a timestamp",
        "customers",
        LinkCondition("bookings", "max", attribute="booked", operator="less", values=(REF - dt.timedelta(days=20),)),
        {"c"},
    ),
    (
        "exists with a relative date",
        "customers",
        exists_bookings(Condition("booked", "within_last_days", (30,))),
        {"a", "b"},
    ),
    ("within_last_days on a timestamp", "bookings", Condition("booked", "within_last_days", (10,)), {"b1", "b3"}),
    ("within_next_days on a date", "bookings", Condition("stay", "within_next_days", (7,)), {"b1"}),
    ("within_next_days includes the far bound", "bookings", Condition("stay", "within_next_days", (20,)), {"b1", "b3"}),
    (
        "a 1-N link after an N-1 path",
        "bookings",
        LinkCondition("customer.bookings", "count", operator="greater_or_equal", values=(2,)),
        {"b1", "b2"},
    ),
    (
        "a nested link condition inside a link filter",
        "hotels",
        Negate(LinkCondition("chain", "exists", filter=Condition("name", "equal", ("Budget",)))),
        {"h1", "h2"},
    ),
    (
        "N-1 path and attribute together",
        "bookings",
        AllOf((Condition("customer.country", "equal", ("SE",)), Condition("nights", "equal", (2,)))),
        {"b1"},
    ),
]


@pytest.mark.parametrize(("case", "dimension", "node", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_link_query_matches_exactly_the_expected_keys(
    catalog: EntityCatalog, case: str, dimension: str, node: Filter, expected: set[str]
) -> None:
    assert members(catalog, dimension, node) == expected


def test_relative_dates_follow_the_reference_time(catalog: EntityCatalog) -> None:
    node = Condition("booked", "within_last_days", (10,))
    later = Bindings(reference_time=REF + dt.timedelta(days=5))
    assert members(catalog, "bookings", node, later) == {"b3"}


def test_parameters_are_bound_at_execution(catalog: EntityCatalog) -> None:
    node = AllOf(
        (
            Condition("country", "in", parameter="countries"),
            LinkCondition("bookings", "count", operator="greater_or_equal", parameter="min_bookings"),
        )
    )
    bindings = Bindings(reference_time=REF, parameters={"countries": ("SE", "FR"), "min_bookings": (1,)})
    assert members(catalog, "customers", node, bindings) == {"a", "b"}
    bindings = Bindings(reference_time=REF, parameters={"countries": ("US",), "min_bookings": (1,)})
    assert members(catalog, "customers", node, bindings) == {"c"}


def test_a_working_set_is_built_from_a_link_query(catalog: EntityCatalog) -> None:
    store = WorkingSetStore(catalog)
    query = AudienceQuery("customers", exists_bookings(Condition("hotel.city", "equal", ("Paris",))))
    working_set = store.build("prod", "campaigns/c1/runs/r1", "target", query, Bindings(reference_time=REF))
    plan = store.open_stream("prod", working_set.working_set_id, [])
    assert [r.entity_key for r in store.read_batch(plan, 0, 100)] == ["a", "b"]


def test_link_queries_compile_to_one_statement_with_bound_values(catalog: EntityCatalog) -> None:
    node = exists_bookings(
        AllOf((Condition("hotel.city", "equal", ("x' OR 1=1 --",)), Condition("nights", "equal", (3,))))
    )
    evaluation = AudienceEvaluator(catalog).evaluate("prod", AudienceQuery("customers", node), explain=True)
    assert evaluation.count == 0
    assert "OR 1=1" not in evaluation.sql
    assert evaluation.sql.count("EXISTS") == 2


ERROR_CASES: list[tuple[str, str, Filter, str]] = [
    (
        "a 1-N path used as N-1",
        "customers",
        Condition("bookings.nights", "equal", (1,)),
        "query.filter.condition.attribute",
    ),
    ("an unknown link", "bookings", Condition("room.city", "equal", ("x",)), "query.filter.condition.attribute"),
    (
        "an attribute used as a link",
        "bookings",
        Condition("nights.city", "equal", ("x",)),
        "query.filter.condition.attribute",
    ),
    (
        "an unknown linked attribute",
        "bookings",
        Condition("hotel.zip", "equal", ("x",)),
        "query.filter.condition.attribute",
    ),
    (
        "a type mismatch through a path",
        "bookings",
        Condition("hotel.city", "equal", (5,)),
        "query.filter.condition.values[0]",
    ),
    ("an unknown 1-N link", "customers", LinkCondition("orders", "exists"), "query.filter.link.link"),
    (
        "a bad nested filter names its path",
        "customers",
        exists_bookings(Condition("nope", "equal", (1,))),
        "query.filter.link.filter.condition.attribute",
    ),
    (
        "a sum of a string",
        "customers",
        LinkCondition("bookings", "sum", attribute="id", operator="equal", values=(1,)),
        "query.filter.link.attribute",
    ),
    (
        "a count without an operator",
        "customers",
        LinkCondition("bookings", "count", values=(1,)),
        "query.filter.link.operator",
    ),
    (
        "a count compared to a string",
        "customers",
        LinkCondition("bookings", "count", operator="equal", values=("1",)),
        "query.filter.link.values[0]",
    ),
    ("exists with values", "customers", LinkCondition("bookings", "exists", values=(1,)), "query.filter.link.measure"),
    ("an unset measure", "customers", LinkCondition("bookings", ""), "query.filter.link.measure"),
    (
        "an unbound parameter",
        "customers",
        Condition("country", "equal", parameter="where"),
        "query.filter.condition.parameter",
    ),
    (
        "a relative date on a string",
        "customers",
        Condition("country", "within_last_days", (3,)),
        "query.filter.condition.operator",
    ),
    (
        "a negative relative date",
        "bookings",
        Condition("booked", "within_last_days", (-1,)),
        "query.filter.condition.values[0]",
    ),
]


@pytest.mark.parametrize(("case", "dimension", "node", "field"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_link_queries_are_invalid_argument_naming_the_path(
    catalog: EntityCatalog, case: str, dimension: str, node: Filter, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        members(catalog, dimension, node)
    assert caught.value.reason == "INVALID_FILTER"
    assert [v.field for v in caught.value.violations] == [field]


def test_a_path_through_too_many_links_is_refused(catalog: EntityCatalog) -> None:
    evaluator = AudienceEvaluator(catalog, limits=FilterLimits(max_path_links=1))
    with pytest.raises(InvalidArgument) as caught:
        evaluator.evaluate("prod", AudienceQuery("bookings", Condition("hotel.chain.name", "equal", ("Ritz",))))
    assert [v.field for v in caught.value.violations] == ["query.filter.condition.attribute"]


LINK_ERRORS: list[tuple[str, Link, str]] = [
    ("an unknown target", _n1("shop", "shops", "customer_id"), "entity.links[0].target"),
    ("an unknown local attribute", _n1("shop", "customers", "shop_id"), "entity.links[0].join[0].attribute"),
    (
        "an unknown target attribute",
        Link("shop", "customers", MANY_TO_ONE, (JoinPair("customer_id", "shop_id"),)),
        "entity.links[0].join[0].target_attribute",
    ),
    (
        "incompatible join types",
        Link("shop", "bookings", ONE_TO_MANY, (JoinPair("nights", "id"),)),
        "entity.links[0].join[0].target_attribute",
    ),
    (
        "an N-1 link not on the target's primary key",
        Link("shop", "customers", MANY_TO_ONE, (JoinPair("customer_id", "country"),)),
        "entity.links[0].join",
    ),
    (
        "an unset cardinality",
        Link("shop", "customers", "", (JoinPair("customer_id", "id"),)),
        "entity.links[0].cardinality",
    ),
    ("a link named like an attribute", _n1("nights", "customers", "customer_id"), "entity.links[0].name"),
]


@pytest.mark.parametrize(("case", "link", "field"), LINK_ERRORS, ids=[c[0] for c in LINK_ERRORS])
def test_a_bad_link_is_refused_naming_the_field_and_creates_nothing(
    catalog: EntityCatalog, case: str, link: Link, field: str
) -> None:
    schema = _schema(Attribute("customer_id", "string"), Attribute("nights", "integer"), links=(link,))
    with pytest.raises(InvalidArgument) as caught:
        catalog.create_entity("prod", "visits", schema)
    assert field in [v.field for v in caught.value.violations]
    assert "visits" not in [e.entity_id for e in catalog.list_entities("prod")[0]]


def test_links_get_indexes_on_the_many_side(catalog: EntityCatalog) -> None:
    bookings = catalog.get_entity("prod", "bookings")
    with catalog.database.engine.connect() as conn:
        indexed = {tuple(i["column_names"]) for i in sa.inspect(conn).get_indexes(bookings.table_name)}
    assert {("customer_id",), ("hotel_id",)} <= indexed


def test_adding_links_keeps_the_existing_ones_and_refuses_changes(catalog: EntityCatalog) -> None:
    with pytest.raises(InvalidArgument) as caught:
        catalog.add_links("prod", "customers", ())
    assert caught.value.reason == "INCOMPATIBLE_SCHEMA_CHANGE"
    assert catalog.get_entity("prod", "customers").schema.links == (CUSTOMER_BOOKINGS,)
    again = catalog.add_links("prod", "customers", (CUSTOMER_BOOKINGS,))
    assert again.schema.links == (CUSTOMER_BOOKINGS,)


def test_links_survive_a_fresh_catalog(catalog: EntityCatalog) -> None:
    fresh = EntityCatalog(catalog.database)
    assert fresh.get_entity("prod", "customers").schema.links == (CUSTOMER_BOOKINGS,)
    assert fresh.get_entity("prod", "bookings").schema.links == BOOKINGS.links


def test_the_distribution_counts_values_most_frequent_first_with_null_as_a_value(catalog: EntityCatalog) -> None:
    evaluator = AudienceEvaluator(catalog)
    everyone = evaluator.evaluate("prod", AudienceQuery("customers"), distribution_attribute="tier")
    assert everyone.distribution == [(None, 2), ("gold", 1), ("silver", 1)]
    bookers = evaluator.evaluate(
        "prod", AudienceQuery("customers", exists_bookings()), distribution_attribute="country"
    )
    assert bookers.distribution == [("FR", 1), ("SE", 1), ("US", 1)]


def test_the_distribution_keeps_the_top_twenty_values(catalog: EntityCatalog) -> None:
    chains = catalog.get_entity("prod", "chains")
    apply_changes(
        catalog.database,
        chains,
        [RecordChange("upsert", {"id": f"x{i}", "version": 1, "name": f"n{i:02d}"}) for i in range(30)]
        + [RecordChange("upsert", {"id": f"y{i}", "version": 1, "name": "n29"}) for i in range(3)],
    )
    evaluation = AudienceEvaluator(catalog).evaluate("prod", AudienceQuery("chains"), distribution_attribute="name")
    assert evaluation.distribution[0] == ("n29", 4)
    assert [value for value, _ in evaluation.distribution[1:]] == ["Budget", "Ritz", *[f"n{i:02d}" for i in range(17)]]


def test_an_unknown_distribution_attribute_is_invalid_argument(catalog: EntityCatalog) -> None:
    with pytest.raises(InvalidArgument) as caught:
        AudienceEvaluator(catalog).evaluate("prod", AudienceQuery("customers"), distribution_attribute="nope")
    assert [v.field for v in caught.value.violations] == ["distribution_attribute"]


def test_the_distribution_of_a_many_to_one_path_counts_each_record_once(catalog: EntityCatalog) -> None:
    # b4 has no hotel and counts as NULL; b2's hotel h3 is in Miami.
    evaluation = AudienceEvaluator(catalog).evaluate(
        "prod", AudienceQuery("bookings"), distribution_attribute="hotel.city"
    )
    assert evaluation.distribution == [("Paris", 2), ("Miami", 1), (None, 1)]


def test_the_distribution_of_a_chained_path_applies_the_filter(catalog: EntityCatalog) -> None:
    bookers = AudienceQuery("bookings", Condition("nights", "greater_or_equal", (2,)))
    evaluation = AudienceEvaluator(catalog).evaluate("prod", bookers, distribution_attribute="hotel.chain.name")
    assert evaluation.distribution == [("Ritz", 1), (None, 1)]


def test_the_distribution_of_a_path_keeps_the_top_twenty_values(catalog: EntityCatalog) -> None:
    hotels = catalog.get_entity("prod", "hotels")
    bookings = catalog.get_entity("prod", "bookings")
    apply_changes(
        catalog.database,
        hotels,
        [RecordChange("upsert", {"id": f"x{i}", "version": 1, "city": f"Oslo{i:02d}"}) for i in range(25)],
    )
    apply_changes(
        catalog.database,
        bookings,
        [
            RecordChange(
                "upsert",
                {
                    "id": f"bx{i}",
                    "version": 1,
                    "customer_id": "d",
                    "hotel_id": f"x{i}",
                    "amount": Decimal(1),
                    "nights": 1,
                    "booked": REF,
                },
            )
            for i in range(25)
        ],
    )
    evaluation = AudienceEvaluator(catalog).evaluate(
        "prod", AudienceQuery("bookings"), distribution_attribute="hotel.city"
    )
    assert evaluation.distribution == [("Paris", 2), ("Miami", 1), *[(f"Oslo{i:02d}", 1) for i in range(18)]]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("bookings.nights", "ONE_TO_MANY_PATH"),
        ("nope.city", "UNKNOWN_LINK"),
        ("country.city", "UNKNOWN_LINK"),
        ("bookings.hotel.city", "ONE_TO_MANY_PATH"),
    ],
)
def test_a_bad_distribution_path_of_customers_is_invalid_argument(
    catalog: EntityCatalog, path: str, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        AudienceEvaluator(catalog).evaluate("prod", AudienceQuery("customers"), distribution_attribute=path)
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == (reason, ["distribution_attribute"])


def test_an_unknown_attribute_at_the_end_of_a_distribution_path_is_invalid_argument(catalog: EntityCatalog) -> None:
    with pytest.raises(InvalidArgument) as caught:
        AudienceEvaluator(catalog).evaluate("prod", AudienceQuery("bookings"), distribution_attribute="hotel.stars")
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == (
        "UNKNOWN_ATTRIBUTE",
        ["distribution_attribute"],
    )


def test_an_entity_can_link_to_itself(catalog: EntityCatalog) -> None:
    people = _schema(
        Attribute("referrer_id", "string", nullable=True),
        Attribute("city", "string"),
        links=(
            _n1("referrer", "people", "referrer_id"),
            Link("referred", "people", ONE_TO_MANY, (JoinPair("id", "referrer_id"),)),
        ),
    )
    entity = catalog.create_entity("prod", "people", people)
    rows = [("p1", None, "Oslo"), ("p2", "p1", "Rome"), ("p3", "p1", "Oslo"), ("p4", "p3", "Rome")]
    apply_changes(
        catalog.database,
        entity,
        [RecordChange("upsert", {"id": i, "version": 1, "referrer_id": r, "city": c}) for i, r, c in rows],
    )
    assert members(catalog, "people", Condition("referrer.city", "equal", ("Oslo",))) == {"p2", "p3", "p4"}
    assert members(catalog, "people", Condition("referrer.referrer.id", "equal", ("p1",))) == {"p4"}
    referred_in_rome = LinkCondition("referred", "exists", filter=Condition("city", "equal", ("Rome",)))
    assert members(catalog, "people", referred_in_rome) == {"p1", "p3"}


def test_links_can_be_added_to_an_entity_stored_before_links_existed(catalog: EntityCatalog) -> None:
    chains = catalog.get_entity("prod", "chains")
    legacy = '{"attributes":[{"name":"id","type":"string","nullable":false,"enum_values":[]},'
    legacy += '{"name":"version","type":"integer","nullable":false,"enum_values":[]},'
    legacy += '{"name":"name","type":"string","nullable":false,"enum_values":[]}],'
    legacy += '"primary_key":["id"],"version_attribute":"version","identity":null}'
    with catalog.database.engine.begin() as conn:
        conn.execute(sa.text("UPDATE entities SET definition = :d WHERE entity_id = 'chains'"), {"d": legacy})
    hotels = Link("hotels", "hotels", ONE_TO_MANY, (JoinPair("id", "chain_id"),))
    updated = EntityCatalog(catalog.database).add_links("prod", "chains", (hotels,))
    assert updated.schema.links == (hotels,)
    assert updated.schema.attributes == chains.schema.attributes
