"""Incremental query: working sets without the records earlier runs produced, on SQLite and PostgreSQL.

Three (or more) simulated runs of one campaign activity, each at its own reference time, in the
processed-keys mode (with the history window expiring, and forever) and the watermark mode, with
exact membership and excluded counts, idempotent rebuilds, and one call over the real gRPC server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from audience_svc.app import build_server, purge_periodically
from audience_svc.entities import EntityCatalog
from audience_svc.incremental import IncrementalBuild, IncrementalBuilder, IncrementalMode, ProcessedKeys, Watermark
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import AudienceQuery, Bindings, Condition
from audience_svc.schema import Attribute, Entity, EntitySchema
from audience_svc.settings import AudienceSettings
from audience_svc.tables import MIGRATIONS, ProcessedKeyTableRow
from audience_svc.working_sets import WorkingSet, WorkingSetStore
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc, entity_pb2, query_pb2, working_set_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument
from carillon_chassis.server import GrpcServer
from tests.conftest import DatabaseFactory

T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
CUSTOMERS = EntitySchema(
    attributes=(
        Attribute("id", "string"),
        Attribute("version", "integer"),
        Attribute("age", "integer"),
        Attribute("updated", "timestamp", nullable=True),
        Attribute("signup", "date", nullable=True),
    ),
    primary_key=("id",),
    version_attribute="version",
)
ADULTS = AudienceQuery("customers", Condition("age", "greater_or_equal", (18,)))


class Campaign:
    """One campaign activity's runs over a customers entity, with helpers to add records and build."""

    def __init__(self, database: Database) -> None:
        database.migrate(MIGRATIONS)
        self.database = database
        self.catalog = EntityCatalog(database)
        self.customers: Entity = self.catalog.create_entity("prod", "customers", CUSTOMERS)
        self.store = WorkingSetStore(self.catalog)
        self.builder = IncrementalBuilder(self.store)

    def add(self, key: str, age: int = 30, updated: dt.datetime | None = None, signup: dt.date | None = None) -> None:
        values = {"id": key, "version": 1, "age": age, "updated": updated, "signup": signup}
        apply_changes(self.database, self.customers, [RecordChange("upsert", values)])

    def build(
        self, run: str, mode: IncrementalMode, at: dt.datetime, *, activity: str = "new", campaign: str = "weekly"
    ) -> IncrementalBuild:
        return self.builder.build(
            "prod", f"campaigns/{campaign}/runs/{run}", activity, ADULTS, mode, Bindings(reference_time=at)
        )

    def keys(self, built: IncrementalBuild) -> list[str]:
        plan = self.store.open_stream("prod", built.working_set.working_set_id, [])
        return [r.entity_key for r in self.store.read_batch(plan, 0, 1000)]

    def result(self, built: IncrementalBuild) -> tuple[list[str], int]:
        return self.keys(built), built.excluded


@pytest.fixture
def campaign(make_database: Callable[[str], Database]) -> Campaign:
    return Campaign(make_database("audience"))


def test_each_run_takes_only_the_keys_no_earlier_run_produced(campaign: Campaign) -> None:
    for key in ("a", "b", "c"):
        campaign.add(key)
    campaign.add("minor", age=10)
    first = campaign.build("r1", ProcessedKeys(), T0)
    campaign.add("d")
    campaign.add("e")
    second = campaign.build("r2", ProcessedKeys(), T0 + dt.timedelta(days=7))
    campaign.add("f")
    third = campaign.build("r3", ProcessedKeys(), T0 + dt.timedelta(days=14))
    assert [campaign.result(b) for b in (first, second, third)] == [
        (["a", "b", "c"], 0),
        (["d", "e"], 3),
        (["f"], 5),
    ]


def test_rebuilding_a_run_returns_its_working_set_and_excluded_count(campaign: Campaign) -> None:
    campaign.add("a")
    campaign.build("r1", ProcessedKeys(), T0)
    campaign.add("b")
    second = campaign.build("r2", ProcessedKeys(), T0 + dt.timedelta(days=1))
    campaign.build("r3", ProcessedKeys(), T0 + dt.timedelta(days=2))
    again = campaign.build("r2", ProcessedKeys(), T0 + dt.timedelta(days=3))
    assert (again.working_set.working_set_id, campaign.result(again)) == (second.working_set.working_set_id, (["b"], 1))


