"""Saved audiences through the real AudienceService over gRPC, on SQLite and PostgreSQL.

Definitions are evaluated when read (with parameters and a reference time bound at execution);
snapshots freeze a working set's members; saving a working set creates or overwrites, never appends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from audience_svc.app import build_server
from carillon.audience.v1 import audience_pb2, audience_service_pb2_grpc, query_pb2
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.type.v1 import value_pb2
from tests.conftest import DatabaseFactory
from tests.integration.test_audience_server import PROD, batch, create_customers, customer, details, settings_for

Stub = audience_service_pb2_grpc.AudienceServiceStub
RUN = "campaigns/spring/runs/r1"


def age(operator: query_pb2.Operator.ValueType, *values: int, parameter: str = "") -> query_pb2.Filter:
    return query_pb2.Filter(
        condition=query_pb2.Condition(
            attribute="age",
            operator=operator,
            values=[value_pb2.Value(integer_value=v) for v in values],
            parameter=parameter,
        )
    )


def customers(filter_: query_pb2.Filter | None = None) -> query_pb2.AudienceQuery:
    query = query_pb2.AudienceQuery(dimension="entities/customers")
    if filter_ is not None:
        query.filter.CopyFrom(filter_)
    return query


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[Stub]:
    server = await build_server(settings_for(database_factory))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        await create_customers(stub)

        async def batches() -> AsyncIterator[svc.IngestRecordsRequest]:
            yield batch([customer(i) for i in range(1, 11)])  # ages 21..30

        await stub.IngestRecords(batches(), metadata=PROD)
        yield stub
    await server.stop(0)


async def evaluate_saved(stub: Stub, name: str, **parameters: int) -> list[str]:
    response = await stub.EvaluateAudience(
        svc.EvaluateAudienceRequest(
            audience=name,
            sample_size=100,
            parameters={
                k: query_pb2.ParameterValue(values=[value_pb2.Value(integer_value=v)]) for k, v in parameters.items()
            },
        ),
        metadata=PROD,
    )
    assert response.count == len(response.sample_keys)
    return list(response.sample_keys)


async def build(stub: Stub, activity: str, filter_: query_pb2.Filter) -> str:
    response = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(run=RUN, activity=activity, query=customers(filter_)), metadata=PROD
    )
    return response.working_set.name


async def test_a_definition_is_evaluated_when_read_with_its_parameters(stub: Stub) -> None:
    query = customers(age(query_pb2.OPERATOR_GREATER_OR_EQUAL, parameter="min_age"))
    created = await stub.CreateAudience(
        svc.CreateAudienceRequest(
            audience_id="grown-ups", audience=audience_pb2.Audience(display_name="Grown-ups", query=query)
        ),
        metadata=PROD,
    )
    assert created.audience.name == "audiences/grown-ups"
    assert created.audience.kind == audience_pb2.AUDIENCE_KIND_DEFINITION
    assert created.audience.query == query
    assert await evaluate_saved(stub, "audiences/grown-ups", min_age=29) == ["c009", "c010"]

    async def more() -> AsyncIterator[svc.IngestRecordsRequest]:
        yield batch([customer(11)])

    await stub.IngestRecords(more(), metadata=PROD)
    assert await evaluate_saved(stub, "audiences/grown-ups", min_age=29) == ["c009", "c010", "c011"]


async def test_a_definition_reads_back_as_it_was_sent(stub: Stub) -> None:
    query = customers(
        query_pb2.Filter(
            any=query_pb2.FilterList(
                filters=[
                    query_pb2.Filter(
                        condition=query_pb2.Condition(
                            attribute="email",
                            operator=query_pb2.OPERATOR_EQUAL,
                            values=[value_pb2.Value(string_value="x")],
                        )
                    ),
                    query_pb2.Filter(negate=age(query_pb2.OPERATOR_BETWEEN, 1, 2)),
                    age(query_pb2.OPERATOR_IN, 3, 4),
                ]
            )
        )
    )
    created = await stub.CreateAudience(
        svc.CreateAudienceRequest(audience_id="mixed", audience=audience_pb2.Audience(query=query)), metadata=PROD
    )
    read = await stub.GetAudience(svc.GetAudienceRequest(name="audiences/mixed"), metadata=PROD)
    assert created.audience.query == query == read.audience.query


async def test_an_audience_id_is_unique_in_its_sandbox(stub: Stub) -> None:
    request = svc.CreateAudienceRequest(audience_id="all", audience=audience_pb2.Audience(query=customers()))
    await stub.CreateAudience(request, metadata=PROD)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateAudience(request, metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_bad_definition_is_invalid_naming_the_field_and_saves_nothing(stub: Stub) -> None:
    bad = customers(
        query_pb2.Filter(condition=query_pb2.Condition(attribute="nope", operator=query_pb2.OPERATOR_IS_NULL))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateAudience(
            svc.CreateAudienceRequest(audience_id="bad", audience=audience_pb2.Audience(query=bad)), metadata=PROD
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[2] == ["audience.query.filter.condition.attribute"]
    listed = await stub.ListAudiences(svc.ListAudiencesRequest(), metadata=PROD)
    assert list(listed.audiences) == []


async def test_saving_a_working_set_creates_then_overwrites_never_appends(stub: Stub) -> None:
    young = await build(stub, "young", age(query_pb2.OPERATOR_LESS, 23))
    old = await build(stub, "old", age(query_pb2.OPERATOR_GREATER, 29))
    first = await stub.SaveAudience(svc.SaveAudienceRequest(audience_id="picked", working_set=young), metadata=PROD)
    assert (first.created, first.audience.kind, first.audience.member_count) == (
        True,
        audience_pb2.AUDIENCE_KIND_SNAPSHOT,
        2,
    )
    assert await evaluate_saved(stub, "audiences/picked") == ["c001", "c002"]
    second = await stub.SaveAudience(svc.SaveAudienceRequest(audience_id="picked", working_set=old), metadata=PROD)
    assert (second.created, second.audience.member_count) == (False, 1)
    assert second.audience.create_time == first.audience.create_time
    assert await evaluate_saved(stub, "audiences/picked") == ["c010"]


async def test_a_working_set_builds_from_a_saved_audience(stub: Stub) -> None:
    young = await build(stub, "young", age(query_pb2.OPERATOR_LESS, 24))
    await stub.SaveAudience(svc.SaveAudienceRequest(audience_id="picked", working_set=young), metadata=PROD)
    built = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(run=RUN, activity="again", audience="audiences/picked"), metadata=PROD
    )
    assert built.working_set.count == 3


async def test_audiences_list_in_pages_and_delete(stub: Stub) -> None:
    for audience_id in ["a1", "a2", "a3"]:
        await stub.CreateAudience(
            svc.CreateAudienceRequest(audience_id=audience_id, audience=audience_pb2.Audience(query=customers())),
            metadata=PROD,
        )
    page = await stub.ListAudiences(svc.ListAudiencesRequest(page_size=2), metadata=PROD)
    rest = await stub.ListAudiences(svc.ListAudiencesRequest(page_token=page.next_page_token), metadata=PROD)
    assert [a.name for a in [*page.audiences, *rest.audiences]] == ["audiences/a1", "audiences/a2", "audiences/a3"]
    await stub.DeleteAudience(svc.DeleteAudienceRequest(name="audiences/a2"), metadata=PROD)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetAudience(svc.GetAudienceRequest(name="audiences/a2"), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_query_and_audience_together_are_invalid(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EvaluateAudience(
            svc.EvaluateAudienceRequest(query=customers(), audience="audiences/x"), metadata=PROD
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
