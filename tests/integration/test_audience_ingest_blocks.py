"""CSV record blocks (the bulk wire format) against per-row changes, on SQLite and PostgreSQL.

The differential tests draw seeded random batches of changes (good rows, wrong types, NULLs in
required attributes, bad enums, out-of-range integers, impossible dates, stale versions, ties,
deletes, quoting and line breaks inside values, NULL against the empty string), apply each batch to
one entity as RecordChanges and to a twin entity as a CSV block, and require the same counts, the
same rejected rows and fields, and the same stored rows. On PostgreSQL the clean blocks take the COPY
fast path and the dirty ones the exact path, so both are held to the per-row semantics.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from functools import partial as partial_call
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from audience_svc.app import build_server
from audience_svc.blocks import RecordBlock, apply_block
from audience_svc.coercion import Malformed, RawValue
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import IngestResult, RecordChange, apply_changes
from audience_svc.schema import Attribute, Entity, EntitySchema
from audience_svc.tables import MIGRATIONS
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc
from carillon_chassis.database import Database, as_utc
from carillon_chassis.errors import InvalidArgument
from tests.conftest import DatabaseFactory
from tests.integration.test_audience_server import PROD, create_customers, details, error_metadata, settings_for

SCHEMA = EntitySchema(
    attributes=(
        Attribute("customer_id", "string"),
        Attribute("version", "integer"),
        Attribute("email", "string"),
        Attribute("age", "integer", nullable=True),
        Attribute("balance", "decimal", nullable=True),
        Attribute("tier", "enum", nullable=True, enum_values=("gold", "silver")),
        Attribute("birthday", "date", nullable=True),
        Attribute("vip", "boolean", nullable=True),
        Attribute("seen", "timestamp", nullable=True),
        Attribute("note", "string", nullable=True),
    ),
    primary_key=("customer_id",),
    version_attribute="version",
)
COLUMNS = ("_op", *(a.name for a in SCHEMA.attributes))
NOTES = ["plain", "with,comma", 'with "quotes"', "two\nlines", "crlf\r\ninside", "", "  spaced  ", "naïve ü", "\\."]
STOCKHOLM = dt.timezone(dt.timedelta(hours=2))


@dataclass(frozen=True)
class Cell:
    """One value as the per-row format carries it and as the block's text carries it (None: NULL)."""

    raw: RawValue
    text: str | None


NULL = Cell(None, None)


def good_cells(rng: random.Random) -> dict[str, Cell]:
    """Valid values for the non-key attributes, each NULL now and then where nullable."""
    balance = Decimal(rng.randrange(-(10**6), 10**6)) / 100
    birthday = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(20000))
    seen = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=rng.randrange(10**8), microseconds=500)
    vip = rng.random() < 0.5
    note = rng.choice(NOTES)
    cells = {
        "email": Cell(f"{rng.randrange(100)}@example.com", None),
        "age": Cell(rng.randrange(-5, 120), None),
        "balance": Cell(balance, rng.choice([format(balance, "f"), f"{balance:.4f}"])),
        "tier": Cell(rng.choice(["gold", "silver"]), None),
        "birthday": Cell(birthday, birthday.isoformat()),
        "vip": Cell(vip, rng.choice([["false", "F", "0"], ["true", "TRUE", "t", "1"]][vip])),
        "seen": Cell(
            seen, rng.choice([seen.isoformat(), seen.astimezone(STOCKHOLM).isoformat()]).replace("+00:00", "Z")
        ),
        "note": Cell(note, note),
    }
    cells = {name: Cell(c.raw, str(c.raw) if c.text is None else c.text) for name, c in cells.items()}
    for name in ("age", "balance", "tier", "birthday", "vip", "seen", "note"):
        if rng.random() < 0.15:
            cells[name] = NULL
    return cells


BAD_CELLS = [
    ("age", Cell("forty", "forty")),  # a string for an integer
    ("age", Cell(2**63, str(2**63))),  # out of range
    ("version", Cell(-(2**63) - 1, str(-(2**63) - 1))),
    ("tier", Cell("bronze", "bronze")),  # not an enum value
    ("birthday", Cell(Malformed("date", "bad"), "2024-02-30")),  # an impossible date
    ("balance", Cell(Decimal("1.12345678901"), "1.12345678901")),  # too many digits after the point
    ("email", NULL),  # NULL in a required attribute
    ("vip", Cell("yes", "yes")),
    ("seen", Cell(dt.datetime(2024, 5, 1, 12), "2024-05-01T12:00:00")),  # no UTC offset
]


@dataclass(frozen=True)
class Change:
    operation: str
    cells: dict[str, Cell]


