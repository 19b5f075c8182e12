"""Entity schema validation: every problem is an INVALID_ARGUMENT naming the field that holds it."""

from __future__ import annotations

import dataclasses

import pytest

from audience_svc.schema import (
    Attribute,
    EntitySchema,
    IdentityBinding,
    definition_from_json,
    definition_to_json,
    entity_table,
    validate_schema,
)
from carillon_chassis.errors import InvalidArgument

VALID = EntitySchema(
    attributes=(
        Attribute("customer_id", "string"),
        Attribute("version", "integer"),
        Attribute("email", "string"),
        Attribute("tier", "enum", nullable=True, enum_values=("gold", "silver")),
        Attribute("first_name", "string", nullable=True),
    ),
    primary_key=("customer_id",),
    version_attribute="version",
    identity=IdentityBinding("email", "email"),
)


def fields_of(entity_id: str, schema: EntitySchema) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_schema(entity_id, schema)
    assert caught.value.reason == "INVALID_ENTITY"
    return [v.field for v in caught.value.violations]


def with_attribute(index: int, **changes: object) -> EntitySchema:
    attributes = list(VALID.attributes)
    attributes[index] = dataclasses.replace(attributes[index], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(VALID, attributes=tuple(attributes))


def test_a_valid_schema_passes() -> None:
    validate_schema("customers", VALID)


@pytest.mark.parametrize("entity_id", ["", "Customers", "1st", "has-dash", "a" * 42])
def test_a_bad_entity_id_names_entity_id(entity_id: str) -> None:
    assert fields_of(entity_id, VALID) == ["entity_id"]


def test_an_entity_without_attributes_names_the_attribute_list() -> None:
    schema = dataclasses.replace(VALID, attributes=(), primary_key=(), version_attribute="")
    assert "entity.attributes" in fields_of("customers", schema)


@pytest.mark.parametrize("name", ["", "Email", "2nd", "e-mail", "a" * 64])
def test_a_bad_attribute_name_names_that_attribute(name: str) -> None:
    assert fields_of("customers", with_attribute(4, name=name)) == ["entity.attributes[4].name"]


def test_a_duplicate_attribute_name_names_the_second_one() -> None:
    assert fields_of("customers", with_attribute(4, name="version")) == ["entity.attributes[4].name"]


def test_an_unset_attribute_type_names_that_type() -> None:
    assert fields_of("customers", with_attribute(4, type="")) == ["entity.attributes[4].type"]


def test_an_enum_without_values_names_its_enum_values() -> None:
    assert fields_of("customers", with_attribute(3, enum_values=())) == ["entity.attributes[3].enum_values"]


def test_duplicate_enum_values_name_the_enum_values() -> None:
    schema = with_attribute(3, enum_values=("gold", "gold"))
    assert fields_of("customers", schema) == ["entity.attributes[3].enum_values"]


def test_enum_values_on_a_non_enum_attribute_name_its_enum_values() -> None:
    assert fields_of("customers", with_attribute(4, enum_values=("x",))) == ["entity.attributes[4].enum_values"]


def test_a_missing_primary_key_names_the_primary_key() -> None:
    assert fields_of("customers", dataclasses.replace(VALID, primary_key=())) == ["entity.primary_key"]


def test_an_unknown_key_attribute_names_its_position_in_the_key() -> None:
    schema = dataclasses.replace(VALID, primary_key=("customer_id", "nope"))
    assert fields_of("customers", schema) == ["entity.primary_key[1]"]


def test_a_nullable_key_attribute_names_its_position_in_the_key() -> None:
    schema = dataclasses.replace(VALID, primary_key=("tier",))
    assert fields_of("customers", schema) == ["entity.primary_key[0]"]


def test_a_key_attribute_listed_twice_names_the_repetition() -> None:
    schema = dataclasses.replace(VALID, primary_key=("customer_id", "customer_id"))
    assert fields_of("customers", schema) == ["entity.primary_key[1]"]


@pytest.mark.parametrize("version", ["", "nope", "email", "tier", "customer_id"])
def test_a_bad_version_attribute_names_the_version_attribute(version: str) -> None:
    schema = dataclasses.replace(VALID, version_attribute=version)
    assert fields_of("customers", schema) == ["entity.version_attribute"]


def test_a_nullable_version_attribute_names_the_version_attribute() -> None:
    assert fields_of("customers", with_attribute(1, nullable=True)) == ["entity.version_attribute"]


def test_a_timestamp_version_attribute_is_accepted() -> None:
    validate_schema("customers", with_attribute(1, type="timestamp"))


def test_an_unknown_identity_attribute_names_the_identity_attribute() -> None:
    schema = dataclasses.replace(VALID, identity=IdentityBinding("phone", "phone"))
    assert fields_of("customers", schema) == ["entity.identity.attribute"]


def test_a_nullable_identity_attribute_names_the_identity_attribute() -> None:
    schema = dataclasses.replace(VALID, identity=IdentityBinding("tier", "crm"))
    assert fields_of("customers", schema) == ["entity.identity.attribute"]


def test_an_empty_identity_namespace_names_the_namespace() -> None:
    schema = dataclasses.replace(VALID, identity=IdentityBinding("email", " "))
    assert fields_of("customers", schema) == ["entity.identity.namespace"]


def test_every_violation_of_a_schema_is_listed_together() -> None:
    schema = EntitySchema(
        attributes=(Attribute("Bad", "string"), Attribute("ok", "")),
        primary_key=(),
        version_attribute="missing",
    )
    assert fields_of("Bad Id", schema) == [
        "entity_id",
        "entity.attributes[0].name",
        "entity.attributes[1].type",
        "entity.primary_key",
        "entity.version_attribute",
    ]


def test_the_catalog_json_form_round_trips() -> None:
    assert definition_from_json(definition_to_json(VALID)) == VALID


def test_the_entity_table_has_the_declared_key_in_key_order() -> None:
    schema = EntitySchema(
        attributes=(Attribute("b", "integer"), Attribute("a", "string"), Attribute("version", "integer")),
        primary_key=("a", "b"),
        version_attribute="version",
    )
    table = entity_table("ent_x", schema)
    assert [c.name for c in table.primary_key.columns] == ["a", "b"]
    assert all(c.autoincrement is False for c in table.columns)


def test_a_version_attribute_in_the_primary_key_names_the_version_attribute() -> None:
    schema = dataclasses.replace(VALID, primary_key=("customer_id", "version"))
    assert fields_of("customers", schema) == ["entity.version_attribute"]
