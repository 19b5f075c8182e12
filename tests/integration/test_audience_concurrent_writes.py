"""Concurrent create-or-overwrite writes of audience_svc, raced for real on SQLite and PostgreSQL.

The scheduler runs parallel branches of one campaign and retries a call whose answer was lost, so
the same write may arrive twice at once: two saves of one audience id, or two calls building the
same (run, activity) working set (build, combine, change dimension, split, deduplication,
reconciliation); and reads of a saved audience (build from it, evaluate it) may meet a save that
replaces its members. Each test starts the calls on their own threads behind a barrier (or, over
gRPC, at once on the real server's worker threads), for several rounds, and checks that every call
succeeds (never INTERNAL) and that the store holds exactly one outcome: one member set (never a mix
or a union), one working set per activity, no leftover table.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from audience_svc.entities import EntityCatalog
from audience_svc.incremental import IncrementalBuild, IncrementalBuilder, IncrementalMode, ProcessedKeys, Watermark
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import AudienceQuery, Condition
from audience_svc.reconciliation import reconcile
from audience_svc.saved_audiences import MAX_READ_ATTEMPTS, AudienceChanged, Resolved, SavedAudienceStore
from audience_svc.schema import MANY_TO_ONE, Attribute, EntitySchema, JoinPair, Link
from audience_svc.tables import MIGRATIONS, ReconciliationRow, SavedAudienceRow, WorkingSetRow
from audience_svc.working_sets import Subset, WorkingSet, WorkingSetStore
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import query_pb2
from carillon_chassis.database import Database
from carillon_chassis.errors import NotFound
from tests.integration.test_audience_saved import RUN as GRPC_RUN
from tests.integration.test_audience_saved import Stub, age, stub
from tests.integration.test_audience_saved import build as build_over_grpc
from tests.integration.test_audience_server import PROD

__all__ = ["stub"]  # the fixture of a real AudienceService with customers c001..c010 (ages 21..30)

ROUNDS = 8
CUSTOMERS = EntitySchema(
    attributes=(
        Attribute("id", "string"),
        Attribute("version", "integer"),
        Attribute("age", "integer"),
        Attribute("email", "string", nullable=True),
        Attribute("updated", "timestamp"),
    ),
    primary_key=("id",),
    version_attribute="version",
)
BOOKINGS = EntitySchema(
    attributes=(Attribute("id", "string"), Attribute("version", "integer"), Attribute("customer_id", "string")),
    primary_key=("id",),
    version_attribute="version",
    links=(Link("customer", "customers", MANY_TO_ONE, (JoinPair("customer_id", "id"),)),),
)
UPDATED = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
PEOPLE = 300  # customers c000..c299, aged 20 + i % 50; every third one has two bookings


class Stores:
    """A fresh audience database with customers and bookings, its working sets and saved audiences."""

    def __init__(self, database: Database) -> None:
        database.migrate(MIGRATIONS)
        self.database = database
        catalog = EntityCatalog(database)
        customers = catalog.create_entity("prod", "customers", CUSTOMERS)
        bookings = catalog.create_entity("prod", "bookings", BOOKINGS)
        apply_changes(
            database,
            customers,
            [
                RecordChange(
                    "upsert",
                    {"id": f"c{i:03}", "version": 1, "age": 20 + i % 50, "email": f"{i % 280}@x", "updated": UPDATED},
                )
                for i in range(PEOPLE)
            ],
        )
        apply_changes(
            database,
            bookings,
            [
                RecordChange("upsert", {"id": f"b{i:03}{j}", "version": 1, "customer_id": f"c{i:03}"})
                for i in range(0, PEOPLE, 3)
                for j in range(2)
            ],
        )
        self.working_sets = WorkingSetStore(catalog)
        self.saved = SavedAudienceStore(catalog, self.working_sets)

    def build(self, run: str, activity: str, low: int, high: int, dimension: str = "customers") -> str:
        query = AudienceQuery(dimension, Condition("age", "between", (low, high)) if dimension == "customers" else None)
        return self.working_sets.build("prod", run, activity, query).working_set_id

    def keys(self, working_set_id: str) -> list[str]:
        plan = self.working_sets.open_stream("prod", working_set_id, [])
        records = self.working_sets.read_batch(plan, 0, 10000)
        assert [r.position for r in records] == list(range(1, len(records) + 1))
        return [r.entity_key for r in records]

    def members(self, audience_id: str) -> set[str]:
        entity, where = self.saved.resolve("prod", audience_id)
        with self.database.engine.connect() as conn:
            return set(conn.execute(sa.select(entity.table.c.id).where(where)).scalars())

    def tables(self, prefix: str) -> set[str]:
        return {name for name in sa.inspect(self.database.engine).get_table_names() if name.startswith(prefix)}

    def catalogued(self, table: Any) -> set[str]:
        with self.database.engine.connect() as conn:
            return set(conn.execute(sa.select(table.c.table_name).where(table.c.table_name != "")).scalars())

    def activities(self, run: str) -> list[str]:
        catalog = WorkingSetRow.__table__  # type: ignore[attr-defined]
        with self.database.engine.connect() as conn:
            return sorted(conn.execute(sa.select(catalog.c.activity).where(catalog.c.run == run)).scalars())


@pytest.fixture
def stores(make_database: Callable[[str], Database]) -> Stores:
    return Stores(make_database("audience"))


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call on its own thread, all released at once; their results or raised exceptions."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # the test reports every outcome
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def succeeded(results: list[Any]) -> list[Any]:
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, [f"{type(f).__name__}: {f}" for f in failures]
    return results


def assert_no_leftover_tables(stores: Stores) -> None:
    assert stores.tables("aud_") == stores.catalogued(SavedAudienceRow.__table__)  # type: ignore[attr-defined]
    assert stores.tables("ws_") == stores.catalogued(WorkingSetRow.__table__)  # type: ignore[attr-defined]


# --- saving two working sets to one audience at once ---------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new_audience", "existing_audience"])
def test_two_saves_of_one_audience_at_once_both_succeed_and_leave_one_member_set(
    stores: Stores, existing: bool
) -> None:
    young = stores.build("campaigns/c/runs/r", "young", 20, 29)
    old = stores.build("campaigns/c/runs/r", "old", 50, 69)
    member_sets = {frozenset(stores.keys(young)), frozenset(stores.keys(old))}
    for round_ in range(ROUNDS):
        audience_id = f"vip{round_}"
        if existing:
            stores.saved.save_working_set("prod", audience_id, old)
        results = succeeded(
            race(
                partial(stores.saved.save_working_set, "prod", audience_id, young),
                partial(stores.saved.save_working_set, "prod", audience_id, old),
            )
        )
        members = stores.members(audience_id)
        assert frozenset(members) in member_sets
        saved = stores.saved.get("prod", audience_id)
        assert saved.member_count == len(members)
        # Each call answers with the audience as it saved it: its own working set's member count.
        assert [audience.member_count for audience, _ in results] == [len(stores.keys(young)), len(stores.keys(old))]
        # Exactly one call created a new audience; when it existed, neither did.
        assert sorted(created for _, created in results) == ([False, False] if existing else [False, True])
    assert_no_leftover_tables(stores)


def test_a_save_racing_a_delete_of_one_audience_leaves_no_orphan_table(stores: Stores) -> None:
    young = stores.build("campaigns/c/runs/r", "young", 20, 29)
    for round_ in range(ROUNDS):
        audience_id = f"gone{round_}"
        stores.saved.save_working_set("prod", audience_id, young)
        results = race(
            partial(stores.saved.save_working_set, "prod", audience_id, young),
            partial(stores.saved.delete, "prod", audience_id),
        )
        saved, deleted = results
        assert not isinstance(saved, BaseException), saved
        assert deleted is None or isinstance(deleted, NotFound), deleted
    assert_no_leftover_tables(stores)


# --- one (run, activity) built twice at once -------------------------------------------------------


def test_two_builds_of_one_activity_at_once_return_the_same_working_set(stores: Stores) -> None:
    for round_ in range(ROUNDS):
        run = f"campaigns/c/runs/r{round_}"
        first, second = succeeded(
            race(partial(stores.build, run, "a", 20, 40), partial(stores.build, run, "a", 20, 40))
        )
        assert first == second
        assert stores.activities(run) == ["a"]
    assert_no_leftover_tables(stores)


@pytest.mark.parametrize("operation", ["union", "intersection", "exclusion"])
def test_two_combines_of_one_activity_at_once_return_the_same_working_set(stores: Stores, operation: str) -> None:
    young = stores.build("campaigns/c/runs/src", "young", 20, 39)
    middle = stores.build("campaigns/c/runs/src", "middle", 30, 49)
    for round_ in range(ROUNDS):
        run = f"campaigns/c/runs/r{round_}"

        def combine(run: str = run) -> Any:
            return stores.working_sets.combine("prod", run, "both", young, [middle], operation)

        first, second = succeeded(race(combine, combine))
        assert first.working_set_id == second.working_set_id
        assert stores.activities(run) == ["both"]
    assert_no_leftover_tables(stores)


def test_two_dimension_changes_of_one_activity_at_once_return_the_same_working_set(stores: Stores) -> None:
    bookings = stores.build("campaigns/c/runs/src", "bookings", 0, 0, dimension="bookings")
    for round_ in range(ROUNDS):
        run = f"campaigns/c/runs/r{round_}"

        def change(run: str = run) -> Any:
            return stores.working_sets.change_dimension("prod", run, "who", bookings, "customer")

        (first, unmatched_first), (second, unmatched_second) = succeeded(race(change, change))
        assert first.working_set_id == second.working_set_id
        assert (first.count, unmatched_first, unmatched_second) == (PEOPLE // 3, 0, 0)
        assert stores.activities(run) == ["who"]
    assert_no_leftover_tables(stores)


def test_two_splits_at_once_return_the_same_subsets_and_complement(stores: Stores) -> None:
    source = stores.build("campaigns/c/runs/src", "all", 0, 100)
    subsets = [
        Subset("s1", Condition("age", "less", (30,)), limit_percent=50, order_by=(("age", True),)),
        Subset("s2", Condition("age", "less", (40,)), limit=40),
    ]
    for round_ in range(ROUNDS):
        run = f"campaigns/c/runs/r{round_}"

        def split(run: str = run) -> Any:
            return stores.working_sets.split("prod", run, source, subsets, complement_activity="rest")

        (built_first, rest_first), (built_second, rest_second) = succeeded(race(split, split))
        assert [w.working_set_id for w in built_first] == [w.working_set_id for w in built_second]
        assert rest_first is not None and rest_second is not None
        assert rest_first.working_set_id == rest_second.working_set_id
        parts = [stores.keys(w.working_set_id) for w in [*built_first, rest_first]]
        assert sorted(k for part in parts for k in part) == sorted(stores.keys(source))
        assert stores.activities(run) == ["rest", "s1", "s2"]
    assert_no_leftover_tables(stores)


def test_two_random_deduplications_at_once_return_one_result_and_its_exact_complement(stores: Stores) -> None:
    source = stores.build("campaigns/c/runs/src", "all", 0, 100)
    for round_ in range(ROUNDS):
        run = f"campaigns/c/runs/r{round_}"

        def deduplicate(run: str = run) -> Any:
            return stores.working_sets.deduplicate(
                "prod", run, "one", source, ["age"], method="random", complement_activity="dups"
            )

        (kept_first, dups_first), (kept_second, dups_second) = succeeded(race(deduplicate, deduplicate))
        assert kept_first.working_set_id == kept_second.working_set_id
        assert dups_first is not None and dups_second is not None
        assert dups_first.working_set_id == dups_second.working_set_id
        kept, dups = stores.keys(kept_first.working_set_id), stores.keys(dups_first.working_set_id)
        assert (len(kept), set(kept) & set(dups)) == (50, set())
        assert sorted(kept + dups) == sorted(stores.keys(source))
        assert stores.activities(run) == ["dups", "one"]
    assert_no_leftover_tables(stores)


# --- reconciliation of one activity twice at once -------------------------------------------------


@pytest.mark.parametrize("keep", [False, True], ids=["drop_unreconciled", "keep_unreconciled"])
def test_two_reconciliations_of_one_activity_at_once_return_the_same_result(stores: Stores, keep: bool) -> None:
    source = stores.build("campaigns/c/runs/src", "all", 0, 100)
    for round_ in range(ROUNDS):
        run = f"campaigns/c/runs/r{round_}"

        def reconciled(run: str = run) -> Any:
            return reconcile(
                stores.working_sets,
                "prod",
                run,
                "match",
                source,
                "customers",
                [("email", "email")],
                unreconciled_activity="rest" if keep else "",
            )

        first, second = succeeded(race(reconciled, reconciled))
        # 280 distinct emails over 300 customers: 260 alone on theirs, 40 sharing one with another.
        assert (first.matched, first.unmatched, first.ambiguous) == (260, 0, 40)
        assert (second.matched, second.unmatched, second.ambiguous) == (260, 0, 40)
        assert first.working_set.working_set_id == second.working_set.working_set_id
        assert len(stores.keys(first.working_set.working_set_id)) == 260
        if keep:
            assert first.unreconciled is not None and second.unreconciled is not None
            assert first.unreconciled.working_set_id == second.unreconciled.working_set_id
            assert len(stores.keys(first.unreconciled.working_set_id)) == 40
        assert stores.activities(run) == (["match", "rest"] if keep else ["match"])
        rows = ReconciliationRow.__table__  # type: ignore[attr-defined]
        with stores.database.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(rows).where(rows.c.run == run)).scalar_one() == 1
    assert_no_leftover_tables(stores)


# --- incremental builds of one (run, activity) twice at once --------------------------------------


@pytest.mark.parametrize("mode", [ProcessedKeys(), Watermark("updated")], ids=["processed_keys", "watermark"])
def test_two_incremental_builds_of_one_activity_at_once_return_one_working_set_and_one_count(
    stores: Stores, mode: IncrementalMode
) -> None:
    builder = IncrementalBuilder(stores.working_sets)
    query = AudienceQuery("customers", Condition("age", "between", (20, 39)))
    for round_ in range(ROUNDS):
        run = f"campaigns/inc/runs/r{round_}"

        def build(run: str = run) -> IncrementalBuild:
            return builder.build("prod", run, "a", query, mode)

        first, second = succeeded(race(build, build))
        assert first.working_set.working_set_id == second.working_set.working_set_id
        assert first.excluded == second.excluded
        # The first run takes every matching record; later runs have nothing new.
        assert (first.working_set.count, first.excluded) == ((120, 0) if round_ == 0 else (0, 120))
        assert stores.activities(run) == ["a"]
    assert_no_leftover_tables(stores)


# --- reading a saved audience while it is overwritten ---------------------------------------------


def test_a_build_from_a_saved_audience_racing_its_overwrite_gets_one_member_set(stores: Stores) -> None:
    young = stores.build("campaigns/c/runs/r", "young", 20, 29)
    old = stores.build("campaigns/c/runs/r", "old", 50, 69)
    member_sets = {frozenset(stores.keys(young)), frozenset(stores.keys(old))}
    stores.saved.save_working_set("prod", "vip", old)
    for round_ in range(ROUNDS * 2):
        run = f"campaigns/read/runs/r{round_}"

        def build(run: str = run) -> str:
            def use(resolved: Resolved) -> WorkingSet:
                return stores.working_sets.build("prod", run, "a", None, resolved=resolved)

            return stores.saved.read("prod", "vip", use).working_set_id

        built, _ = succeeded(
            race(build, partial(stores.saved.save_working_set, "prod", "vip", young if round_ % 2 else old))
        )
        assert frozenset(stores.keys(built)) in member_sets
    assert_no_leftover_tables(stores)


def test_builds_from_a_saved_audience_amid_many_overwrites_wait_for_them_and_succeed(stores: Stores) -> None:
    young = stores.build("campaigns/c/runs/r", "young", 20, 29)
    old = stores.build("campaigns/c/runs/r", "old", 50, 69)
    member_sets = {frozenset(stores.keys(young)), frozenset(stores.keys(old))}
    stores.saved.save_working_set("prod", "vip", old)
    for round_ in range(ROUNDS):
        run = f"campaigns/many/runs/r{round_}"

        def build(activity: str, run: str = run) -> str:
            def use(resolved: Resolved) -> WorkingSet:
                return stores.working_sets.build("prod", run, activity, None, resolved=resolved)

            return stores.saved.read("prod", "vip", use).working_set_id

        saves = [partial(stores.saved.save_working_set, "prod", "vip", source) for source in (young, old) * 3]
        *_, first, second = succeeded(race(*saves, partial(build, "a"), partial(build, "b")))
        assert frozenset(stores.keys(first)) in member_sets
        assert frozenset(stores.keys(second)) in member_sets
    assert_no_leftover_tables(stores)


async def test_saves_builds_and_evaluations_of_one_audience_at_once_over_grpc_all_succeed(stub: Stub) -> None:
    young = await build_over_grpc(stub, "young", age(query_pb2.OPERATOR_LESS, 25))  # c001..c004
    old = await build_over_grpc(stub, "old", age(query_pb2.OPERATOR_GREATER, 24))  # c005..c010
    member_sets = {("c001", "c002", "c003", "c004"), ("c005", "c006", "c007", "c008", "c009", "c010")}
    await stub.SaveAudience(svc.SaveAudienceRequest(audience_id="vip", working_set=old), metadata=PROD)
    for round_ in range(ROUNDS):
        saves = [
            stub.SaveAudience(svc.SaveAudienceRequest(audience_id="vip", working_set=source), metadata=PROD)
            for source in (young, old)
        ]
        built, evaluated, *saved = await asyncio.gather(
            stub.BuildWorkingSet(
                svc.BuildWorkingSetRequest(run=GRPC_RUN, activity=f"read{round_}", audience="audiences/vip"),
                metadata=PROD,
            ),
            stub.EvaluateAudience(
                svc.EvaluateAudienceRequest(audience="audiences/vip", sample_size=100), metadata=PROD
            ),
            *saves,
        )
        assert [s.created for s in saved] == [False, False]
        assert tuple(sorted(evaluated.sample_keys)) in member_sets
        assert built.working_set.count in (4, 6)
    final = await stub.GetAudience(svc.GetAudienceRequest(name="audiences/vip"), metadata=PROD)
    assert final.audience.member_count in (4, 6)


# --- a source working set purged while an operation reads it --------------------------------------


class PurgingStore(WorkingSetStore):
    """A store that purges the first working set whose table it looks up, right after the look-up (as
    the purge sweep would drop an expiring source right after the operation found it)."""

    purged = False

    def table_name(self, sandbox: str, working_set_id: str, *, field: str = "working_set") -> str:
        name = super().table_name(sandbox, working_set_id, field=field)
        if not self.purged:
            self.purged = True
            catalog = WorkingSetRow.__table__  # type: ignore[attr-defined]
            with self.database.engine.begin() as conn:
                conn.execute(
                    catalog.update()
                    .where(catalog.c.working_set_id == working_set_id)
                    .values(expire_time=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
                )
            assert self.purge_expired() == 1
        return name


# Each operation: the field naming its source read first (the one purged), and the call, given the
# working sets a and c (customers) and b (bookings).
OPERATIONS: dict[str, tuple[str, Callable[[WorkingSetStore, dict[str, str]], object]]] = {
    "combine": (
        "primary",
        lambda store, ws: store.combine("prod", "campaigns/p/runs/r", "x", ws["a"], [ws["c"]], "union"),
    ),
    "change_dimension": (
        "working_set",
        lambda store, ws: store.change_dimension("prod", "campaigns/p/runs/r", "x", ws["b"], "customer"),
    ),
    "split": (
        "working_set",
        lambda store, ws: store.split(
            "prod", "campaigns/p/runs/r", ws["a"], [Subset("x", limit_percent=50)], complement_activity="y"
        ),
    ),
    "deduplicate": (
        "working_set",
        lambda store, ws: store.deduplicate(
            "prod", "campaigns/p/runs/r", "x", ws["a"], ["age"], attribute="age", complement_activity="y"
        ),
    ),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_source_purged_while_an_operation_reads_it_is_not_found_and_builds_nothing(
    stores: Stores, operation: str
) -> None:
    field, call = OPERATIONS[operation]
    ws = {
        "a": stores.build("campaigns/p/runs/src", "a", 20, 39),
        "b": stores.build("campaigns/p/runs/src", "b", 0, 0, dimension="bookings"),
        "c": stores.build("campaigns/p/runs/src", "c", 30, 49),
    }
    with pytest.raises(NotFound) as caught:
        call(PurgingStore(stores.working_sets.catalog), ws)
    assert [v.field for v in caught.value.violations] == [field]
    assert stores.activities("campaigns/p/runs/r") == []
    # Only the source looked up first was purged: b (bookings) for a change of dimension, a for the others.
    assert stores.activities("campaigns/p/runs/src") == (["a", "c"] if operation == "change_dimension" else ["b", "c"])
    assert_no_leftover_tables(stores)


def test_a_working_set_purged_while_it_is_saved_is_not_found_and_saves_nothing(stores: Stores) -> None:
    source = stores.build("campaigns/p/runs/src", "a", 20, 39)
    saved = SavedAudienceStore(stores.working_sets.catalog, PurgingStore(stores.working_sets.catalog))
    with pytest.raises(NotFound) as caught:
        saved.save_working_set("prod", "vip", source)
    assert [v.field for v in caught.value.violations] == ["working_set"]
    with pytest.raises(NotFound):
        stores.saved.get("prod", "vip")
    assert_no_leftover_tables(stores)


def test_a_read_that_keeps_losing_to_overwrites_is_aborted_and_retryable(stores: Stores) -> None:
    young = stores.build("campaigns/c/runs/r", "young", 20, 29)
    stores.saved.save_working_set("prod", "vip", young)
    attempts = []

    def overwritten_then_read(resolved: Resolved) -> int:
        attempts.append(1)
        stores.saved.save_working_set("prod", "vip", young)  # drops the table ``resolved`` names
        entity, where = resolved
        with stores.database.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(entity.table).where(where)).scalar_one())

    with pytest.raises(AudienceChanged) as caught:
        stores.saved.read("prod", "vip", overwritten_then_read)
    assert (caught.value.code, caught.value.reason, len(attempts)) == (
        grpc.StatusCode.ABORTED,
        "AUDIENCE_CHANGED",
        MAX_READ_ATTEMPTS,
    )


def test_a_failed_read_of_an_audience_nobody_replaced_is_raised_as_it_is(stores: Stores) -> None:
    young = stores.build("campaigns/c/runs/r", "young", 20, 29)
    stores.saved.save_working_set("prod", "vip", young)
    attempts = []

    def broken(resolved: Resolved) -> None:
        attempts.append(1)
        with stores.database.engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table"))

    with pytest.raises(sa.exc.DBAPIError):
        stores.saved.read("prod", "vip", broken)
    assert len(attempts) == 1
