"""RecordCommunications' ``defaults`` over a real gRPC server, on both backends: what a batch's
communications have in common, sent once, fills the fields each leaves unset."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest

from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.values import from_timestamp, to_timestamp
from profile_stub.app import build_server
from profile_stub.settings import ProfileSettings
from tests.conftest import DatabaseFactory
from tests.rpc_errors import failure_of

METADATA = (("x-carillon-sandbox", "prod"),)
EMAIL, SMS = channel_pb2.CHANNEL_EMAIL, channel_pb2.CHANNEL_SMS
MARKETING, TRANSACTIONAL = channel_pb2.MESSAGE_CATEGORY_MARKETING, channel_pb2.MESSAGE_CATEGORY_TRANSACTIONAL
SENT = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
LATER = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)


@pytest.fixture
async def stub(database_factory: DatabaseFactory) -> AsyncIterator[profile_service_pb2_grpc.ProfileServiceStub]:
    url, schema = database_factory.url_and_schema("profile")
    server = await build_server(ProfileSettings(port=0, database_url=url, database_schema=schema))
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
    await stub.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name=f"profiles/{name}", identities=[value_pb2.Identity(namespace="email", value=f"{name}@x.com")]
                )
                for name in ("ann", "bob")
            ]
        ),
        metadata=METADATA,
    )
    yield stub
    await channel.close()
    await server.stop()


def defaults(**fields: object) -> profile_pb2.Communication:
    return profile_pb2.Communication(
        channel=EMAIL,
        category=MARKETING,
        campaign="campaigns/c",
        run="campaigns/c/runs/r",
        activity="email1",
        send_time=to_timestamp(SENT),
        **fields,  # type: ignore[arg-type]
    )


async def history(stub: profile_service_pb2_grpc.ProfileServiceStub, name: str) -> list[tuple[object, ...]]:
    response = await stub.ListCommunications(
        profile_service_pb2.ListCommunicationsRequest(profile=f"profiles/{name}"), metadata=METADATA
    )
    return [
        (c.message_id, c.channel, c.category, c.campaign, c.run, c.activity, from_timestamp(c.send_time))
        for c in response.communications
    ]


async def test_the_fields_a_communication_leaves_unset_take_the_defaults(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    recorded = await stub.RecordCommunications(
        profile_service_pb2.RecordCommunicationsRequest(
            defaults=defaults(),
            communications=[
                profile_pb2.Communication(profile="profiles/ann", message_id="m1"),
                profile_pb2.Communication(profile="profiles/bob", message_id="m2"),
            ],
        ),
        metadata=METADATA,
    )

    assert recorded.recorded == 2
    assert await history(stub, "ann") == [("m1", EMAIL, MARKETING, "campaigns/c", "campaigns/c/runs/r", "email1", SENT)]
    assert await history(stub, "bob") == [("m2", EMAIL, MARKETING, "campaigns/c", "campaigns/c/runs/r", "email1", SENT)]


async def test_a_field_a_communication_sets_wins_over_the_default(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    await stub.RecordCommunications(
        profile_service_pb2.RecordCommunicationsRequest(
            defaults=defaults(),
            communications=[
                profile_pb2.Communication(
                    profile="profiles/ann",
                    message_id="m1",
                    channel=SMS,
                    category=TRANSACTIONAL,
                    campaign="campaigns/d",
                    run="campaigns/d/runs/s",
                    activity="sms1",
                    send_time=to_timestamp(LATER),
                ),
                profile_pb2.Communication(profile="profiles/ann", message_id="m2", activity="email2"),
            ],
        ),
        metadata=METADATA,
    )

    assert await history(stub, "ann") == [
        ("m1", SMS, TRANSACTIONAL, "campaigns/d", "campaigns/d/runs/s", "sms1", LATER),
        ("m2", EMAIL, MARKETING, "campaigns/c", "campaigns/c/runs/r", "email2", SENT),
    ]


async def test_without_defaults_a_communication_records_its_own_fields(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    await stub.RecordCommunications(
        profile_service_pb2.RecordCommunicationsRequest(
            communications=[
                profile_pb2.Communication(
                    profile="profiles/bob", message_id="m1", channel=SMS, category=MARKETING, campaign="campaigns/c"
                )
            ]
        ),
        metadata=METADATA,
    )

    ((message_id, channel, category, campaign, run, activity, _),) = await history(stub, "bob")
    assert (message_id, channel, category, campaign, run, activity) == ("m1", SMS, MARKETING, "campaigns/c", "", "")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"profile": "profiles/ann"}, ["defaults.profile"]),
        ({"message_id": "m9"}, ["defaults.message_id"]),
        ({"profile": "profiles/ann", "message_id": "m9"}, ["defaults.profile", "defaults.message_id"]),
    ],
    ids=["profile", "message-id", "both"],
)
async def test_a_default_profile_or_message_id_is_invalid_argument_and_records_nothing(
    stub: profile_service_pb2_grpc.ProfileServiceStub, fields: dict[str, str], expected: list[str]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await stub.RecordCommunications(
            profile_service_pb2.RecordCommunicationsRequest(
                defaults=defaults(**fields),
                communications=[profile_pb2.Communication(profile="profiles/ann", message_id="m1")],
            ),
            metadata=METADATA,
        )

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_DEFAULTS",
        expected,
    )
    assert await history(stub, "ann") == []


async def test_an_invalid_merged_value_is_named_as_the_communications_field(
    stub: profile_service_pb2_grpc.ProfileServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await stub.RecordCommunications(
            profile_service_pb2.RecordCommunicationsRequest(
                defaults=profile_pb2.Communication(category=MARKETING, campaign="campaigns/c\x00"),
                communications=[
                    profile_pb2.Communication(profile="profiles/ann", message_id="m1", channel=EMAIL),
                    profile_pb2.Communication(profile="profiles/bob", message_id="m2", campaign="campaigns/ok"),
                ],
            ),
            metadata=METADATA,
        )

    failure = failure_of(caught.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    # communications[0] inherits the campaign with a NUL; communications[1] has its own campaign, but no
    # channel, neither its own nor a default.
    assert failure.fields == ["communications[0].campaign", "communications[1].channel"]
    assert await history(stub, "ann") == []
