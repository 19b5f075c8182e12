"""The per-recipient conversions of the delivery worker: eligibility results to verdicts, recipients from
their batch message, and the communications of a batch to one RecordCommunications request."""

from __future__ import annotations

import datetime as dt
from typing import Any

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.profile.v1 import profile_pb2, profile_service_pb2
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.values import from_value_map, to_timestamp, to_value, to_value_map
from delivery_svc.eligibility import Communication, ProfileServiceGateway, ProfileView, Verdict, _verdict
from delivery_svc.pipeline import Recipient
from delivery_svc.servicer import recipients_from_proto


def result(**fields: Any) -> profile_pb2.EligibilityResult:
    return profile_pb2.EligibilityResult(
        identity=value_pb2.Identity(namespace="email", value="ada@example.com"), **fields
    )


def test_a_result_with_a_profile_becomes_a_verdict_with_its_view() -> None:
    profile = profile_pb2.Profile(
        name="profiles/p1",
        first_name="Ada",
        last_name="Lovelace",
        locale="en-GB",
        time_zone="Europe/London",
        identities=[
            value_pb2.Identity(namespace="email", value="ada@example.com"),
            value_pb2.Identity(namespace="phone", value="+441234567"),
        ],
    )
    attributes = to_value_map({"points": 12, "tier": "gold", "tags": ["a", "b"]})
    message = result(
        verdict=profile_pb2.VERDICT_ALLOWED,
        profile=profile,
        address="ada@example.com",
        attributes=attributes,
        reserved=True,
        message_id="m1",
    )

    assert _verdict(message) == Verdict(
        identity=("email", "ada@example.com"),
        verdict="allowed",
        profile=ProfileView(
            profile_id="p1",
            first_name="Ada",
            last_name="Lovelace",
            locale="en-GB",
            time_zone="Europe/London",
            identities=(("email", "ada@example.com"), ("phone", "+441234567")),
            attributes={"points": 12, "tier": "gold", "tags": ["a", "b"]},
        ),
        address="ada@example.com",
        reserved=True,
        message_id="m1",
    )


def test_a_result_without_a_profile_or_asked_without_gets_none_and_an_unknown_verdict_is_unspecified() -> None:
    with_profile = result(verdict=profile_pb2.VERDICT_CAPPED, profile=profile_pb2.Profile(name="profiles/p1"))

    assert _verdict(with_profile, with_profile=False) == Verdict(("email", "ada@example.com"), "capped")
    assert _verdict(result(verdict=profile_pb2.VERDICT_UNKNOWN_PROFILE)) == Verdict(
        ("email", "ada@example.com"), "unknown_profile"
    )
    assert _verdict(result(verdict=99)).verdict == "unspecified"  # type: ignore[arg-type]
    assert _verdict(with_profile).profile == ProfileView(profile_id="p1")
    assert dict(_verdict(with_profile).profile.attributes) == {}  # type: ignore[union-attr]


def test_recipients_read_their_targets_as_from_value_map_does() -> None:
    target = {
        "hotel": "Ritz",
        "empty": "",
        "nights": 3,
        "flag": False,
        "none": None,
        "price": to_value(dt.date(2026, 11, 29)),
        "rooms": ["a", 1],
        "nested": {"city": "Paris"},
    }
    values = {key: value if isinstance(value, value_pb2.Value) else to_value(value) for key, value in target.items()}
    values["unset"] = value_pb2.Value()
    batch = dpb.RecipientBatch(
        recipients=[
            dpb.Recipient(identity=value_pb2.Identity(namespace="email", value="a@x.org"), target=values),
            dpb.Recipient(identity=value_pb2.Identity(namespace="crm", value="42"), entity_key="order-1"),
        ]
    )

    assert recipients_from_proto(batch) == [
        Recipient("email", "a@x.org", "", from_value_map(values)),
        Recipient("crm", "42", "order-1", {}),
    ]
    assert recipients_from_proto(batch)[0].target["hotel"] == "Ritz"


class CapturingStub:
    def __init__(self) -> None:
        self.requests: list[profile_service_pb2.RecordCommunicationsRequest] = []
        self.checks: list[profile_service_pb2.CheckEligibilityRequest] = []

    async def CheckEligibility(
        self, request: profile_service_pb2.CheckEligibilityRequest, **_: Any
    ) -> profile_service_pb2.CheckEligibilityResponse:
        self.checks.append(request)
        return profile_service_pb2.CheckEligibilityResponse(
            results=[
                profile_pb2.EligibilityResult(identity=i, verdict=profile_pb2.VERDICT_NO_CONSENT)
                for i in request.identities
            ]
        )

    async def RecordCommunications(
        self, request: profile_service_pb2.RecordCommunicationsRequest, **_: Any
    ) -> profile_service_pb2.RecordCommunicationsResponse:
        self.requests.append(request)
        return profile_service_pb2.RecordCommunicationsResponse(recorded=len(request.communications))


