"""Which past sends a capping check reads: every send its longest rule's current period can count."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from carillon_chassis.database import Database
from profile_stub.capping import CappingRule
from profile_stub.profiles import Communication, Consent, Profile, ProfileStore
from profile_stub.tables import MIGRATIONS


def make_store(make_database: Callable[[str], Database], time_zone: str) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database)
    profile = Profile(
        "kim", [("email", "kim@example.com")], time_zone=time_zone, consents=[Consent("email", "opted_in")]
    )
    store.upsert_profiles("prod", [profile])
    return store


def send(store: ProfileStore, message_id: str, when: datetime) -> None:
    store.record_communications("prod", [Communication(message_id, "kim", "email", "marketing", send_time=when)])


def verdict(store: ProfileStore, now: datetime) -> str:
    return store.check_eligibility("prod", "email", "marketing", [("email", "kim@example.com")], now=now)[0].verdict


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    return make_store(make_database, "Europe/Stockholm")


def test_a_monthly_cap_beside_a_daily_cap_still_counts_the_sends_of_the_whole_month(store: ProfileStore) -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    store.create_capping_rule("prod", CappingRule("daily", 5, "day"))
    store.create_capping_rule("prod", CappingRule("monthly", 2, "month"))
    send(store, "m1", datetime(2026, 11, 2, 9, 0, tzinfo=UTC))
    assert verdict(store, now) == "allowed"

    send(store, "m2", datetime(2026, 11, 20, 9, 0, tzinfo=UTC))

    assert verdict(store, now) == "capped"


def test_a_local_daily_cap_ahead_of_utc_counts_a_send_of_the_previous_utc_day(
    make_database: Callable[[str], Database],
) -> None:
    store = make_store(make_database, "Pacific/Kiritimati")  # UTC+14
    now = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)  # 15:00 on the 25th in Kiritimati
    store.create_capping_rule("prod", CappingRule("local", 1, "day", time_basis="profile"))

    send(store, "m1", now - timedelta(hours=14))  # 01:00 on the 25th there, the 24th in UTC

    assert verdict(store, now) == "capped"
    assert verdict(store, now + timedelta(hours=10)) == "allowed"  # 01:00 on the 26th there
