"""Every operator against a small data set, on SQLite and PostgreSQL, with the exact matching keys."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from audience_svc.audiences import AudienceEvaluator
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import AllOf, AnyOf, AudienceQuery, Condition, Filter, Negate
from audience_svc.schema import Attribute, EntitySchema
from audience_svc.tables import MIGRATIONS
from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument, NotFound

SCHEMA = EntitySchema(
    attributes=(
        Attribute("id", "string"),
        Attribute("version", "integer"),
        Attribute("name", "string", nullable=True),
        Attribute("age", "integer", nullable=True),
        Attribute("balance", "decimal", nullable=True),
        Attribute("tier", "enum", nullable=True, enum_values=("gold", "silver", "bronze")),
        Attribute("born", "date", nullable=True),
        Attribute("seen", "timestamp", nullable=True),
        Attribute("vip", "boolean", nullable=True),
    ),
    primary_key=("id",),
    version_attribute="version",
)
UTC = dt.UTC
ROWS: list[dict[str, Any]] = [
    {
        "id": "a",
        "name": "Alice",
        "age": 30,
        "balance": Decimal("10.50"),
        "tier": "gold",
        "born": dt.date(1990, 1, 1),
        "seen": dt.datetime(2024, 1, 1, 10, tzinfo=UTC),
        "vip": True,
    },
    {
        "id": "b",
        "name": "bob",
        "age": 40,
        "balance": Decimal("99.99"),
        "tier": "silver",
        "born": dt.date(1980, 6, 15),
        "seen": dt.datetime(2024, 3, 1, tzinfo=UTC),
        "vip": False,
    },
    {"id": "c", "name": "50%_off"},
    {
        "id": "d",
        "name": "Carol_x",
        "age": 18,
        "balance": Decimal(0),
        "tier": "gold",
        "born": dt.date(2005, 12, 31),
        "seen": dt.datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC),
        "vip": False,
    },
    {
        "id": "e",
        "age": 65,
        "balance": Decimal("-5"),
        "tier": "bronze",
        "born": dt.date(1959, 2, 28),
        "seen": dt.datetime(2024, 6, 1, 12, tzinfo=UTC),
        "vip": True,
    },
]
CET = dt.timezone(dt.timedelta(hours=1))

CASES: list[tuple[str, Filter | None, set[str]]] = [
    ("no filter", None, {"a", "b", "c", "d", "e"}),
    ("equal", Condition("age", "equal", (30,)), {"a"}),
    ("not_equal skips nulls", Condition("age", "not_equal", (30,)), {"b", "d", "e"}),
    ("less", Condition("age", "less", (30,)), {"d"}),
    ("less_or_equal", Condition("age", "less_or_equal", (30,)), {"a", "d"}),
    ("greater", Condition("age", "greater", (40,)), {"e"}),
    ("greater_or_equal", Condition("age", "greater_or_equal", (40,)), {"b", "e"}),
    ("in", Condition("tier", "in", ("gold", "bronze")), {"a", "d", "e"}),
    ("not_in skips nulls", Condition("tier", "not_in", ("gold",)), {"b", "e"}),
    ("is_null", Condition("age", "is_null"), {"c"}),
    ("is_not_null", Condition("name", "is_not_null"), {"a", "b", "c", "d"}),
    ("like with a wildcard", Condition("name", "like", ("%o%",)), {"b", "c", "d"}),
    ("like ignores case", Condition("name", "like", ("a%",)), {"a"}),
    ("like with an escaped wildcard", Condition("name", "like", ("50\\%%",)), {"c"}),
    ("like on an enum", Condition("tier", "like", ("%ver",)), {"b"}),
    ("starts_with ignores case", Condition("name", "starts_with", ("CAR",)), {"d"}),
    ("starts_with matches % literally", Condition("name", "starts_with", ("50%",)), {"c"}),
    ("contains matches _ literally", Condition("name", "contains", ("_",)), {"c", "d"}),
    ("contains matches % literally", Condition("name", "contains", ("%",)), {"c"}),
    ("between integers", Condition("age", "between", (18, 40)), {"a", "b", "d"}),
    ("between decimals", Condition("balance", "between", (Decimal(0), Decimal("10.5"))), {"a", "d"}),
    ("decimal equal to an integer value", Condition("balance", "equal", (0,)), {"d"}),
    ("decimal less than a negative", Condition("balance", "less", (Decimal("-4.99"),)), {"e"}),
    ("date less", Condition("born", "less", (dt.date(1981, 1, 1),)), {"b", "e"}),
    (
        "timestamp in another zone",
        Condition("seen", "greater_or_equal", (dt.datetime(2024, 1, 1, 11, tzinfo=CET),)),
        {"a", "b", "e"},
    ),
    ("boolean equal", Condition("vip", "equal", (True,)), {"a", "e"}),
    ("boolean not_equal", Condition("vip", "not_equal", (True,)), {"b", "d"}),
    ("negate includes nulls", Negate(Condition("tier", "equal", ("gold",))), {"b", "c", "e"}),
    ("double negate", Negate(Negate(Condition("tier", "equal", ("gold",)))), {"a", "d"}),
    ("any", AnyOf((Condition("age", "less", (20,)), Condition("tier", "equal", ("bronze",)))), {"d", "e"}),
    ("all", AllOf((Condition("vip", "equal", (True,)), Condition("age", "greater", (40,)))), {"e"}),
    (
        "nested",
        AllOf(
            (
                AnyOf((Condition("tier", "equal", ("gold",)), Condition("name", "is_null"))),
                Negate(Condition("age", "less", (20,))),
            )
        ),
        {"a", "e"},
    ),
]


@pytest.fixture
def evaluator(make_database: Callable[[str], Database]) -> AudienceEvaluator:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    catalog = EntityCatalog(database)
    entity = catalog.create_entity("prod", "customers", SCHEMA)
    apply_changes(database, entity, [RecordChange("upsert", {"version": 1, **row}) for row in ROWS])
    return AudienceEvaluator(catalog)


@pytest.mark.parametrize(("case", "node", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_operator_matches_exactly_the_expected_keys(
    evaluator: AudienceEvaluator, case: str, node: Filter | None, expected: set[str]
) -> None:
    evaluation = evaluator.evaluate("prod", AudienceQuery("customers", node), sample=1000)
    assert set(evaluation.sample_keys) == expected
    assert evaluation.count == len(expected)


def test_the_sample_is_the_first_keys_in_key_order(evaluator: AudienceEvaluator) -> None:
    evaluation = evaluator.evaluate("prod", AudienceQuery("customers"), sample=3)
    assert evaluation.sample_keys == ["a", "b", "c"]
    assert evaluation.count == 5


def test_explain_returns_the_count_sql_with_placeholders(evaluator: AudienceEvaluator) -> None:
    node = Condition("name", "equal", ("x'; DROP TABLE users; --",))
    evaluation = evaluator.evaluate("prod", AudienceQuery("customers", node), explain=True)
    assert evaluation.count == 0
    assert evaluation.sql.startswith("SELECT count(*)")
    assert "DROP TABLE" not in evaluation.sql


def test_an_unknown_dimension_is_not_found_naming_the_dimension(evaluator: AudienceEvaluator) -> None:
    with pytest.raises(NotFound) as caught:
        evaluator.evaluate("prod", AudienceQuery("nope"))
    assert [v.field for v in caught.value.violations] == ["query.dimension"]


def test_a_dimension_of_another_sandbox_is_not_found(evaluator: AudienceEvaluator) -> None:
    with pytest.raises(NotFound):
        evaluator.evaluate("staging", AudienceQuery("customers"))


@pytest.mark.parametrize("size", [-1, 1001])
def test_a_sample_size_out_of_range_is_invalid_argument(evaluator: AudienceEvaluator, size: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        evaluator.evaluate("prod", AudienceQuery("customers"), sample=size)
    assert [v.field for v in caught.value.violations] == ["sample_size"]
