"""Links, link conditions, relative dates and parameters through the real AudienceService over gRPC.

Runs on SQLite and PostgreSQL. Covers what only the wire shows: the new proto fields round-trip,
UpdateEntity adds the reverse link, and errors carry the field path of the bad node.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2

from audience_svc.app import build_server
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc, entity_pb2, query_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.server import GrpcServer
from carillon_chassis.values import to_timestamp
from tests.conftest import DatabaseFactory
from tests.integration.test_audience_server import PROD, details, settings_for

Stub = audience_service_pb2_grpc.AudienceServiceStub
REF = dt.datetime(2025, 6, 15, 12, tzinfo=dt.UTC)
STRING = entity_pb2.ATTRIBUTE_TYPE_STRING
INTEGER = entity_pb2.ATTRIBUTE_TYPE_INTEGER


def attribute(name: str, type_: entity_pb2.AttributeType.ValueType) -> entity_pb2.Attribute:
    return entity_pb2.Attribute(name=name, type=type_)


def text(value: str) -> value_pb2.Value:
    return value_pb2.Value(string_value=value)


def integer(value: int) -> value_pb2.Value:
    return value_pb2.Value(integer_value=value)


CUSTOMERS = entity_pb2.Entity(
    attributes=[attribute("id", STRING), attribute("version", INTEGER), attribute("country", STRING)],
    primary_key=["id"],
    version_attribute="version",
)
BOOKINGS = entity_pb2.Entity(
    attributes=[
        attribute("id", STRING),
        attribute("version", INTEGER),
        attribute("customer_id", STRING),
        attribute("booked", entity_pb2.ATTRIBUTE_TYPE_TIMESTAMP),
    ],
    primary_key=["id"],
    version_attribute="version",
    links=[
        entity_pb2.Link(
            name="customer",
            target="entities/customers",
            cardinality=entity_pb2.LINK_CARDINALITY_MANY_TO_ONE,
            join=[entity_pb2.JoinAttributes(attribute="customer_id", target_attribute="id")],
        )
    ],
)
REVERSE = entity_pb2.Link(
    name="bookings",
    target="entities/bookings",
    cardinality=entity_pb2.LINK_CARDINALITY_ONE_TO_MANY,
    join=[entity_pb2.JoinAttributes(attribute="id", target_attribute="customer_id")],
)


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[Stub]:
    server: GrpcServer = await build_server(settings_for(database_factory))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        await stub.CreateEntity(svc.CreateEntityRequest(entity_id="customers", entity=CUSTOMERS), metadata=PROD)
        await stub.CreateEntity(svc.CreateEntityRequest(entity_id="bookings", entity=BOOKINGS), metadata=PROD)
        customers = [("a", "SE"), ("b", "FR"), ("c", "SE")]
        bookings = [("b1", "a", 3), ("b2", "a", 50), ("b3", "b", 1)]

        async def batches() -> AsyncIterator[svc.IngestRecordsRequest]:
            yield svc.IngestRecordsRequest(
                entity="entities/customers",
                changes=[
                    svc.RecordChange(values={"id": text(i), "version": integer(1), "country": text(c)})
                    for i, c in customers
                ],
            )

        async def booking_batches() -> AsyncIterator[svc.IngestRecordsRequest]:
            yield svc.IngestRecordsRequest(
                entity="entities/bookings",
                changes=[
                    svc.RecordChange(
                        values={
                            "id": text(i),
                            "version": integer(1),
                            "customer_id": text(c),
                            "booked": value_pb2.Value(timestamp_value=to_timestamp(REF - dt.timedelta(days=days))),
                        }
                    )
                    for i, c, days in bookings
                ],
            )

        await stub.IngestRecords(batches(), metadata=PROD)
        await stub.IngestRecords(booking_batches(), metadata=PROD)
        yield stub
    await server.stop(0)


async def add_reverse_link(stub: Stub) -> entity_pb2.Entity:
    update = entity_pb2.Entity(name="entities/customers", links=[REVERSE])
    response = await stub.UpdateEntity(
        svc.UpdateEntityRequest(entity=update, update_mask=field_mask_pb2.FieldMask(paths=["links"])), metadata=PROD
    )
    return response.entity


async def test_update_entity_adds_a_link_that_reads_back(stub: Stub) -> None:
    entity = await add_reverse_link(stub)
    assert list(entity.links) == [REVERSE]
    read = await stub.GetEntity(svc.GetEntityRequest(name="entities/customers"), metadata=PROD)
    assert list(read.entity.links) == [REVERSE]
    bookings = await stub.GetEntity(svc.GetEntityRequest(name="entities/bookings"), metadata=PROD)
    assert list(bookings.entity.links) == list(BOOKINGS.links)


async def test_a_link_condition_with_relative_date_and_parameter_evaluates_over_the_wire(stub: Stub) -> None:
    await add_reverse_link(stub)
    recent = query_pb2.Filter(
        condition=query_pb2.Condition(
            attribute="booked", operator=query_pb2.OPERATOR_WITHIN_LAST_DAYS, parameter="days"
        )
    )
    link = query_pb2.Filter(
        link=query_pb2.LinkCondition(link="bookings", measure=query_pb2.LINK_MEASURE_EXISTS, filter=recent)
    )
    request = svc.EvaluateAudienceRequest(
        query=query_pb2.AudienceQuery(dimension="entities/customers", filter=link),
        sample_size=10,
        reference_time=to_timestamp(REF),
        parameters={"days": query_pb2.ParameterValue(values=[integer(5)])},
    )
    response = await stub.EvaluateAudience(request, metadata=PROD)
    assert list(response.sample_keys) == ["a", "b"]
    request.parameters["days"].values[0].integer_value = 2
    response = await stub.EvaluateAudience(request, metadata=PROD)
    assert list(response.sample_keys) == ["b"]


async def test_an_n1_path_filters_over_the_wire(stub: Stub) -> None:
    path = query_pb2.Filter(
        condition=query_pb2.Condition(
            attribute="customer.country", operator=query_pb2.OPERATOR_EQUAL, values=[text("SE")]
        )
    )
    request = svc.EvaluateAudienceRequest(query=query_pb2.AudienceQuery(dimension="entities/bookings", filter=path))
    response = await stub.EvaluateAudience(request, metadata=PROD)
    assert (response.count, list(response.sample_keys)) == (2, ["b1", "b2"])


async def test_the_distribution_of_an_n1_path_over_the_wire(stub: Stub) -> None:
    request = svc.EvaluateAudienceRequest(
        query=query_pb2.AudienceQuery(dimension="entities/bookings"), distribution_attribute="customer.country"
    )
    response = await stub.EvaluateAudience(request, metadata=PROD)
    assert [(v.value.string_value, v.count) for v in response.distribution] == [("SE", 2), ("FR", 1)]


async def test_the_distribution_of_a_1n_path_is_invalid_argument_naming_the_field(stub: Stub) -> None:
    await add_reverse_link(stub)
    request = svc.EvaluateAudienceRequest(
        query=query_pb2.AudienceQuery(dimension="entities/customers"), distribution_attribute="bookings.id"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EvaluateAudience(request, metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == ("ONE_TO_MANY_PATH", "audience.carillon.dev", ["distribution_attribute"])


async def test_a_1n_path_used_as_n1_is_invalid_argument_naming_the_path(stub: Stub) -> None:
    await add_reverse_link(stub)
    bad = query_pb2.Filter(
        all=query_pb2.FilterList(
            filters=[
                query_pb2.Filter(
                    condition=query_pb2.Condition(
                        attribute="bookings.id", operator=query_pb2.OPERATOR_EQUAL, values=[text("b1")]
                    )
                )
            ]
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EvaluateAudience(
            svc.EvaluateAudienceRequest(query=query_pb2.AudienceQuery(dimension="entities/customers", filter=bad)),
            metadata=PROD,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, _, fields = details(caught.value)
    assert reason == "INVALID_FILTER"
    assert fields == ["query.filter.all.filters[0].condition.attribute"]


async def test_removing_a_link_is_an_incompatible_change(stub: Stub) -> None:
    await add_reverse_link(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateEntity(
            svc.UpdateEntityRequest(
                entity=entity_pb2.Entity(name="entities/customers"),
                update_mask=field_mask_pb2.FieldMask(paths=["links"]),
            ),
            metadata=PROD,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[0] == "INCOMPATIBLE_SCHEMA_CHANGE"


async def test_a_link_to_an_unknown_entity_is_invalid_on_its_target(stub: Stub) -> None:
    entity = entity_pb2.Entity()
    entity.CopyFrom(BOOKINGS)
    entity.links[0].target = "entities/nobody"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateEntity(svc.CreateEntityRequest(entity_id="orders", entity=entity), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, _, fields = details(caught.value)
    assert (reason, fields) == ("INVALID_LINK", ["entity.links[0].target"])


async def test_working_sets_combine_and_change_dimension_over_the_wire(stub: Stub) -> None:
    run = "campaigns/c1/runs/r1"

    async def build(activity: str, dimension: str, country: str = "") -> str:
        query = query_pb2.AudienceQuery(dimension=dimension)
        if country:
            query.filter.condition.CopyFrom(
                query_pb2.Condition(attribute="country", operator=query_pb2.OPERATOR_EQUAL, values=[text(country)])
            )
        response = await stub.BuildWorkingSet(
            svc.BuildWorkingSetRequest(run=run, activity=activity, query=query), metadata=PROD
        )
        return response.working_set.name

    swedes = await build("se", "entities/customers", "SE")
    french = await build("fr", "entities/customers", "FR")
    union = await stub.CombineWorkingSets(
        svc.CombineWorkingSetsRequest(
            run=run, activity="both", primary=swedes, others=[french], operation=svc.COMBINE_OPERATION_UNION
        ),
        metadata=PROD,
    )
    assert union.working_set.count == 3
    bookings = await build("bookings", "entities/bookings")
    changed = await stub.ChangeDimension(
        svc.ChangeDimensionRequest(run=run, activity="owners", working_set=bookings, link="customer"), metadata=PROD
    )
    assert (changed.working_set.dimension, changed.working_set.count, changed.unmatched) == (
        "entities/customers",
        2,
        0,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CombineWorkingSets(
            svc.CombineWorkingSetsRequest(run=run, activity="bad", primary=swedes, others=[french]), metadata=PROD
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[2] == ["operation"]


async def test_a_split_over_the_wire_returns_subsets_and_complement(stub: Stub) -> None:
    run = "campaigns/c1/runs/r1"
    built = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(
            run=run, activity="all", query=query_pb2.AudienceQuery(dimension="entities/customers")
        ),
        metadata=PROD,
    )
    swedes = query_pb2.Filter(
        condition=query_pb2.Condition(attribute="country", operator=query_pb2.OPERATOR_EQUAL, values=[text("SE")])
    )
    response = await stub.SplitWorkingSet(
        svc.SplitWorkingSetRequest(
            run=run,
            working_set=built.working_set.name,
            subsets=[
                svc.SplitSubset(
                    activity="one-swede",
                    filter=swedes,
                    limit=1,
                    order_by=[svc.SortKey(attribute="id", descending=True)],
                )
            ],
            complement_activity="others",
        ),
        metadata=PROD,
    )
    assert [w.count for w in response.subsets] == [1]
    assert response.complement.count == 2
    page = await anext(
        aiter(stub.StreamWorkingSet(svc.StreamWorkingSetRequest(working_set=response.subsets[0].name), metadata=PROD))
    )
    assert [row.entity_key for row in page.rows] == ["c"]


async def test_deduplication_over_the_wire_keeps_the_chosen_record(stub: Stub) -> None:
    run = "campaigns/c1/runs/r1"
    built = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(
            run=run, activity="all", query=query_pb2.AudienceQuery(dimension="entities/bookings")
        ),
        metadata=PROD,
    )
    response = await stub.DeduplicateWorkingSet(
        svc.DeduplicateWorkingSetRequest(
            run=run,
            activity="latest",
            working_set=built.working_set.name,
            fields=["customer_id"],
            method=svc.DEDUPLICATION_METHOD_HIGHEST,
            attribute="booked",
            complement_activity="older",
        ),
        metadata=PROD,
    )
    page = await anext(
        aiter(stub.StreamWorkingSet(svc.StreamWorkingSetRequest(working_set=response.working_set.name), metadata=PROD))
    )
    # b1 was booked 3 days before the reference time, b2 50 days before: b1 is a's latest booking.
    assert [row.entity_key for row in page.rows] == ["b1", "b3"]
    assert response.complement.count == 1


async def test_streaming_enrichments_over_the_wire(stub: Stub) -> None:
    await add_reverse_link(stub)
    run = "campaigns/c1/runs/r1"
    built = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(
            run=run, activity="all", query=query_pb2.AudienceQuery(dimension="entities/customers")
        ),
        metadata=PROD,
    )
    recent = query_pb2.Filter(
        condition=query_pb2.Condition(
            attribute="booked", operator=query_pb2.OPERATOR_WITHIN_LAST_DAYS, values=[integer(10)]
        )
    )
    request = svc.StreamWorkingSetRequest(
        working_set=built.working_set.name,
        attributes=["country"],
        enrichments=[
            svc.Enrichment(alias="recent", link="bookings", measure=query_pb2.LINK_MEASURE_COUNT, filter=recent)
        ],
        reference_time=to_timestamp(REF),
    )
    page = await anext(aiter(stub.StreamWorkingSet(request, metadata=PROD)))
    assert [(r.entity_key, r.values["recent"].integer_value) for r in page.rows] == [("a", 1), ("b", 1), ("c", 0)]
