"""A reservation is a row of ``communications`` with an expiry, recorded in place, on both backends: what the
history shows, what recording, releasing and expiry do to the row, the migration that moved the reservations
there, and (PostgreSQL) that recording a batch is a heap-only update."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database, as_utc
from profile_stub.capping import CappingRule
from profile_stub.keysets import insert_rows
from profile_stub.profiles import Communication, Consent, MessageKeys, Profile, ProfileStore
from profile_stub.tables import MIGRATIONS, CommunicationRow
from tests.integration.test_profile_reservations import NOW, reserve, store
from tests.races import race

SENT = NOW + timedelta(minutes=5)

__all__ = ["store"]  # the fixture, shared with the reservation tests


def rows(store: ProfileStore) -> list[tuple[str, str, str, str, str, bool]]:
    """Every row of communications: message id, profile, campaign, run, activity, and whether it is a
    reservation (an expiry set)."""
    with store.database.engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT message_id, profile_id, campaign, run, activity, expire_time IS NOT NULL"
                " FROM communications ORDER BY message_id"
            )
        )
        return [(str(m), str(p), str(c), str(r), str(a), bool(e)) for m, p, c, r, a, e in found]


def recorded(message_id: str, profile_id: str = "ann") -> Communication:
    return Communication(
        message_id, profile_id, "sms", "marketing", campaign="campaigns/c", run="campaigns/c/runs/r", activity="sms1",
        send_time=SENT,
    )  # fmt: skip


def test_a_reservation_is_no_history(store: ProfileStore) -> None:
    assert reserve(store, "ann@example.com", "m1") == ("allowed", True)

    assert store.history("prod", "ann") == []
    assert store.list_communications("prod", "ann", 10) == ([], None)
    assert rows(store) == [("m1", "ann", "", "", "", True)]


def test_a_reservation_made_with_message_keys_holds_its_run_and_activity(store: ProfileStore) -> None:
    keys = MessageKeys("campaigns/c/runs/r", "email1", [""])
    (result,) = store.check_eligibility(
        "prod", "email", "marketing", [("email", "ann@example.com")], reserve=True, message_keys=keys, now=NOW
    )

    assert result.reserved
    assert rows(store) == [(result.message_id, "ann", "", "campaigns/c/runs/r", "email1", True)]


def test_recording_a_reservation_turns_its_row_into_the_communication_with_the_recorded_fields(
    store: ProfileStore,
) -> None:
    reserve(store, "ann@example.com", "m1")

    assert store.record_communications("prod", [recorded("m1")]) == 1

    assert rows(store) == [("m1", "ann", "campaigns/c", "campaigns/c/runs/r", "sms1", False)]
    assert store.history("prod", "ann") == [recorded("m1")]
    assert store.list_communications("prod", "ann", 10) == ([recorded("m1")], None)
    assert store.record_communications("prod", [recorded("m1")]) == 0  # recorded already: skipped
    assert reserve(store, "ann@example.com", "m2", NOW + timedelta(hours=1)) == ("capped", False)  # still counts


def test_reservations_recorded_with_a_send_time_each_get_each_their_own(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")
    reserve(store, "bob@example.com", "m2")
    batch = [
        Communication("m1", "ann", "email", "marketing", "campaigns/a", "r", "a", send_time=SENT),
        Communication("m2", "bob", "sms", "marketing", "campaigns/b", "r", "a", send_time=SENT + timedelta(seconds=1)),
        Communication("t1", "bob", "email", "transactional", send_time=NOW),  # not reserved
    ]

    assert store.record_communications("prod", batch) == 3

    assert store.history("prod", "ann") == batch[:1]
    assert store.history("prod", "bob") == [batch[2], batch[1]]
    assert [r[-1] for r in rows(store)] == [False, False, False]


def test_an_expired_reservation_recorded_late_still_becomes_the_communication(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")
    assert reserve(store, "ann@example.com", "m2", NOW + timedelta(minutes=31)) == ("allowed", True)  # m1 expired

    assert store.record_communications("prod", [recorded("m1")]) == 1

    assert rows(store) == [
        ("m1", "ann", "campaigns/c", "campaigns/c/runs/r", "sms1", False),
        ("m2", "ann", "", "", "", True),
    ]


def test_recording_a_reservation_of_another_profile_records_it_for_the_profile_given(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")

    assert store.record_communications("prod", [recorded("m1", "bob")]) == 1

    assert rows(store) == [("m1", "bob", "campaigns/c", "campaigns/c/runs/r", "sms1", False)]
    assert store.history("prod", "ann") == []


def test_releasing_deletes_reservations_only_never_a_communication(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")
    store.record_communications("prod", [recorded("m1")])
    reserve(store, "bob@example.com", "m2")
    store.record_communications("prod", [Communication("t1", "bob", "email", "transactional", send_time=NOW)])

    assert store.release_reservations("prod", ["m1", "m2", "t1"]) == 1

    assert [r[0] for r in rows(store)] == ["m1", "t1"]
    assert [c.message_id for c in store.history("prod", "ann")] == ["m1"]


def test_an_expired_reservation_counts_no_more_and_is_replaced_in_place(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")
    later = NOW + timedelta(minutes=31)

    assert reserve(store, "ann@example.com", "m1", later) == ("allowed", True)  # the same id again, expired

    assert rows(store) == [("m1", "ann", "", "", "", True)]  # one row, its expiry renewed
    assert reserve(store, "ann@example.com", "m2", later + timedelta(minutes=29)) == ("capped", False)
    assert reserve(store, "ann@example.com", "m2", later + timedelta(minutes=31)) == ("allowed", True)
    assert rows(store) == [("m2", "ann", "", "", "", True)]  # the expired m1 dropped by the capping check


def test_reserving_a_message_recorded_already_leaves_its_communication_as_it_is(store: ProfileStore) -> None:
    store.record_communications("prod", [recorded("m1")])

    assert reserve(store, "ann@example.com", "m1", SENT) == ("allowed", True)  # counted once: the send itself

    assert rows(store) == [("m1", "ann", "campaigns/c", "campaigns/c/runs/r", "sms1", False)]


def test_forgetting_a_profile_deletes_its_communications_and_reservations(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")
    store.record_communications("prod", [recorded("m1")])
    store.check_eligibility(
        "prod", "sms", "marketing", [("email", "ann@example.com")], reserve=True, message_ids=["m2"], now=NOW
    )  # (no phone: missing address, nothing reserved)
    reserve(store, "bob@example.com", "m3")

    store.delete_profile("prod", "ann")

    assert [r[:2] for r in rows(store)] == [("m3", "bob")]


def test_reservers_and_recorders_of_one_profile_never_pass_its_cap(store: ProfileStore) -> None:
    store.delete_capping_rule("prod", "daily")
    store.create_capping_rule("prod", CappingRule("daily", 3, "day"))
    racers = 6
    allowed: list[str] = []

    def reserve_and_record(i: int) -> None:
        _, reserved = reserve(store, "ann@example.com", f"race-{i}", NOW + timedelta(minutes=i))
        if reserved:
            allowed.append(f"race-{i}")
            store.record_communications("prod", [recorded(f"race-{i}")])

    errors = race(racers, reserve_and_record)

    assert errors == []
    assert len(allowed) == 3
    assert sorted(c.message_id for c in store.history("prod", "ann")) == sorted(allowed)
    assert reserve(store, "ann@example.com", "late", NOW + timedelta(minutes=racers)) == ("capped", False)


# -- migration 4 ------------------------------------------------------------------------------------------

_LEGACY = sa.MetaData()
_LEGACY_RESERVATIONS = sa.Table(
    "send_reservations",
    _LEGACY,
    sa.Column("sandbox", sa.String(30), primary_key=True),
    sa.Column("message_id", sa.String(120), primary_key=True),
    sa.Column("profile_id", sa.String(63), nullable=False, index=True),
    sa.Column("channel", sa.String(20), nullable=False),
    sa.Column("reserve_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
)


def _back_to_version_3(database: Database) -> None:
    """The schema of version 3: communications without an expiry, indexed by profile and send time, and the
    reservations in a table of their own."""
    with database.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_communications_profile_count_time"))
        conn.execute(sa.text("ALTER TABLE communications DROP COLUMN expire_time"))
        conn.execute(sa.text("ALTER TABLE communications DROP COLUMN count_time"))
        conn.execute(
            sa.text("CREATE INDEX ix_communications_profile_send_time ON communications (profile_id, send_time)")
        )
        if database.is_postgres:
            conn.execute(sa.text("ALTER TABLE communications RESET (fillfactor)"))
        _LEGACY.create_all(conn)
        conn.execute(sa.text("DELETE FROM carillon_schema_migrations WHERE version = 4"))


def test_migration_4_moves_the_reservations_into_the_communications(store: ProfileStore) -> None:
    database = store.database
    _back_to_version_3(database)
    with database.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO communications (sandbox, message_id, profile_id, channel, category, campaign, run,"
                " activity, send_time) VALUES ('prod', 'sent', 'ann', 'email', 'marketing', 'campaigns/c', 'r', 'a',"
                " :t)"
            ),
            {"t": NOW - timedelta(hours=2)},
        )
        insert_rows(
            conn,
            _LEGACY_RESERVATIONS,
            [
                {
                    "sandbox": "prod",
                    "message_id": mid,
                    "profile_id": pid,
                    "channel": "email",
                    "reserve_time": NOW - timedelta(minutes=1),
                    "expire_time": NOW + timedelta(minutes=29),
                }
                for mid, pid in (("live", "bob"), ("sent", "ann"))  # "sent" is recorded already
            ],
        )

    assert database.migrate(MIGRATIONS) == [4]

    assert rows(store) == [("live", "bob", "", "", "", True), ("sent", "ann", "campaigns/c", "r", "a", False)]
    with database.engine.connect() as conn:
        assert not sa.inspect(conn).has_table("send_reservations")
        indexes = {i["name"]: i["column_names"] for i in sa.inspect(conn).get_indexes("communications")}
    assert indexes == {"ix_communications_profile_count_time": ["profile_id", "count_time"]}
    with database.engine.connect() as conn:  # the count time of a moved reservation is its reservation's
        comms = CommunicationRow.__table__  # type: ignore[attr-defined]
        count_times = dict(conn.execute(sa.select(comms.c.message_id, comms.c.count_time)).all())
    assert {mid: as_utc(t) for mid, t in count_times.items()} == {
        "live": NOW - timedelta(minutes=1),
        "sent": NOW - timedelta(hours=2),
    }
    assert [c.message_id for c in store.history("prod", "ann")] == ["sent"]
    assert store.history("prod", "bob") == []
    assert reserve(store, "bob@example.com", "next") == ("capped", False)  # the moved reservation counts
    assert store.record_communications("prod", [recorded("live", "bob")]) == 1
    assert database.migrate(MIGRATIONS) == []


# -- PostgreSQL: recording is a heap-only update -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"])  # page layout and heap-only updates are PostgreSQL's
@pytest.mark.parametrize("send_times", ["shared", "one_each"])  # one statement form each
def test_recording_reserved_messages_adds_no_index_entry_and_keeps_each_row_in_its_page(
    make_database: Callable[[str], Database], send_times: str
) -> None:
    # A heap-only update leaves the row's new version in its page and adds no index entry; an update of an
    # indexed column (the send time, in the index of version 3) or one without room in the page adds an
    # entry to both indexes per message.
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database)
    count = 3_000
    store.upsert_profiles(
        "prod",
        [
            Profile(f"p{i:05d}", [("email", f"p{i:05d}@example.com")], consents=[Consent("email", "opted_in", "f")])
            for i in range(count)
        ],
    )
    store.create_capping_rule("prod", CappingRule("daily", 10, "day"))
    identities = [("email", f"p{i:05d}@example.com") for i in range(count)]
    keys = MessageKeys("campaigns/c/runs/r", "email1", [""] * count)
    reserved = store.check_eligibility("prod", "email", "marketing", identities, reserve=True, message_keys=keys)

    def layout() -> tuple[dict[str, str], int]:
        with database.engine.connect() as conn:
            pages = conn.exec_driver_sql("SELECT message_id, (ctid::text::point)[0]::text FROM communications").all()
            (index_bytes,) = conn.exec_driver_sql("SELECT pg_indexes_size('communications')").one()
        return {str(m): str(p) for m, p in pages}, int(index_bytes)

    before = layout()
    now = datetime.now(UTC)  # a send time other than the reservations'
    sent = [
        Communication(
            r.message_id, f"p{i:05d}", "email", "marketing", "campaigns/c", keys.run, keys.activity,
            now if send_times == "shared" else now + timedelta(microseconds=i),
        )
        for i, r in enumerate(reserved)
    ]  # fmt: skip
    assert store.record_communications("prod", sent) == count

    assert layout() == before
    assert [c.campaign for c in store.history("prod", "p00042")] == ["campaigns/c"]