async def test_the_communications_of_a_batch_become_one_request_with_every_field() -> None:
    first, second = dt.datetime(2026, 11, 29, 10, tzinfo=dt.UTC), dt.datetime(2026, 11, 29, 11, tzinfo=dt.UTC)
    communications = [
        Communication("m1", "p1", "email", "marketing", "campaigns/c", "campaigns/c/runs/r", "a1", first),
        Communication("m2", "p2", "email", "marketing", "campaigns/c", "campaigns/c/runs/r", "a1", first),
        Communication("m3", "p3", "sms", "transactional", "campaigns/d", "campaigns/d/runs/s", "a2", second),
        Communication("m4", "p4", "email", "marketing", "campaigns/c", "campaigns/c/runs/r", "a1", first),
    ]
    gateway = ProfileServiceGateway("127.0.0.1:1", timeout_s=1)
    stub = CapturingStub()
    gateway._stub = stub  # type: ignore[assignment]
    try:
        recorded = await gateway.record("prod", communications)
    finally:
        await gateway.close()

    expected = [
        profile_pb2.Communication(
            profile=f"profiles/{c.profile_id}",
            channel=channel_pb2.CHANNEL_EMAIL if c.channel == "email" else channel_pb2.CHANNEL_SMS,
            category=channel_pb2.MESSAGE_CATEGORY_MARKETING
            if c.category == "marketing"
            else channel_pb2.MESSAGE_CATEGORY_TRANSACTIONAL,
            campaign=c.campaign,
            run=c.run,
            activity=c.activity,
            message_id=c.message_id,
            send_time=to_timestamp(c.send_time),
        )
        for c in communications
    ]
    assert recorded == 4
    assert list(stub.requests[0].communications) == expected
    assert not stub.requests[0].HasField("defaults")  # several sends: each communication is complete


async def test_the_communications_of_one_send_share_their_fields_through_the_defaults() -> None:
    sent = dt.datetime(2026, 11, 29, 10, tzinfo=dt.UTC)
    communications = [
        Communication(f"m{i}", f"p{i}", "email", "marketing", "campaigns/c", "campaigns/c/runs/r", "a1", sent)
        for i in range(3)
    ]
    gateway = ProfileServiceGateway("127.0.0.1:1", timeout_s=1)
    stub = CapturingStub()
    gateway._stub = stub  # type: ignore[assignment]
    try:
        await gateway.record("prod", communications)
    finally:
        await gateway.close()

    (request,) = stub.requests
    assert request.defaults == profile_pb2.Communication(
        channel=channel_pb2.CHANNEL_EMAIL,
        category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
        campaign="campaigns/c",
        run="campaigns/c/runs/r",
        activity="a1",
        send_time=to_timestamp(sent),
    )
    assert list(request.communications) == [
        profile_pb2.Communication(profile=f"profiles/p{i}", message_id=f"m{i}") for i in range(3)
    ]


async def test_eligibility_requests_carry_every_identity_in_order() -> None:
    identities = [("email", "a@x.org"), ("phone", "+4411"), ("email", "b@x.org")]
    gateway = ProfileServiceGateway("127.0.0.1:1", timeout_s=1)
    stub = CapturingStub()
    gateway._stub = stub  # type: ignore[assignment]
    try:
        reserved = await gateway.check_and_reserve(
            "prod", "email", identities, "campaigns/c/runs/r", "a1", ["", "k", ""]
        )
        checked = await gateway.check("prod", "email", "transactional", identities)
        again = await gateway.reserve("prod", "email", "marketing", identities, ["m1", "m2", "m3"])
    finally:
        await gateway.close()

    expected = [value_pb2.Identity(namespace=ns, value=value) for ns, value in identities]
    assert [list(request.identities) for request in stub.checks] == [expected, expected, expected]
    assert list(stub.checks[0].entity_keys) == ["", "k", ""] and stub.checks[0].run == "campaigns/c/runs/r"
    assert list(stub.checks[2].message_ids) == ["m1", "m2", "m3"] and stub.checks[2].omit_profiles
    assert [v.identity for v in reserved] == [v.identity for v in checked] == [v.identity for v in again] == identities
