"""Adding attributes to an existing entity, on SQLite and PostgreSQL: the catalog and over gRPC.

A new attribute is appended, nullable; the table gets the column (existing records read NULL) and
ingestion and rules accept it at once. Every other change of the attributes, key, version or
identity is INCOMPATIBLE_SCHEMA_CHANGE naming the field, and changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from audience_svc.app import build_server
from audience_svc.audiences import AudienceEvaluator
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import AudienceQuery, Condition
from audience_svc.schema import ONE_TO_MANY, Attribute, EntitySchema, IdentityBinding, JoinPair, Link
from audience_svc.tables import MIGRATIONS
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc, entity_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument, Unavailable
from tests.conftest import DatabaseFactory
from tests.integration.test_audience_server import PROD, details, settings_for

CUSTOMERS = EntitySchema(
    attributes=(Attribute("id", "string"), Attribute("version", "integer"), Attribute("email", "string")),
    primary_key=("id",),
    version_attribute="version",
    identity=IdentityBinding("email", "email"),
)
TIER = Attribute("tier", "enum", nullable=True, enum_values=("gold", "silver"))
POINTS = Attribute("points", "integer", nullable=True)


@pytest.fixture
def catalog(make_database: Callable[[str], Database]) -> EntityCatalog:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    catalog = EntityCatalog(database)
    customers = catalog.create_entity("prod", "customers", CUSTOMERS)
    apply_changes(
        database,
        customers,
        [RecordChange("upsert", {"id": k, "version": 1, "email": f"{k}@x.io"}) for k in ("a", "b")],
    )
    return catalog


def columns(catalog: EntityCatalog, entity_id: str) -> list[str]:
    table_name = catalog.get_entity("prod", entity_id).table_name
    return [c["name"] for c in sa.inspect(catalog.database.engine).get_columns(table_name)]


def keys(catalog: EntityCatalog, condition: Condition) -> set[str]:
    evaluation = AudienceEvaluator(catalog).evaluate("prod", AudienceQuery("customers", condition), sample=100)
    return set(evaluation.sample_keys)


def test_an_appended_nullable_attribute_adds_a_column(catalog: EntityCatalog) -> None:
    updated = catalog.update_schema("prod", "customers", attributes=(*CUSTOMERS.attributes, TIER, POINTS))
    assert updated.schema.attributes == (*CUSTOMERS.attributes, TIER, POINTS)
    assert columns(catalog, "customers") == ["id", "version", "email", "tier", "points"]


def test_existing_records_read_null_for_a_new_attribute(catalog: EntityCatalog) -> None:
    catalog.update_schema("prod", "customers", attributes=(*CUSTOMERS.attributes, TIER))
    assert keys(catalog, Condition("tier", "is_null")) == {"a", "b"}


def test_ingestion_accepts_a_new_attribute_after_the_change(catalog: EntityCatalog) -> None:
    updated = catalog.update_schema("prod", "customers", attributes=(*CUSTOMERS.attributes, TIER))
    entity = catalog.get_entity("prod", "customers")
    apply_changes(
        catalog.database,
        entity,
        [RecordChange("upsert", {"id": "a", "version": 2, "email": "a@x.io", "tier": "gold"})],
    )
    assert entity.schema == updated.schema
    assert keys(catalog, Condition("tier", "equal", ("gold",))) == {"a"}


def test_another_replica_reads_the_new_attribute(catalog: EntityCatalog) -> None:
    catalog.update_schema("prod", "customers", attributes=(*CUSTOMERS.attributes, TIER))
    fresh = EntityCatalog(catalog.database)
    assert fresh.get_entity("prod", "customers").schema.attributes == (*CUSTOMERS.attributes, TIER)


def test_attributes_and_links_are_added_in_one_change(catalog: EntityCatalog) -> None:
    referrals = Link("referrals", "customers", ONE_TO_MANY, (JoinPair("id", "referrer_id"),))
    referrer = Attribute("referrer_id", "string", nullable=True)
    updated = catalog.update_schema(
        "prod", "customers", attributes=(*CUSTOMERS.attributes, referrer), links=(referrals,)
    )
    assert (updated.schema.attributes[-1], updated.schema.links) == (referrer, (referrals,))
    assert columns(catalog, "customers") == ["id", "version", "email", "referrer_id"]


def test_the_same_attributes_again_change_nothing(catalog: EntityCatalog) -> None:
    before = catalog.get_entity("prod", "customers")
    after = catalog.update_schema("prod", "customers", attributes=CUSTOMERS.attributes)
    assert after.update_time == before.update_time


@pytest.mark.parametrize(
    ("attributes", "fields"),
    [
        ((*CUSTOMERS.attributes, Attribute("points", "integer")), ["entity.attributes[3].nullable"]),
        (CUSTOMERS.attributes[:2], ["entity.attributes[2]"]),
        (
            (CUSTOMERS.attributes[0], CUSTOMERS.attributes[2], CUSTOMERS.attributes[1]),
            ["entity.attributes[1]", "entity.attributes[2]"],
        ),
        ((*CUSTOMERS.attributes[:2], Attribute("email", "string", nullable=True)), ["entity.attributes[2]"]),
        ((*CUSTOMERS.attributes[:2], Attribute("mail", "string"), TIER), ["entity.attributes[2]"]),
    ],
    ids=["not nullable", "removed", "reordered", "changed", "renamed"],
)
def test_an_incompatible_attribute_change_names_the_field_and_changes_nothing(
    catalog: EntityCatalog, attributes: tuple[Attribute, ...], fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        catalog.update_schema("prod", "customers", attributes=attributes)
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == ("INCOMPATIBLE_SCHEMA_CHANGE", fields)
    assert catalog.get_entity("prod", "customers").schema == CUSTOMERS
    assert columns(catalog, "customers") == ["id", "version", "email"]


def test_an_invalid_new_attribute_is_invalid_entity_naming_it(catalog: EntityCatalog) -> None:
    with pytest.raises(InvalidArgument) as caught:
        catalog.update_schema(
            "prod", "customers", attributes=(*CUSTOMERS.attributes, Attribute("email", "string", nullable=True))
        )
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == (
        "INVALID_ENTITY",
        ["entity.attributes[3].name"],
    )
    assert columns(catalog, "customers") == ["id", "version", "email"]


# Over gRPC.

Stub = audience_service_pb2_grpc.AudienceServiceStub
WIRE_CUSTOMERS = entity_pb2.Entity(
    attributes=[
        entity_pb2.Attribute(name="id", type=entity_pb2.ATTRIBUTE_TYPE_STRING),
        entity_pb2.Attribute(name="version", type=entity_pb2.ATTRIBUTE_TYPE_INTEGER),
    ],
    primary_key=["id"],
    version_attribute="version",
)
WIRE_TIER = entity_pb2.Attribute(
    name="tier", type=entity_pb2.ATTRIBUTE_TYPE_ENUM, nullable=True, enum_values=["gold", "silver"]
)


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[Stub]:
    server = await build_server(settings_for(database_factory))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        await stub.CreateEntity(svc.CreateEntityRequest(entity_id="customers", entity=WIRE_CUSTOMERS), metadata=PROD)
        yield stub
    await server.stop(0)


def update(entity: entity_pb2.Entity, *paths: str) -> svc.UpdateEntityRequest:
    return svc.UpdateEntityRequest(entity=entity, update_mask=field_mask_pb2.FieldMask(paths=list(paths)))


async def test_update_entity_appends_an_attribute_that_ingestion_accepts(stub: Stub) -> None:
    read = await stub.GetEntity(svc.GetEntityRequest(name="entities/customers"), metadata=PROD)
    entity = read.entity
    entity.attributes.append(WIRE_TIER)
    updated = await stub.UpdateEntity(update(entity, "attributes"), metadata=PROD)
    assert [a.name for a in updated.entity.attributes] == ["id", "version", "tier"]

    async def batches() -> AsyncIterator[svc.IngestRecordsRequest]:
        yield svc.IngestRecordsRequest(
            entity="entities/customers",
            changes=[
                svc.RecordChange(
                    values={
                        "id": value_pb2.Value(string_value="a"),
                        "version": value_pb2.Value(integer_value=1),
                        "tier": value_pb2.Value(string_value="gold"),
                    }
                )
            ],
        )

    ingested = await stub.IngestRecords(batches(), metadata=PROD)
    assert ingested.upserted == 1
    evaluated = await stub.EvaluateAudience(
        svc.EvaluateAudienceRequest(query={"dimension": "entities/customers"}, distribution_attribute="tier"),
        metadata=PROD,
    )
    assert [(v.value.string_value, v.count) for v in evaluated.distribution] == [("gold", 1)]


async def test_update_entity_refuses_a_non_nullable_new_attribute(stub: Stub) -> None:
    entity = entity_pb2.Entity(name="entities/customers", attributes=WIRE_CUSTOMERS.attributes)
    entity.attributes.append(entity_pb2.Attribute(name="points", type=entity_pb2.ATTRIBUTE_TYPE_INTEGER))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateEntity(update(entity, "attributes"), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == (
        "INCOMPATIBLE_SCHEMA_CHANGE",
        "audience.carillon.dev",
        ["entity.attributes[2].nullable"],
    )


@pytest.mark.parametrize("path", ["primary_key", "version_attribute", "identity"])
async def test_update_entity_refuses_to_change_key_version_or_identity(stub: Stub, path: str) -> None:
    entity = entity_pb2.Entity(name="entities/customers")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateEntity(update(entity, "attributes", path), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == ("INCOMPATIBLE_SCHEMA_CHANGE", "audience.carillon.dev", [f"entity.{path}"])


@pytest.mark.parametrize("paths", [(), ("display_name",), ("attributes", "nope")])
async def test_update_entity_refuses_an_unsupported_update_mask(stub: Stub, paths: tuple[str, ...]) -> None:
    entity = entity_pb2.Entity(name="entities/customers")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateEntity(update(entity, *paths), metadata=PROD)
    assert details(caught.value) == ("UNSUPPORTED_UPDATE_MASK", "audience.carillon.dev", ["update_mask"])


@contextlib.contextmanager
def conflicting_lock(database: Database, table_name: str) -> Iterator[None]:
    """Hold, from another connection, a lock an ALTER TABLE of ``table_name`` must wait for.

    PostgreSQL: a reader's ACCESS SHARE lock (an open transaction that read the table); SQLite: the
    write lock (readers never block a writer there).
    """
    with database.engine.connect() as conn:
        if database.is_postgres:
            conn.execute(sa.text(f'SELECT count(*) FROM "{table_name}"'))
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield
        conn.rollback()


def test_an_attribute_change_waiting_for_a_table_in_use_is_unavailable_and_changes_nothing(
    catalog: EntityCatalog,
) -> None:
    impatient = EntityCatalog(catalog.database, lock_timeout_s=0.2)
    table_name = catalog.get_entity("prod", "customers").table_name
    with conflicting_lock(catalog.database, table_name), pytest.raises(Unavailable) as caught:
        impatient.update_schema("prod", "customers", attributes=(*CUSTOMERS.attributes, TIER))
    assert (caught.value.reason, caught.value.metadata) == (
        "SCHEMA_LOCK_TIMEOUT",
        {"limit": "schema_lock_timeout_s", "value": "0.2"},
    )
    assert columns(catalog, "customers") == ["id", "version", "email"]
    assert EntityCatalog(catalog.database).get_entity("prod", "customers").schema == CUSTOMERS


def test_an_attribute_change_retried_once_the_table_is_free_succeeds(catalog: EntityCatalog) -> None:
    impatient = EntityCatalog(catalog.database, lock_timeout_s=0.2)
    table_name = catalog.get_entity("prod", "customers").table_name
    with conflicting_lock(catalog.database, table_name), pytest.raises(Unavailable):
        impatient.update_schema("prod", "customers", attributes=(*CUSTOMERS.attributes, TIER))
    impatient.update_schema("prod", "customers", attributes=(*CUSTOMERS.attributes, TIER))
    assert columns(catalog, "customers") == ["id", "version", "email", "tier"]
