"""CheckEligibility's ``profile_view``: the personalization view carries what a delivery worker renders
with (name, identities, names, locale, time zone, country, and the custom attributes once), the full
view everything; the verdicts are the same. On a real profile_stub server, both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from tests.conftest import DatabaseFactory
from tests.profile_server import profile_service
from tests.rpc_errors import failure_of

METADATA = (("x-carillon-sandbox", "prod"),)
EMAIL = channel_pb2.CHANNEL_EMAIL
ANN = value_pb2.Identity(namespace="email", value="ann@example.com")
NOBODY = value_pb2.Identity(namespace="email", value="nobody@example.com")


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[profile_service_pb2_grpc.ProfileServiceStub]:
    async with profile_service(database_factory) as stub:
        await stub.UpsertProfiles(
            profile_service_pb2.UpsertProfilesRequest(
                profiles=[
                    profile_pb2.Profile(
                        name="profiles/ann",
                        identities=[ANN, value_pb2.Identity(namespace="phone", value="+15550100")],
                        first_name="Ann",
                        last_name="Lee",
                        locale="en-GB",
                        time_zone="Europe/London",
                        country="GB",
                        attributes={"tier": value_pb2.Value(string_value="gold")},
                        consents=[profile_pb2.Consent(channel=EMAIL, state=profile_pb2.CONSENT_STATE_OPTED_IN)],
                    )
                ]
            ),
            metadata=METADATA,
        )
        yield stub


View = profile_service_pb2.ProfileView.ValueType
Category = channel_pb2.MessageCategory.ValueType


async def check(
    stub: profile_service_pb2_grpc.ProfileServiceStub, view: View, category: Category
) -> list[profile_pb2.EligibilityResult]:
    request = profile_service_pb2.CheckEligibilityRequest(
        channel=EMAIL, category=category, identities=[ANN, NOBODY], profile_view=view
    )
    if category == channel_pb2.MESSAGE_CATEGORY_MARKETING:
        request.reserve, request.run, request.activity = True, "campaigns/c/runs/r", "a1"
        request.entity_keys.extend(["", ""])
    return list((await stub.CheckEligibility(request, metadata=METADATA)).results)


@pytest.mark.parametrize(
    "category", [channel_pb2.MESSAGE_CATEGORY_MARKETING, channel_pb2.MESSAGE_CATEGORY_TRANSACTIONAL]
)
async def test_the_personalization_view_carries_what_rendering_reads_and_no_more(
    stub: profile_service_pb2_grpc.ProfileServiceStub, category: Category
) -> None:
    (ann_full, nobody_full) = await check(stub, profile_service_pb2.PROFILE_VIEW_UNSPECIFIED, category)
    (ann, nobody) = await check(stub, profile_service_pb2.PROFILE_VIEW_PERSONALIZATION, category)

    profile = ann.profile
    assert (profile.name, profile.first_name, profile.last_name) == ("profiles/ann", "Ann", "Lee")
    assert (profile.locale, profile.time_zone, profile.country) == ("en-GB", "Europe/London", "GB")
    assert [(i.namespace, i.value) for i in profile.identities] == [
        ("email", "ann@example.com"),
        ("phone", "+15550100"),
    ]
    assert dict(ann.attributes) == {"tier": value_pb2.Value(string_value="gold")}
    # Left out: the attributes a second time, the consents and the times.
    assert (len(profile.attributes), len(profile.consents)) == (0, 0)
    assert not profile.HasField("create_time") and not profile.HasField("update_time")
    # The full view (the default) has them; the verdicts and addresses are the same in both views.
    assert dict(ann_full.profile.attributes) == dict(ann.attributes) and len(ann_full.profile.consents) == 1
    assert ann_full.profile.HasField("create_time")
    assert (ann.verdict, ann.address, nobody.verdict) == (ann_full.verdict, ann_full.address, nobody_full.verdict)
    assert ann.verdict == profile_pb2.VERDICT_ALLOWED and nobody.verdict == profile_pb2.VERDICT_UNKNOWN_PROFILE


async def test_an_unknown_profile_view_is_invalid_and_names_the_field(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(stub, View(7), channel_pb2.MESSAGE_CATEGORY_TRANSACTIONAL)

    failure = failure_of(caught.value)
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["profile_view"])
