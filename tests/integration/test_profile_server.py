"""profile_stub's new RPCs over a real gRPC server, on both backends: reservations, feedback, caps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from profile_stub.app import build_server
from profile_stub.settings import ProfileSettings
from tests.conftest import DatabaseFactory
from tests.rpc_errors import failure_of

METADATA = (("x-carillon-sandbox", "prod"),)
EMAIL = channel_pb2.CHANNEL_EMAIL
MARKETING = channel_pb2.MESSAGE_CATEGORY_MARKETING
ANN = value_pb2.Identity(namespace="email", value="ann@example.com")


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[profile_service_pb2_grpc.ProfileServiceStub]:
    url, schema = database_factory.url_and_schema("profile")
    server = await build_server(
        ProfileSettings(port=0, database_url=url, database_schema=schema, soft_bounce_limit=2, max_eligibility_batch=50)
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
    await stub.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name="profiles/ann",
                    identities=[ANN],
                    consents=[profile_pb2.Consent(channel=EMAIL, state=profile_pb2.CONSENT_STATE_OPTED_IN)],
                )
            ]
        ),
        metadata=METADATA,
    )
    yield stub
    await channel.close()
    await server.stop()


async def reserve(stub: profile_service_pb2_grpc.ProfileServiceStub, message_id: str) -> profile_pb2.EligibilityResult:
    response = await stub.CheckEligibility(
        profile_service_pb2.CheckEligibilityRequest(
            channel=EMAIL, category=MARKETING, identities=[ANN], reserve=True, message_ids=[message_id]
        ),
        metadata=METADATA,
    )
    return response.results[0]


async def test_a_reservation_is_confirmed_by_recording_the_same_message_id(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    created = await stub.CreateCappingRule(
        profile_service_pb2.CreateCappingRuleRequest(
            capping_rule=profile_pb2.CappingRule(channel=EMAIL, max_messages=1, period=profile_pb2.CAPPING_PERIOD_DAY),
            capping_rule_id="daily",
        ),
        metadata=METADATA,
    )
    first = await reserve(stub, "m1")
    await stub.RecordCommunications(
        profile_service_pb2.RecordCommunicationsRequest(
            communications=[
                profile_pb2.Communication(profile="profiles/ann", channel=EMAIL, category=MARKETING, message_id="m1")
            ]
        ),
        metadata=METADATA,
    )
    released = await stub.ReleaseReservations(
        profile_service_pb2.ReleaseReservationsRequest(message_ids=["m1"]), metadata=METADATA
    )
    second = await reserve(stub, "m2")

    assert created.capping_rule.name == "cappingRules/daily"
    assert (first.verdict, first.reserved, first.address) == (profile_pb2.VERDICT_ALLOWED, True, "ann@example.com")
    assert released.released == 0  # the reservation had become a communication
    assert (second.verdict, second.reserved) == (profile_pb2.VERDICT_CAPPED, False)


async def test_soft_bounces_over_the_configured_limit_quarantine_until_released(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    bounce = profile_pb2.DELIVERY_EVENT_TYPE_SOFT_BOUNCE
    response = await stub.RecordDeliveryEvents(
        profile_service_pb2.RecordDeliveryEventsRequest(
            events=[
                profile_pb2.DeliveryEvent(event_id=f"e{i}", channel=EMAIL, address="ann@example.com", type=bounce)
                for i in range(2)
            ]
        ),
        metadata=METADATA,
    )
    state = await stub.GetQuarantine(
        profile_service_pb2.GetQuarantineRequest(channel=EMAIL, address="ann@example.com"), metadata=METADATA
    )
    verdict = (await reserve(stub, "m1")).verdict
    await stub.ReleaseQuarantine(
        profile_service_pb2.ReleaseQuarantineRequest(channel=EMAIL, address="ann@example.com"), metadata=METADATA
    )

    assert response.applied == 2
    assert (state.quarantine.quarantined, state.quarantine.soft_bounce_count) == (True, 2)
    assert verdict == profile_pb2.VERDICT_QUARANTINED
    assert (await reserve(stub, "m1")).verdict == profile_pb2.VERDICT_ALLOWED


async def test_capping_rules_are_listed_in_pages_and_deleted(stub: profile_service_pb2_grpc.ProfileServiceStub) -> None:
    for rule_id in ("a", "b", "c"):
        await stub.CreateCappingRule(
            profile_service_pb2.CreateCappingRuleRequest(
                capping_rule=profile_pb2.CappingRule(max_messages=3, period=profile_pb2.CAPPING_PERIOD_WEEK),
                capping_rule_id=rule_id,
            ),
            metadata=METADATA,
        )
    first = await stub.ListCappingRules(profile_service_pb2.ListCappingRulesRequest(page_size=2), metadata=METADATA)
    rest = await stub.ListCappingRules(
        profile_service_pb2.ListCappingRulesRequest(page_size=2, page_token=first.next_page_token), metadata=METADATA
    )
    await stub.DeleteCappingRule(profile_service_pb2.DeleteCappingRuleRequest(name="cappingRules/a"), metadata=METADATA)
    after = await stub.ListCappingRules(profile_service_pb2.ListCappingRulesRequest(), metadata=METADATA)

    assert [r.name for r in first.capping_rules] == ["cappingRules/a", "cappingRules/b"]
    assert ([r.name for r in rest.capping_rules], rest.next_page_token) == (["cappingRules/c"], "")
    assert [r.name for r in after.capping_rules] == ["cappingRules/b", "cappingRules/c"]
    assert first.capping_rules[0].channel == channel_pb2.CHANNEL_UNSPECIFIED


async def test_a_bad_capping_rule_is_invalid_argument_naming_the_field(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await stub.CreateCappingRule(
            profile_service_pb2.CreateCappingRuleRequest(capping_rule=profile_pb2.CappingRule(max_messages=1)),
            metadata=METADATA,
        )

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CAPPING_RULE")
    assert failure.fields == ["capping_rule.period"]


async def test_lookup_attributes_history_and_forgetting_over_grpc(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    await stub.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name="profiles/bo",
                    identities=[value_pb2.Identity(namespace="push_token", value=t) for t in ("t1", "t2")],
                    country="SE",
                    attributes={"tier": value_pb2.Value(string_value="gold")},
                )
            ]
        ),
        metadata=METADATA,
    )
    await stub.RecordCommunications(
        profile_service_pb2.RecordCommunicationsRequest(
            communications=[
                profile_pb2.Communication(profile="profiles/bo", channel=EMAIL, category=MARKETING, message_id=m)
                for m in ("m1", "m2", "m3")
            ]
        ),
        metadata=METADATA,
    )
    found = await stub.LookupProfile(
        profile_service_pb2.LookupProfileRequest(identity=value_pb2.Identity(namespace="push_token", value="t2")),
        metadata=METADATA,
    )
    first = await stub.ListCommunications(
        profile_service_pb2.ListCommunicationsRequest(profile="profiles/bo", page_size=2), metadata=METADATA
    )
    rest = await stub.ListCommunications(
        profile_service_pb2.ListCommunicationsRequest(
            profile="profiles/bo", page_size=2, page_token=first.next_page_token
        ),
        metadata=METADATA,
    )
    await stub.DeleteProfile(profile_service_pb2.DeleteProfileRequest(name="profiles/bo"), metadata=METADATA)
    with pytest.raises(grpc.RpcError) as caught:
        await stub.GetProfile(profile_service_pb2.GetProfileRequest(name="profiles/bo"), metadata=METADATA)

    assert (found.profile.name, found.profile.country) == ("profiles/bo", "SE")
    assert found.profile.attributes["tier"].string_value == "gold"
    assert len(first.communications) == 2 and first.next_page_token
    assert (len(rest.communications), rest.next_page_token) == (1, "")
    ids = {c.message_id for c in first.communications} | {c.message_id for c in rest.communications}
    assert ids == {"m1", "m2", "m3"}
    assert failure_of(caught.value).code == grpc.StatusCode.NOT_FOUND


async def test_a_malformed_history_page_token_is_invalid_argument(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await stub.ListCommunications(
            profile_service_pb2.ListCommunicationsRequest(profile="profiles/ann", page_token="%%%"), metadata=METADATA
        )

    assert (failure_of(caught.value).code, failure_of(caught.value).reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_too_many_delivery_events_in_one_call_are_refused(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    hard = profile_pb2.DELIVERY_EVENT_TYPE_HARD_BOUNCE
    events = [
        profile_pb2.DeliveryEvent(event_id=f"e{i}", channel=EMAIL, address="ann@example.com", type=hard)
        for i in range(51)
    ]

    with pytest.raises(grpc.RpcError) as caught:
        await stub.RecordDeliveryEvents(
            profile_service_pb2.RecordDeliveryEventsRequest(events=events), metadata=METADATA
        )

    assert failure_of(caught.value).reason == "BATCH_TOO_LARGE"
    assert (await reserve(stub, "m1")).verdict == profile_pb2.VERDICT_ALLOWED
