"""profile_stub's store on both backends: profiles, identities, consent, eligibility and history."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument, NotFound
from profile_stub.profiles import Communication, Consent, Profile, ProfileStore
from profile_stub.tables import MIGRATIONS


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    return ProfileStore(database)


def ann(**changes: object) -> Profile:
    base = Profile(
        profile_id="ann",
        identities=[("crm_id", "c1"), ("email", "ann@example.com")],
        first_name="Ann",
        consents=[Consent("email", "opted_in", "form")],
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_upsert_creates_then_replaces_a_profile(store: ProfileStore) -> None:
    assert store.upsert_profiles("prod", [ann()]) == (1, 0)
    assert store.upsert_profiles("prod", [ann(first_name="Anna", identities=[("crm_id", "c1")])]) == (0, 1)

    profile = store.get_profile("prod", "ann")
    assert profile.first_name == "Anna"
    assert profile.identities == [("crm_id", "c1")]
    assert profile.consent("email") == "opted_in"


def test_an_identity_owned_by_another_profile_is_refused_and_nothing_is_written(store: ProfileStore) -> None:
    store.upsert_profiles("prod", [ann()])
    bob = Profile(profile_id="bob", identities=[("email", "ann@example.com")])

    with pytest.raises(InvalidArgument) as caught:
        store.upsert_profiles("prod", [bob])

    assert caught.value.reason == "IDENTITY_CONFLICT"
    assert [v.field for v in caught.value.violations] == ["profiles[0].identities[0]"]
    with pytest.raises(NotFound):
        store.get_profile("prod", "bob")


def test_eligibility_gives_each_identity_its_verdict_in_request_order(store: ProfileStore) -> None:
    store.upsert_profiles(
        "prod",
        [
            ann(),
            Profile("bob", [("crm_id", "c2"), ("email", "bob@example.com")], consents=[Consent("email", "opted_out")]),
            Profile("cid", [("crm_id", "c3"), ("email", "cid@example.com")]),
            Profile("dan", [("crm_id", "c4")], consents=[Consent("email", "opted_in")]),
        ],
    )
    identities = [("crm_id", c) for c in ("c4", "c1", "c2", "c3", "c9")]

    results = store.check_eligibility("prod", "email", "marketing", identities)

    assert [(r.identity, r.verdict) for r in results] == [
        (("crm_id", "c4"), "missing_address"),
        (("crm_id", "c1"), "allowed"),
        (("crm_id", "c2"), "no_consent"),
        (("crm_id", "c3"), "no_consent"),
        (("crm_id", "c9"), "unknown_profile"),
    ]
    assert results[1].address == "ann@example.com"


def test_transactional_messages_skip_consent_but_not_a_missing_address(store: ProfileStore) -> None:
    store.upsert_profiles(
        "prod",
        [
            Profile("bob", [("crm_id", "c2"), ("email", "bob@example.com")], consents=[Consent("email", "opted_out")]),
            Profile("dan", [("crm_id", "c4")]),
        ],
    )

    results = store.check_eligibility("prod", "email", "transactional", [("crm_id", "c2"), ("crm_id", "c4")])

    assert [r.verdict for r in results] == ["allowed", "missing_address"]


def test_unknown_consent_is_allowed_only_on_channels_configured_so(store: ProfileStore) -> None:
    lenient = ProfileStore(store.database, unknown_consent_allowed=["email"])
    store.upsert_profiles("prod", [Profile("cid", [("crm_id", "c3"), ("email", "cid@example.com")])])

    assert lenient.check_eligibility("prod", "email", "marketing", [("crm_id", "c3")])[0].verdict == "allowed"
    assert store.check_eligibility("prod", "email", "marketing", [("crm_id", "c3")])[0].verdict == "no_consent"


def test_set_consent_changes_the_verdict_at_once(store: ProfileStore) -> None:
    store.upsert_profiles("prod", [ann()])

    store.set_consent("prod", "ann", "email", "opted_out", "unsubscribe-link")

    assert store.check_eligibility("prod", "email", "marketing", [("crm_id", "c1")])[0].verdict == "no_consent"


def test_recording_the_same_message_twice_counts_it_once(store: ProfileStore) -> None:
    store.upsert_profiles("prod", [ann()])
    sent = Communication(message_id="m1", profile_id="ann", channel="email", category="marketing", run="r")

    assert store.record_communications("prod", [sent, sent]) == 1
    assert store.record_communications("prod", [sent]) == 0
    assert [c.message_id for c in store.history("prod", "ann")] == ["m1"]


def test_communications_for_an_unknown_profile_write_nothing(store: ProfileStore) -> None:
    store.upsert_profiles("prod", [ann()])
    good = Communication(message_id="m1", profile_id="ann", channel="email", category="marketing")
    bad = Communication(message_id="m2", profile_id="ghost", channel="email", category="marketing")

    with pytest.raises(NotFound) as caught:
        store.record_communications("prod", [good, bad])

    assert [v.field for v in caught.value.violations] == ["communications[1].profile"]
    assert store.history("prod", "ann") == []


def test_profiles_of_one_sandbox_are_invisible_in_another(store: ProfileStore) -> None:
    store.upsert_profiles("demo", [ann()])

    with pytest.raises(NotFound):
        store.get_profile("prod", "ann")
    assert store.check_eligibility("prod", "email", "marketing", [("crm_id", "c1")])[0].verdict == "unknown_profile"
