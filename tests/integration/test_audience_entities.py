"""The entity catalog on a real database (SQLite and PostgreSQL): each entity is a real table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from audience_svc.entities import EntityCatalog
from audience_svc.schema import Attribute, EntitySchema, IdentityBinding
from audience_svc.tables import MIGRATIONS
from carillon_chassis.database import Database
from carillon_chassis.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted

SCHEMA = EntitySchema(
    attributes=(
        Attribute("customer_id", "string"),
        Attribute("version", "integer"),
        Attribute("email", "string"),
        Attribute("age", "integer", nullable=True),
    ),
    primary_key=("customer_id",),
    version_attribute="version",
    identity=IdentityBinding("email", "email"),
    display_name="Customers",
)


@pytest.fixture
def catalog(make_database: Callable[[str], Database]) -> EntityCatalog:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    return EntityCatalog(database, max_entities=3)


def table_names(catalog: EntityCatalog) -> set[str]:
    return {name for name in sa.inspect(catalog.database.engine).get_table_names() if name.startswith("ent_")}


def test_creating_an_entity_creates_its_table_with_its_key(catalog: EntityCatalog) -> None:
    entity = catalog.create_entity("prod", "customers", SCHEMA)
    inspector = sa.inspect(catalog.database.engine)
    assert entity.table_name in inspector.get_table_names()
    assert inspector.get_pk_constraint(entity.table_name)["constrained_columns"] == ["customer_id"]
    assert [c["name"] for c in inspector.get_columns(entity.table_name)] == ["customer_id", "version", "email", "age"]


def test_a_created_entity_reads_back_identically(catalog: EntityCatalog) -> None:
    created = catalog.create_entity("prod", "customers", SCHEMA)
    fresh = EntityCatalog(catalog.database)
    read = fresh.get_entity("prod", "customers")
    assert read.schema == SCHEMA
    assert read.table_name == created.table_name
    assert read.create_time is not None and read.create_time.utcoffset() is not None


def test_an_invalid_schema_writes_nothing(catalog: EntityCatalog) -> None:
    bad = EntitySchema(attributes=SCHEMA.attributes, primary_key=(), version_attribute="version")
    with pytest.raises(InvalidArgument):
        catalog.create_entity("prod", "customers", bad)
    assert table_names(catalog) == set()
    listed, token = catalog.list_entities("prod")
    assert ([e.entity_id for e in listed], token) == (["message_logs"], "")


def test_a_taken_id_is_already_exists_and_adds_no_table(catalog: EntityCatalog) -> None:
    catalog.create_entity("prod", "customers", SCHEMA)
    with pytest.raises(AlreadyExists) as caught:
        catalog.create_entity("prod", "customers", SCHEMA)
    assert caught.value.reason == "ENTITY_ALREADY_EXISTS"
    assert len(table_names(catalog)) == 1


def test_the_same_id_in_another_sandbox_is_another_entity(catalog: EntityCatalog) -> None:
    first = catalog.create_entity("prod", "customers", SCHEMA)
    second = catalog.create_entity("staging", "customers", SCHEMA)
    assert first.table_name != second.table_name


def test_the_entity_limit_is_resource_exhausted_naming_the_limit(catalog: EntityCatalog) -> None:
    for name in ("a", "b", "c"):
        catalog.create_entity("prod", name, SCHEMA)
    with pytest.raises(ResourceExhausted) as caught:
        catalog.create_entity("prod", "d", SCHEMA)
    assert caught.value.metadata["limit"] == "max_entities"
    assert len(table_names(catalog)) == 3


def test_the_entity_limit_counts_per_sandbox(catalog: EntityCatalog) -> None:
    for name in ("a", "b", "c"):
        catalog.create_entity("prod", name, SCHEMA)
    catalog.create_entity("staging", "a", SCHEMA)


def test_an_unknown_entity_is_not_found_naming_the_field(catalog: EntityCatalog) -> None:
    with pytest.raises(NotFound) as caught:
        catalog.get_entity("prod", "nope", field="query.dimension")
    assert [v.field for v in caught.value.violations] == ["query.dimension"]


def test_an_entity_of_another_sandbox_is_not_found(catalog: EntityCatalog) -> None:
    catalog.create_entity("prod", "customers", SCHEMA)
    with pytest.raises(NotFound):
        catalog.get_entity("staging", "customers")


def test_entities_are_listed_in_id_order_one_page_at_a_time(catalog: EntityCatalog) -> None:
    for name in ("c", "a", "b"):
        catalog.create_entity("prod", name, SCHEMA)
    first, token = catalog.list_entities("prod", 2)
    second, last = catalog.list_entities("prod", 2, token)
    assert [e.entity_id for e in first] == ["a", "b"]
    assert [e.entity_id for e in second] == ["c", "message_logs"]
    assert last == ""


def test_a_forged_page_token_is_invalid_argument(catalog: EntityCatalog) -> None:
    with pytest.raises(InvalidArgument) as caught:
        catalog.list_entities("prod", 2, "not-a-token")
    assert [v.field for v in caught.value.violations] == ["page_token"]
