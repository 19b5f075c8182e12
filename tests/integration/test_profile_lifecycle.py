"""Lookup by identity, the right to be forgotten and the history read API, on both backends."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument, NotFound
from profile_stub.capping import CappingRule
from profile_stub.profiles import Communication, Consent, Profile, ProfileStore
from profile_stub.quarantine import DeliveryEvent
from profile_stub.tables import MIGRATIONS

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database)
    store.upsert_profiles(
        "prod",
        [
            Profile(
                "ann",
                [("email", "ann@example.com"), ("push_token", "tok-1"), ("push_token", "tok-2")],
                consents=[Consent("email", "opted_in", "form")],
            ),
            Profile("bob", [("email", "bob@example.com")]),
        ],
    )
    return store


def test_a_profile_is_found_by_any_of_its_identities(store: ProfileStore) -> None:
    assert store.lookup_profile("prod", "push_token", "tok-2").profile_id == "ann"
    assert store.lookup_profile("prod", "email", "bob@example.com").profile_id == "bob"
    with pytest.raises(NotFound):
        store.lookup_profile("prod", "email", "nobody@example.com")


def test_forgetting_a_profile_removes_its_consent_history_quarantine_and_reservations(store: ProfileStore) -> None:
    store.create_capping_rule("prod", CappingRule("daily", 5, "day"))
    store.record_communications("prod", [Communication("m1", "ann", "email", "marketing")])
    store.check_eligibility(
        "prod", "email", "marketing", [("email", "ann@example.com")], reserve=True, message_ids=["m2"]
    )
    store.record_delivery_events("prod", [DeliveryEvent("e1", "email", "hard_bounce", "ann@example.com")])

    store.delete_profile("prod", "ann")

    with pytest.raises(NotFound):
        store.get_profile("prod", "ann")
    assert store.history("prod", "ann") == []
    assert not store.get_quarantine("prod", "email", "ann@example.com").quarantined
    assert store.release_reservations("prod", ["m2"]) == 0
    # A new profile with the same address starts clean: no consent, no quarantine.
    store.upsert_profiles("prod", [Profile("ann2", [("email", "ann@example.com")])])
    assert store.get_profile("prod", "ann2").consents == []
    assert store.check_eligibility("prod", "email", "transactional", [("email", "ann@example.com")])[0].verdict == (
        "allowed"
    )
    assert store.get_profile("prod", "bob").profile_id == "bob"


def test_forgetting_an_unknown_profile_is_not_found(store: ProfileStore) -> None:
    with pytest.raises(NotFound):
        store.delete_profile("prod", "ghost")


def test_history_is_listed_newest_first_in_pages(store: ProfileStore) -> None:
    store.record_communications(
        "prod",
        [Communication(f"m{i}", "ann", "email", "marketing", send_time=T0 + timedelta(hours=i)) for i in range(5)]
        + [Communication("same-time", "ann", "sms", "transactional", send_time=T0 + timedelta(hours=4))],
    )
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = store.list_communications("prod", "ann", 2, cursor)
        seen += [c.message_id for c in page]
        pages += 1
        if cursor is None:
            break

    assert seen == ["same-time", "m4", "m3", "m2", "m1", "m0"]
    assert pages == 3


def test_unknown_identities_are_created_on_the_fly_only_when_asked(store: ProfileStore) -> None:
    ident = ("email", "new@example.com")

    assert store.check_eligibility("prod", "email", "transactional", [ident])[0].verdict == "unknown_profile"
    created = store.check_eligibility("prod", "email", "transactional", [ident, ident], create_missing=True)

    assert [r.verdict for r in created] == ["allowed", "allowed"]
    assert created[0].address == "new@example.com"
    profile = store.lookup_profile("prod", *ident)
    assert created[0].profile is not None and created[0].profile.profile_id == profile.profile_id
    assert profile.consents == []
    assert store.check_eligibility("prod", "email", "marketing", [ident])[0].verdict == "no_consent"


def test_country_and_custom_attributes_round_trip_with_their_types(store: ProfileStore) -> None:
    attributes = {
        "tier": "gold",
        "points": 1200,
        "ratio": Decimal("0.25"),
        "vip": True,
        "born": date(1990, 5, 17),
        "seen": T0,
        "note": None,
    }
    store.upsert_profiles("prod", [Profile("cy", [("email", "cy@example.com")], country="SE", attributes=attributes)])

    profile = store.get_profile("prod", "cy")

    assert (profile.country, profile.attributes) == ("SE", attributes)
    store.upsert_profiles("prod", [Profile("cy", [("email", "cy@example.com")])])
    assert (store.get_profile("prod", "cy").country, store.get_profile("prod", "cy").attributes) == ("", {})


def test_a_badly_named_attribute_is_refused(store: ProfileStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.upsert_profiles("prod", [Profile("cy", attributes={"Bad Name": 1})])

    assert [v.field for v in caught.value.violations] == ["profiles[0].attributes"]


def test_consent_is_kept_per_purpose_and_checked_for_the_purpose_asked(store: ProfileStore) -> None:
    store.set_consent("prod", "ann", "email", "opted_out", "preferences", purpose="newsletter")

    consents = {(c.channel, c.purpose): (c.state, c.source) for c in store.get_profile("prod", "ann").consents}
    ident = [("email", "ann@example.com")]

    assert consents == {
        ("email", "marketing"): ("opted_in", "form"),
        ("email", "newsletter"): ("opted_out", "preferences"),
    }
    assert store.check_eligibility("prod", "email", "marketing", ident)[0].verdict == "allowed"
    assert store.check_eligibility("prod", "email", "marketing", ident, purpose="newsletter")[0].verdict == "no_consent"
    assert store.check_eligibility("prod", "email", "marketing", ident, purpose="offers")[0].verdict == "no_consent"


def test_forgetting_a_profile_also_removes_its_purpose_consents(store: ProfileStore) -> None:
    store.set_consent("prod", "ann", "email", "opted_in", "form", purpose="newsletter")
    store.delete_profile("prod", "ann")
    store.upsert_profiles("prod", [Profile("ann", [("email", "ann@example.com")])])

    assert store.get_profile("prod", "ann").consents == []


def test_a_profile_with_several_push_tokens_is_sent_to_every_token_not_quarantined(store: ProfileStore) -> None:
    store.set_consent("prod", "ann", "push", "opted_in", "app")
    ident = [("email", "ann@example.com")]
    store.record_delivery_events("prod", [DeliveryEvent("e1", "push", "hard_bounce", "tok-1")])

    allowed = store.check_eligibility("prod", "push", "marketing", ident)[0]
    store.record_delivery_events("prod", [DeliveryEvent("e2", "push", "hard_bounce", "tok-2")])

    assert (allowed.verdict, allowed.address, allowed.addresses) == ("allowed", "tok-2", ["tok-2"])
    assert store.check_eligibility("prod", "push", "transactional", ident)[0].verdict == "quarantined"
