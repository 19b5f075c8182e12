"""Capping rules and atomic check-and-reserve, on both backends."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from carillon_chassis.database import Database
from carillon_chassis.errors import AlreadyExists, InvalidArgument, NotFound
from profile_stub.capping import CappingRule
from profile_stub.profiles import Communication, Consent, Profile, ProfileStore
from profile_stub.tables import MIGRATIONS
from tests.races import race

ANN = Profile(
    "ann",
    [("crm_id", "c1"), ("email", "ann@example.com"), ("phone", "+4670000001")],
    time_zone="Pacific/Auckland",
    consents=[Consent("email", "opted_in", "form"), Consent("sms", "opted_in", "form")],
)
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)  # a Wednesday


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database, reservation_ttl=timedelta(minutes=30))
    store.upsert_profiles("prod", [ANN])
    return store


def sent(store: ProfileStore, message_id: str, when: datetime, channel: str = "email") -> None:
    store.record_communications(
        "prod", [Communication(message_id, "ann", channel, "marketing", run="r", send_time=when)]
    )


def check(store: ProfileStore, channel: str = "email", category: str = "marketing", now: datetime = NOW) -> str:
    return store.check_eligibility("prod", channel, category, [("crm_id", "c1")], now=now)[0].verdict


def reserve(store: ProfileStore, message_id: str, now: datetime = NOW) -> str:
    result = store.check_eligibility(
        "prod", "email", "marketing", [("crm_id", "c1")], reserve=True, message_ids=[message_id], now=now
    )[0]
    assert result.reserved == (result.verdict == "allowed")
    return result.verdict


def test_a_daily_cap_counts_marketing_sends_of_the_day(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("daily", 2, "day", channel="email"))
    sent(store, "m0", NOW - timedelta(days=1))
    sent(store, "m1", NOW - timedelta(hours=1))
    assert check(store) == "allowed"

    sent(store, "m2", NOW - timedelta(minutes=1))

    assert check(store) == "capped"
    assert check(store, "sms") == "allowed"
    assert check(store, category="transactional") == "allowed"


def test_a_rule_without_a_channel_counts_every_channel(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("weekly", 2, "week"))
    sent(store, "m1", NOW - timedelta(days=2), "sms")  # Monday
    sent(store, "m2", NOW - timedelta(hours=2), "email")

    assert check(store, "sms") == "capped"
    assert check(store, now=NOW + timedelta(days=5)) == "allowed"  # next Monday


def test_a_profile_time_zone_rule_counts_the_profiles_local_day(store: ProfileStore) -> None:
    # 12:00 UTC is 01:00 the next day in Auckland: a send at 10:00 UTC was on the previous local day.
    sent(store, "m1", NOW - timedelta(hours=2))
    store.create_capping_rule("prod", CappingRule("utc", 1, "day", time_basis="utc"))
    assert check(store) == "capped"

    store.delete_capping_rule("prod", "utc")
    store.create_capping_rule("prod", CappingRule("local", 1, "day", time_basis="profile"))

    assert check(store) == "allowed"


def test_a_monthly_cap_resets_at_the_first_of_the_month(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("monthly", 1, "month"))
    sent(store, "m1", NOW - timedelta(days=20))

    assert check(store) == "capped"
    assert check(store, now=datetime(2026, 12, 1, 0, 1, tzinfo=UTC)) == "allowed"


def test_reservations_count_against_the_cap_until_they_expire(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("daily", 1, "day"))

    assert reserve(store, "m1") == "allowed"
    assert reserve(store, "m2") == "capped"
    assert reserve(store, "m1") == "allowed"  # the same message again is not counted twice
    assert reserve(store, "m2", NOW + timedelta(minutes=31)) == "allowed"


def test_a_confirmed_reservation_becomes_a_communication(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("daily", 1, "day"))
    reserve(store, "m1")

    sent(store, "m1", NOW)

    assert reserve(store, "m2", NOW + timedelta(hours=2)) == "capped"
    assert [c.message_id for c in store.history("prod", "ann")] == ["m1"]


def test_a_released_reservation_frees_its_slot(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("daily", 1, "day"))
    reserve(store, "m1")

    assert store.release_reservations("prod", ["m1", "never"]) == 1
    assert reserve(store, "m2") == "allowed"


def test_two_identities_of_one_profile_in_a_batch_share_the_cap(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("daily", 1, "day"))

    results = store.check_eligibility(
        "prod", "email", "marketing", [("crm_id", "c1"), ("email", "ann@example.com")],
        reserve=True, message_ids=["a", "b"], now=NOW,
    )  # fmt: skip

    assert [r.verdict for r in results] == ["allowed", "capped"]


def test_concurrent_reservers_race_for_the_last_slot_and_exactly_one_wins(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("daily", 3, "day"))
    sent(store, "m1", NOW - timedelta(hours=1))
    sent(store, "m2", NOW - timedelta(hours=1))
    racers = 4
    verdicts: list[str] = []

    errors = race(racers, lambda i: verdicts.append(reserve(store, f"race-{i}")))

    assert errors == []
    assert sorted(verdicts) == ["allowed"] + ["capped"] * (racers - 1)


def test_a_capping_rule_with_a_bad_limit_is_refused(store: ProfileStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.create_capping_rule("prod", CappingRule("bad", 0, "year"))

    assert [v.field for v in caught.value.violations] == ["capping_rule.max_messages", "capping_rule.period"]
    assert store.list_capping_rules("prod") == []


def test_capping_rules_are_listed_per_sandbox_and_deleted(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("daily", 1, "day"))
    store.create_capping_rule("demo", CappingRule("weekly", 1, "week"))
    with pytest.raises(AlreadyExists):
        store.create_capping_rule("prod", CappingRule("daily", 2, "day"))

    assert [r.rule_id for r in store.list_capping_rules("prod")] == ["daily"]
    store.delete_capping_rule("prod", "daily")
    with pytest.raises(NotFound):
        store.delete_capping_rule("prod", "daily")
    assert [r.rule_id for r in store.list_capping_rules("demo")] == ["weekly"]


def test_reserve_needs_one_message_id_per_identity(store: ProfileStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.check_eligibility("prod", "email", "marketing", [("crm_id", "c1")], reserve=True)

    assert caught.value.reason == "MESSAGE_IDS_MISMATCH"
