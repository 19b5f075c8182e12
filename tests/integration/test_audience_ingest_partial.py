"""Partial batches (allow_partial) and the bulk merge path, on SQLite and PostgreSQL (where rows go by COPY)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import grpc
import pytest

from audience_svc.app import build_server
from audience_svc.coercion import Malformed
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import apply_changes
from audience_svc.schema import Entity
from audience_svc.tables import MIGRATIONS
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc
from carillon_chassis.database import Database
from tests.conftest import DatabaseFactory
from tests.integration.test_audience_ingest import SCHEMA, delete, stored, upsert
from tests.integration.test_audience_server import PROD, batch, create_customers, customer, settings_for


@pytest.fixture
def database(make_database: Callable[[str], Database]) -> Database:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    return database


@pytest.fixture
def entity(database: Database) -> Entity:
    return EntityCatalog(database).create_entity("prod", "customers", SCHEMA)


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[audience_service_pb2_grpc.AudienceServiceStub]:
    server = await build_server(settings_for(database_factory))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield audience_service_pb2_grpc.AudienceServiceStub(channel)
    await server.stop(0)


def test_allow_partial_applies_the_valid_changes_and_lists_the_rejected(database: Database, entity: Entity) -> None:
    result = apply_changes(
        database,
        entity,
        [upsert("a", 1), upsert("b", 1, age="old"), upsert("c", 1), upsert("d", 1, nope=1)],
        allow_partial=True,
    )
    assert (result.upserted, result.rejected) == (2, 2)
    assert [v.field for v in result.rejections] == ["changes[1].values.age", "changes[3].values.nope"]
    assert set(stored(database, entity)) == {"a", "c"}


def test_a_partial_batch_of_only_bad_changes_writes_nothing(database: Database, entity: Entity) -> None:
    result = apply_changes(database, entity, [upsert("a", 1, age=Malformed("decimal", "bad"))], allow_partial=True)
    assert (result.upserted, result.rejected) == (0, 1)
    assert stored(database, entity) == {}


def test_the_bulk_merge_keeps_every_type_and_the_highest_version(database: Database, entity: Entity) -> None:
    values = {
        "age": 41,
        "balance": Decimal("12.3456789012"),
        "tier": "gold",
        "birthday": dt.date(1984, 2, 29),
        "vip": True,
    }
    apply_changes(database, entity, [upsert(f"k{i}", 2, **values) for i in range(2000)])
    result = apply_changes(
        database,
        entity,
        [upsert("k1", 1, age=1), upsert("k2", 3, age=None), delete("k3", 1), delete("k4", 2), upsert("new", 1)],
    )
    assert (result.upserted, result.deleted, result.ignored_stale) == (2, 1, 2)
    rows = stored(database, entity)
    assert len(rows) == 2000
    assert rows["k1"]["age"] == 41 and rows["k2"]["age"] is None and "k4" not in rows and "k3" in rows
    assert rows["k0"]["balance"] == Decimal("12.3456789012")
    assert rows["k0"]["birthday"] == dt.date(1984, 2, 29) and rows["k0"]["vip"] is True


async def test_allow_partial_over_the_wire_returns_the_rejections(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    await create_customers(stub)
    bad = customer(2)
    bad.values["age"].string_value = "old"

    async def batches() -> AsyncIterator[svc.IngestRecordsRequest]:
        request = batch([customer(1), bad, customer(3)])
        request.allow_partial = True
        yield request
        yield batch([customer(4)])

    response = await stub.IngestRecords(batches(), metadata=PROD)
    assert (response.batches, response.upserted, response.rejected) == (2, 3, 1)
    assert [(r.batch_index, r.field) for r in response.rejections] == [(0, "changes[1].values.age")]