def test_a_purged_run_rebuilt_does_not_exclude_its_own_keys(campaign: Campaign) -> None:
    campaign.add("a")
    campaign.build("r1", ProcessedKeys(), T0)
    campaign.add("b")
    second = campaign.build("r2", ProcessedKeys(), T0 + dt.timedelta(days=1))
    campaign.store.purge_expired(dt.datetime.now(dt.UTC) + dt.timedelta(days=365))
    rebuilt = campaign.build("r2", ProcessedKeys(), T0 + dt.timedelta(days=1))
    assert rebuilt.working_set.working_set_id != second.working_set.working_set_id
    assert campaign.result(rebuilt) == (["b"], 1)


def test_keys_processed_before_the_history_window_are_taken_again(campaign: Campaign) -> None:
    window = ProcessedKeys(history_window=dt.timedelta(days=30))
    for key in ("a", "b"):
        campaign.add(key)
    first = campaign.build("r1", window, T0)
    campaign.add("c")
    second = campaign.build("r2", window, T0 + dt.timedelta(days=10))
    # a and b were processed at T0, more than 30 days before; c at T0 + 10 days, within them.
    third = campaign.build("r3", window, T0 + dt.timedelta(days=35))
    fourth = campaign.build("r4", window, T0 + dt.timedelta(days=36))
    assert [campaign.result(b) for b in (first, second, third, fourth)] == [
        (["a", "b"], 0),
        (["c"], 2),
        (["a", "b"], 1),
        ([], 3),
    ]


def test_a_zero_history_window_excludes_processed_keys_forever(campaign: Campaign) -> None:
    forever = ProcessedKeys(history_window=dt.timedelta(0))
    campaign.add("a")
    campaign.build("r1", forever, T0)
    campaign.add("b")
    later = campaign.build("r2", forever, T0 + dt.timedelta(days=3650))
    assert campaign.result(later) == (["b"], 1)


def test_each_activity_and_campaign_has_its_own_history(campaign: Campaign) -> None:
    campaign.add("a")
    campaign.build("r1", ProcessedKeys(), T0)
    other_activity = campaign.build("r2", ProcessedKeys(), T0, activity="other")
    other_campaign = campaign.build("r1", ProcessedKeys(), T0, campaign="monthly")
    same = campaign.build("r2", ProcessedKeys(), T0)
    assert [campaign.result(b) for b in (other_activity, other_campaign, same)] == [(["a"], 0), (["a"], 0), ([], 1)]


def test_the_watermark_takes_only_records_updated_after_the_previous_run(campaign: Campaign) -> None:
    mode = Watermark("updated")
    campaign.add("a", updated=T0 - dt.timedelta(hours=2))
    campaign.add("b", updated=T0 - dt.timedelta(hours=1))
    campaign.add("never", updated=None)
    first = campaign.build("r1", mode, T0)
    campaign.add("c", updated=T0 + dt.timedelta(hours=1))
    campaign.add("d", updated=T0 - dt.timedelta(hours=1))  # as old as the watermark: not after it
    second = campaign.build("r2", mode, T0 + dt.timedelta(days=1))
    third = campaign.build("r3", mode, T0 + dt.timedelta(days=2))
    campaign.add("e", updated=T0 + dt.timedelta(hours=1, seconds=1))
    fourth = campaign.build("r4", mode, T0 + dt.timedelta(days=3))
    assert [campaign.result(b) for b in (first, second, third, fourth)] == [
        (["a", "b"], 1),
        (["c"], 4),
        ([], 5),
        (["e"], 5),
    ]


def test_the_first_run_starts_from_the_initial_watermark(campaign: Campaign) -> None:
    mode = Watermark("updated", initial=T0)
    campaign.add("old", updated=T0)
    campaign.add("new", updated=T0 + dt.timedelta(minutes=1))
    assert campaign.result(campaign.build("r1", mode, T0)) == (["new"], 1)


def test_a_date_watermark_compares_dates(campaign: Campaign) -> None:
    mode = Watermark("signup", initial=dt.datetime(2026, 1, 1, 23, 0, tzinfo=dt.UTC))
    campaign.add("jan1", signup=dt.date(2026, 1, 1))
    campaign.add("jan2", signup=dt.date(2026, 1, 2))
    first = campaign.build("r1", mode, T0)
    campaign.add("jan3", signup=dt.date(2026, 1, 3))
    second = campaign.build("r2", mode, T0 + dt.timedelta(days=1))
    assert [campaign.result(b) for b in (first, second)] == [(["jan2"], 1), (["jan3"], 2)]


