"""profile_stub's per-batch paths (eligibility without full profiles, reservations, recording), on both
backends: the cheaper forms give the same answers as the full ones."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.database import Database, as_utc
from carillon_chassis.errors import InvalidArgument, NotFound
from carillon_chassis.messages import message_id
from delivery_svc.eligibility import ProfileServiceGateway
from profile_stub.app import build_server
from profile_stub.capping import CappingRule
from profile_stub.keysets import insert_rows
from profile_stub.profiles import Communication, Consent, Eligibility, MessageKeys, Profile, ProfileStore
from profile_stub.quarantine import DeliveryEvent
from profile_stub.settings import ProfileSettings
from profile_stub.tables import MIGRATIONS
from tests.conftest import DatabaseFactory

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PROFILES = [
    Profile("p-in", [("email", "in@example.com")], consents=[Consent("email", "opted_in", "form")]),
    Profile("p-out", [("email", "out@example.com")], consents=[Consent("email", "opted_out", "form")]),
    Profile("p-none", [("email", "none@example.com")]),
    Profile("p-phone", [("phone", "+4670000001")], consents=[Consent("email", "opted_in", "form")]),
    Profile(
        "p-two",
        [("email", "b-two@example.com"), ("email", "a-two@example.com"), ("crm", "c2")],
        consents=[Consent("email", "opted_in", "form"), Consent("email", "opted_out", "form", purpose="news")],
    ),
    Profile("p-bounced", [("email", "bounced@example.com")], consents=[Consent("email", "opted_in", "form")]),
    Profile(
        "p-news",
        [("email", "news@example.com")],
        time_zone="Pacific/Auckland",
        consents=[Consent("email", "opted_out", "form"), Consent("email", "opted_in", "form", purpose="news")],
    ),
    Profile(
        "p-busy",
        [("email", "busy@example.com")],
        time_zone="Pacific/Auckland",
        consents=[Consent("email", "opted_in", "form"), Consent("email", "opted_in", "form", purpose="news")],
    ),
]
IDENTITIES = [
    ("email", "in@example.com"),
    ("email", "out@example.com"),
    ("email", "none@example.com"),
    ("phone", "+4670000001"),
    ("crm", "c2"),
    ("email", "bounced@example.com"),
    ("email", "news@example.com"),
    ("email", "busy@example.com"),
    ("email", "nobody@example.com"),
    ("email", "in@example.com"),  # a repeat
]


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database, unknown_consent_allowed=["sms"])
    store.upsert_profiles("prod", PROFILES)
    store.record_delivery_events("prod", [DeliveryEvent("e1", "email", "hard_bounce", address="bounced@example.com")])
    store.create_capping_rule("prod", CappingRule("daily", 2, "day", channel="email", time_basis="profile"))
    store.record_communications(
        "prod",
        [
            Communication(f"old{i}", "p-busy", "email", "marketing", send_time=NOW - timedelta(minutes=i))
            for i in (1, 2)
        ],
    )
    return store


def summary(results: list[Eligibility]) -> list[tuple[object, ...]]:
    return [
        (r.identity, r.verdict, r.address, r.addresses, r.reserved, r.profile and r.profile.profile_id) for r in results
    ]


@pytest.mark.parametrize("purpose", ["marketing", "news"])
@pytest.mark.parametrize("category", ["marketing", "transactional"])
def test_verdicts_without_full_profiles_are_the_verdicts_with_them(
    store: ProfileStore, purpose: str, category: str
) -> None:
    full = store.check_eligibility("prod", "email", category, IDENTITIES, purpose=purpose, now=NOW)
    light = store.check_eligibility(
        "prod", "email", category, IDENTITIES, purpose=purpose, full_profiles=False, now=NOW
    )

    assert summary(light) == summary(full)
    assert {r.verdict for r in full} >= {"unknown_profile", "missing_address", "quarantined", "allowed"}
    assert ("capped" in {r.verdict for r in full}) == (category == "marketing")


def test_reserving_without_full_profiles_gives_the_verdicts_and_reservations_of_the_full_form(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database)
    answers = []
    for sandbox, full_profiles in (("full", True), ("light", False)):  # one sandbox each, the same data
        store.upsert_profiles(sandbox, PROFILES)
        store.create_capping_rule(sandbox, CappingRule("daily", 2, "day", channel="email"))
        calls = [[f"m{i}" for i in range(len(IDENTITIES) - 1)] + ["m0"]]  # the repeat reuses its message id
        calls += [[f"{prefix}{i}" for i in range(len(IDENTITIES))] for prefix in ("n", "o")]
        answers.append(
            [
                summary(
                    store.check_eligibility(
                        sandbox,
                        "email",
                        "marketing",
                        IDENTITIES,
                        reserve=True,
                        message_ids=message_ids,
                        full_profiles=full_profiles,
                        now=NOW,
                    )
                )
                for message_ids in calls
            ]
        )

    assert answers[0] == answers[1]
    first, _, third = answers[1]
    assert (first[0][4], first[-1][4]) == (True, True)  # reserved, and the repeat holds the same reservation
    assert "capped" in {verdict for _, verdict, *_ in third}


def test_recording_skips_message_ids_recorded_before_and_repeats_in_the_batch(store: ProfileStore) -> None:
    batch = [
        Communication("new1", "p-in", "email", "marketing", run="r", send_time=NOW),
        Communication("old1", "p-in", "email", "marketing", run="r", send_time=NOW),  # recorded for p-busy
        Communication("new1", "p-two", "email", "marketing", run="r2", send_time=NOW),  # a repeat: the first counts
        Communication("new2", "p-two", "sms", "transactional", run="r", send_time=NOW + timedelta(seconds=1)),
    ]

    assert store.record_communications("prod", batch) == 2
    assert [(c.message_id, c.run) for c in store.history("prod", "p-in")] == [("new1", "r")]
    assert [(c.message_id, c.channel, c.send_time) for c in store.history("prod", "p-two")] == [
        ("new2", "sms", NOW + timedelta(seconds=1))
    ]
    assert [c.message_id for c in store.history("prod", "p-busy")] == ["old2", "old1"]


def test_recording_for_an_unknown_profile_is_not_found_and_records_nothing(store: ProfileStore) -> None:
    batch = [
        Communication("new1", "p-in", "email", "marketing"),
        Communication("new2", "p-ghost", "email", "marketing"),
        Communication("new3", "p-ghost", "email", "marketing"),
    ]

    with pytest.raises(NotFound) as raised:
        store.record_communications("prod", batch)

    assert [v.field for v in raised.value.violations] == ["communications[1].profile", "communications[2].profile"]
    assert store.history("prod", "p-in") == []


def test_a_recorded_reservation_stops_holding_its_own_count(store: ProfileStore) -> None:
    reserved = store.check_eligibility(
        "prod", "email", "marketing", [("email", "in@example.com")], reserve=True, message_ids=["r1"], now=NOW
    )
    recorded = store.record_communications("prod", [Communication("r1", "p-in", "email", "marketing", send_time=NOW)])
    released = store.release_reservations("prod", ["r1"])

    assert (reserved[0].reserved, recorded, released) == (True, 1, 0)


def test_insert_rows_writes_times_numbers_and_values_shared_by_every_row(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("profile")
    metadata = sa.MetaData()
    table = sa.Table(
        "rows",
        metadata,
        sa.Column("key", sa.String(20), primary_key=True),
        sa.Column("n", sa.Integer),
        sa.Column("kind", sa.String(20)),
        sa.Column("at", sa.DateTime(timezone=True)),
    )
    at = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC)
    rows = [{"key": f"k{i}", "n": i * 7 - 3, "kind": "same", "at": at + timedelta(hours=i)} for i in range(3)]
    shared = [{"key": f"s{i}", "n": 5, "kind": "same", "at": at} for i in range(2)]
    with database.engine.begin() as conn:
        metadata.create_all(conn)
        written = insert_rows(conn, table, rows) + insert_rows(conn, table, shared)
        skipped = insert_rows(conn, table, [shared[0], {**shared[1], "key": "s2"}], skip_conflicts=True)

    with database.engine.connect() as conn:
        found = {k: (n, kind, as_utc(when)) for k, n, kind, when in conn.execute(sa.select(table))}
    assert (written, skipped) == (5, 1 if database.is_postgres else 2)
    assert found == {r["key"]: (r["n"], r["kind"], r["at"]) for r in [*rows, *shared, {**shared[1], "key": "s2"}]}


@pytest.fixture
async def address(database_factory: DatabaseFactory) -> AsyncIterator[str]:
    url, schema = database_factory.url_and_schema("profile")
    server = await build_server(ProfileSettings(port=0, database_url=url, database_schema=schema))
    await server.start()
    yield server.address
    await server.stop()


@pytest.fixture
async def stub(address: str) -> AsyncIterator[profile_service_pb2_grpc.ProfileServiceStub]:
    channel = grpc.aio.insecure_channel(address)
    yield profile_service_pb2_grpc.ProfileServiceStub(channel)
    await channel.close()


async def test_omit_profiles_leaves_the_profiles_out_and_keeps_the_verdicts(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    metadata = (("x-carillon-sandbox", "prod"),)
    await stub.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name="profiles/ann",
                    first_name="Ann",
                    identities=[value_pb2.Identity(namespace="email", value="ann@example.com")],
                    attributes={"tier": value_pb2.Value(string_value="gold")},
                    consents=[
                        profile_pb2.Consent(channel=channel_pb2.CHANNEL_EMAIL, state=profile_pb2.CONSENT_STATE_OPTED_IN)
                    ],
                )
            ]
        ),
        metadata=metadata,
    )

    def request(omit: bool, reserve: bool) -> profile_service_pb2.CheckEligibilityRequest:
        return profile_service_pb2.CheckEligibilityRequest(
            channel=channel_pb2.CHANNEL_EMAIL,
            category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
            identities=[
                value_pb2.Identity(namespace="email", value="ann@example.com"),
                value_pb2.Identity(namespace="email", value="who@example.com"),
            ],
            reserve=reserve,
            message_ids=["m1", "m2"] if reserve else [],
            omit_profiles=omit,
        )

    full = (await stub.CheckEligibility(request(False, False), metadata=metadata)).results
    light = (await stub.CheckEligibility(request(True, False), metadata=metadata)).results
    reserved = (await stub.CheckEligibility(request(True, True), metadata=metadata)).results

    assert full[0].profile.first_name == "Ann" and "tier" in full[0].attributes
    assert not light[0].HasField("profile") and not light[0].attributes
    for results in (light, reserved):
        assert [(r.identity.value, r.verdict, r.address, list(r.addresses)) for r in results] == [
            (r.identity.value, r.verdict, r.address, list(r.addresses)) for r in full
        ]
    assert [r.reserved for r in reserved] == [True, False]
    assert not reserved[0].HasField("profile")


async def upsert_ann(stub: profile_service_pb2_grpc.ProfileServiceStub) -> None:
    """Profile ann (first name Ann), opted in to email, in sandbox prod."""
    await stub.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name="profiles/ann",
                    first_name="Ann",
                    identities=[value_pb2.Identity(namespace="email", value="ann@example.com")],
                    consents=[
                        profile_pb2.Consent(channel=channel_pb2.CHANNEL_EMAIL, state=profile_pb2.CONSENT_STATE_OPTED_IN)
                    ],
                )
            ]
        ),
        metadata=(("x-carillon-sandbox", "prod"),),
    )


async def test_the_delivery_gateway_reserves_without_profiles_and_checks_with_them(
    address: str, stub: profile_service_pb2_grpc.ProfileServiceStub
) -> None:
    await upsert_ann(stub)
    gateway = ProfileServiceGateway(address, timeout_s=10)
    try:
        checked = await gateway.check("prod", "email", "marketing", [("email", "ann@example.com")])
        reserved = await gateway.reserve("prod", "email", "marketing", [("email", "ann@example.com")], ["m1"])
    finally:
        await gateway.close()

    assert [(v.verdict, v.address, v.profile and v.profile.first_name) for v in checked] == [
        ("allowed", "ann@example.com", "Ann")
    ]
    assert [(v.verdict, v.address, v.profile) for v in reserved] == [("allowed", "ann@example.com", None)]


def test_reserving_with_message_keys_derives_the_ledger_message_ids_and_counts_each_once(store: ProfileStore) -> None:
    identities = [
        ("email", "in@example.com"),
        ("crm", "c2"),
        ("email", "nobody@example.com"),
        ("email", "out@example.com"),
    ]
    keys = MessageKeys("campaigns/c/runs/r", "email1", ["", "e1", "", ""])

    first = store.check_eligibility(
        "prod", "email", "marketing", identities, reserve=True, message_keys=keys, now=NOW, full_profiles=False
    )
    again = store.check_eligibility("prod", "email", "marketing", identities, reserve=True, message_keys=keys, now=NOW)

    expected = [
        message_id("prod", "campaigns/c/runs/r", "email1", "p-in", ""),
        message_id("prod", "campaigns/c/runs/r", "email1", "p-two", "e1"),
    ]
    for results in (first, again):
        assert [(r.verdict, r.reserved, r.message_id) for r in results] == [
            ("allowed", True, expected[0]),
            ("allowed", True, expected[1]),
            ("unknown_profile", False, ""),
            ("no_consent", False, ""),
        ]
    assert again[0].profile is not None and again[0].profile.consents  # full profiles by default
    assert store.release_reservations("prod", expected) == 2  # held once each, under the derived ids


@pytest.mark.parametrize(
    ("keys", "message_ids", "field"),
    [
        (MessageKeys("r", "a", ["", ""]), ["m1", "m2"], "message_ids"),
        (MessageKeys("", "a", ["", ""]), [], "run"),
        (MessageKeys("r", "", ["", ""]), [], "activity"),
        (MessageKeys("r", "a", [""]), [], "entity_keys"),
        (MessageKeys("r", "a", ["", "x\x00"]), [], "entity_keys[1]"),
    ],
    ids=["both", "no-run", "no-activity", "too-few-keys", "nul"],
)
def test_bad_message_keys_are_invalid_argument_naming_the_field(
    store: ProfileStore, keys: MessageKeys, message_ids: list[str], field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        store.check_eligibility(
            "prod", "email", "marketing", IDENTITIES[:2], reserve=True, message_ids=message_ids, message_keys=keys
        )

    assert field in [v.field for v in raised.value.violations]
    assert store.release_reservations("prod", ["m1", "m2"]) == 0


async def test_the_delivery_gateway_checks_and_reserves_in_one_call(
    address: str, stub: profile_service_pb2_grpc.ProfileServiceStub
) -> None:
    await upsert_ann(stub)
    gateway = ProfileServiceGateway(address, timeout_s=10)
    try:
        verdicts = await gateway.check_and_reserve(
            "prod", "email", [("email", "ann@example.com"), ("email", "who@example.com")], "runs/r", "email1", ["", ""]
        )
        released = await gateway.release("prod", [v.message_id for v in verdicts if v.reserved])
    finally:
        await gateway.close()

    assert [(v.verdict, v.reserved, v.message_id) for v in verdicts] == [
        ("allowed", True, message_id("prod", "runs/r", "email1", "ann", "")),
        ("unknown_profile", False, ""),
    ]
    assert verdicts[0].profile is not None and verdicts[0].profile.first_name == "Ann"
    assert released == 1


def test_recording_a_batch_finds_its_profiles_by_key_not_by_walking_the_profile_table(
    make_database: Callable[[str], Database],
) -> None:
    # PostgreSQL planned the "unknown profile" check of each batch as a walk of the profiles' whole
    # index (merge anti-join): each batch of a million-profile send cost more than the one before.
    # The plans are read in the recording transaction itself, with its settings.
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database)
    store.upsert_profiles("prod", [Profile(profile_id=f"p{i:05d}") for i in range(20_000)])
    # No ANALYZE: statistics lag behind a fresh load (with them missing, the anti-join compared every
    # id with every profile).
    plans: list[str] = []

    def explain(conn: object, cursor: Any, statement: str, parameters: Any, *args: object) -> None:
        if not statement.lstrip().upper().startswith(("SELECT", "DELETE", "INSERT")) or isinstance(parameters, list):
            return  # (an executemany has no one plan)
        other = cursor.connection.cursor()
        other.execute(("EXPLAIN " if database.is_postgres else "EXPLAIN QUERY PLAN ") + statement, parameters)
        plans.append("\n".join(str(row[0] if database.is_postgres else row[-1]) for row in other.fetchall()))

    sa.event.listen(database.engine, "after_cursor_execute", explain)
    try:
        recorded = store.record_communications(
            "prod", [Communication(f"m{i}", f"p{i:05d}", "email", "marketing", send_time=NOW) for i in range(500)]
        )
    finally:
        sa.event.remove(database.engine, "after_cursor_execute", explain)

    assert recorded == 500
    assert plans
    walks = ("Seq Scan on profiles", "Merge", "Hash Anti", "SCAN profiles", "Join Filter", "Materialize")
    assert not [plan for plan in plans if any(walk in plan for walk in walks)], plans


def test_reserving_a_batch_locks_its_profiles_by_key_not_by_walking_the_profile_table(
    make_database: Callable[[str], Database],
) -> None:
    # The reservers of a profile serialize on its row (PostgreSQL), locked as the batch's profiles are
    # read: one primary-key probe per id, in id order, however stale the statistics (a fresh load, not
    # analyzed). On SQLite the counter rows' version bump takes the writer lock, as before.
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database)
    store.upsert_profiles(
        "prod",
        [
            Profile(f"p{i:05d}", [("email", f"p{i:05d}@example.com")], consents=[Consent("email", "opted_in", "f")])
            for i in range(20_000)
        ],
    )
    store.create_capping_rule("prod", CappingRule("daily", 2, "day", channel="email"))
    plans: list[str] = []

    def explain(conn: object, cursor: Any, statement: str, parameters: Any, *args: object) -> None:
        if "FOR NO KEY UPDATE" not in statement.upper() or isinstance(parameters, list):
            return
        other = cursor.connection.cursor()
        other.execute("EXPLAIN " + statement, parameters)
        plans.append("\n".join(str(row[0]) for row in other.fetchall()))

    sa.event.listen(database.engine, "after_cursor_execute", explain)
    try:
        results = store.check_eligibility(
            "prod",
            "email",
            "marketing",
            [("email", f"p{i:05d}@example.com") for i in range(0, 1000, 2)],
            reserve=True,
            message_ids=[f"m{i}" for i in range(500)],
            now=NOW,
        )
    finally:
        sa.event.remove(database.engine, "after_cursor_execute", explain)

    assert [r.verdict for r in results] == ["allowed"] * 500
    assert len(plans) == (1 if database.is_postgres else 0)
    walks = ("Seq Scan on profiles", "Merge", "Hash", "Materialize")
    assert not [plan for plan in plans if any(walk in plan for walk in walks)], plans
    assert all("Index Scan using profiles_pkey" in plan and "LockRows" in plan for plan in plans), plans
