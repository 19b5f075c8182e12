"""Property test of eligibility on both backends: for random consent, quarantine, capping rules and
history, every verdict is the one its specific reason demands, no ineligible profile is ever allowed a
marketing message, transactional messages never go to a quarantined or missing address, and
reservations never push a profile over a cap.

The expected verdicts come from a small independent model written here, not from the store.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carillon_chassis.database import Database
from profile_stub.capping import CappingRule
from profile_stub.profiles import Communication, Consent, Profile, ProfileStore
from profile_stub.quarantine import DeliveryEvent
from profile_stub.tables import MIGRATIONS

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
CHANNELS = ("email", "sms")
NAMESPACE = {"email": "email", "sms": "phone"}
ZONES = ("", "Pacific/Auckland", "America/Los_Angeles")
_sandboxes = itertools.count()


@dataclass
class PersonSpec:
    exists: bool
    has_address: dict[str, bool]
    consent: dict[str, str]  # "none" when nothing is recorded
    events: dict[str, list[str]]
    sends: list[tuple[str, int]]  # (channel, hours before NOW)
    time_zone: str


person = st.builds(
    PersonSpec,
    exists=st.sampled_from([True, True, True, False]),
    has_address=st.fixed_dictionaries({c: st.sampled_from([True, True, True, False]) for c in CHANNELS}),
    consent=st.fixed_dictionaries(
        {c: st.sampled_from(["opted_in", "opted_in", "opted_in", "none", "opted_out"]) for c in CHANNELS}
    ),
    events=st.fixed_dictionaries(
        {
            c: st.lists(st.sampled_from(["delivered", "delivered", "soft_bounce", "hard_bounce"]), max_size=4)
            for c in CHANNELS
        }
    ),
    sends=st.lists(
        st.tuples(st.sampled_from(CHANNELS), st.one_of(st.integers(0, 48), st.integers(0, 24 * 35))), max_size=6
    ),
    time_zone=st.sampled_from(ZONES),
)
rule = st.tuples(
    st.sampled_from(["", *CHANNELS]),
    st.integers(1, 4),
    st.sampled_from(["day", "week", "month"]),
    st.sampled_from(["utc", "profile"]),
)


def start_of(period: str, basis: str, time_zone: str) -> datetime:
    tz = ZoneInfo(time_zone) if basis == "profile" and time_zone else UTC
    local = NOW.astimezone(tz)
    if period == "day":
        first = local.date()
    elif period == "week":
        first = local.date() - timedelta(days=local.weekday())
    else:
        first = local.date().replace(day=1)
    return datetime(first.year, first.month, first.day, tzinfo=tz)


def quarantined(events: list[str], limit: int) -> bool:
    soft = 0
    for kind in events:
        if kind == "hard_bounce":
            return True
        soft = 0 if kind == "delivered" else soft + 1
        if soft >= limit:
            return True
    return False


def expected(
    spec: PersonSpec, channel: str, category: str, limit: int, rules: list[tuple[str, int, str, str]], extra: int = 0
) -> str:
    if not spec.exists:
        return "unknown_profile"
    if not spec.has_address[channel]:
        return "missing_address"
    if quarantined(spec.events[channel], limit):
        return "quarantined"
    if category == "transactional":
        return "allowed"
    if spec.consent[channel] != "opted_in":
        return "no_consent"
    for rule_channel, most, period, basis in rules:
        if rule_channel and rule_channel != channel:
            continue
        start = start_of(period, basis, spec.time_zone)
        counted = sum(1 for c, hours in spec.sends if NOW - timedelta(hours=hours) >= start and rule_channel in ("", c))
        if counted + extra + 1 > most:
            return "capped"
    return "allowed"


@pytest.fixture
def database(make_database: Callable[[str], Database]) -> Database:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    return database


@settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    people=st.lists(person, min_size=1, max_size=5),
    rules=st.lists(rule, max_size=3),
    limit=st.integers(1, 5),
    channel=st.sampled_from(CHANNELS),
)
def test_every_verdict_is_the_one_its_reason_demands(
    database: Database, people: list[PersonSpec], rules: list[tuple[str, int, str, str]], limit: int, channel: str
) -> None:
    sandbox = f"prop{next(_sandboxes)}"
    store = ProfileStore(database, soft_bounce_limit=limit)
    profiles = [
        Profile(
            f"p{i}",
            [("crm_id", f"c{i}")] + [(NAMESPACE[c], f"{c}-{i}") for c in CHANNELS if spec.has_address[c]],
            time_zone=spec.time_zone,
            consents=[Consent(c, spec.consent[c], "test") for c in CHANNELS if spec.consent[c] != "none"],
        )
        for i, spec in enumerate(people)
        if spec.exists
    ]
    store.upsert_profiles(sandbox, profiles)
    events = [
        DeliveryEvent(f"e{i}-{c}-{j}", c, kind, f"{c}-{i}")
        for i, spec in enumerate(people)
        for c in CHANNELS
        for j, kind in enumerate(spec.events[c])
    ]
    store.record_delivery_events(sandbox, events)
    store.record_communications(
        sandbox,
        [
            Communication(f"h{i}-{j}", f"p{i}", c, "marketing", send_time=NOW - timedelta(hours=hours))
            for i, spec in enumerate(people)
            if spec.exists
            for j, (c, hours) in enumerate(spec.sends)
        ],
    )
    for i, (rule_channel, most, period, basis) in enumerate(rules):
        store.create_capping_rule(sandbox, CappingRule(f"r{i}", most, period, rule_channel, basis))
    identities = [("crm_id", f"c{i}") for i in range(len(people))]

    for category in ("marketing", "transactional"):
        got = store.check_eligibility(sandbox, channel, category, identities, now=NOW)
        assert [r.verdict for r in got] == [expected(p, channel, category, limit, rules) for p in people]
        for r in got:
            assert (r.verdict == "allowed") == bool(r.address)

    # Reserving twice per profile in one batch: the second reservation counts the first.
    twice = identities + identities
    got = store.check_eligibility(
        sandbox, channel, "marketing", twice, reserve=True, message_ids=[f"x{i}" for i in range(len(twice))], now=NOW
    )
    n = len(people)
    assert [r.verdict for r in got[:n]] == [expected(p, channel, "marketing", limit, rules) for p in people]
    assert [r.verdict for r in got[n:]] == [
        expected(p, channel, "marketing", limit, rules, extra=int(got[i].verdict == "allowed"))
        for i, p in enumerate(people)
    ]