def random_batch(rng: random.Random, size: int, dirty: bool, keys: int = 12, deletes: bool = True) -> list[Change]:
    """Random changes of ``keys`` keys; when ``dirty``, one kind of bad value (so no other hides it) in some rows."""
    bad_name, bad_cell = rng.choice(BAD_CELLS)
    changes = []
    for _ in range(size):
        name = f"k{rng.randrange(keys)}"
        key = Cell(name, name)
        version = rng.randrange(1, 6)
        identity = {"customer_id": key, "version": Cell(version, str(version))}
        if deletes and rng.random() < 0.2:
            changes.append(Change("delete", identity))
            continue
        cells = {**identity, **good_cells(rng)}
        if dirty and rng.random() < 0.3:
            cells[bad_name] = bad_cell
        changes.append(Change("upsert", cells))
    return changes


def as_record_changes(changes: list[Change]) -> list[RecordChange]:
    return [RecordChange(c.operation, {name: cell.raw for name, cell in c.cells.items()}) for c in changes]


def csv_cell(text: str | None, rng: random.Random) -> str:
    if text is None:
        return ""
    if text == "" or re.search(r'[,"\r\n]', text) or rng.random() < 0.1:
        return '"' + text.replace('"', '""') + '"'
    return text


def as_block(changes: list[Change], rng: random.Random, with_op: bool = True) -> RecordBlock:
    """The CSV block of ``changes`` (without an ``_op`` column, all must be upserts)."""
    end = rng.choice(["\n", "\r\n"])
    lines = []
    for change in changes:
        op = rng.choice(["d", "D", "delete"]) if change.operation == "delete" else rng.choice(["", "u", "U", "upsert"])
        cells = [op] + [change.cells.get(name, NULL).text for name in COLUMNS[1:]]
        # a delete's other cells are ignored, so fill some with noise
        if change.operation == "delete":
            cells = [cell if i <= 2 or rng.random() < 0.7 else "noise" for i, cell in enumerate(cells)]
        lines.append(",".join(csv_cell(cell, rng) for cell in cells[0 if with_op else 1 :]))
    return RecordBlock(COLUMNS[0 if with_op else 1 :], end.join(lines) + (end if rng.random() < 0.8 else ""))


def stored(database: Database, entity: Entity) -> dict[str, dict[str, Any]]:
    with database.engine.connect() as conn:
        rows = conn.execute(sa.select(entity.table)).mappings().all()
    return {row["customer_id"]: {**row, "seen": as_utc(row["seen"])} for row in rows}


def outcome(apply: Callable[[], IngestResult], prefix: str) -> tuple[str, Any]:
    """The counts and rejected fields of a batch, or the fields of its refusal, with `changes[i]` paths."""
    try:
        result = apply()
    except InvalidArgument as exc:
        return "refused", sorted(v.field.replace(prefix, "changes[") for v in exc.violations)
    fields = sorted(v.field.replace(prefix, "changes[") for v in result.rejections)
    return "applied", (result.upserted, result.deleted, result.ignored_stale, result.rejected, fields)


@pytest.fixture
def database(make_database: Callable[[str], Database]) -> Database:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    return database


@pytest.mark.parametrize("with_op", [True, False], ids=["with_op", "upserts_only"])
@pytest.mark.parametrize("seed", range(8))
def test_blocks_and_per_row_changes_give_the_same_counts_errors_and_rows(
    database: Database, seed: int, with_op: bool
) -> None:
    catalog = EntityCatalog(database)
    by_rows = catalog.create_entity("prod", "by_rows", SCHEMA)
    by_block = catalog.create_entity("prod", "by_block", SCHEMA)
    rng = random.Random(seed)
    for _ in range(8):
        size, dirty = rng.randrange(1, 40), rng.random() < 0.5
        # without deletes, a wide key range: many blocks of only new keys (appended), some with old or repeated keys
        changes = random_batch(rng, size, dirty, keys=12 if with_op else 150, deletes=with_op)
        partial = rng.random() < 0.5
        block = as_block(changes, rng, with_op)
        records = as_record_changes(changes)
        per_row = outcome(partial_call(apply_changes, database, by_rows, records, allow_partial=partial), "changes[")
        bulk = outcome(partial_call(apply_block, database, by_block, block, allow_partial=partial), "block.rows[")
        assert bulk == per_row, block.text
        assert stored(database, by_block) == stored(database, by_rows)
    assert stored(database, by_rows)  # the scenario wrote something


