"""The real AudienceService over gRPC, in-process, on SQLite and PostgreSQL.

Checks what only the wire shows: rich error details (ErrorInfo and BadRequest naming the field),
sandboxes from call metadata, client-streamed ingestion, server-streamed working sets, and the
background purge of expired working sets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from audience_svc.app import build_server
from audience_svc.settings import AudienceSettings
from audience_svc.violations import MAX_LISTED_VIOLATIONS
from carillon.audience.v1 import (
    audience_service_pb2 as svc,
)
from carillon.audience.v1 import (
    audience_service_pb2_grpc,
    entity_pb2,
    query_pb2,
)
from carillon.type.v1 import value_pb2
from carillon_chassis.server import GrpcServer
from tests.conftest import DatabaseFactory

Stub = audience_service_pb2_grpc.AudienceServiceStub
PROD = (("x-carillon-sandbox", "prod"),)
STAGING = (("x-carillon-sandbox", "staging"),)
CUSTOMERS = entity_pb2.Entity(
    display_name="Customers",
    attributes=[
        entity_pb2.Attribute(name="customer_id", type=entity_pb2.ATTRIBUTE_TYPE_STRING),
        entity_pb2.Attribute(name="version", type=entity_pb2.ATTRIBUTE_TYPE_INTEGER),
        entity_pb2.Attribute(name="email", type=entity_pb2.ATTRIBUTE_TYPE_STRING),
        entity_pb2.Attribute(name="age", type=entity_pb2.ATTRIBUTE_TYPE_INTEGER, nullable=True),
    ],
    primary_key=["customer_id"],
    version_attribute="version",
    identity=entity_pb2.IdentityBinding(attribute="email", namespace="email"),
)
RUN = "campaigns/spring/runs/r1"


def settings_for(database_factory: DatabaseFactory, **extra: object) -> AudienceSettings:
    url, schema = database_factory.url_and_schema("audience")
    return AudienceSettings(port=0, database_url=url, database_schema=schema, **extra)  # type: ignore[arg-type]


@pytest.fixture
async def server(database_factory: DatabaseFactory) -> AsyncIterator[GrpcServer]:
    server = await build_server(settings_for(database_factory))
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture
async def stub(server: GrpcServer) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield Stub(channel)


def integer(value: int) -> value_pb2.Value:
    return value_pb2.Value(integer_value=value)


def text(value: str) -> value_pb2.Value:
    return value_pb2.Value(string_value=value)


def customer(i: int, version: int = 1, **extra: value_pb2.Value) -> svc.RecordChange:
    values = {"customer_id": text(f"c{i:03d}"), "version": integer(version), "email": text(f"c{i}@example.com")}
    return svc.RecordChange(values={**values, "age": integer(20 + i), **extra})


def batch(changes: Iterable[svc.RecordChange], entity: str = "entities/customers") -> svc.IngestRecordsRequest:
    return svc.IngestRecordsRequest(entity=entity, changes=list(changes))


def condition(attribute: str, operator: query_pb2.Operator.ValueType, *values: value_pb2.Value) -> query_pb2.Filter:
    return query_pb2.Filter(condition=query_pb2.Condition(attribute=attribute, operator=operator, values=values))


def details(error: grpc.aio.AioRpcError) -> tuple[str, str, list[str]]:
    """The ErrorInfo reason and domain and the BadRequest fields of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None
    reason, domain, fields = "", "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = info.reason, info.domain
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, domain, fields


def error_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The ErrorInfo metadata of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details if detail.Is(info.DESCRIPTOR))
    return dict(info.metadata)


async def create_customers(stub: Stub, metadata: tuple[tuple[str, str], ...] = PROD) -> None:
    await stub.CreateEntity(svc.CreateEntityRequest(entity_id="customers", entity=CUSTOMERS), metadata=metadata)


async def ingest(stub: Stub, *batches: svc.IngestRecordsRequest) -> svc.IngestRecordsResponse:
    async def requests() -> AsyncIterator[svc.IngestRecordsRequest]:
        for request in batches:
            yield request

    response: svc.IngestRecordsResponse = await stub.IngestRecords(requests(), metadata=PROD)
    return response


