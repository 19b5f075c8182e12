"""Quarantine from delivery feedback, on both backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database
from carillon_chassis.errors import InvalidArgument
from profile_stub import quarantine
from profile_stub.profiles import Consent, Profile, ProfileStore
from profile_stub.quarantine import DeliveryEvent, Quarantine
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


def _people(store: ProfileStore, n: int) -> list[str]:
    """``n`` profiles p0.. with an email address p<i>@example.com and opt-in email consent."""
    people = [
        Profile(f"p{i}", [("email", f"p{i}@example.com")], consents=[Consent("email", "opted_in", "form")])
        for i in range(n)
    ]
    store.upsert_profiles("prod", people)
    return [p.profile_id for p in people]


NO_TIMES = {"update_time": None, "quarantine_time": None}  # the times of the calls differ


def _mixed_feedback(ids: list[str], prefix: str) -> list[DeliveryEvent]:
    """Per profile, in order: two soft bounces and a delivery by address, a hard bounce by profile, an
    unsubscribe by address (its owner looked up) and a complaint for a profile that does not exist."""
    events = []
    for pid in ids:
        address = f"{pid}@example.com"
        events += [
            event(f"{prefix}{pid}-1", "soft_bounce", address),
            event(f"{prefix}{pid}-2", "soft_bounce", address),
            event(f"{prefix}{pid}-3", "delivered", address),
            event(f"{prefix}{pid}-4", "hard_bounce", "", profile_id=pid),
            event(f"{prefix}{pid}-5", "unsubscribe", address, source="link"),
            event(f"{prefix}{pid}-6", "complaint", "", profile_id=f"gone-{pid}"),
        ]
    return events


def test_a_call_reads_and_writes_the_same_number_of_statements_whatever_its_number_of_events(
    store: ProfileStore,
) -> None:
    ids = _people(store, 30)
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    sa.event.listen(store.database.engine, "before_cursor_execute", count)
    try:
        store.record_delivery_events("prod", _mixed_feedback(ids[:2], "a"))
        few = len(statements)
        statements.clear()
        store.record_delivery_events("prod", _mixed_feedback(ids[2:], "b"))
        many = len(statements)
    finally:
        sa.event.remove(store.database.engine, "before_cursor_execute", count)

    assert many == few  # 12 events or 168: one statement per kind of read and write, not per event


def test_events_applied_in_one_call_end_as_applied_one_call_each(
    make_database: Callable[[str], Database],
) -> None:
    ends = []
    for one_call in (True, False):
        database = make_database(f"profile_{'one' if one_call else 'each'}")
        database.migrate(MIGRATIONS)
        store = ProfileStore(database, soft_bounce_limit=3)
        ids = _people(store, 3)
        events = [*_mixed_feedback(ids, "e"), event("late", "soft_bounce", "p1@example.com")]
        if one_call:
            assert store.record_delivery_events("prod", events) == len(events)
        else:
            assert sum(store.record_delivery_events("prod", [e]) for e in events) == len(events)
        ends.append(
            [
                (
                    vars(store.get_quarantine("prod", "email", f"{pid}@example.com")) | NO_TIMES,
                    [(c.channel, c.state, c.source) for c in store.get_profile("prod", pid).consents],
                )
                for pid in ids
            ]
        )

    assert ends[0] == ends[1]
    quarantine_state, consents = ends[0][1]
    assert (quarantine_state["quarantined"], quarantine_state["reason"], quarantine_state["soft_bounces"]) == (
        True,
        "hard_bounce",
        1,
    )
    assert consents == [("email", "opted_out", "link")]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_concurrent_calls_on_a_recorded_address_both_count(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first call holds the state it read while the second reads it: the second must wait for the
    # first's write (its row lock), not apply its soft bounce to the stale state and overwrite it.
    store.record_delivery_events("prod", [event("e0", "soft_bounce")])
    real_load, first_read = quarantine.load, threading.Event()

    def load(*args: Any, **kwargs: Any) -> dict[str, Quarantine]:
        found = real_load(*args, **kwargs)
        if threading.current_thread().name == "first":
            first_read.set()
            time.sleep(0.5)
        return found

    monkeypatch.setattr(quarantine, "load", load)
    threads = [
        threading.Thread(
            target=store.record_delivery_events, args=("prod", [event(f"e-{name}", "soft_bounce")]), name=name
        )
        for name in ("first", "second")
    ]
    threads[0].start()
    assert first_read.wait(5)
    threads[1].start()
    for thread in threads:
        thread.join()

    state = store.get_quarantine("prod", "email", "ann@example.com")
    assert (state.soft_bounces, state.quarantined) == (3, True)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_delivery_racing_a_hard_bounce_on_a_new_address_never_lifts_its_quarantine(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both calls find no state for the address; the hard bounce writes first. The delivery's write must
    # fail (its call is retried, and then reads the quarantine) rather than overwrite it.
    real_load, both_read = quarantine.load, threading.Barrier(2)

    def load(*args: Any, **kwargs: Any) -> dict[str, Quarantine]:
        found = real_load(*args, **kwargs)
        both_read.wait(5)
        if threading.current_thread().name == "delivered":
            time.sleep(0.5)
        return found

    monkeypatch.setattr(quarantine, "load", load)
    errors: list[BaseException] = []

    def record(kind: str) -> None:
        try:
            store.record_delivery_events("prod", [event(f"e-{kind}", kind, "new@example.com")])
        except sa.exc.IntegrityError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(kind,), name=kind) for kind in ("hard_bounce", "delivered")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.setattr(quarantine, "load", real_load)

    assert len(errors) == 1
    assert store.get_quarantine("prod", "email", "new@example.com").quarantined