def test_a_large_clean_block_matches_per_row_changes(database: Database) -> None:
    catalog = EntityCatalog(database)
    by_rows = catalog.create_entity("prod", "by_rows", SCHEMA)
    by_block = catalog.create_entity("prod", "by_block", SCHEMA)
    rng = random.Random(42)
    for _ in range(3):
        changes = random_batch(rng, 3000, dirty=False)
        for i, change in enumerate(changes):  # many distinct keys, some repeated
            change.cells["customer_id"] = Cell(f"k{i % 2500}", f"k{i % 2500}")
        block = as_block(changes, rng)
        assert apply_block(database, by_block, block) == apply_changes(database, by_rows, as_record_changes(changes))
    assert len(stored(database, by_block)) > 2000
    assert stored(database, by_block) == stored(database, by_rows)


@pytest.fixture
def entity(database: Database) -> Entity:
    return EntityCatalog(database).create_entity("prod", "customers", SCHEMA)


def test_an_unquoted_empty_cell_is_null_and_a_quoted_one_the_empty_string(database: Database, entity: Entity) -> None:
    block = RecordBlock(("customer_id", "version", "email", "note"), 'a,1,"",\nb,1,x,""\n')
    assert apply_block(database, entity, block) == IngestResult(upserted=2)
    rows = stored(database, entity)
    assert (rows["a"]["email"], rows["a"]["note"], rows["b"]["note"]) == ("", None, "")


def test_an_unknown_column_fails_the_block_even_when_partial(database: Database, entity: Entity) -> None:
    block = RecordBlock(("customer_id", "version", "email", "shoe_size", "email"), "a,1,x,42,y\n")
    with pytest.raises(InvalidArgument) as caught:
        apply_block(database, entity, block, allow_partial=True)
    assert caught.value.reason == "INVALID_RECORDS"
    assert [v.field for v in caught.value.violations] == ["block.columns[3]", "block.columns[4]"]
    assert stored(database, entity) == {}


def test_a_malformed_row_is_reported_with_its_index(database: Database, entity: Entity) -> None:
    block = RecordBlock(("customer_id", "version", "email"), 'a,1,x\nb,1,x"y\nc,1\n"d",1,"z"\n')
    with pytest.raises(InvalidArgument) as caught:
        apply_block(database, entity, block)
    assert [v.field for v in caught.value.violations] == ["block.rows[1]", "block.rows[2]"]
    assert stored(database, entity) == {}


def test_a_missing_required_column_rejects_upserts_but_not_deletes(database: Database, entity: Entity) -> None:
    apply_block(database, entity, RecordBlock(("customer_id", "version", "email"), "a,1,x\nb,1,y\n"))
    block = RecordBlock(("_op", "customer_id", "version"), "d,a,2\nu,c,1\n")
    result = apply_block(database, entity, block, allow_partial=True)
    assert (result.deleted, result.rejected) == (1, 1)
    assert [v.field for v in result.rejections] == ["block.rows[1].values.email"]
    assert set(stored(database, entity)) == {"b"}


def test_a_bad_operation_is_reported_on_its_row(database: Database, entity: Entity) -> None:
    block = RecordBlock(("_op", "customer_id", "version", "email"), "u,a,1,x\nx,b,1,y\n")
    with pytest.raises(InvalidArgument) as caught:
        apply_block(database, entity, block)
    assert [v.field for v in caught.value.violations] == ["block.rows[1].operation"]


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[audience_service_pb2_grpc.AudienceServiceStub]:
    server = await build_server(settings_for(database_factory))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield audience_service_pb2_grpc.AudienceServiceStub(channel)
    await server.stop(0)


async def ingest(
    stub: audience_service_pb2_grpc.AudienceServiceStub, *requests: svc.IngestRecordsRequest
) -> svc.IngestRecordsResponse:
    async def stream() -> AsyncIterator[svc.IngestRecordsRequest]:
        for request in requests:
            yield request

    response: svc.IngestRecordsResponse = await stub.IngestRecords(stream(), metadata=PROD)
    return response


def block_request(text: str, *, allow_partial: bool = False) -> svc.IngestRecordsRequest:
    return svc.IngestRecordsRequest(
        entity="entities/customers",
        block=svc.RecordBlock(columns=["customer_id", "version", "email", "age"], csv=text),
        allow_partial=allow_partial,
    )


