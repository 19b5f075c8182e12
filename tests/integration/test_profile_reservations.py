"""Reservations on both backends: how they are locked, written, confirmed by recording and replaced, with
the statements each step costs where speed is the point."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database
from carillon_chassis.errors import NotFound
from profile_stub.capping import CappingRule
from profile_stub.profiles import Communication, Consent, Profile, ProfileStore
from profile_stub.tables import MIGRATIONS

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
ANN = Profile("ann", [("email", "ann@example.com")], consents=[Consent("email", "opted_in", "form")])
BOB = Profile("bob", [("email", "bob@example.com")], consents=[Consent("email", "opted_in", "form")])


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database, reservation_ttl=timedelta(minutes=30))
    store.upsert_profiles("prod", [ANN, BOB])
    store.create_capping_rule("prod", CappingRule("daily", 1, "day"))
    return store


def reserve(store: ProfileStore, address: str, message_id: str, now: datetime = NOW) -> tuple[str, bool]:
    result = store.check_eligibility(
        "prod", "email", "marketing", [("email", address)], reserve=True, message_ids=[message_id], now=now
    )[0]
    return result.verdict, result.reserved


def reservations(store: ProfileStore) -> list[tuple[str, str]]:
    with store.database.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT message_id, profile_id FROM communications WHERE expire_time IS NOT NULL ORDER BY message_id"
            )
        )
        return [(str(mid), str(pid)) for mid, pid in rows]


@contextmanager
def statements(database: Database) -> Iterator[list[str]]:
    """The SQL statements run on ``database`` meanwhile, upper-cased and on one line each."""
    seen: list[str] = []

    def record(conn: object, cursor: Any, statement: str, *args: object) -> None:
        seen.append(" ".join(statement.split()).upper())

    sa.event.listen(database.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", record)


def test_an_expired_reservation_of_another_profile_under_the_same_message_id_is_replaced(store: ProfileStore) -> None:
    assert reserve(store, "ann@example.com", "m1") == ("allowed", True)

    later = NOW + timedelta(minutes=31)
    assert reserve(store, "bob@example.com", "m1", later) == ("allowed", True)

    assert reservations(store) == [("m1", "bob")]
    assert reserve(store, "bob@example.com", "m2", later) == ("capped", False)  # bob's reservation counts
    assert reserve(store, "ann@example.com", "m3", later) == ("allowed", True)  # ann's expired one does not


def test_recording_a_message_reserved_under_another_profile_still_needs_that_profile(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")

    with pytest.raises(NotFound) as raised:
        store.record_communications("prod", [Communication("m1", "ghost", "email", "marketing", send_time=NOW)])

    assert [v.field for v in raised.value.violations] == ["communications[0].profile"]
    assert reservations(store) == [("m1", "ann")]  # nothing changed: the reservation still holds
    assert store.history("prod", "ann") == []


def test_recording_a_reservation_of_a_profile_forgotten_since_is_not_found(store: ProfileStore) -> None:
    reserve(store, "bob@example.com", "m1")
    store.delete_profile("prod", "bob")

    with pytest.raises(NotFound):
        store.record_communications("prod", [Communication("m1", "bob", "email", "marketing", send_time=NOW)])


def test_recording_the_reserved_messages_of_a_batch_looks_no_profile_up(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")
    reserve(store, "bob@example.com", "m2")
    batch = [
        Communication("m1", "ann", "email", "marketing", send_time=NOW),
        Communication("m2", "bob", "email", "marketing", send_time=NOW),
    ]

    with statements(store.database) as seen:
        assert store.record_communications("prod", batch) == 2

    probes = [s for s in seen if "FROM PROFILES" in s]
    assert probes == []  # the reservations deleted prove their profiles, on both backends
    assert reservations(store) == []
    assert [c.message_id for c in store.history("prod", "bob")] == ["m2"]


def test_recording_an_unreserved_message_still_looks_its_profile_up(store: ProfileStore) -> None:
    with statements(store.database) as seen:
        assert store.record_communications("prod", [Communication("t1", "ann", "email", "transactional")]) == 1

    assert [s for s in seen if "FROM PROFILES" in s]


def test_reserving_without_a_capping_rule_locks_nothing_and_still_counts_each_message_once(
    store: ProfileStore,
) -> None:
    store.delete_capping_rule("prod", "daily")

    with statements(store.database) as seen:
        assert reserve(store, "ann@example.com", "m1") == ("allowed", True)
        assert reserve(store, "ann@example.com", "m1") == ("allowed", True)

    assert not [s for s in seen if "FOR NO KEY UPDATE" in s or "PROFILE_COUNTERS" in s]
    assert reservations(store) == [("m1", "ann")]


def test_a_reserver_with_a_rule_locks_the_profile_rows_on_postgresql_and_writes_no_counter(
    store: ProfileStore,
) -> None:
    with statements(store.database) as seen:
        reserve(store, "ann@example.com", "m1")

    locks = [s for s in seen if "FOR NO KEY UPDATE" in s]
    counters = [s for s in seen if "PROFILE_COUNTERS" in s]
    if store.database.is_postgres:
        assert len(locks) == 1 and "FROM PROFILES" in locks[0] and counters == []
    else:  # the first write takes SQLite's writer lock: the counter's version bump
        assert locks == [] and counters


def test_profile_updates_and_reservers_of_the_same_profiles_never_deadlock(store: ProfileStore) -> None:
    # A reserver locks profile rows in id order; an upsert of the same profiles given in the opposite
    # order updates them in id order too (otherwise each could hold a row the other waits for).
    ids = [f"p{i:02d}" for i in range(30)]
    profiles = [
        Profile(pid, [("email", f"{pid}@example.com")], consents=[Consent("email", "opted_in", "f")]) for pid in ids
    ]
    store.upsert_profiles("prod", profiles)
    store.delete_capping_rule("prod", "daily")
    store.create_capping_rule("prod", CappingRule("many", 1000, "day"))
    errors: list[BaseException] = []
    rounds = 15

    def reserver() -> None:
        try:
            for r in range(rounds):
                store.check_eligibility(
                    "prod", "email", "marketing", [("email", f"{pid}@example.com") for pid in ids],
                    reserve=True, message_ids=[f"r{r}-{pid}" for pid in ids], now=NOW,
                )  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    def updater() -> None:
        try:
            for r in range(rounds):
                store.upsert_profiles(
                    "prod",
                    [
                        Profile(p.profile_id, p.identities, first_name=f"v{r}", consents=p.consents)
                        for p in reversed(profiles)
                    ],
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reserver), threading.Thread(target=updater)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(reservations(store)) == rounds * len(ids)


def test_the_next_capping_check_of_a_profile_drops_its_expired_reservations(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")
    reserve(store, "bob@example.com", "m2", NOW + timedelta(minutes=20))

    assert reserve(store, "ann@example.com", "m3", NOW + timedelta(minutes=31)) == ("allowed", True)

    assert reservations(store) == [("m2", "bob"), ("m3", "ann")]  # bob's is live, and was not checked


def test_a_check_that_finds_no_expired_reservation_deletes_nothing(store: ProfileStore) -> None:
    reserve(store, "ann@example.com", "m1")

    with statements(store.database) as seen:
        reserve(store, "bob@example.com", "m2")

    assert not [s for s in seen if s.startswith("DELETE")]
