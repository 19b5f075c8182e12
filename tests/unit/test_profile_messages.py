"""profile_stub's domain-to-protobuf conversions of an eligibility answer."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from carillon.profile.v1 import profile_pb2
from carillon_chassis.values import from_value_map
from profile_stub.profiles import Consent, Eligibility, Profile
from profile_stub.servicer import eligibility_to_proto, profile_to_proto

CREATED = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


def ann(**changes: object) -> Profile:
    profile = Profile(
        profile_id="ann",
        identities=[("email", "ann@example.com"), ("phone", "+4612345678")],
        first_name="Ann",
        locale="sv",
        time_zone="Europe/Stockholm",
        consents=[Consent("email", "opted_in", "form", CREATED), Consent("sms", "opted_out", "app", None, "news")],
        country="SE",
        attributes={"tier": "gold", "nights": 3, "spend": Decimal("12.50"), "since": date(2020, 1, 2)},
        create_time=CREATED,
        update_time=CREATED + timedelta(days=1),
    )
    for key, value in changes.items():
        setattr(profile, key, value)
    return profile


@pytest.mark.parametrize(
    "when",
    [
        CREATED,
        datetime(1960, 3, 1, 12, 30, 15, 654321, tzinfo=timezone(timedelta(hours=5))),
        datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-8))),
    ],
    ids=["utc", "before-1970-east-of-utc", "west-of-utc"],
)
def test_a_profile_time_reads_back_as_the_same_instant_to_the_microsecond(when: datetime) -> None:
    message = profile_to_proto(ann(create_time=when, consents=[Consent("email", "opted_in", "form", when)]))

    assert message.create_time.ToDatetime(tzinfo=UTC) == when
    assert message.consents[0].update_time.ToDatetime(tzinfo=UTC) == when


def test_an_allowed_verdict_carries_the_whole_profile_and_its_attributes() -> None:
    profile = ann()

    message = eligibility_to_proto(
        Eligibility(("email", "ann@example.com"), "allowed", profile, "ann@example.com", addresses=["ann@example.com"])
    )

    assert message.verdict == profile_pb2.VERDICT_ALLOWED
    assert (message.address, list(message.addresses)) == ("ann@example.com", ["ann@example.com"])
    assert message.profile == profile_to_proto(profile)
    assert [(i.namespace, i.value) for i in message.profile.identities] == profile.identities
    assert [(c.state, c.purpose, c.HasField("update_time")) for c in message.profile.consents] == [
        (profile_pb2.CONSENT_STATE_OPTED_IN, "", True),
        (profile_pb2.CONSENT_STATE_OPTED_OUT, "news", False),
    ]
    assert dict(from_value_map(message.attributes)) == profile.attributes
    assert dict(from_value_map(message.profile.attributes)) == profile.attributes


def test_an_unknown_identity_has_a_verdict_and_no_profile() -> None:
    message = eligibility_to_proto(Eligibility(("email", "who@example.com"), "unknown_profile"))

    assert message.verdict == profile_pb2.VERDICT_UNKNOWN_PROFILE
    assert not message.HasField("profile")
    assert (message.identity.namespace, message.identity.value) == ("email", "who@example.com")