def test_a_rebuilt_watermark_run_starts_from_its_own_watermark(campaign: Campaign) -> None:
    mode = Watermark("updated")
    campaign.add("a", updated=T0)
    campaign.build("r1", mode, T0)
    campaign.add("b", updated=T0 + dt.timedelta(hours=1))
    campaign.build("r2", mode, T0 + dt.timedelta(days=1))
    campaign.store.purge_expired(dt.datetime.now(dt.UTC) + dt.timedelta(days=365))
    assert campaign.result(campaign.build("r2", mode, T0 + dt.timedelta(days=1))) == (["b"], 1)


def test_processed_keys_work_on_a_composite_key(campaign: Campaign) -> None:
    stays = EntitySchema(
        attributes=(Attribute("hotel", "string"), Attribute("night", "date"), Attribute("version", "integer")),
        primary_key=("hotel", "night"),
        version_attribute="version",
    )
    entity = campaign.catalog.create_entity("prod", "stays", stays)

    def add(hotel: str, day: int) -> None:
        values = {"hotel": hotel, "night": dt.date(2026, 3, day), "version": 1}
        apply_changes(campaign.database, entity, [RecordChange("upsert", values)])

    def build(run: str) -> IncrementalBuild:
        query = AudienceQuery("stays")
        return campaign.builder.build("prod", f"campaigns/c/runs/{run}", "q", query, ProcessedKeys(), Bindings(T0))

    add("ritz", 1)
    add("ritz", 2)
    first = build("r1")
    add("savoy", 1)
    add("ritz", 3)
    second = build("r2")
    assert [campaign.result(b) for b in (first, second)] == [
        (["ritz|2026-03-01", "ritz|2026-03-02"], 0),
        (["ritz|2026-03-03", "savoy|2026-03-01"], 2),
    ]


def test_a_rebuilt_earlier_run_leaves_keys_a_later_run_recorded_again_to_that_run(campaign: Campaign) -> None:
    window = ProcessedKeys(history_window=dt.timedelta(days=30))
    campaign.add("a")
    campaign.build("r1", window, T0)
    # a's window expired: r3 takes it again and records it at T0 + 40 days.
    third = campaign.result(campaign.build("r3", window, T0 + dt.timedelta(days=40)))
    campaign.store.purge_expired(dt.datetime.now(dt.UTC) + dt.timedelta(days=365))
    rebuilt = campaign.result(campaign.build("r1", window, T0))
    fourth = campaign.result(campaign.build("r4", window, T0 + dt.timedelta(days=45)))
    assert [third, rebuilt, fourth] == [(["a"], 0), (["a"], 0), ([], 1)]


class PausingStore(WorkingSetStore):
    """A store whose builds of run r1 hold their transaction open until another build has started."""

    def __init__(self, catalog: EntityCatalog) -> None:
        super().__init__(catalog)
        self.inside = threading.Event()
        self.second_started = threading.Event()

    def materialize(
        self,
        sandbox: str,
        run: str,
        activity: str,
        entity: Entity,
        selection: Any,
        *,
        then: Callable[[sa.Connection, sa.Table, int], None] | None = None,
    ) -> WorkingSet:
        def pause(conn: sa.Connection, table: sa.Table, count: int) -> None:
            assert then is not None
            then(conn, table, count)
            if run.endswith("/r1"):
                self.inside.set()
                self.second_started.wait(10)
                # Give the second build time to read the state while this one has not committed.
                time.sleep(0.5)

        return super().materialize(sandbox, run, activity, entity, selection, then=pause)


