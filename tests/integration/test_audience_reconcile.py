"""Reconciliation of a working set with a target entity, with exact membership, on SQLite and PostgreSQL.

Loaded rows (an ``imports`` entity) are matched to ``customers`` on one or two attribute pairs;
matched, unmatched and ambiguous rows are counted, and the rows not reconciled are dropped or kept
in their own working set. One call goes over the real gRPC server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from audience_svc.app import build_server
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.query import AudienceQuery
from audience_svc.reconciliation import Reconciliation, reconcile
from audience_svc.schema import Attribute, Entity, EntitySchema
from audience_svc.settings import AudienceSettings
from audience_svc.tables import MIGRATIONS
from audience_svc.working_sets import WorkingSet, WorkingSetStore
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc, entity_pb2, query_pb2, working_set_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.database import Database
from carillon_chassis.errors import FailedPrecondition, InvalidArgument, NotFound
from carillon_chassis.server import GrpcServer
from tests.conftest import DatabaseFactory

RUN = "campaigns/import/runs/r1"
CUSTOMERS = EntitySchema(
    attributes=(
        Attribute("id", "string"),
        Attribute("version", "integer"),
        Attribute("email", "string", nullable=True),
        Attribute("first_name", "string", nullable=True),
        Attribute("last_name", "string", nullable=True),
    ),
    primary_key=("id",),
    version_attribute="version",
)
IMPORTS = EntitySchema(
    attributes=(
        Attribute("row", "integer"),
        Attribute("version", "integer"),
        Attribute("mail", "string", nullable=True),
        Attribute("given", "string", nullable=True),
        Attribute("family", "string", nullable=True),
    ),
    primary_key=("row",),
    version_attribute="version",
)
# Customer id → (email, first name, last name); two customers share dup@x.
PEOPLE = {
    "a": ("a@x", "Ada", "Lovelace"),
    "b": ("b@x", "Alan", "Turing"),
    "c": ("dup@x", "Grace", "Hopper"),
    "d": ("dup@x", "Grace", "Kelly"),
}
# Imported row → (mail, given name, family name).
ROWS = {
    1: ("a@x", "Ada", "Lovelace"),
    2: ("b@x", "Alan", "Byron"),
    3: ("z@x", "Grace", "Hopper"),
    4: ("dup@x", "Grace", "Kelly"),
    5: ("a@x", None, None),
    6: (None, "Nobody", "Known"),
}
EMAIL = [("mail", "email")]


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> WorkingSetStore:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    catalog = EntityCatalog(database)
    customers = catalog.create_entity("prod", "customers", CUSTOMERS)
    imports = catalog.create_entity("prod", "imports", IMPORTS)
    apply_changes(
        database,
        customers,
        [
            RecordChange("upsert", {"id": k, "version": 1, "email": e, "first_name": f, "last_name": n})
            for k, (e, f, n) in PEOPLE.items()
        ],
    )
    apply_changes(
        database,
        imports,
        [
            RecordChange("upsert", {"row": k, "version": 1, "mail": m, "given": g, "family": f})
            for k, (m, g, f) in ROWS.items()
        ],
    )
    return WorkingSetStore(catalog)


def keys(store: WorkingSetStore, working_set_id: str) -> list[str]:
    plan = store.open_stream("prod", working_set_id, [])
    return [r.entity_key for r in store.read_batch(plan, 0, 1000)]


def loaded(store: WorkingSetStore) -> str:
    return store.build("prod", RUN, "load", AudienceQuery("imports")).working_set_id


def outcome(store: WorkingSetStore, result: Reconciliation) -> tuple[object, ...]:
    kept = None if result.unreconciled is None else keys(store, result.unreconciled.working_set_id)
    return (
        keys(store, result.working_set.working_set_id),
        result.working_set.dimension,
        kept,
        (result.matched, result.unmatched, result.ambiguous),
    )


def test_rows_matching_one_record_are_reconciled_and_the_others_dropped_and_counted(store: WorkingSetStore) -> None:
    result = reconcile(store, "prod", RUN, "match", loaded(store), "customers", EMAIL)
    assert outcome(store, result) == (["a", "b"], "entities/customers", None, (3, 2, 1))


def test_rows_not_reconciled_can_be_kept_in_their_own_working_set(store: WorkingSetStore) -> None:
    result = reconcile(store, "prod", RUN, "match", loaded(store), "customers", EMAIL, unreconciled_activity="rest")
    assert outcome(store, result) == (["a", "b"], "entities/customers", ["3", "4", "6"], (3, 2, 1))
    assert result.unreconciled is not None and result.unreconciled.dimension == "entities/imports"


def test_every_pair_must_match(store: WorkingSetStore) -> None:
    names = [("given", "first_name"), ("family", "last_name")]
    result = reconcile(store, "prod", RUN, "match", loaded(store), "customers", names, unreconciled_activity="rest")
    assert outcome(store, result) == (["a", "c", "d"], "entities/customers", ["2", "5", "6"], (3, 3, 0))


def test_a_record_deleted_after_the_load_counts_as_unmatched(store: WorkingSetStore) -> None:
    source = loaded(store)
    imports = store.catalog.get_entity("prod", "imports")
    apply_changes(store.database, imports, [RecordChange("delete", {"row": 1, "version": 2})])
    result = reconcile(store, "prod", RUN, "match", source, "customers", EMAIL, unreconciled_activity="rest")
    # The kept working set holds row 1 too; like any record deleted after a build, it is not streamed.
    assert outcome(store, result) == (["a", "b"], "entities/customers", ["3", "4", "6"], (2, 3, 1))
    assert result.unreconciled is not None and result.unreconciled.count == 4


def test_reconciling_again_returns_the_same_working_sets(store: WorkingSetStore) -> None:
    source = loaded(store)
    first = reconcile(store, "prod", RUN, "match", source, "customers", EMAIL, unreconciled_activity="rest")
    again = reconcile(store, "prod", RUN, "match", source, "customers", EMAIL, unreconciled_activity="rest")
    assert first.unreconciled is not None and again.unreconciled is not None
    assert (again.working_set.working_set_id, again.unreconciled.working_set_id) == (
        first.working_set.working_set_id,
        first.unreconciled.working_set_id,
    )
    assert outcome(store, again) == (["a", "b"], "entities/customers", ["3", "4", "6"], (3, 2, 1))


def test_reconciling_again_after_the_data_changed_returns_the_recorded_counts(store: WorkingSetStore) -> None:
    source = loaded(store)
    reconcile(store, "prod", RUN, "match", source, "customers", EMAIL)
    # z@x (row 3) now matches a customer: recomputed counts would be (4, 1, 1).
    apply_changes(
        store.database,
        store.catalog.get_entity("prod", "customers"),
        [RecordChange("upsert", {"id": "z", "version": 1, "email": "z@x"})],
    )
    again = reconcile(store, "prod", RUN, "match", source, "customers", EMAIL)
    assert outcome(store, again) == (["a", "b"], "entities/customers", None, (3, 2, 1))


def test_an_activity_holding_another_working_set_is_failed_precondition(store: WorkingSetStore) -> None:
    source = loaded(store)
    with pytest.raises(FailedPrecondition) as caught:
        reconcile(store, "prod", RUN, "load", source, "customers", EMAIL)
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == ("ACTIVITY_TAKEN", ["activity"])


def test_reconciling_an_activity_again_with_another_target_is_failed_precondition(store: WorkingSetStore) -> None:
    source = loaded(store)
    reconcile(store, "prod", RUN, "match", source, "customers", EMAIL)
    with pytest.raises(FailedPrecondition) as caught:
        reconcile(store, "prod", RUN, "match", source, "imports", [("mail", "mail")])
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == ("ACTIVITY_TAKEN", ["activity"])


def test_a_taken_unreconciled_activity_is_failed_precondition_and_builds_nothing(store: WorkingSetStore) -> None:
    source = loaded(store)
    with pytest.raises(FailedPrecondition) as caught:
        reconcile(store, "prod", RUN, "match", source, "customers", EMAIL, unreconciled_activity="load")
    assert [v.field for v in caught.value.violations] == ["unreconciled_activity"]
    assert store.find("prod", RUN, "match") is None


class FailingKeptStore(WorkingSetStore):
    """A store that fails creating the kept working set inside the reconciled set's transaction."""

    def materialize_in(
        self, conn: sa.Connection, sandbox: str, run: str, activity: str, entity: Entity, selection: sa.Select[Any]
    ) -> WorkingSet:
        super().materialize_in(conn, sandbox, run, activity, entity, selection)
        raise RuntimeError("the kept working set failed")


