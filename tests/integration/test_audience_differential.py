"""Differential tests of the filter compiler: the pushed-down result equals a plain-Python evaluation.

Hypothesis generates rows of a small fixed schema (people N-1 cities, people 1-N orders, orders N-1
people) and random filter trees over them: attribute conditions, N-1 dot paths (one and two links),
1-N link conditions (exists, not exists, count, sum, avg, min, max) with nested filters, relative
dates, AND / OR / NOT. Each tree is evaluated by the database (SQLite and PostgreSQL) and by the
reference evaluator below, which states the semantics independently of SQL: a comparison with a
missing value (NULL, or no linked record) is false, NOT is the complement, ``is_null`` through a
path is true when the linked record is missing, an aggregate over no values is missing.

Runs are derandomized so CI is reproducible; the example count stays modest to keep the suite fast.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audience_svc.audiences import AudienceEvaluator
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import AllOf, AnyOf, AudienceQuery, Bindings, Condition, Filter, LinkCondition, Negate
from audience_svc.schema import MANY_TO_ONE, ONE_TO_MANY, Attribute, EntitySchema, JoinPair, Link
from audience_svc.tables import MIGRATIONS
from carillon_chassis.database import Database

REF = dt.datetime(2025, 6, 15, 12, tzinfo=dt.UTC)
TODAY = REF.date()
Row = dict[str, Any]


def _schema(*attributes: Attribute, links: tuple[Link, ...] = ()) -> EntitySchema:
    return EntitySchema(
        attributes=(Attribute("id", "string"), Attribute("version", "integer"), *attributes),
        primary_key=("id",),
        version_attribute="version",
        links=links,
    )


CITIES = _schema(Attribute("name", "string", nullable=True), Attribute("size", "integer", nullable=True))
PEOPLE = _schema(
    Attribute("age", "integer", nullable=True),
    Attribute("name", "string", nullable=True),
    Attribute("score", "decimal", nullable=True),
    Attribute("vip", "boolean", nullable=True),
    Attribute("joined", "date", nullable=True),
    Attribute("city_id", "string", nullable=True),
    links=(Link("city", "cities", MANY_TO_ONE, (JoinPair("city_id", "id"),)),),
)
ORDERS = _schema(
    Attribute("person_id", "string"),
    Attribute("amount", "integer", nullable=True),
    Attribute("kind", "enum", nullable=True, enum_values=("a", "b")),
    Attribute("placed", "date", nullable=True),
    links=(Link("person", "people", MANY_TO_ONE, (JoinPair("person_id", "id"),)),),
)
PEOPLE_ORDERS = Link("orders", "orders", ONE_TO_MANY, (JoinPair("id", "person_id"),))

# ---------------------------------------------------------------------------------------------
# Data

small_int = st.integers(min_value=0, max_value=4)
word = st.text(alphabet="abAB", max_size=3)
dates = st.integers(min_value=-6, max_value=6).map(lambda d: TODAY + dt.timedelta(days=d))
decimals = st.sampled_from([Decimal(0), Decimal("0.5"), Decimal("1.25"), Decimal(2), Decimal(-1)])


def nullable(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


city_rows = st.lists(st.fixed_dictionaries({"name": nullable(word), "size": nullable(small_int)}), max_size=3)
person_rows = st.lists(
    st.fixed_dictionaries(
        {
            "age": nullable(small_int),
            "name": nullable(word),
            "score": nullable(decimals),
            "vip": nullable(st.booleans()),
            "joined": nullable(dates),
            "city_id": nullable(st.sampled_from(["c0", "c1", "c2", "c3"])),
        }
    ),
    max_size=7,
)
order_rows = st.lists(
    st.fixed_dictionaries(
        {
            "person_id": st.sampled_from([f"p{i}" for i in range(8)]),
            "amount": nullable(small_int),
            "kind": nullable(st.sampled_from(["a", "b"])),
            "placed": nullable(dates),
        }
    ),
    max_size=10,
)


def with_ids(prefix: str, rows: list[Row]) -> list[Row]:
    return [{"id": f"{prefix}{i}", **row} for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Filters

INT_OPS = ["equal", "not_equal", "less", "greater_or_equal", "between", "in", "not_in", "is_null", "is_not_null"]
STR_OPS = ["equal", "not_equal", "in", "not_in", "is_null", "is_not_null", "starts_with", "contains"]
DATE_OPS = ["equal", "less", "greater_or_equal", "between", "is_null", "within_last_days", "within_next_days"]


@st.composite
def condition(draw: st.DrawFn, attribute: str, kind: str) -> Condition:
    ops = {"int": INT_OPS, "str": STR_OPS, "date": DATE_OPS, "dec": INT_OPS, "bool": ["equal", "is_null"]}[kind]
    operator = draw(st.sampled_from(ops))
    if operator in ("is_null", "is_not_null"):
        return Condition(attribute, operator)
    if operator in ("within_last_days", "within_next_days"):
        return Condition(attribute, operator, (draw(st.integers(min_value=0, max_value=5)),))
    value = {
        "int": st.integers(min_value=-1, max_value=5),
        "str": word,
        "date": dates,
        "dec": decimals,
        "bool": st.booleans(),
        "enum": st.sampled_from(["a", "b"]),
    }[kind]
    if operator in ("in", "not_in"):
        return Condition(attribute, operator, tuple(draw(st.lists(value, min_size=1, max_size=3))))
    if operator == "between":
        return Condition(attribute, operator, (draw(value), draw(value)))
    return Condition(attribute, operator, (draw(value),))


def trees(leaves: st.SearchStrategy[Filter], max_leaves: int) -> st.SearchStrategy[Filter]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3).map(lambda fs: AllOf(tuple(fs))),
            st.lists(children, min_size=1, max_size=3).map(lambda fs: AnyOf(tuple(fs))),
            children.map(Negate),
        ),
        max_leaves=max_leaves,
    )


order_leaves = st.one_of(
    condition("amount", "int"),
    condition("placed", "date"),
    st.sampled_from(["equal", "in", "not_in", "is_null"]).map(
        lambda op: Condition("kind", op) if op == "is_null" else Condition("kind", op, ("a",))
    ),
    condition("person.age", "int"),
    condition("person.city.name", "str"),
)
order_filters = trees(order_leaves, max_leaves=3)


@st.composite
def link_condition(draw: st.DrawFn, link: str) -> LinkCondition:
    measure = draw(st.sampled_from(["exists", "not_exists", "count", "sum", "avg", "min", "max"]))
    nested = draw(st.none() | order_filters)
    if measure in ("exists", "not_exists"):
        return LinkCondition(link, measure, filter=nested)
    operator = draw(st.sampled_from(["equal", "not_equal", "less", "greater_or_equal", "between"]))
    count = 2 if operator == "between" else 1
    values = tuple(draw(st.lists(st.integers(min_value=0, max_value=6), min_size=count, max_size=count)))
    attribute = (
        ""
        if measure == "count"
        else draw(st.sampled_from(["amount", "placed"]) if measure in ("min", "max") else st.just("amount"))
    )
    if attribute == "placed":
        values = tuple(TODAY + dt.timedelta(days=v - 3) for v in values)
    return LinkCondition(link, measure, attribute=attribute, operator=operator, values=values, filter=nested)


person_leaves = st.one_of(
    condition("age", "int"),
    condition("name", "str"),
    condition("score", "dec"),
    condition("vip", "bool"),
    condition("joined", "date"),
    condition("city.name", "str"),
    condition("city.size", "int"),
    link_condition("orders"),
)
person_filters = trees(person_leaves, max_leaves=6)
order_dimension_filters = trees(st.one_of(order_leaves, link_condition("person.orders")), max_leaves=5)

# ---------------------------------------------------------------------------------------------
# The reference evaluator


class World:
    """The generated rows, by entity, with the plain-Python semantics of filters over them."""

    def __init__(self, cities: list[Row], people: list[Row], orders: list[Row]) -> None:
        self.rows = {"cities": cities, "people": people, "orders": orders}
        self.by_id = {name: {row["id"]: row for row in rows} for name, rows in self.rows.items()}

    MISSING = object()

    def value(self, entity: str, row: Row, path: str) -> Any:
        *hops, name = path.split(".")
        for hop in hops:
            if entity == "people" and hop == "city":
                entity, key = "cities", row["city_id"]
            elif entity == "orders" and hop == "person":
                entity, key = "people", row["person_id"]
            else:
                raise AssertionError(hop)
            linked = self.by_id[entity].get(key)
            if linked is None:
                return self.MISSING
            row = linked
        return row[name]

    def matches(self, entity: str, row: Row, node: Filter) -> bool:
        if isinstance(node, AllOf):
            return all(self.matches(entity, row, f) for f in node.filters)
        if isinstance(node, AnyOf):
            return any(self.matches(entity, row, f) for f in node.filters)
        if isinstance(node, Negate):
            return not self.matches(entity, row, node.filter)
        if isinstance(node, Condition):
            value = self.value(entity, row, node.attribute)
            if node.operator == "is_null":
                return value is None or value is self.MISSING
            if value is None or value is self.MISSING:
                return False
            return compare(value, node.operator, list(node.values))
        assert isinstance(node, LinkCondition)
        *hops, link = node.link.split(".")
        if hops:
            assert hops == ["person"] and entity == "orders"
            person = self.by_id["people"].get(row["person_id"])
            if person is None:
                return node.measure == "not_exists"
            row = person
        assert link == "orders"
        linked = [
            o
            for o in self.rows["orders"]
            if o["person_id"] == row["id"] and (node.filter is None or self.matches("orders", o, node.filter))
        ]
        if node.measure == "exists":
            return bool(linked)
        if node.measure == "not_exists":
            return not linked
        if node.measure == "count":
            measured: Any = len(linked)
        else:
            present = [o[node.attribute] for o in linked if o[node.attribute] is not None]
            if not present:
                return False
            if node.measure == "sum":
                measured = sum(present)
            elif node.measure == "avg":
                measured = Fraction(sum(present), len(present))
            else:
                measured = min(present) if node.measure == "min" else max(present)
        return compare(measured, node.operator, list(node.values))


def compare(value: Any, operator: str, values: list[Any]) -> bool:
    if isinstance(value, bool) or isinstance(values[0] if values else None, bool):
        pass
    elif isinstance(value, Decimal | int | Fraction):
        values = [Fraction(v) for v in values]
        value = Fraction(value)
    if operator == "equal":
        return bool(value == values[0])
    if operator == "not_equal":
        return bool(value != values[0])
    if operator == "less":
        return bool(value < values[0])
    if operator == "greater_or_equal":
        return bool(value >= values[0])
    if operator == "between":
        return bool(values[0] <= value <= values[1])
    if operator == "in":
        return value in values
    if operator == "not_in":
        return value not in values
    if operator == "is_not_null":
        return True
    if operator == "starts_with":
        return str(value).lower().startswith(str(values[0]).lower())
    if operator == "contains":
        return str(values[0]).lower() in str(value).lower()
    if operator == "within_last_days":
        return TODAY - dt.timedelta(days=values[0]) <= value <= TODAY
    if operator == "within_next_days":
        return TODAY <= value <= TODAY + dt.timedelta(days=values[0])
    raise AssertionError(operator)


# ---------------------------------------------------------------------------------------------
# The tests


class Store:
    """One database with the fixed schema, refilled for each example."""

    def __init__(self, database: Database) -> None:
        database.migrate(MIGRATIONS)
        self.database = database
        self.catalog = EntityCatalog(database)
        self.entities = {
            name: self.catalog.create_entity("prod", name, schema)
            for name, schema in [("cities", CITIES), ("people", PEOPLE), ("orders", ORDERS)]
        }
        self.catalog.add_links("prod", "people", (*PEOPLE.links, PEOPLE_ORDERS))
        self.evaluator = AudienceEvaluator(self.catalog)

    def load(self, world: World) -> None:
        with self.database.engine.begin() as conn:
            for entity in self.entities.values():
                conn.execute(sa.delete(entity.table))
        for name, rows in world.rows.items():
            changes = [RecordChange("upsert", {"version": 1, **row}) for row in rows]
            if changes:
                apply_changes(self.database, self.entities[name], changes)

    def members(self, dimension: str, node: Filter) -> set[str]:
        evaluation = self.evaluator.evaluate(
            "prod", AudienceQuery(dimension, node), sample=1000, bindings=Bindings(reference_time=REF)
        )
        assert evaluation.count == len(evaluation.sample_keys)
        return set(evaluation.sample_keys)


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> Iterator[Store]:
    yield Store(make_database("audience"))


worlds = st.builds(
    lambda c, p, o: World(with_ids("c", c), with_ids("p", p), with_ids("o", o)), city_rows, person_rows, order_rows
)
EXAMPLES = settings(
    max_examples=50, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@EXAMPLES
@given(world=worlds, filters=st.lists(person_filters, min_size=1, max_size=3))
def test_people_queries_match_the_reference_evaluation(store: Store, world: World, filters: list[Filter]) -> None:
    store.load(world)
    for node in filters:
        expected = {p["id"] for p in world.rows["people"] if world.matches("people", p, node)}
        assert store.members("people", node) == expected, node


@EXAMPLES
@given(world=worlds, filters=st.lists(order_dimension_filters, min_size=1, max_size=3))
def test_order_queries_match_the_reference_evaluation(store: Store, world: World, filters: list[Filter]) -> None:
    store.load(world)
    for node in filters:
        expected = {o["id"] for o in world.rows["orders"] if world.matches("orders", o, node)}
        assert store.members("orders", node) == expected, node
