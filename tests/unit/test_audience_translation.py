"""Translation between the contract and the domain, the violation cap and the settings."""

from __future__ import annotations

import pytest

from audience_svc.schema import Attribute, Entity, EntitySchema, IdentityBinding
from audience_svc.servicer import ATTRIBUTE_TYPE_NAMES, entity_to_proto, query_from_proto, schema_from_proto
from audience_svc.settings import AudienceSettings
from audience_svc.violations import MAX_LISTED_VIOLATIONS, invalid_argument
from carillon.audience.v1 import entity_pb2, query_pb2
from carillon_chassis.errors import FieldViolation, InvalidArgument

SCHEMA = EntitySchema(
    attributes=(
        Attribute("id", "string"),
        Attribute("version", "timestamp"),
        Attribute("tier", "enum", nullable=True, enum_values=("gold", "silver")),
    ),
    primary_key=("id",),
    version_attribute="version",
    identity=IdentityBinding("id", "crm_id"),
    display_name="Members",
)


def test_every_attribute_type_of_the_contract_has_a_domain_name() -> None:
    named = {v.number for v in entity_pb2.AttributeType.DESCRIPTOR.values if v.number}
    assert set(ATTRIBUTE_TYPE_NAMES) == named


def test_an_entity_message_round_trips_through_the_domain_schema() -> None:
    message = entity_to_proto(Entity(sandbox="prod", entity_id="members", schema=SCHEMA, table_name="ent_x"))
    assert message.name == "entities/members"
    assert schema_from_proto(message) == SCHEMA


def test_an_unset_identity_binding_is_no_binding() -> None:
    message = entity_to_proto(Entity("prod", "members", SCHEMA, "ent_x"))
    message.ClearField("identity")
    assert schema_from_proto(message).identity is None


def test_an_unset_attribute_type_becomes_an_empty_type_for_validation_to_name() -> None:
    message = entity_pb2.Entity(attributes=[entity_pb2.Attribute(name="id")])
    assert schema_from_proto(message).attributes[0].type == ""


@pytest.mark.parametrize("dimension", ["", "customers", "entities/", "entities/a/b", "tables/customers"])
def test_a_malformed_dimension_is_invalid_on_query_dimension(dimension: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        query_from_proto(query_pb2.AudienceQuery(dimension=dimension))
    assert [v.field for v in caught.value.violations] == ["query.dimension"]


def test_a_query_without_filter_has_no_filter() -> None:
    query = query_from_proto(query_pb2.AudienceQuery(dimension="entities/customers"))
    assert (query.dimension, query.filter) == ("customers", None)


def test_a_long_violation_list_is_cut_and_keeps_its_total() -> None:
    violations = [FieldViolation(f"changes[{i}].values.age", "bad") for i in range(MAX_LISTED_VIOLATIONS + 7)]
    error = invalid_argument("bad batch", violations, "INVALID_RECORDS")
    assert error.violations == violations[:MAX_LISTED_VIOLATIONS]
    assert error.metadata["violations_total"] == str(MAX_LISTED_VIOLATIONS + 7)


def test_a_short_violation_list_is_kept_whole() -> None:
    violations = [FieldViolation("entity.primary_key", "missing")]
    assert invalid_argument("bad", violations, "INVALID_ENTITY").violations == violations


def test_settings_have_the_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "MAX_ENTITIES", "WORKING_SET_RETENTION_DAYS", "MAX_FILTER_DEPTH", "MAX_FILTER_NODES"):
        monkeypatch.delenv(f"CARILLON_AUDIENCE_{name}", raising=False)
    settings = AudienceSettings()
    assert (settings.service_name, settings.port, settings.max_entities) == ("audience", 50051, 200)
    assert settings.working_set_retention_days == 5
    assert (settings.max_filter_depth, settings.max_filter_nodes) == (32, 1000)


def test_settings_read_the_audience_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARILLON_AUDIENCE_MAX_ENTITIES", "7")
    monkeypatch.setenv("CARILLON_AUDIENCE_WORKING_SET_RETENTION_DAYS", "0.5")
    settings = AudienceSettings()
    assert (settings.max_entities, settings.working_set_retention_days) == (7, 0.5)


def test_every_operator_and_measure_of_the_contract_has_a_domain_name() -> None:
    from audience_svc.servicer import MEASURE_NAMES, OPERATOR_NAMES

    assert set(OPERATOR_NAMES) == {v.number for v in query_pb2.Operator.DESCRIPTOR.values if v.number}
    assert set(MEASURE_NAMES) == {v.number for v in query_pb2.LinkMeasure.DESCRIPTOR.values if v.number}


def test_links_round_trip_through_the_domain_schema() -> None:
    from audience_svc.schema import MANY_TO_ONE, ONE_TO_MANY, JoinPair, Link

    schema = EntitySchema(
        attributes=SCHEMA.attributes,
        primary_key=SCHEMA.primary_key,
        version_attribute=SCHEMA.version_attribute,
        identity=SCHEMA.identity,
        display_name=SCHEMA.display_name,
        links=(
            Link("club", "clubs", MANY_TO_ONE, (JoinPair("tier", "id"),)),
            Link("visits", "visits", ONE_TO_MANY, (JoinPair("id", "member_id"), JoinPair("tier", "tier"))),
        ),
    )
    message = entity_to_proto(Entity("prod", "members", schema, "ent_x"))
    assert [link.target for link in message.links] == ["entities/clubs", "entities/visits"]
    assert schema_from_proto(message) == schema


def test_a_link_filter_round_trips_through_the_domain_tree() -> None:
    from audience_svc.servicer import filter_from_proto, filter_to_proto
    from carillon.type.v1 import value_pb2

    message = query_pb2.Filter(
        link=query_pb2.LinkCondition(
            link="customer.bookings",
            measure=query_pb2.LINK_MEASURE_AVG,
            attribute="nights",
            operator=query_pb2.OPERATOR_BETWEEN,
            values=[value_pb2.Value(integer_value=1), value_pb2.Value(decimal_value="2.5")],
            filter=query_pb2.Filter(
                negate=query_pb2.Filter(
                    condition=query_pb2.Condition(
                        attribute="booked", operator=query_pb2.OPERATOR_WITHIN_LAST_DAYS, parameter="days"
                    )
                )
            ),
        )
    )
    assert filter_to_proto(filter_from_proto(message)) == message