@pytest.mark.parametrize("mode", [ProcessedKeys(), Watermark("updated")], ids=["processed_keys", "watermark"])
def test_concurrent_runs_of_one_activity_never_produce_the_same_records(
    make_database: Callable[[str], Database], mode: IncrementalMode
) -> None:
    campaign = Campaign(make_database("audience"))
    store = PausingStore(campaign.catalog)
    builder = IncrementalBuilder(store)
    for key in ("a", "b", "c"):
        campaign.add(key, updated=T0)
    results: dict[str, object] = {}

    def build(run: str) -> None:
        if run == "r2":
            store.second_started.set()
        try:
            results[run] = builder.build("prod", f"campaigns/w/runs/{run}", "a", ADULTS, mode, Bindings(T0))
        except Exception as exc:
            results[run] = exc

    first = threading.Thread(target=build, args=("r1",))
    first.start()
    assert store.inside.wait(10)
    second = threading.Thread(target=build, args=("r2",))
    second.start()
    first.join()
    second.join()
    built = [results["r1"], results["r2"]]
    assert all(isinstance(b, IncrementalBuild) for b in built), results
    assert [campaign.result(b) for b in built if isinstance(b, IncrementalBuild)] == [(["a", "b", "c"], 0), ([], 3)]


class RisingStore(WorkingSetStore):
    """A store that raises record b's ``updated`` right after its builds select their rows, in the
    build's own transaction (as concurrent ingest between two statements would)."""

    def __init__(self, catalog: EntityCatalog, customers: Entity, to: dt.datetime) -> None:
        super().__init__(catalog)
        self.customers = customers
        self.to = to

    def materialize(
        self,
        sandbox: str,
        run: str,
        activity: str,
        entity: Entity,
        selection: Any,
        *,
        then: Callable[[sa.Connection, sa.Table, int], None] | None = None,
    ) -> WorkingSet:
        def rise(conn: sa.Connection, table: sa.Table, count: int) -> None:
            records = self.customers.table
            conn.execute(records.update().where(records.c.id == "b").values(updated=self.to))
            assert then is not None
            then(conn, table, count)

        return super().materialize(sandbox, run, activity, entity, selection, then=rise)


def test_a_value_rising_during_a_build_is_taken_by_the_next_run(campaign: Campaign) -> None:
    mode = Watermark("updated")
    campaign.add("a", updated=T0)
    campaign.add("b", updated=T0 + dt.timedelta(hours=1))
    rising = IncrementalBuilder(RisingStore(campaign.catalog, campaign.customers, T0 + dt.timedelta(hours=5)))
    first = rising.build("prod", "campaigns/weekly/runs/r1", "new", ADULTS, mode, Bindings(reference_time=T0))
    second = campaign.build("r2", mode, T0 + dt.timedelta(days=1))
    assert [campaign.result(b) for b in (first, second)] == [(["a", "b"], 0), (["b"], 1)]


def test_migration_3_adds_the_incremental_tables_to_an_existing_database(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("audience")
    database.migrate(MIGRATIONS[:2])
    assert database.migrate(MIGRATIONS[:3]) == [3]
    assert {"incremental_runs", "processed_key_tables"} <= set(sa.inspect(database.engine).get_table_names())


@pytest.mark.parametrize(
    ("mode", "field"),
    [
        (ProcessedKeys(history_window=dt.timedelta(days=-1)), "incremental.processed_keys.history_window"),
        (ProcessedKeys(history_window=dt.timedelta(days=36526)), "incremental.processed_keys.history_window"),
        (Watermark("age"), "incremental.watermark.attribute"),
        (Watermark("nope"), "incremental.watermark.attribute"),
    ],
)
def test_a_bad_mode_is_refused_and_builds_nothing(campaign: Campaign, mode: IncrementalMode, field: str) -> None:
    campaign.add("a", updated=T0)
    with pytest.raises(InvalidArgument) as caught:
        campaign.build("r1", mode, T0)
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == ("INVALID_INCREMENTAL", [field])
    assert campaign.store.find("prod", "campaigns/weekly/runs/r1", "new") is None


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[audience_service_pb2_grpc.AudienceServiceStub]:
    url, schema = database_factory.url_and_schema("audience")
    server: GrpcServer = await build_server(AudienceSettings(port=0, database_url=url, database_schema=schema))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield audience_service_pb2_grpc.AudienceServiceStub(channel)
    await server.stop(0)


async def test_build_working_set_over_grpc_reports_the_excluded_records(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    await stub.CreateEntity(
        svc.CreateEntityRequest(
            entity_id="customers",
            entity=entity_pb2.Entity(
                attributes=[
                    entity_pb2.Attribute(name="id", type=entity_pb2.ATTRIBUTE_TYPE_STRING),
                    entity_pb2.Attribute(name="version", type=entity_pb2.ATTRIBUTE_TYPE_INTEGER),
                ],
                primary_key=["id"],
                version_attribute="version",
            ),
        )
    )

    async def add(key: str) -> None:
        change = svc.RecordChange(
            values={"id": value_pb2.Value(string_value=key), "version": value_pb2.Value(integer_value=1)}
        )
        await stub.IngestRecords(iter([svc.IngestRecordsRequest(entity="entities/customers", changes=[change])]))

    incremental = working_set_pb2.Incremental(
        processed_keys=working_set_pb2.IncrementalProcessedKeys(history_window=duration_pb2.Duration(seconds=0))
    )
    query = query_pb2.AudienceQuery(dimension="entities/customers")
    await add("a")
    first = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(run="campaigns/c/runs/r1", activity="q", query=query, incremental=incremental)
    )
    await add("b")
    second = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(run="campaigns/c/runs/r2", activity="q", query=query, incremental=incremental)
    )
    assert [(r.working_set.count, r.excluded) for r in (first, second)] == [(1, 0), (1, 1)]


