"""The filter compiler: errors name the field path from the request root; values stay bound parameters."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from audience_svc.coercion import Malformed
from audience_svc.query import (
    AllOf,
    AnyOf,
    Condition,
    EmptyFilter,
    Filter,
    FilterLimits,
    Negate,
    compile_filter,
)
from audience_svc.schema import Attribute, Entity, EntitySchema
from audience_svc.servicer import OPERATOR_NAMES, filter_from_proto
from carillon.audience.v1 import query_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.errors import InvalidArgument

ENTITY = Entity(
    sandbox="prod",
    entity_id="customers",
    table_name="ent_test",
    schema=EntitySchema(
        attributes=(
            Attribute("customer_id", "string"),
            Attribute("version", "integer"),
            Attribute("age", "integer", nullable=True),
            Attribute("vip", "boolean", nullable=True),
            Attribute("tier", "enum", nullable=True, enum_values=("gold", "silver")),
        ),
        primary_key=("customer_id",),
        version_attribute="version",
    ),
)
DIALECTS: list[sa.Dialect] = [sqlite.dialect(), postgresql.dialect()]  # type: ignore[no-untyped-call]


def violations(node: Filter, limits: FilterLimits | None = None) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as caught:
        compile_filter(ENTITY, node, limits=limits)
    return [(caught.value.reason, v.field) for v in caught.value.violations]


def sql_of(node: Filter, dialect: sa.Dialect) -> tuple[str, dict[str, object]]:
    statement = sa.select(sa.func.count()).select_from(ENTITY.table).where(compile_filter(ENTITY, node))
    compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    return str(compiled), dict(compiled.params)


def test_no_filter_matches_everything() -> None:
    assert compile_filter(ENTITY, None).compare(sa.true())


def test_an_unknown_attribute_names_its_path_from_the_request_root() -> None:
    node = AllOf((Condition("age", "greater", (18,)), Condition("agee", "equal", (1,))))
    assert violations(node) == [("INVALID_FILTER", "query.filter.all.filters[1].condition.attribute")]


def test_an_unset_operator_names_the_operator() -> None:
    assert violations(Condition("age", "", (1,))) == [("INVALID_FILTER", "query.filter.condition.operator")]


def test_an_empty_in_list_names_the_values() -> None:
    assert violations(Condition("age", "in", ())) == [("INVALID_FILTER", "query.filter.condition.values")]


def test_an_empty_not_in_list_names_the_values() -> None:
    assert violations(Condition("age", "not_in", ())) == [("INVALID_FILTER", "query.filter.condition.values")]


@pytest.mark.parametrize(
    ("operator", "count"),
    [("equal", 0), ("equal", 2), ("between", 1), ("between", 3), ("is_null", 1), ("is_not_null", 1), ("like", 2)],
)
def test_a_wrong_number_of_values_names_the_values(operator: str, count: int) -> None:
    node = Condition("customer_id", operator, tuple(["a"] * count))
    assert violations(node) == [("INVALID_FILTER", "query.filter.condition.values")]


@pytest.mark.parametrize("operator", ["like", "starts_with", "contains"])
def test_a_string_match_on_a_non_string_attribute_names_the_operator(operator: str) -> None:
    node = Condition("age", operator, ("1",))
    assert violations(node) == [("INVALID_FILTER", "query.filter.condition.operator")]


def test_an_ordering_operator_on_a_boolean_names_the_operator() -> None:
    assert violations(Condition("vip", "less", (True,))) == [("INVALID_FILTER", "query.filter.condition.operator")]


def test_a_value_of_the_wrong_type_names_that_value() -> None:
    node = Negate(Condition("age", "in", (1, "two", 3)))
    assert violations(node) == [("INVALID_FILTER", "query.filter.negate.condition.values[1]")]


def test_a_null_operand_names_that_value() -> None:
    assert violations(Condition("age", "equal", (None,))) == [("INVALID_FILTER", "query.filter.condition.values[0]")]


def test_an_enum_operand_outside_the_enum_names_that_value() -> None:
    node = Condition("tier", "equal", ("bronze",))
    assert violations(node) == [("INVALID_FILTER", "query.filter.condition.values[0]")]


def test_a_malformed_operand_names_that_value() -> None:
    node = Condition("age", "equal", (Malformed("decimal", "'x' is not a decimal number"),))
    assert violations(node) == [("INVALID_FILTER", "query.filter.condition.values[0]")]


def test_an_empty_filter_list_names_its_filters() -> None:
    assert violations(AnyOf(())) == [("INVALID_FILTER", "query.filter.any.filters")]


def test_a_node_with_no_kind_names_that_node() -> None:
    assert violations(AllOf((EmptyFilter(),))) == [("INVALID_FILTER", "query.filter.all.filters[0]")]


def test_every_problem_of_a_tree_is_listed_together() -> None:
    node = AnyOf(
        (
            Condition("nope", "equal", ("x",)),
            AllOf((Condition("age", "between", (1,)), Negate(Condition("tier", "like", (5,))))),
        )
    )
    assert [field for _, field in violations(node)] == [
        "query.filter.any.filters[0].condition.attribute",
        "query.filter.any.filters[1].all.filters[0].condition.values",
        "query.filter.any.filters[1].all.filters[1].negate.condition.values[0]",
    ]


def test_a_filter_deeper_than_the_limit_is_refused_naming_the_limit() -> None:
    node: Filter = Condition("age", "is_null")
    for _ in range(4):
        node = Negate(node)
    with pytest.raises(InvalidArgument) as caught:
        compile_filter(ENTITY, node, limits=FilterLimits(max_depth=4))
    assert caught.value.reason == "FILTER_TOO_DEEP"
    assert caught.value.metadata["limit"] == "max_filter_depth"
    assert [v.field for v in caught.value.violations] == ["query.filter"]


def test_a_filter_at_the_depth_limit_compiles() -> None:
    node: Filter = Condition("age", "is_null")
    for _ in range(3):
        node = Negate(node)
    compile_filter(ENTITY, node, limits=FilterLimits(max_depth=4))


def test_a_filter_with_more_nodes_than_the_limit_is_refused_naming_the_limit() -> None:
    node = AnyOf(tuple(Condition("age", "equal", (i,)) for i in range(10)))
    with pytest.raises(InvalidArgument) as caught:
        compile_filter(ENTITY, node, limits=FilterLimits(max_nodes=10))
    assert caught.value.reason == "FILTER_TOO_LARGE"
    assert caught.value.metadata["limit"] == "max_filter_nodes"


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_an_injection_attempt_stays_a_bound_parameter(dialect: sa.Dialect) -> None:
    evil = "x'; DROP TABLE ent_test; --"
    text, params = sql_of(Condition("customer_id", "equal", (evil,)), dialect)
    assert "DROP TABLE" not in text
    assert evil in params.values()


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_every_value_of_an_in_list_is_a_bound_parameter(dialect: sa.Dialect) -> None:
    text, params = sql_of(Condition("customer_id", "in", ("alpha", "beta")), dialect)
    assert "alpha" not in text and "beta" not in text
    assert {"alpha", "beta"} <= set(params.values())


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_contains_escapes_wildcards_in_its_bound_value(dialect: sa.Dialect) -> None:
    text, params = sql_of(Condition("customer_id", "contains", ("50%_off",)), dialect)
    assert "50" not in text
    assert "50/%/_off" in params.values()


def test_negate_is_the_complement_including_unknown_results() -> None:
    text, _ = sql_of(Negate(Condition("age", "equal", (1,))), DIALECTS[1])
    assert "NOT coalesce(" in text


def test_every_operator_of_the_contract_has_a_domain_name() -> None:
    named = {v.number for v in query_pb2.Operator.DESCRIPTOR.values if v.number != query_pb2.OPERATOR_UNSPECIFIED}
    assert set(OPERATOR_NAMES) == named


def test_a_filter_message_converts_to_the_domain_tree() -> None:
    message = query_pb2.Filter(
        all=query_pb2.FilterList(
            filters=[
                query_pb2.Filter(
                    condition=query_pb2.Condition(
                        attribute="age",
                        operator=query_pb2.OPERATOR_BETWEEN,
                        values=[value_pb2.Value(integer_value=1), value_pb2.Value(integer_value=9)],
                    )
                ),
                query_pb2.Filter(negate=query_pb2.Filter()),
            ]
        )
    )
    assert filter_from_proto(message) == AllOf((Condition("age", "between", (1, 9)), Negate(EmptyFilter())))
