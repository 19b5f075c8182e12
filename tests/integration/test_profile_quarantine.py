"""Quarantine from delivery feedback, on both backends."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument
from profile_stub.profiles import Consent, Profile, ProfileStore
from profile_stub.quarantine import DeliveryEvent
from profile_stub.tables import MIGRATIONS

ANN = Profile("ann", [("crm_id", "c1"), ("email", "ann@example.com")], consents=[Consent("email", "opted_in", "form")])


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database, soft_bounce_limit=3)
    store.upsert_profiles("prod", [ANN])
    return store


def event(event_id: str, kind: str, address: str = "ann@example.com", **extra: str) -> DeliveryEvent:
    return DeliveryEvent(event_id=event_id, channel="email", kind=kind, address=address, **extra)


def verdict(store: ProfileStore, category: str = "marketing") -> str:
    return store.check_eligibility("prod", "email", category, [("crm_id", "c1")])[0].verdict


def test_a_hard_bounce_quarantines_the_address_for_marketing_and_transactional(store: ProfileStore) -> None:
    assert store.record_delivery_events("prod", [event("e1", "hard_bounce")]) == 1

    assert verdict(store) == "quarantined"
    assert verdict(store, "transactional") == "quarantined"
    state = store.get_quarantine("prod", "email", "ann@example.com")
    assert (state.quarantined, state.reason) == (True, "hard_bounce")


def test_soft_bounces_quarantine_only_after_the_configured_number_in_a_row(store: ProfileStore) -> None:
    store.record_delivery_events("prod", [event("e1", "soft_bounce"), event("e2", "soft_bounce")])
    assert verdict(store) == "allowed"
    assert store.get_quarantine("prod", "email", "ann@example.com").soft_bounces == 2

    store.record_delivery_events("prod", [event("e3", "soft_bounce")])

    assert verdict(store) == "quarantined"
    assert store.get_quarantine("prod", "email", "ann@example.com").reason == "soft_bounce"


def test_a_delivery_clears_the_soft_bounce_count(store: ProfileStore) -> None:
    store.record_delivery_events(
        "prod",
        [event("e1", "soft_bounce"), event("e2", "soft_bounce"), event("e3", "delivered"), event("e4", "soft_bounce")],
    )

    assert store.get_quarantine("prod", "email", "ann@example.com").soft_bounces == 1
    assert verdict(store) == "allowed"


def test_a_repeated_event_id_is_applied_once(store: ProfileStore) -> None:
    bounce = event("e1", "soft_bounce")

    assert store.record_delivery_events("prod", [bounce, bounce]) == 1
    assert store.record_delivery_events("prod", [bounce]) == 0
    assert store.get_quarantine("prod", "email", "ann@example.com").soft_bounces == 1


def test_release_lifts_the_quarantine(store: ProfileStore) -> None:
    store.record_delivery_events("prod", [event("e1", "hard_bounce")])

    released = store.release_quarantine("prod", "email", "ann@example.com")

    assert not released.quarantined
    assert verdict(store) == "allowed"


def test_a_complaint_opts_the_profile_out_with_its_source(store: ProfileStore) -> None:
    store.record_delivery_events("prod", [event("e1", "complaint", source="fbl")])

    consent = store.get_profile("prod", "ann").consents[0]
    assert (consent.channel, consent.state, consent.source) == ("email", "opted_out", "fbl")
    assert verdict(store) == "no_consent"
    assert not store.get_quarantine("prod", "email", "ann@example.com").quarantined


def test_an_unsubscribe_by_profile_opts_out_and_resolves_the_address(store: ProfileStore) -> None:
    store.record_delivery_events("prod", [event("e1", "unsubscribe", address="", profile_id="ann")])
    store.record_delivery_events("prod", [event("e2", "hard_bounce", address="", profile_id="ann")])

    assert store.get_profile("prod", "ann").consent("email") == "opted_out"
    assert store.get_quarantine("prod", "email", "ann@example.com").quarantined


def test_feedback_for_an_unknown_address_quarantines_it_without_a_profile(store: ProfileStore) -> None:
    store.record_delivery_events("prod", [event("e1", "hard_bounce", address="ghost@example.com")])

    assert store.get_quarantine("prod", "email", "ghost@example.com").quarantined
    assert verdict(store) == "allowed"


def test_an_event_without_a_type_is_refused_and_nothing_is_applied(store: ProfileStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.record_delivery_events("prod", [event("e1", "hard_bounce"), event("e2", "")])

    assert [v.field for v in caught.value.violations] == ["events[1].type"]
    assert verdict(store) == "allowed"


def test_the_soft_bounce_limit_must_be_between_1_and_20(store: ProfileStore) -> None:
    with pytest.raises(ValueError):
        ProfileStore(store.database, soft_bounce_limit=21)