async def test_an_incremental_without_a_mode_is_invalid_over_grpc(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
) -> None:
    request = svc.BuildWorkingSetRequest(
        run="campaigns/c/runs/r1",
        activity="q",
        query=query_pb2.AudienceQuery(dimension="entities/customers"),
        incremental=working_set_pb2.Incremental(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BuildWorkingSet(request)
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert [d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR)] == [True]
    assert (caught.value.code(), [v.field for v in bad.field_violations]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["incremental.mode"],
    )


BAD_TIMES = [
    (
        working_set_pb2.Incremental(
            processed_keys=working_set_pb2.IncrementalProcessedKeys(
                history_window=duration_pb2.Duration(seconds=315576000000)
            )
        ),
        None,
        "incremental.processed_keys.history_window",
    ),
    (
        working_set_pb2.Incremental(
            processed_keys=working_set_pb2.IncrementalProcessedKeys(
                history_window=duration_pb2.Duration(seconds=10**15)
            )
        ),
        None,
        "incremental.processed_keys.history_window",
    ),
    (
        working_set_pb2.Incremental(
            watermark=working_set_pb2.IncrementalWatermark(
                attribute="updated", initial_time=timestamp_pb2.Timestamp(seconds=-62135596800 * 2)
            )
        ),
        None,
        "incremental.watermark.initial_time",
    ),
    (
        working_set_pb2.Incremental(processed_keys=working_set_pb2.IncrementalProcessedKeys()),
        timestamp_pb2.Timestamp(seconds=253402300800 * 2),
        "reference_time",
    ),
    (
        working_set_pb2.Incremental(processed_keys=working_set_pb2.IncrementalProcessedKeys()),
        timestamp_pb2.Timestamp(seconds=1, nanos=-5),
        "reference_time",
    ),
]


@pytest.mark.parametrize(("incremental", "reference_time", "field"), BAD_TIMES)
async def test_an_out_of_range_time_or_window_is_invalid_over_grpc_naming_its_field(
    stub: audience_service_pb2_grpc.AudienceServiceStub,
    incremental: working_set_pb2.Incremental,
    reference_time: timestamp_pb2.Timestamp | None,
    field: str,
) -> None:
    request = svc.BuildWorkingSetRequest(
        run="campaigns/c/runs/r1",
        activity="q",
        query=query_pb2.AudienceQuery(dimension="entities/customers"),
        incremental=incremental,
        reference_time=reference_time,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BuildWorkingSet(request)
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert [d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR)] == [True]
    assert (caught.value.code(), [v.field for v in bad.field_violations]) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


# Purging processed keys: older than now - history window - working-set retention (5 days here).

DAY = dt.timedelta(days=1)
_key_tables: sa.Table = ProcessedKeyTableRow.__table__  # type: ignore[attr-defined]


def processed(campaign: Campaign) -> set[tuple[str, str]]:
    """The (key, run) pairs the processed-key table of campaign ``weekly``'s activity ``new`` holds."""
    with campaign.database.engine.connect() as conn:
        table_name = conn.execute(
            sa.select(_key_tables.c.table_name).where(_key_tables.c.campaign == "campaigns/weekly")
        ).scalar_one()
        return {(key, run) for key, run in conn.execute(sa.text(f'SELECT k1, run FROM "{table_name}"'))}


def stored_window(campaign: Campaign) -> int | None:
    with campaign.database.engine.connect() as conn:
        window = conn.execute(sa.select(_key_tables.c.history_window_s)).scalar_one()
    return None if window is None else int(window)


def test_the_purge_deletes_processed_keys_older_than_the_window_and_the_retention(campaign: Campaign) -> None:
    one_day = ProcessedKeys(history_window=DAY)
    for key in ("a", "b"):
        campaign.add(key)
    campaign.build("r1", one_day, T0)
    campaign.add("c")
    campaign.build("r2", one_day, T0 + DAY / 2)
    purged = campaign.builder.purge_processed_keys(T0 + 6 * DAY + dt.timedelta(hours=1))
    assert (purged, processed(campaign)) == (2, {("c", "campaigns/weekly/runs/r2")})


def test_the_purge_keeps_the_keys_a_still_retained_run_sees(campaign: Campaign) -> None:
    one_day = ProcessedKeys(history_window=DAY)
    for key in ("a", "b"):
        campaign.add(key)
    campaign.build("r1", one_day, T0)
    campaign.add("c")
    campaign.build("r2", one_day, T0 + DAY / 2)
    # The last moment r2 (built at T0 + 12 h) is retained: nothing it saw may go.
    purged = campaign.builder.purge_processed_keys(T0 + DAY / 2 + 5 * DAY)
    campaign.store.purge_expired(dt.datetime.now(dt.UTC) + dt.timedelta(days=3650))
    rebuilt = campaign.build("r2", one_day, T0 + DAY / 2)
    assert (purged, campaign.result(rebuilt)) == (0, (["c"], 2))


def test_processed_keys_of_a_zero_history_window_are_never_purged(campaign: Campaign) -> None:
    campaign.add("a")
    campaign.build("r1", ProcessedKeys(history_window=dt.timedelta(0)), T0)
    purged = campaign.builder.purge_processed_keys(T0 + 3650 * DAY)
    assert (purged, processed(campaign)) == (0, {("a", "campaigns/weekly/runs/r1")})


def test_each_processed_key_table_keeps_the_longest_window_its_builds_used(campaign: Campaign) -> None:
    campaign.add("a")
    windows = [DAY, 30 * DAY, DAY, dt.timedelta(0), DAY]
    stored = []
    for i, window in enumerate(windows):
        campaign.build(f"r{i}", ProcessedKeys(history_window=window), T0 + i * DAY)
        stored.append(stored_window(campaign))
    assert stored == [86400, 30 * 86400, 30 * 86400, 0, 0]


def test_a_processed_key_table_of_an_older_release_is_never_purged(campaign: Campaign) -> None:
    campaign.add("a")
    campaign.build("r1", ProcessedKeys(history_window=DAY), T0)
    with campaign.database.engine.begin() as conn:
        conn.execute(_key_tables.update().values(history_window_s=None))
    purged = campaign.builder.purge_processed_keys(T0 + 3650 * DAY)
    assert (purged, processed(campaign)) == (0, {("a", "campaigns/weekly/runs/r1")})


def test_migration_5_adds_the_history_window_to_an_existing_database(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("audience")
    database.migrate(MIGRATIONS[:4])
    with database.engine.begin() as conn:
        # Migration 3 of an older release created the table without the column.
        conn.execute(sa.text("ALTER TABLE processed_key_tables DROP COLUMN history_window_s"))
    assert database.migrate(MIGRATIONS) == [5]
    columns = {c["name"] for c in sa.inspect(database.engine).get_columns("processed_key_tables")}
    assert "history_window_s" in columns


async def test_the_service_purge_sweep_purges_processed_keys(campaign: Campaign) -> None:
    campaign.add("a")
    # Processed at T0 with a one-day window: past the window and retention long before now.
    campaign.build("r1", ProcessedKeys(history_window=DAY), T0)
    sweep = asyncio.create_task(purge_periodically(campaign.store, 3600, campaign.builder))
    try:
        for _ in range(1000):
            if not processed(campaign):
                break
            await asyncio.sleep(0.01)
    finally:
        sweep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweep
    assert processed(campaign) == set()
