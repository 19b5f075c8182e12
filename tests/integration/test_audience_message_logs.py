"""Message logs, the built-in entity, and rules over the built-in link ``message_logs``.

Runs on SQLite and PostgreSQL. The model: customers (identity ``email`` in namespace ``email``) and
members (identity ``crm_id``, an integer, in namespace ``crm``), and message logs of two campaigns.
Every rule test asserts the exact set of matching keys.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2

from audience_svc.app import build_server
from audience_svc.audiences import AudienceEvaluator
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import RecordChange, apply_changes
from audience_svc.message_logs import MAX_LOGS, MessageLog, MessageLogRecorder, RecordResult
from audience_svc.query import Aggregate, AllOf, AudienceQuery, Condition, Filter, FilterLimits, LinkCondition
from audience_svc.saved_audiences import SavedAudienceStore
from audience_svc.schema import (
    MANY_TO_ONE,
    MESSAGE_LOGS_SCHEMA,
    ONE_TO_MANY,
    Attribute,
    EntitySchema,
    IdentityBinding,
    JoinPair,
    Link,
    definition_to_json,
    entity_table,
)
from audience_svc.tables import MIGRATIONS, EntityRow
from audience_svc.working_sets import WorkingSetStore
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc, entity_pb2, message_log_pb2
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.database import Database
from carillon_chassis.errors import FailedPrecondition, InvalidArgument
from carillon_chassis.values import to_timestamp
from tests.conftest import DatabaseFactory
from tests.integration.test_audience_server import PROD, STAGING, details, settings_for

REF = dt.datetime(2025, 6, 15, 12, tzinfo=dt.UTC)
CUSTOMERS = EntitySchema(
    attributes=(Attribute("id", "string"), Attribute("version", "integer"), Attribute("email", "string")),
    primary_key=("id",),
    version_attribute="version",
    identity=IdentityBinding("email", "email"),
)
MEMBERS = EntitySchema(
    attributes=(Attribute("id", "string"), Attribute("version", "integer"), Attribute("crm_id", "integer")),
    primary_key=("id",),
    version_attribute="version",
    identity=IdentityBinding("crm_id", "crm"),
)
# Customers a..e; e's email also appears as a crm identity value below (another namespace).
EMAILS = {"a": "a@x.io", "b": "b@x.io", "c": "c@x.io", "d": "d@x.io", "e": "e@x.io"}


def log(
    message_id: str,
    status: str,
    value: str,
    *,
    namespace: str = "email",
    campaign: str = "campaigns/spring",
    activity: str = "email1",
    channel: str = "email",
    minutes: int = 0,
    profile_id: str = "",
) -> MessageLog:
    return MessageLog(
        message_id=message_id,
        status=status,
        campaign=campaign,
        run=f"{campaign}/runs/r1",
        activity=activity,
        channel=channel,
        identity_namespace=namespace,
        identity_value=value,
        profile_id=profile_id,
        event_time=REF + dt.timedelta(minutes=minutes),
    )


LOGS = [
    # a: sent and opened email1 of spring.
    log("m1", "sent", "a@x.io"),
    log("m1", "opened", "a@x.io", minutes=5),
    # b: sent, never opened; clicked twice in two messages of activity email2.
    log("m2", "sent", "b@x.io"),
    log("m3", "clicked", "b@x.io", activity="email2"),
    log("m4", "clicked", "b@x.io", activity="email2"),
    # c: opened email1, but of another campaign.
    log("m5", "opened", "c@x.io", campaign="campaigns/autumn"),
    # d: opened activity email2 of spring, one click.
    log("m6", "opened", "d@x.io", activity="email2"),
    log("m6", "clicked", "d@x.io", activity="email2"),
    # e's email, but in the crm namespace: no customer log; member 7 (crm 7) opened email1.
    log("m7", "opened", "e@x.io", namespace="crm"),
    log("m8", "opened", "7", namespace="crm", channel="sms"),
]


class Model:
    """The catalog, stores and recorder over one database, with customers, members and logs."""

    def __init__(self, database: Database) -> None:
        database.migrate(MIGRATIONS)
        self.catalog = EntityCatalog(database)
        self.evaluator = AudienceEvaluator(self.catalog, limits=FilterLimits())
        self.working_sets = WorkingSetStore(self.catalog)
        self.saved = SavedAudienceStore(self.catalog, self.working_sets)
        self.recorder = MessageLogRecorder(self.catalog)
        customers = self.catalog.create_entity("prod", "customers", CUSTOMERS)
        members = self.catalog.create_entity("prod", "members", MEMBERS)
        apply_changes(
            database,
            customers,
            [RecordChange("upsert", {"id": k, "version": 1, "email": v}) for k, v in EMAILS.items()],
        )
        apply_changes(
            database, members, [RecordChange("upsert", {"id": f"p{n}", "version": 1, "crm_id": n}) for n in (7, 8)]
        )

    def keys(self, dimension: str, node: Filter | None) -> set[str]:
        return set(self.evaluator.evaluate("prod", AudienceQuery(dimension, node), sample=1000).sample_keys)


@pytest.fixture
def model(make_database: Callable[[str], Database]) -> Model:
    return Model(make_database("audience"))


@pytest.fixture
def logged(model: Model) -> Model:
    model.recorder.record("prod", LOGS)
    return model


def opened(activity: str = "email1", campaign: str = "campaigns/spring") -> Filter:
    return AllOf(
        (
            Condition("status", "equal", ("opened",)),
            Condition("activity", "equal", (activity,)),
            Condition("campaign", "equal", (campaign,)),
        )
    )


def test_the_built_in_entity_has_the_message_log_schema(model: Model) -> None:
    entity = model.catalog.get_entity("prod", "message_logs")
    assert entity.schema == MESSAGE_LOGS_SCHEMA
    assert entity.schema.primary_key == ("message_id", "status")


def test_the_built_in_entity_is_indexed_on_namespace_and_identity(model: Model) -> None:
    entity = model.catalog.message_logs("prod")
    indexes = sa.inspect(model.catalog.database.engine).get_indexes(entity.table_name)
    assert [index["column_names"] for index in indexes] == [["identity_namespace", "identity_value"]]


def test_the_built_in_entity_does_not_count_against_the_entity_limit(make_database: Callable[[str], Database]) -> None:
    database = make_database("audience")
    database.migrate(MIGRATIONS)
    catalog = EntityCatalog(database, max_entities=1)
    catalog.message_logs("prod")
    catalog.create_entity("prod", "customers", CUSTOMERS)
    assert [e.entity_id for e in catalog.list_entities("prod")[0]] == ["customers", "message_logs"]


def test_recorded_logs_are_queryable_when_the_call_returns(logged: Model) -> None:
    assert logged.keys("message_logs", None) == {
        "m1|sent",
        "m1|opened",
        "m2|sent",
        "m3|clicked",
        "m4|clicked",
        "m5|opened",
        "m6|opened",
        "m6|clicked",
        "m7|opened",
        "m8|opened",
    }


def test_a_recorded_log_holds_its_values_and_its_event_time_as_version(logged: Model) -> None:
    entity = logged.catalog.message_logs("prod")
    table = entity.table
    with logged.catalog.database.engine.connect() as conn:
        row = conn.execute(sa.select(table).where(table.c.message_id == "m8")).mappings().one()
    expected_version = int((REF - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds()) * 1_000_000
    assert dict(row) | {"event_time": None} == {
        "message_id": "m8",
        "status": "opened",
        "campaign": "campaigns/spring",
        "run": "campaigns/spring/runs/r1",
        "activity": "email1",
        "channel": "sms",
        "identity_namespace": "crm",
        "identity_value": "7",
        "profile_id": None,
        "entity_key": None,
        "event_time": None,
        "version": expected_version,
    }


def test_recording_the_same_events_again_counts_duplicates_and_changes_nothing(logged: Model) -> None:
    changed = log("m1", "opened", "someone-else@x.io", activity="other")
    result = logged.recorder.record("prod", [changed, log("m9", "sent", "a@x.io")])
    assert (result.recorded, result.duplicates) == (1, 1)
    table = logged.catalog.message_logs("prod").table
    with logged.catalog.database.engine.connect() as conn:
        row = conn.execute(
            sa.select(table.c.identity_value, table.c.activity).where(
                table.c.message_id == "m1", table.c.status == "opened"
            )
        ).one()
    assert tuple(row) == ("a@x.io", "email1")


def test_an_event_repeated_within_one_call_is_recorded_once(model: Model) -> None:
    result = model.recorder.record("prod", [log("m1", "sent", "a@x.io"), log("m1", "sent", "a@x.io")])
    assert (result.recorded, result.duplicates) == (1, 1)
    assert model.keys("message_logs", None) == {"m1|sent"}


def test_a_call_is_one_insert_whose_parameters_do_not_grow_with_its_logs(model: Model) -> None:
    # A multi-row VALUES list bound every value of every log on its own: a 5,000-log call cost about
    # 100 us of audience_svc's CPU per log. On PostgreSQL each column is one parameter.
    logs = [log(f"m{i}", "sent", f"u{i}@x.io", profile_id=f"p{i}" if i % 2 else "") for i in range(300)]
    inserts: list[int] = []  # parameters bound by each insert into the message logs
    name = model.catalog.message_logs("prod").table.name

    def seen(conn: object, cursor: object, statement: str, parameters: Any, *args: object) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO") and name in statement:
            inserts.append(len(parameters) if isinstance(parameters, (dict, tuple, list)) else 0)

    engine = model.catalog.database.engine
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        result = model.recorder.record("prod", logs)
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)

    assert (result.recorded, result.duplicates) == (300, 0)
    assert len(model.keys("message_logs", None)) == 300
    table = model.catalog.message_logs("prod").table
    with engine.connect() as conn:
        profiles = dict(conn.execute(sa.select(table.c.message_id, table.c.profile_id)).all())
    assert (profiles["m1"], profiles["m2"]) == ("p1", None)
    if model.catalog.database.is_postgres:
        assert len(inserts) == 1 and inserts[0] < 20, inserts


def test_logs_of_another_sandbox_are_not_visible(logged: Model) -> None:
    logged.recorder.record("staging", [log("s1", "sent", "a@x.io")])
    staging = logged.evaluator.evaluate("staging", AudienceQuery("message_logs", None), sample=1000)
    assert set(staging.sample_keys) == {"s1|sent"}
    assert logged.keys("message_logs", Condition("message_id", "equal", ("s1",))) == set()
    assert len(logged.keys("message_logs", None)) == len(LOGS)


def test_an_unknown_status_or_channel_is_named_unknown_not_unset(model: Model) -> None:
    with pytest.raises(InvalidArgument) as caught:
        model.recorder.record("prod", [log("m1", "read", "a@x.io", channel="fax"), log("m2", "", "a@x.io", channel="")])
    assert [(v.field, v.description.split(";")[0]) for v in caught.value.violations] == [
        ("logs[0].status", "the status 'read' is unknown"),
        ("logs[0].channel", "the channel 'fax' is unknown"),
        ("logs[1].status", "the status must be set"),
        ("logs[1].channel", "the channel must be set"),
    ]


def test_a_bad_log_names_its_fields_and_nothing_is_written(model: Model) -> None:
    bad = MessageLog(
        message_id="",
        status="",
        campaign="spring",
        run="r1",
        activity="",
        channel="",
        identity_namespace="",
        identity_value="",
    )
    with pytest.raises(InvalidArgument) as caught:
        model.recorder.record("prod", [log("ok", "sent", "a@x.io"), bad])
    assert caught.value.reason == "INVALID_MESSAGE_LOGS"
    assert [v.field for v in caught.value.violations] == [
        "logs[1].message_id",
        "logs[1].activity",
        "logs[1].identity.namespace",
        "logs[1].identity.value",
        "logs[1].status",
        "logs[1].channel",
        "logs[1].campaign",
        "logs[1].run",
    ]
    assert model.keys("message_logs", None) == set()


def test_a_run_of_another_campaign_is_a_violation_of_the_run(model: Model) -> None:
    bad = MessageLog("m1", "sent", "campaigns/a", "campaigns/b/runs/r1", "email1", "email", "email", "a@x.io")
    with pytest.raises(InvalidArgument) as caught:
        model.recorder.record("prod", [bad])
    assert [v.field for v in caught.value.violations] == ["logs[0].run"]


def test_more_logs_than_the_limit_are_refused(model: Model) -> None:
    with pytest.raises(InvalidArgument) as caught:
        model.recorder.record("prod", [log(f"m{i}", "sent", "a@x.io") for i in range(MAX_LOGS + 1)])
    assert [v.field for v in caught.value.violations] == ["logs"]
    assert model.keys("message_logs", None) == set()


def test_customers_with_an_opened_log_of_an_activity_match(logged: Model) -> None:
    assert logged.keys("customers", LinkCondition("message_logs", "exists", filter=opened())) == {"a"}


def test_customers_without_an_opened_log_of_an_activity_match(logged: Model) -> None:
    found = logged.keys("customers", LinkCondition("message_logs", "not_exists", filter=opened()))
    assert found == {"b", "c", "d", "e"}


def test_a_log_of_another_identity_namespace_does_not_match(logged: Model) -> None:
    # m7 holds e's email as a crm identity: customer e has no log.
    assert logged.keys("customers", LinkCondition("message_logs", "exists")) == {"a", "b", "c", "d"}


def test_an_integer_identity_reaches_its_logs_as_text(logged: Model) -> None:
    assert logged.keys("members", LinkCondition("message_logs", "exists", filter=opened())) == {"p7"}


def test_customers_with_at_least_two_clicks_match(logged: Model) -> None:
    node = LinkCondition(
        "message_logs",
        "count",
        operator="greater_or_equal",
        values=(2,),
        filter=Condition("status", "equal", ("clicked",)),
    )
    assert logged.keys("customers", node) == {"b"}


def test_an_aggregate_over_message_logs_compares_like_any_link(logged: Model) -> None:
    node = LinkCondition("message_logs", "max", attribute="version", operator="greater", values=(0,))
    assert logged.keys("customers", node) == {"a", "b", "c", "d"}


def test_the_link_condition_is_one_statement_with_bound_values(logged: Model) -> None:
    evaluation = logged.evaluator.evaluate(
        "prod", AudienceQuery("customers", LinkCondition("message_logs", "exists", filter=opened())), explain=True
    )
    assert "campaigns/spring" not in evaluation.sql
    assert "'email'" not in evaluation.sql


def test_message_logs_are_a_query_dimension_of_their_own(logged: Model) -> None:
    node = AllOf((Condition("status", "equal", ("opened",)), Condition("campaign", "equal", ("campaigns/spring",))))
    assert logged.keys("message_logs", node) == {"m1|opened", "m6|opened", "m7|opened", "m8|opened"}


def test_a_working_set_is_built_from_a_message_log_rule(logged: Model) -> None:
    query = AudienceQuery("customers", LinkCondition("message_logs", "not_exists", filter=opened()))
    built = logged.working_sets.build("prod", "campaigns/spring/runs/r2", "sms1", query)
    assert built.count == 4


def test_a_saved_definition_audience_resolves_a_message_log_rule(logged: Model) -> None:
    query = AudienceQuery("customers", LinkCondition("message_logs", "exists", filter=opened()))
    logged.saved.create_definition("prod", "openers", "Openers", query)
    entity, where = logged.saved.resolve("prod", "openers")
    assert logged.evaluator.evaluate_where(entity, where, 100).sample_keys == ["a"]


def test_enrichment_counts_the_logs_of_each_streamed_row(logged: Model) -> None:
    query = AudienceQuery("customers", None)
    built = logged.working_sets.build("prod", "campaigns/spring/runs/r2", "all", query)
    plan = logged.working_sets.open_stream(
        "prod", built.working_set_id, [], aggregates=(Aggregate("logs", "message_logs", "count"),)
    )
    rows = logged.working_sets.read_batch(plan, 0, 100)
    assert {r.entity_key: r.values["logs"] for r in rows} == {"a": 2, "b": 3, "c": 1, "d": 2, "e": 0}


def test_changing_dimension_through_the_built_in_link_reaches_only_logs_of_the_namespace(logged: Model) -> None:
    built = logged.working_sets.build("prod", "campaigns/spring/runs/r2", "all", AudienceQuery("customers", None))
    changed, unmatched = logged.working_sets.change_dimension(
        "prod", "campaigns/spring/runs/r2", "logs", built.working_set_id, "message_logs"
    )
    plan = logged.working_sets.open_stream("prod", changed.working_set_id, [])
    keys = {r.entity_key for r in logged.working_sets.read_batch(plan, 0, 100)}
    assert (keys, unmatched) == (
        {"m1|sent", "m1|opened", "m2|sent", "m3|clicked", "m4|clicked", "m5|opened", "m6|opened", "m6|clicked"},
        1,
    )


def test_a_user_link_named_message_logs_is_refused(model: Model) -> None:
    link = Link("message_logs", "customers", MANY_TO_ONE, (JoinPair("id", "id"),))
    with pytest.raises(InvalidArgument) as caught:
        model.catalog.add_links("prod", "customers", (link,))
    assert [v.field for v in caught.value.violations] == ["entity.links[0].name"]


def test_a_user_link_to_message_logs_is_allowed(model: Model) -> None:
    link = Link("logs_by_id", "message_logs", ONE_TO_MANY, (JoinPair("id", "message_id"),))
    updated = model.catalog.add_links("prod", "customers", (link,))
    assert updated.schema.links == (link,)


def test_an_attribute_named_message_logs_is_refused(model: Model) -> None:
    schema = EntitySchema(
        attributes=(*CUSTOMERS.attributes, Attribute("message_logs", "integer", nullable=True)),
        primary_key=("id",),
        version_attribute="version",
    )
    with pytest.raises(InvalidArgument) as caught:
        model.catalog.create_entity("prod", "people", schema)
    assert [v.field for v in caught.value.violations] == ["entity.attributes[3].name"]


def test_only_entities_with_an_identity_have_the_built_in_link(model: Model) -> None:
    customers = model.catalog.get_entity("prod", "customers").schema
    assert customers.link("message_logs") == Link(
        "message_logs",
        "message_logs",
        ONE_TO_MANY,
        (JoinPair("email", "identity_value"),),
        target_values=(("identity_namespace", "email"),),
    )
    assert customers.links == ()
    assert model.catalog.get_entity("prod", "message_logs").schema.link("message_logs") is None


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        ("decimal", Decimal("12.5")),
        ("boolean", True),
        ("timestamp", dt.datetime(2025, 1, 1, tzinfo=dt.UTC)),
        ("date", dt.date(2025, 1, 2)),
    ],
)
def test_an_identity_of_a_type_without_a_portable_text_has_no_built_in_link(
    model: Model, type_: str, value: object
) -> None:
    schema = EntitySchema(
        attributes=(Attribute("id", "string"), Attribute("version", "integer"), Attribute("ident", type_)),
        primary_key=("id",),
        version_attribute="version",
        identity=IdentityBinding("ident", "odd"),
    )
    entity = model.catalog.create_entity("prod", "odd", schema)
    apply_changes(model.catalog.database, entity, [RecordChange("upsert", {"id": "x", "version": 1, "ident": value})])
    assert entity.schema.link("message_logs") is None
    with pytest.raises(InvalidArgument):
        model.evaluator.evaluate("prod", AudienceQuery("odd", LinkCondition("message_logs", "exists")))


def test_an_enum_identity_reaches_its_logs(model: Model) -> None:
    schema = EntitySchema(
        attributes=(
            Attribute("id", "string"),
            Attribute("version", "integer"),
            Attribute("tier", "enum", enum_values=("gold", "silver")),
        ),
        primary_key=("id",),
        version_attribute="version",
        identity=IdentityBinding("tier", "tier"),
    )
    entity = model.catalog.create_entity("prod", "tiers", schema)
    apply_changes(
        model.catalog.database,
        entity,
        [RecordChange("upsert", {"id": k, "version": 1, "tier": t}) for k, t in (("g", "gold"), ("s", "silver"))],
    )
    model.recorder.record("prod", [log("m1", "sent", "gold", namespace="tier")])
    assert model.keys("tiers", LinkCondition("message_logs", "exists")) == {"g"}


def test_another_catalog_finds_the_built_in_entity_created_by_the_first(model: Model) -> None:
    first = model.catalog.message_logs("prod")
    second = EntityCatalog(model.catalog.database).message_logs("prod")
    assert second.table_name == first.table_name


def test_creating_an_entity_called_message_logs_is_refused(model: Model) -> None:
    with pytest.raises(InvalidArgument) as caught:
        model.catalog.create_entity("prod", "message_logs", CUSTOMERS)
    assert (caught.value.reason, [v.field for v in caught.value.violations]) == ("RESERVED_ENTITY_ID", ["entity_id"])


def test_changing_the_built_in_entity_is_refused(model: Model) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        model.catalog.update_schema("prod", "message_logs", links=())
    assert caught.value.reason == "BUILT_IN_ENTITY"


def test_ingesting_into_the_built_in_entity_is_refused(model: Model) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        model.catalog.writable_entity("prod", "message_logs")
    assert caught.value.reason == "BUILT_IN_ENTITY"


# Over gRPC: the wire form of the contract.

Stub = audience_service_pb2_grpc.AudienceServiceStub


def wire_log(
    message_id: str, status: message_log_pb2.MessageStatus.ValueType, email: str
) -> message_log_pb2.MessageLog:
    return message_log_pb2.MessageLog(
        message_id=message_id,
        status=status,
        campaign="campaigns/spring",
        run="campaigns/spring/runs/r1",
        activity="email1",
        channel=channel_pb2.CHANNEL_EMAIL,
        identity=value_pb2.Identity(namespace="email", value=email),
        event_time=to_timestamp(REF),
    )


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[Stub]:
    server = await build_server(settings_for(database_factory))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield Stub(channel)
    await server.stop(0)


async def test_record_message_logs_reports_recorded_and_duplicates(stub: Stub) -> None:
    request = svc.RecordMessageLogsRequest(
        logs=[wire_log("m1", message_log_pb2.MESSAGE_STATUS_SENT, "a@x.io")] * 2
        + [wire_log("m1", message_log_pb2.MESSAGE_STATUS_OPENED, "a@x.io")]
    )
    first = await stub.RecordMessageLogs(request, metadata=PROD)
    again = await stub.RecordMessageLogs(request, metadata=PROD)
    assert (first.recorded, first.duplicates, again.recorded, again.duplicates) == (2, 1, 0, 3)


async def test_an_unset_status_is_invalid_argument_naming_the_log(stub: Stub) -> None:
    request = svc.RecordMessageLogsRequest(
        logs=[
            wire_log("m1", message_log_pb2.MESSAGE_STATUS_SENT, "a@x.io"),
            wire_log("m2", message_log_pb2.MESSAGE_STATUS_UNSPECIFIED, "a@x.io"),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordMessageLogs(request, metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == ("INVALID_MESSAGE_LOGS", "audience.carillon.dev", ["logs[1].status"])
    evaluated = await stub.EvaluateAudience(
        svc.EvaluateAudienceRequest(query={"dimension": "entities/message_logs"}), metadata=PROD
    )
    assert evaluated.count == 0


async def test_fields_a_log_leaves_unset_come_from_the_defaults(stub: Stub) -> None:
    full = wire_log("m1", message_log_pb2.MESSAGE_STATUS_SENT, "a@x.io")
    own = message_log_pb2.MessageLog(message_id="m2", identity=value_pb2.Identity(namespace="email", value="b@x.io"))
    other = message_log_pb2.MessageLog(
        message_id="m3", status=message_log_pb2.MESSAGE_STATUS_OPENED, identity=own.identity
    )
    request = svc.RecordMessageLogsRequest(
        logs=[own, other], defaults=wire_log("", message_log_pb2.MESSAGE_STATUS_SENT, "")
    )
    request.defaults.ClearField("identity")

    recorded = await stub.RecordMessageLogs(request, metadata=PROD)
    alone = await stub.RecordMessageLogs(svc.RecordMessageLogsRequest(logs=[full]), metadata=PROD)

    assert (recorded.recorded, alone.recorded) == (2, 1)
    evaluated = await stub.EvaluateAudience(
        svc.EvaluateAudienceRequest(query={"dimension": "entities/message_logs"}, sample_size=10), metadata=PROD
    )
    assert sorted(evaluated.sample_keys) == ["m1|sent", "m2|sent", "m3|opened"]


async def test_a_default_of_a_field_each_log_owns_is_invalid_argument_naming_it(stub: Stub) -> None:
    request = svc.RecordMessageLogsRequest(
        logs=[message_log_pb2.MessageLog(message_id="m1", identity=value_pb2.Identity(namespace="email", value="a"))],
        defaults=wire_log("m9", message_log_pb2.MESSAGE_STATUS_SENT, "a@x.io"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordMessageLogs(request, metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == (
        "INVALID_MESSAGE_LOGS",
        "audience.carillon.dev",
        ["defaults.message_id", "defaults.identity"],
    )


async def test_get_entity_shows_the_built_in_entity_in_every_sandbox(stub: Stub) -> None:
    for metadata in (PROD, STAGING):
        read = await stub.GetEntity(svc.GetEntityRequest(name="entities/message_logs"), metadata=metadata)
        assert [a.name for a in read.entity.attributes] == [a.name for a in MESSAGE_LOGS_SCHEMA.attributes]
        assert list(read.entity.primary_key) == ["message_id", "status"]


async def test_create_entity_message_logs_is_invalid_argument(stub: Stub) -> None:
    entity = entity_pb2.Entity(
        attributes=[
            entity_pb2.Attribute(name="id", type=entity_pb2.ATTRIBUTE_TYPE_STRING),
            entity_pb2.Attribute(name="version", type=entity_pb2.ATTRIBUTE_TYPE_INTEGER),
        ],
        primary_key=["id"],
        version_attribute="version",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateEntity(svc.CreateEntityRequest(entity_id="message_logs", entity=entity), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == ("RESERVED_ENTITY_ID", "audience.carillon.dev", ["entity_id"])


async def test_update_entity_message_logs_is_failed_precondition(stub: Stub) -> None:
    request = svc.UpdateEntityRequest(
        entity=entity_pb2.Entity(name="entities/message_logs"), update_mask=field_mask_pb2.FieldMask(paths=["links"])
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateEntity(request, metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value) == ("BUILT_IN_ENTITY", "audience.carillon.dev", ["entity.name"])


async def test_ingest_records_into_message_logs_is_failed_precondition(stub: Stub) -> None:
    async def batches() -> AsyncIterator[svc.IngestRecordsRequest]:
        yield svc.IngestRecordsRequest(
            entity="entities/message_logs",
            changes=[svc.RecordChange(values={"message_id": value_pb2.Value(string_value="m1")})],
        )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestRecords(batches(), metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value) == ("BUILT_IN_ENTITY", "audience.carillon.dev", ["entity"])


def test_concurrent_calls_with_overlapping_events_in_opposite_orders_both_succeed(model: Model) -> None:
    logs = [log(f"c{i:05d}", "sent", "a@x.io") for i in range(MAX_LOGS)]
    results: dict[str, object] = {}

    def record(name: str, batch: list[MessageLog]) -> None:
        try:
            results[name] = model.recorder.record("prod", batch)
        except Exception as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=record, args=("forward", logs)),
        threading.Thread(target=record, args=("backward", logs[::-1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    forward, backward = results["forward"], results["backward"]
    assert isinstance(forward, RecordResult) and isinstance(backward, RecordResult), results
    assert (forward.recorded + backward.recorded, forward.duplicates + backward.duplicates) == (MAX_LOGS, MAX_LOGS)
    assert model.evaluator.evaluate("prod", AudienceQuery("message_logs", None)).count == MAX_LOGS


async def test_out_of_range_event_times_are_invalid_argument_naming_each_log(stub: Stub) -> None:
    late = wire_log("m2", message_log_pb2.MESSAGE_STATUS_SENT, "a@x.io")
    late.event_time.CopyFrom(timestamp_pb2.Timestamp(seconds=253402300800 * 2))
    bad_nanos = wire_log("m3", message_log_pb2.MESSAGE_STATUS_SENT, "a@x.io")
    bad_nanos.event_time.CopyFrom(timestamp_pb2.Timestamp(seconds=1, nanos=-5))
    request = svc.RecordMessageLogsRequest(
        logs=[wire_log("m1", message_log_pb2.MESSAGE_STATUS_SENT, "a@x.io"), late, bad_nanos]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordMessageLogs(request, metadata=PROD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value) == (
        "INVALID_MESSAGE_LOGS",
        "audience.carillon.dev",
        ["logs[1].event_time", "logs[2].event_time"],
    )
    evaluated = await stub.EvaluateAudience(
        svc.EvaluateAudienceRequest(query={"dimension": "entities/message_logs"}), metadata=PROD
    )
    assert evaluated.count == 0


# Sandboxes of an older release: names reserved since the built-in entity exists.

OLD = "old"
# A user entity called message_logs, created before the built-in one existed.
USER_LOGS = EntitySchema(
    attributes=(Attribute("id", "string"), Attribute("version", "integer"), Attribute("text", "string")),
    primary_key=("id",),
    version_attribute="version",
)


def legacy_entity(database: Database, sandbox: str, entity_id: str, schema: EntitySchema) -> None:
    """Store an entity as an older release did, without the checks of names reserved since."""
    table_name = f"ent_{uuid.uuid4().hex}"
    now = dt.datetime.now(dt.UTC)
    with database.engine.begin() as conn:
        conn.execute(
            EntityRow.__table__.insert().values(  # type: ignore[attr-defined]
                sandbox=sandbox,
                entity_id=entity_id,
                table_name=table_name,
                display_name="",
                definition=definition_to_json(schema),
                create_time=now,
                update_time=now,
            )
        )
        entity_table(table_name, schema).create(conn)


@pytest.fixture
def shadowed(model: Model) -> Model:
    """The model with a sandbox ``old`` whose message_logs is a user entity, and customers there."""
    legacy_entity(model.catalog.database, OLD, "message_logs", USER_LOGS)
    customers = model.catalog.create_entity(OLD, "customers", CUSTOMERS)
    apply_changes(model.catalog.database, customers, [RecordChange("upsert", {"id": "a", "version": 1, "email": "a"})])
    return model


def test_recording_logs_where_a_user_entity_is_called_message_logs_is_shadowed(shadowed: Model) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        shadowed.recorder.record(OLD, [log("m1", "sent", "a")])
    assert (caught.value.reason, caught.value.metadata) == (
        "MESSAGE_LOGS_SHADOWED",
        {"entity": "entities/message_logs"},
    )


def test_the_built_in_link_is_shadowed_by_a_user_entity_called_message_logs(shadowed: Model) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        shadowed.evaluator.evaluate(OLD, AudienceQuery("customers", LinkCondition("message_logs", "exists")))
    assert caught.value.reason == "MESSAGE_LOGS_SHADOWED"


def test_a_user_entity_called_message_logs_stays_an_ordinary_entity(shadowed: Model) -> None:
    catalog = shadowed.catalog
    entity = catalog.writable_entity(OLD, "message_logs")
    apply_changes(catalog.database, entity, [RecordChange("upsert", {"id": "x", "version": 1, "text": "hi"})])
    note = Attribute("note", "string", nullable=True)
    updated = catalog.update_schema(OLD, "message_logs", attributes=(*USER_LOGS.attributes, note))
    listed, _ = catalog.list_entities(OLD)
    assert updated.schema.attributes == (*USER_LOGS.attributes, note)
    assert [e.entity_id for e in listed] == ["customers", "message_logs"]
    assert set(shadowed.evaluator.evaluate(OLD, AudienceQuery("message_logs", None)).sample_keys) == {"x"}


async def test_record_message_logs_in_a_shadowed_sandbox_is_failed_precondition(
    database_factory: DatabaseFactory,
) -> None:
    settings = settings_for(database_factory)
    database = Database(settings.database_url, schema=settings.database_schema)
    database.migrate(MIGRATIONS)
    legacy_entity(database, "prod", "message_logs", USER_LOGS)
    database.close()
    server = await build_server(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            request = svc.RecordMessageLogsRequest(logs=[wire_log("m1", message_log_pb2.MESSAGE_STATUS_SENT, "a@x.io")])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await Stub(channel).RecordMessageLogs(request, metadata=PROD)
    finally:
        await server.stop(0)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value) == ("MESSAGE_LOGS_SHADOWED", "audience.carillon.dev", [])


def test_an_entity_with_an_attribute_named_message_logs_can_still_be_updated(model: Model) -> None:
    legacy = EntitySchema(
        attributes=(*CUSTOMERS.attributes, Attribute("message_logs", "integer", nullable=True)),
        primary_key=("id",),
        version_attribute="version",
        identity=IdentityBinding("email", "email"),
    )
    legacy_entity(model.catalog.database, "prod", "people", legacy)
    tier = Attribute("tier", "string", nullable=True)
    link = Link("logs_by_id", "message_logs", ONE_TO_MANY, (JoinPair("id", "message_id"),))
    updated = model.catalog.update_schema("prod", "people", attributes=(*legacy.attributes, tier), links=(link,))
    assert (updated.schema.attributes, updated.schema.links) == ((*legacy.attributes, tier), (link,))


def test_an_entity_with_a_link_named_message_logs_can_still_be_updated(model: Model) -> None:
    old_link = Link("message_logs", "customers", MANY_TO_ONE, (JoinPair("id", "id"),))
    legacy = EntitySchema(
        attributes=(Attribute("id", "string"), Attribute("version", "integer")),
        primary_key=("id",),
        version_attribute="version",
        links=(old_link,),
    )
    legacy_entity(model.catalog.database, "prod", "people", legacy)
    tier = Attribute("tier", "string", nullable=True)
    updated = model.catalog.update_schema("prod", "people", attributes=(*legacy.attributes, tier))
    assert (updated.schema.attributes, updated.schema.links) == ((*legacy.attributes, tier), (old_link,))


def test_a_new_attribute_named_message_logs_is_refused_on_update(model: Model) -> None:
    attributes = (*CUSTOMERS.attributes, Attribute("message_logs", "integer", nullable=True))
    with pytest.raises(InvalidArgument) as caught:
        model.catalog.update_schema("prod", "customers", attributes=attributes)
    assert [v.field for v in caught.value.violations] == ["entity.attributes[3].name"]