async def test_blocks_over_the_wire_are_counted_and_rejections_name_their_rows(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    await create_customers(stub)
    response = await ingest(
        stub,
        block_request("c1,1,a@x,30\nc2,1,b@x,\n"),
        block_request("c3,1,c@x,old\nc1,2,a@x,31\n", allow_partial=True),
    )
    assert (response.batches, response.upserted, response.rejected) == (2, 3, 1)
    assert [(r.batch_index, r.field) for r in response.rejections] == [(1, "block.rows[0].values.age")]


async def test_a_refused_block_over_the_wire_names_every_bad_row(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    await create_customers(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(stub, block_request("c1,1,a@x,30\nc2,x,b@x,\nc3,1,,1\n"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[2] == ["block.rows[1].values.version", "block.rows[2].values.email"]


async def test_a_batch_with_both_changes_and_a_block_is_refused(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    await create_customers(stub)
    request = block_request("c1,1,a@x,30\n")
    request.changes.add().values["customer_id"].string_value = "c2"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(stub, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[2] == ["block"]


@pytest.mark.parametrize(
    ("attribute", "text"),
    [
        ("balance", "1.12345678901"),
        ("balance", "NaN"),
        ("age", " 42"),
        ("age", "1_000"),
        ("age", "9223372036854775808"),
        ("vip", "yes"),
        ("birthday", "2024-02-30"),
        ("birthday", "Jan 5 2024"),
        ("seen", "2024-05-01 12:00:00"),
        ("seen", "now"),
    ],
)
def test_text_postgresql_would_read_but_the_grammar_refuses_is_refused(
    database: Database, entity: Entity, attribute: str, text: str
) -> None:
    rows = "".join(f"c{i},1,c{i}@example.com,\n" for i in range(50)) + f"bad,1,x,{text}\n"
    with pytest.raises(InvalidArgument) as caught:
        apply_block(database, entity, RecordBlock(("customer_id", "version", "email", attribute), rows))
    assert [v.field for v in caught.value.violations] == [f"block.rows[50].values.{attribute}"]
    assert stored(database, entity) == {}


def test_canonical_and_other_valid_texts_store_the_same_values(database: Database, entity: Entity) -> None:
    columns = ("customer_id", "version", "email", "age", "balance", "vip", "seen")
    canonical = RecordBlock(columns, "a,1,x,7,1.5,true,2024-05-01T10:00:00Z\n")
    other = RecordBlock(columns, "b,+01,x,+007,01.50,T,2024-05-01 12:00:00.000+02:00\n")
    assert apply_block(database, entity, canonical) == apply_block(database, entity, other) == IngestResult(upserted=1)
    rows = stored(database, entity)
    assert {k: v for k, v in rows["a"].items() if k != "customer_id"} == {
        k: v for k, v in rows["b"].items() if k != "customer_id"
    }


async def test_blocks_of_one_stream_apply_in_order_each_seeing_the_previous(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    await create_customers(stub)
    first = block_request("".join(f"c{i},1,c{i}@x,{i}\n" for i in range(1000)))
    newer = block_request("".join(f"c{i},2,c{i}@x,{i + 1}\n" for i in range(0, 1000, 2)))
    stale = block_request("c1,1,stale@x,0\nc2,1,stale@x,0\n")
    mixed = svc.IngestRecordsRequest(entity="entities/customers")
    mixed.changes.add().values["customer_id"].string_value = "c3"
    deletes = svc.IngestRecordsRequest(
        entity="entities/customers", block=svc.RecordBlock(columns=["_op", "customer_id", "version"], csv="d,c0,2\n")
    )
    response = await ingest(stub, first, newer, stale, deletes)
    assert (response.batches, response.upserted, response.deleted, response.ignored_stale) == (4, 1500, 1, 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(stub, first, mixed)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_metadata(caught.value)["batch_index"] == "1"


async def test_a_refused_block_stops_the_stream_and_nothing_after_it_is_written(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    await create_customers(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(
            stub,
            block_request("c1,1,a@x,1\n"),
            block_request("c2,1,b@x,old\n"),
            block_request("c3,1,c@x,3\n"),
            block_request("c4,1,d@x,4\n"),
        )
    metadata = error_metadata(caught.value)
    assert (metadata["batch_index"], metadata["batches_applied"]) == ("1", "1")
    response = await ingest(stub, block_request("c1,1,a@x,1\nc2,1,b@x,2\nc3,1,c@x,3\nc4,1,d@x,4\n"))
    assert (response.upserted, response.ignored_stale) == (3, 1)


def test_concurrent_blocks_of_the_same_new_keys_keep_the_highest_versions(database: Database, entity: Entity) -> None:
    columns = ("customer_id", "version", "email")
    blocks = [RecordBlock(columns, "".join(f"k{i},{v},v{v}@x\n" for i in range(3000))) for v in (1, 2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda block: apply_block(database, entity, block), blocks))
    assert sum(r.upserted + r.ignored_stale for r in results) == 6000
    assert {(row["version"], row["email"]) for row in stored(database, entity).values()} == {(2, "v2@x")}
    assert len(stored(database, entity)) == 3000