async def count(stub: Stub, filter_: query_pb2.Filter | None = None) -> int:
    query = query_pb2.AudienceQuery(dimension="entities/customers", filter=filter_)
    response = await stub.EvaluateAudience(svc.EvaluateAudienceRequest(query=query), metadata=PROD)
    return int(response.count)


async def test_an_entity_without_a_primary_key_is_invalid_and_writes_nothing(stub: Stub) -> None:
    keyless = entity_pb2.Entity()
    keyless.CopyFrom(CUSTOMERS)
    del keyless.primary_key[:]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateEntity(svc.CreateEntityRequest(entity_id="customers", entity=keyless), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == ("INVALID_ENTITY", "audience.carillon.dev", ["entity.primary_key"])
    listed = await stub.ListEntities(svc.ListEntitiesRequest(), metadata=PROD)
    assert [e.name for e in listed.entities] == ["entities/message_logs"]


async def test_an_unknown_attribute_in_a_filter_is_invalid_and_builds_nothing(stub: Stub) -> None:
    await create_customers(stub)
    await ingest(stub, batch(customer(i) for i in range(3)))
    bad = query_pb2.Filter(
        all=query_pb2.FilterList(
            filters=[
                condition("age", query_pb2.OPERATOR_GREATER, integer(1)),
                condition("agee", query_pb2.OPERATOR_EQUAL, integer(1)),
            ]
        )
    )
    query = query_pb2.AudienceQuery(dimension="entities/customers", filter=bad)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BuildWorkingSet(svc.BuildWorkingSetRequest(run=RUN, activity="target", query=query), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == (
        "INVALID_FILTER",
        "audience.carillon.dev",
        ["query.filter.all.filters[1].condition.attribute"],
    )
    everyone = query_pb2.AudienceQuery(dimension="entities/customers")
    built = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(run=RUN, activity="target", query=everyone), metadata=PROD
    )
    assert built.working_set.count == 3


async def test_a_created_entity_reads_back_with_its_name_and_times(stub: Stub) -> None:
    created = await stub.CreateEntity(svc.CreateEntityRequest(entity_id="customers", entity=CUSTOMERS), metadata=PROD)
    read = await stub.GetEntity(svc.GetEntityRequest(name="entities/customers"), metadata=PROD)
    assert read.entity == created.entity
    assert read.entity.name == "entities/customers"
    assert read.entity.identity.namespace == "email"
    assert read.entity.create_time.seconds > 0


async def test_a_taken_entity_id_is_already_exists(stub: Stub) -> None:
    await create_customers(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_customers(stub)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_entities_belong_to_the_sandbox_of_the_call(stub: Stub) -> None:
    await create_customers(stub, STAGING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetEntity(svc.GetEntityRequest(name="entities/customers"), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(caught.value)[0] == "ENTITY_NOT_FOUND"


async def test_ingestion_totals_cover_every_batch_of_the_stream(stub: Stub) -> None:
    await create_customers(stub)
    response = await ingest(
        stub,
        batch(customer(i) for i in range(5)),
        batch([customer(0, version=2), customer(1, version=1)]),
        batch([svc.RecordChange(operation=svc.CHANGE_OPERATION_DELETE, values=customer(2, version=5).values)]),
    )
    assert (response.batches, response.upserted, response.deleted, response.ignored_stale) == (3, 6, 1, 1)
    assert await count(stub) == 4


async def test_a_bad_batch_names_every_bad_row_and_keeps_earlier_batches(stub: Stub) -> None:
    await create_customers(stub)
    bad_rows = [customer(10, age=text("old")), customer(11), customer(12, agee=integer(1))]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(stub, batch(customer(i) for i in range(2)), batch(bad_rows))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, _, fields = details(caught.value)
    assert reason == "INVALID_RECORDS"
    assert sorted(fields) == ["changes[0].values.age", "changes[2].values.agee"]
    assert error_metadata(caught.value)["batch_index"] == "1"
    assert await count(stub) == 2


async def test_the_bad_rows_of_a_huge_batch_reach_the_client_capped_with_their_total(stub: Stub) -> None:
    await create_customers(stub)
    bad_rows = [customer(i, age=text("old"), agee=integer(1)) for i in range(1000)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(stub, batch(bad_rows))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = details(caught.value)[2]
    assert len(fields) == MAX_LISTED_VIOLATIONS
    assert set(fields[:2]) == {"changes[0].values.age", "changes[0].values.agee"}
    assert error_metadata(caught.value)["violations_total"] == "2000"
    assert await count(stub) == 0


async def test_batches_naming_another_entity_are_invalid_on_entity(stub: Stub) -> None:
    await create_customers(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(stub, batch([customer(1)]), batch([customer(2)], entity="entities/other"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[2] == ["entity"]


async def test_ingesting_into_an_unknown_entity_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(stub, batch([customer(1)]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(caught.value)[2] == ["entity"]


async def test_an_empty_in_list_is_invalid_on_its_values(stub: Stub) -> None:
    await create_customers(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await count(stub, condition("age", query_pb2.OPERATOR_IN))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[2] == ["query.filter.condition.values"]


async def test_evaluation_counts_samples_and_explains(stub: Stub) -> None:
    await create_customers(stub)
    await ingest(stub, batch(customer(i) for i in range(30)))
    query = query_pb2.AudienceQuery(
        dimension="entities/customers", filter=condition("age", query_pb2.OPERATOR_GREATER_OR_EQUAL, integer(40))
    )
    response = await stub.EvaluateAudience(
        svc.EvaluateAudienceRequest(query=query, sample_size=3, explain=True), metadata=PROD
    )
    assert response.count == 10
    assert list(response.sample_keys) == ["c020", "c021", "c022"]
    assert "count(*)" in response.sql
    # the value travels as a bound parameter: the WHERE clause ends in a placeholder, not the literal
    where = response.sql.rsplit("WHERE", 1)[1].strip()
    assert where.split(">=")[1].strip() != "40", where


async def test_a_working_set_streams_in_batches_from_a_position(stub: Stub) -> None:
    await create_customers(stub)
    await ingest(stub, batch(customer(i) for i in range(1, 13)))
    query = query_pb2.AudienceQuery(dimension="entities/customers")
    built = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(run=RUN, activity="target", query=query), metadata=PROD
    )
    again = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(run=RUN, activity="target", query=query), metadata=PROD
    )
    assert again.working_set == built.working_set
    request = svc.StreamWorkingSetRequest(
        working_set=built.working_set.name, after_position=4, batch_size=3, attributes=["age"]
    )
    responses = [r async for r in stub.StreamWorkingSet(request, metadata=PROD)]
    assert [[row.position for row in r.rows] for r in responses] == [[5, 6, 7], [8, 9, 10], [11, 12]]
    first = responses[0].rows[0]
    assert (first.entity_key, first.identity.namespace, first.identity.value) == ("c005", "email", "c5@example.com")
    assert dict(first.values) == {"age": integer(25)}


async def test_streaming_an_unknown_attribute_is_invalid_on_its_index(stub: Stub) -> None:
    await create_customers(stub)
    query = query_pb2.AudienceQuery(dimension="entities/customers")
    built = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(run=RUN, activity="target", query=query), metadata=PROD
    )
    request = svc.StreamWorkingSetRequest(working_set=built.working_set.name, attributes=["age", "agee"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.StreamWorkingSet(request, metadata=PROD)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[2] == ["attributes[1]"]


async def test_the_server_purges_expired_working_sets_in_the_background(database_factory: DatabaseFactory) -> None:
    settings = settings_for(database_factory, working_set_retention_days=1e-9, working_set_purge_interval_s=0.05)
    server = await build_server(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            await create_customers(stub)
            query = query_pb2.AudienceQuery(dimension="entities/customers")
            built = await stub.BuildWorkingSet(
                svc.BuildWorkingSetRequest(run=RUN, activity="target", query=query), metadata=PROD
            )
            code = grpc.StatusCode.OK
            for _ in range(200):
                try:
                    await stub.GetWorkingSet(svc.GetWorkingSetRequest(name=built.working_set.name), metadata=PROD)
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    break
                await asyncio.sleep(0.05)
            assert code == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(0)
