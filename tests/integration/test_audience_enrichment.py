"""Collection enrichment of streamed working sets (first N linked records by a sort), on SQLite and PostgreSQL.

Customers stream with their bookings (a one-to-many link) as lists of records: exact contents and
order, the limit, a nested filter, chosen attributes, batch boundaries, the checks, and the wire
form (a list_value of struct_values) over the real gRPC server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from audience_svc.app import build_server
from audience_svc.collection_enrichment import MAX_COLLECTIONS, Collection
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import AudienceQuery, Condition
from audience_svc.schema import MANY_TO_ONE, ONE_TO_MANY, Attribute, EntitySchema, JoinPair, Link
from audience_svc.settings import AudienceSettings
from audience_svc.tables import MIGRATIONS
from audience_svc.working_sets import WorkingSetStore
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc, entity_pb2, query_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument
from carillon_chassis.server import GrpcServer
from carillon_chassis.values import PyValue, from_value_map
from tests.conftest import DatabaseFactory

RUN = "campaigns/c1/runs/r1"
CUSTOMERS = EntitySchema(
    attributes=(Attribute("id", "string"), Attribute("version", "integer")),
    primary_key=("id",),
    version_attribute="version",
)
BOOKINGS = EntitySchema(
    attributes=(
        Attribute("id", "string"),
        Attribute("version", "integer"),
        Attribute("customer_id", "string"),
        Attribute("hotel", "string"),
        Attribute("nights", "integer", nullable=True),
        Attribute("arrival", "date"),
    ),
    primary_key=("id",),
    version_attribute="version",
    links=(Link("customer", "customers", MANY_TO_ONE, (JoinPair("customer_id", "id"),)),),
)
# Booking → (customer, hotel, nights, arrival day in March); customer "c" has none.
BOOKED = {
    "b1": ("a", "Ritz", 2, 5),
    "b2": ("a", "Savoy", 5, 1),
    "b3": ("a", "Adlon", None, 9),
    "b4": ("a", "Plaza", 5, 3),
    "b5": ("b", "Hilton", 1, 2),
}


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> WorkingSetStore:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    catalog = EntityCatalog(database)
    customers = catalog.create_entity("prod", "customers", CUSTOMERS)
    bookings = catalog.create_entity("prod", "bookings", BOOKINGS)
    catalog.add_links(
        "prod", "customers", (Link("bookings", "bookings", ONE_TO_MANY, (JoinPair("id", "customer_id"),)),)
    )
    apply_changes(database, customers, [RecordChange("upsert", {"id": k, "version": 1}) for k in "abc"])
    apply_changes(
        database,
        bookings,
        [
            RecordChange(
                "upsert",
                {"id": k, "version": 1, "customer_id": c, "hotel": h, "nights": n, "arrival": dt.date(2026, 3, d)},
            )
            for k, (c, h, n, d) in BOOKED.items()
        ],
    )
    return WorkingSetStore(catalog)


def streamed(store: WorkingSetStore, collection: Collection, batch: int = 1000) -> dict[str, list[dict[str, PyValue]]]:
    working_set = store.build("prod", RUN, "all", AudienceQuery("customers"))
    plan = store.open_stream("prod", working_set.working_set_id, [], collections=(collection,))
    result: dict[str, list[dict[str, PyValue]]] = {}
    after = 0
    while records := store.read_batch(plan, after, batch):
        result.update({r.entity_key: r.collections[collection.alias] for r in records})
        after = records[-1].position
    return result


def test_each_row_gets_its_first_linked_records_by_the_sort(store: WorkingSetStore) -> None:
    collection = Collection("longest", "bookings", 3, (("nights", True),), ("hotel", "nights"))
    assert streamed(store, collection) == {
        # Savoy (b2) and Plaza (b4) tie on nights: key order decides.
        "a": [{"hotel": "Savoy", "nights": 5}, {"hotel": "Plaza", "nights": 5}, {"hotel": "Ritz", "nights": 2}],
        "b": [{"hotel": "Hilton", "nights": 1}],
        "c": [],
    }


def test_nulls_sort_last_and_the_collection_may_hold_every_attribute(store: WorkingSetStore) -> None:
    collection = Collection("shortest", "bookings", 100, (("nights", False),), ())
    result = streamed(store, collection)
    assert [r["id"] for r in result["a"]] == ["b1", "b2", "b4", "b3"]
    assert result["b"] == [
        {
            "id": "b5",
            "version": 1,
            "customer_id": "b",
            "hotel": "Hilton",
            "nights": 1,
            "arrival": dt.date(2026, 3, 2),
        }
    ]


def test_the_nested_filter_selects_the_linked_records(store: WorkingSetStore) -> None:
    collection = Collection(
        "next",
        "bookings",
        2,
        (("arrival", False),),
        ("hotel",),
        Condition("arrival", "greater", (dt.date(2026, 3, 2),)),
    )
    assert streamed(store, collection) == {"a": [{"hotel": "Plaza"}, {"hotel": "Ritz"}], "b": [], "c": []}


def test_collections_are_the_same_whatever_the_batch_size(store: WorkingSetStore) -> None:
    collection = Collection("longest", "bookings", 2, (("nights", True),), ("id",))
    expected = {"a": [{"id": "b2"}, {"id": "b4"}], "b": [{"id": "b5"}], "c": []}
    assert [streamed(store, collection, batch=n) for n in (1, 2, 3, 1000)] == [expected] * 4


def test_more_collections_than_the_limit_are_refused(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "all", AudienceQuery("customers"))
    many = tuple(Collection(f"c{i}", "bookings", 1) for i in range(MAX_COLLECTIONS + 1))
    with pytest.raises(InvalidArgument) as caught:
        store.open_stream("prod", working_set.working_set_id, [], collections=many)
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == ("INVALID_ENRICHMENT", ["collections"])


def test_the_limit_of_collections_may_be_reached(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "all", AudienceQuery("customers"))
    most = tuple(Collection(f"c{i}", "bookings", 1, (("nights", True),), ("id",)) for i in range(MAX_COLLECTIONS))
    plan = store.open_stream("prod", working_set.working_set_id, [], collections=most)
    first = store.read_batch(plan, 0, 1)[0]
    assert first.collections == {f"c{i}": [{"id": "b2"}] for i in range(MAX_COLLECTIONS)}


@pytest.mark.parametrize(
    ("collection", "fields"),
    [
        (Collection("x", "bookings", 0), ["collections[0].limit"]),
        (Collection("x", "bookings", 101), ["collections[0].limit"]),
        (Collection("x", "orders", 1), ["collections[0].link"]),
        (
            Collection("x", "bookings", 1, (("stars", True),), ("hotel", "spa")),
            ["collections[0].order_by[0].attribute", "collections[0].attributes[1]"],
        ),
    ],
)
def test_a_bad_collection_is_refused_naming_each_field(
    store: WorkingSetStore, collection: Collection, fields: list[str]
) -> None:
    working_set = store.build("prod", RUN, "all", AudienceQuery("customers"))
    with pytest.raises(InvalidArgument) as caught:
        store.open_stream("prod", working_set.working_set_id, [], collections=(collection,))
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == ("INVALID_ENRICHMENT", fields)


def test_a_many_to_one_link_is_not_a_collection(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "b", AudienceQuery("bookings"))
    with pytest.raises(InvalidArgument) as caught:
        store.open_stream("prod", working_set.working_set_id, [], collections=(Collection("x", "customer", 1),))
    assert [v.field for v in caught.value.violations] == ["collections[0].link"]


def test_a_collection_alias_must_differ_from_the_attributes(store: WorkingSetStore) -> None:
    working_set = store.build("prod", RUN, "all", AudienceQuery("customers"))
    with pytest.raises(InvalidArgument) as caught:
        store.open_stream("prod", working_set.working_set_id, ["id"], collections=(Collection("id", "bookings", 1),))
    assert [v.field for v in caught.value.violations] == ["collections[0].alias"]


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[audience_service_pb2_grpc.AudienceServiceStub]:
    url, schema = database_factory.url_and_schema("audience")
    server: GrpcServer = await build_server(AudienceSettings(port=0, database_url=url, database_schema=schema))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield audience_service_pb2_grpc.AudienceServiceStub(channel)
    await server.stop(0)


async def create(stub: audience_service_pb2_grpc.AudienceServiceStub) -> svc.BuildWorkingSetResponse:
    def attribute(name: str, kind: entity_pb2.AttributeType.ValueType) -> entity_pb2.Attribute:
        return entity_pb2.Attribute(name=name, type=kind)

    string, integer = entity_pb2.ATTRIBUTE_TYPE_STRING, entity_pb2.ATTRIBUTE_TYPE_INTEGER
    await stub.CreateEntity(
        svc.CreateEntityRequest(
            entity_id="customers",
            entity=entity_pb2.Entity(
                attributes=[attribute("id", string), attribute("version", integer)],
                primary_key=["id"],
                version_attribute="version",
            ),
        )
    )
    await stub.CreateEntity(
        svc.CreateEntityRequest(
            entity_id="bookings",
            entity=entity_pb2.Entity(
                attributes=[
                    attribute("id", string),
                    attribute("version", integer),
                    attribute("customer_id", string),
                    attribute("nights", integer),
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
            ),
        )
    )
    customers = await stub.GetEntity(svc.GetEntityRequest(name="entities/customers"))
    customers.entity.links.append(
        entity_pb2.Link(
            name="bookings",
            target="entities/bookings",
            cardinality=entity_pb2.LINK_CARDINALITY_ONE_TO_MANY,
            join=[entity_pb2.JoinAttributes(attribute="id", target_attribute="customer_id")],
        )
    )
    await stub.UpdateEntity(svc.UpdateEntityRequest(entity=customers.entity, update_mask={"paths": ["links"]}))

    def text(value: str) -> value_pb2.Value:
        return value_pb2.Value(string_value=value)

    def number(value: int) -> value_pb2.Value:
        return value_pb2.Value(integer_value=value)

    await stub.IngestRecords(
        iter(
            [
                svc.IngestRecordsRequest(
                    entity="entities/customers",
                    changes=[svc.RecordChange(values={"id": text(k), "version": number(1)}) for k in "ab"],
                )
            ]
        )
    )
    bookings = [("b1", "a", 2), ("b2", "a", 4)]
    await stub.IngestRecords(
        iter(
            [
                svc.IngestRecordsRequest(
                    entity="entities/bookings",
                    changes=[
                        svc.RecordChange(
                            values={"id": text(k), "version": number(1), "customer_id": text(c), "nights": number(n)}
                        )
                        for k, c, n in bookings
                    ],
                )
            ]
        )
    )
    return await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(
            run=RUN, activity="all", query=query_pb2.AudienceQuery(dimension="entities/customers")
        )
    )


async def test_a_collection_streams_as_a_list_of_records_over_grpc(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    built = await create(stub)
    request = svc.StreamWorkingSetRequest(
        working_set=built.working_set.name,
        collections=[
            svc.CollectionEnrichment(
                alias="stays",
                link="bookings",
                limit=5,
                order_by=[svc.SortKey(attribute="nights", descending=True)],
                attributes=["id", "nights"],
            )
        ],
    )
    rows = [row async for response in stub.StreamWorkingSet(request) for row in response.rows]
    assert [(row.entity_key, row.values["stays"].WhichOneof("kind")) for row in rows] == [
        ("a", "list_value"),
        ("b", "list_value"),
    ]
    assert [from_value_map(row.values) for row in rows] == [
        {"stays": [{"id": "b2", "nights": 4}, {"id": "b1", "nights": 2}]},
        {"stays": []},
    ]


async def test_a_bad_collection_is_invalid_over_grpc(stub: audience_service_pb2_grpc.AudienceServiceStub) -> None:
    built = await create(stub)
    request = svc.StreamWorkingSetRequest(
        working_set=built.working_set.name,
        collections=[svc.CollectionEnrichment(alias="stays", link="bookings", limit=500)],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [response async for response in stub.StreamWorkingSet(request)]
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert [d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR)] == [True]
    assert (caught.value.code(), [v.field for v in bad.field_violations]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["collections[0].limit"],
    )


def test_a_batch_reads_its_rows_and_collections_from_one_snapshot(store: WorkingSetStore) -> None:
    collection = Collection("all", "bookings", 100, (("hotel", False),), ("hotel",))
    working_set = store.build("prod", RUN, "all", AudienceQuery("customers"))
    plan = store.open_stream("prod", working_set.working_set_id, [], collections=(collection,))
    bookings = store.catalog.get_entity("prod", "bookings")
    late = {"id": "b6", "version": 1, "customer_id": "c", "hotel": "Negresco", "nights": 3}
    late["arrival"] = dt.date(2026, 3, 4)
    written: list[str] = []

    def write_after_the_rows(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        # Between the batch's row statement and its collection statement, another connection commits
        # a booking of customer c: the collections must not see it.
        if not written and plan.table.name in statement:
            written.append(statement)
            apply_changes(store.database, bookings, [RecordChange("upsert", late)])

    sa.event.listen(store.database.engine, "after_cursor_execute", write_after_the_rows)
    try:
        records = store.read_batch(plan, 0, 1000)
    finally:
        sa.event.remove(store.database.engine, "after_cursor_execute", write_after_the_rows)
    assert len(written) == 1
    assert {r.entity_key: [b["hotel"] for b in r.collections["all"]] for r in records} == {
        "a": ["Adlon", "Plaza", "Ritz", "Savoy"],
        "b": ["Hilton"],
        "c": [],
    }
    assert [b["hotel"] for b in store.read_batch(plan, 0, 1000)[2].collections["all"]] == ["Negresco"]
