"""``carillon ingest`` against a real audience server, on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from audience_svc.app import build_server
from audience_svc.settings import AudienceSettings
from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import audience_service_pb2_grpc as aud_grpc
from carillon.audience.v1 import entity_pb2, query_pb2
from carillon_chassis.clients import call_metadata
from carillon_chassis.values import to_value
from carillon_cli.ingest import ingest_file
from tests.conftest import DatabaseFactory

T = entity_pb2
PEOPLE = entity_pb2.Entity(
    attributes=[
        T.Attribute(name="person_id", type=T.ATTRIBUTE_TYPE_STRING),
        T.Attribute(name="age", type=T.ATTRIBUTE_TYPE_INTEGER, nullable=True),
        T.Attribute(name="vip", type=T.ATTRIBUTE_TYPE_BOOLEAN, nullable=True),
        T.Attribute(name="joined", type=T.ATTRIBUTE_TYPE_DATE, nullable=True),
        T.Attribute(name="version", type=T.ATTRIBUTE_TYPE_INTEGER),
    ],
    primary_key=["person_id"],
    version_attribute="version",
)


@pytest.fixture
async def audience(database_factory: DatabaseFactory) -> AsyncIterator[str]:
    url, schema = database_factory.url_and_schema("audience")
    server = await build_server(AudienceSettings(port=0, database_url=url, database_schema=schema))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        await aud_grpc.AudienceServiceStub(channel).CreateEntity(
            aud.CreateEntityRequest(entity_id="people", entity=PEOPLE), metadata=call_metadata("prod")
        )
    yield server.address
    await server.stop(0)


async def count(address: str, condition: query_pb2.Condition | None = None) -> int:
    query = query_pb2.AudienceQuery(dimension="entities/people")
    if condition is not None:
        query.filter.condition.CopyFrom(condition)
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await aud_grpc.AudienceServiceStub(channel).EvaluateAudience(
            aud.EvaluateAudienceRequest(query=query), metadata=call_metadata("prod")
        )
    return int(reply.count)


async def test_a_csv_file_is_loaded_with_typed_values(audience: str, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text(
        "person_id,age,vip,joined,version\n"
        + "".join(f"p{i},{20 + i},{'true' if i % 2 else 'false'},2026-01-{i + 1:02d},1\n" for i in range(25))
        + "p99,,,,1\n"
    )
    seen: list[int] = []

    report = await ingest_file(audience, "people", path, batch_size=10, on_progress=seen.append)

    assert (report.rows, report.batches, report.upserted, report.problems) == (26, 3, 26, [])
    assert seen == [10, 10, 6]
    older = query_pb2.Condition(attribute="age", operator=query_pb2.OPERATOR_GREATER_OR_EQUAL, values=[to_value(40)])
    assert await count(audience, older) == 5
    empty = query_pb2.Condition(attribute="age", operator=query_pb2.OPERATOR_IS_NULL)
    assert await count(audience, empty) == 1


async def test_json_lines_can_delete_with_the_op_column(audience: str, tmp_path: Path) -> None:
    path = tmp_path / "people.jsonl"
    path.write_text(
        '{"person_id": "a", "age": 30, "version": 1}\n'
        '{"person_id": "b", "age": 31, "version": 1}\n'
        '{"person_id": "a", "version": 2, "_op": "d"}\n'
    )

    report = await ingest_file(audience, "people", path, batch_size=2)

    assert report.problems == []
    assert (report.upserted, report.deleted) == (2, 1)
    assert await count(audience) == 1


async def test_a_refused_batch_names_the_file_line_and_writes_nothing_of_that_batch(
    audience: str, tmp_path: Path
) -> None:
    path = tmp_path / "people.jsonl"
    rows = [f'{{"person_id": "p{i}", "age": {i}, "version": 1}}' for i in range(6)]
    rows[4] = '{"person_id": "p4", "age": 4}'  # no version: the server refuses the whole second batch
    path.write_text("\n".join(rows) + "\n")

    report = await ingest_file(audience, "people", path, batch_size=3)

    assert report.batches == 1
    assert len(report.problems) >= 1
    assert all(problem.startswith("line 5 ") for problem in report.problems), report.problems
    assert await count(audience) == 3


async def test_a_csv_cell_the_server_cannot_read_is_reported_with_its_line(audience: str, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("person_id,age,vip,joined,version\np1,1,,,1\np2,1,,,1\np3,old,,,1\n")

    report = await ingest_file(audience, "people", path, batch_size=2)

    assert report.batches == 1
    assert report.problems == ["line 4 (block.rows[0].values.age): 'old' is not an integer"]
    assert await count(audience) == 2


async def test_a_csv_file_keeps_quoted_text_and_deletes_with_the_op_column(audience: str, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text('person_id,age,version,_op\n"a,1",30,1,\n"b ""2""\nline",31,1,u\n,32,1,\nc,33,1,\n"a,1",,2,d\n')

    report = await ingest_file(audience, "people", path, batch_size=4)

    assert (report.problems, report.batches, report.upserted, report.deleted) == ([], 2, 4, 1)
    is_b = query_pb2.Condition(
        attribute="person_id", operator=query_pb2.OPERATOR_EQUAL, values=[to_value('b "2"\nline')]
    )
    empty_id = query_pb2.Condition(attribute="person_id", operator=query_pb2.OPERATOR_EQUAL, values=[to_value("")])
    assert (await count(audience), await count(audience, is_b), await count(audience, empty_id)) == (3, 1, 1)


async def test_an_unknown_csv_column_is_reported_on_the_header(audience: str, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("person_id,shoe_size,version\np1,42,1\n")

    report = await ingest_file(audience, "people", path)

    assert report.problems == ["line 1, the header (block.columns[1]): unknown attribute 'shoe_size'"]
    assert await count(audience) == 0