def test_both_working_sets_are_written_in_one_transaction(store: WorkingSetStore) -> None:
    source = loaded(store)
    failing = FailingKeptStore(store.catalog)
    with pytest.raises(RuntimeError):
        reconcile(failing, "prod", RUN, "match", source, "customers", EMAIL, unreconciled_activity="rest")
    assert (store.find("prod", RUN, "match"), store.find("prod", RUN, "rest")) == (None, None)


class PurgingStore(WorkingSetStore):
    """A store that purges every working set just before it materializes one."""

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
        self.purge_expired(dt.datetime.now(dt.UTC) + dt.timedelta(days=3650))
        return super().materialize(sandbox, run, activity, entity, selection, then=then)


def test_a_source_purged_during_the_call_is_not_found(store: WorkingSetStore) -> None:
    source = loaded(store)
    with pytest.raises(NotFound) as caught:
        reconcile(PurgingStore(store.catalog), "prod", RUN, "match", source, "customers", EMAIL)
    assert [v.field for v in caught.value.violations] == ["working_set"]
    assert store.find("prod", RUN, "match") is None


def test_migration_4_adds_the_reconciliations_table_to_an_existing_database(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("audience")
    database.migrate(MIGRATIONS[:3])
    assert database.migrate(MIGRATIONS[:4]) == [4]
    assert "reconciliations" in set(sa.inspect(database.engine).get_table_names())


@pytest.mark.parametrize(
    ("pairs", "fields"),
    [
        ([], ["pairs"]),
        ([("nope", "email"), ("mail", "nada")], ["pairs[0].source_attribute", "pairs[1].target_attribute"]),
        ([("row", "email")], ["pairs[0].target_attribute"]),
    ],
)
def test_bad_pairs_are_refused_naming_each_field_and_build_nothing(
    store: WorkingSetStore, pairs: list[tuple[str, str]], fields: list[str]
) -> None:
    source = loaded(store)
    with pytest.raises(InvalidArgument) as caught:
        reconcile(store, "prod", RUN, "match", source, "customers", pairs, unreconciled_activity="rest")
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == ("INVALID_RECONCILIATION", fields)
    assert (store.find("prod", RUN, "match"), store.find("prod", RUN, "rest")) == (None, None)


def test_an_unknown_target_is_not_found(store: WorkingSetStore) -> None:
    with pytest.raises(NotFound) as caught:
        reconcile(store, "prod", RUN, "match", loaded(store), "prospects", EMAIL)
    assert [v.field for v in caught.value.violations] == ["target"]


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[audience_service_pb2_grpc.AudienceServiceStub]:
    url, schema = database_factory.url_and_schema("audience")
    server: GrpcServer = await build_server(AudienceSettings(port=0, database_url=url, database_schema=schema))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield audience_service_pb2_grpc.AudienceServiceStub(channel)
    await server.stop(0)


async def test_reconcile_working_set_over_grpc(stub: audience_service_pb2_grpc.AudienceServiceStub) -> None:
    def text(value: str) -> value_pb2.Value:
        return value_pb2.Value(string_value=value)

    for entity_id, key in (("customers", "email"), ("imports", "mail")):
        entity = entity_pb2.Entity(
            attributes=[
                entity_pb2.Attribute(name=key, type=entity_pb2.ATTRIBUTE_TYPE_STRING),
                entity_pb2.Attribute(name="version", type=entity_pb2.ATTRIBUTE_TYPE_INTEGER),
            ],
            primary_key=[key],
            version_attribute="version",
        )
        await stub.CreateEntity(svc.CreateEntityRequest(entity_id=entity_id, entity=entity))
        changes = [
            svc.RecordChange(values={key: text(v), "version": value_pb2.Value(integer_value=1)})
            for v in (["a@x", "b@x"] if entity_id == "customers" else ["a@x", "z@x"])
        ]
        await stub.IngestRecords(iter([svc.IngestRecordsRequest(entity=f"entities/{entity_id}", changes=changes)]))
    source = await stub.BuildWorkingSet(
        svc.BuildWorkingSetRequest(
            run=RUN, activity="load", query=query_pb2.AudienceQuery(dimension="entities/imports")
        )
    )
    response = await stub.ReconcileWorkingSet(
        svc.ReconcileWorkingSetRequest(
            run=RUN,
            activity="match",
            working_set=source.working_set.name,
            target="entities/customers",
            pairs=[working_set_pb2.ReconciliationPair(source_attribute="mail", target_attribute="email")],
            unreconciled_activity="rest",
        )
    )
    assert (
        response.working_set.dimension,
        response.working_set.count,
        response.unreconciled.dimension,
        response.unreconciled.count,
        (response.matched, response.unmatched, response.ambiguous),
    ) == ("entities/customers", 1, "entities/imports", 1, (1, 1, 0))
