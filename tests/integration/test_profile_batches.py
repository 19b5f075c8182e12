"""profile_stub's store with batches larger than one statement's key list, on both backends.

Keys go to the database in slices (500 per ``IN`` list on SQLite, one array per batch on PostgreSQL):
these tests check that every key of a large batch is looked up, whatever the slicing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument
from profile_stub.capping import CappingRule
from profile_stub.keysets import SQLITE_CHUNK
from profile_stub.profiles import Communication, Consent, Profile, ProfileStore
from profile_stub.tables import MIGRATIONS

SIZE = 2 * SQLITE_CHUNK + 100


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    return ProfileStore(database)


def person(i: int, consent: str = "opted_in") -> Profile:
    return Profile(
        profile_id=f"p{i:05d}",
        identities=[("email", f"person{i:05d}@example.com")],
        first_name=f"First{i}",
        consents=[Consent("email", consent, "bench")],
    )


def test_eligibility_of_a_batch_spanning_several_key_slices_judges_every_identity(store: ProfileStore) -> None:
    store.upsert_profiles("prod", [person(i, "opted_out" if i % 10 == 0 else "opted_in") for i in range(SIZE)])
    identities = [("email", f"person{i:05d}@example.com") for i in range(SIZE + 5)]  # 5 unknown at the end

    results = store.check_eligibility("prod", "email", "marketing", identities)

    assert [r.identity for r in results] == identities
    assert [r.verdict for r in results] == [
        "unknown_profile" if i >= SIZE else "no_consent" if i % 10 == 0 else "allowed" for i in range(SIZE + 5)
    ]
    allowed = [r for r in results if r.verdict == "allowed"]
    assert all(r.profile is not None and r.address == r.profile.identities[0][1] for r in allowed)
    assert {r.profile.first_name for r in allowed if r.profile} == {f"First{i}" for i in range(SIZE) if i % 10 != 0}


def test_recording_a_batch_spanning_several_key_slices_records_each_message_once(store: ProfileStore) -> None:
    store.upsert_profiles("prod", [person(i) for i in range(SIZE)])
    sent = [Communication(f"m{i:05d}", f"p{i:05d}", "email", "marketing", "campaigns/c1") for i in range(SIZE)]

    first = store.record_communications("prod", sent)
    again = store.record_communications("prod", [*sent[-10:], *sent[:10]])

    assert (first, again) == (SIZE, 0)
    assert [c.message_id for c in store.history("prod", f"p{SIZE - 1:05d}")] == [f"m{SIZE - 1:05d}"]


def test_a_taken_identity_late_in_a_large_upsert_is_refused_by_its_position(store: ProfileStore) -> None:
    store.upsert_profiles("prod", [person(SIZE - 1)])
    batch = [person(i) for i in range(SIZE - 1)]
    batch.append(Profile(profile_id="intruder", identities=[("email", f"person{SIZE - 1:05d}@example.com")]))

    with pytest.raises(InvalidArgument) as caught:
        store.upsert_profiles("prod", batch)

    assert caught.value.reason == "IDENTITY_CONFLICT"
    assert [v.field for v in caught.value.violations] == [f"profiles[{SIZE - 1}].identities[0]"]
    (verdict,) = store.check_eligibility("prod", "email", "marketing", [("email", "person00000@example.com")])
    assert verdict.verdict == "unknown_profile"  # nothing of the refused batch was written


def test_reserving_a_batch_spanning_several_key_slices_counts_each_message_once_against_the_cap(
    store: ProfileStore,
) -> None:
    store.upsert_profiles("prod", [person(i) for i in range(SIZE)])
    store.create_capping_rule("prod", CappingRule(rule_id="daily", max_messages=1, period="day", channel="email"))
    identities = [("email", f"person{i:05d}@example.com") for i in range(SIZE)]
    first_ids = [f"m1-{i:05d}" for i in range(SIZE)]

    first = store.check_eligibility("prod", "email", "marketing", identities, reserve=True, message_ids=first_ids)
    replayed = store.check_eligibility("prod", "email", "marketing", identities, reserve=True, message_ids=first_ids)
    second = store.check_eligibility(
        "prod", "email", "marketing", identities, reserve=True, message_ids=[f"m2-{i:05d}" for i in range(SIZE)]
    )

    assert {(r.verdict, r.reserved) for r in first} == {("allowed", True)}
    assert {(r.verdict, r.reserved) for r in replayed} == {("allowed", True)}
    assert {(r.verdict, r.reserved) for r in second} == {("capped", False)}
    assert store.release_reservations("prod", first_ids) == SIZE
