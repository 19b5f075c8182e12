"""End to end, multi-entity send: one email per booking of a profile, over the real stack.

The four real servers run (``stack``); the test plays the scheduler's part on the delivery worker's
``Send`` stream with the working-set rows of a "one message per booking" activity: the same person three
times, each row with its booking's key and columns. A real aiosmtpd server records what arrives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import grpc

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.delivery.v1 import delivery_service_pb2_grpc, template_pb2
from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.clients import call_metadata
from carillon_chassis.values import to_value_map
from tests.e2e.conftest import Stack

METADATA = call_metadata("e2e")
HEADER = dpb.SendHeader(
    campaign="campaigns/bookings",
    run="campaigns/bookings/runs/r1",
    activity="per_booking",
    channel=channel_pb2.CHANNEL_EMAIL,
    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
    template="templates/booking",
)
BOOKINGS = [
    {"booking_id": "b-101", "hotel": "Hotel Lutetia", "city": "Paris", "check_in": "2026-12-03"},
    {"booking_id": "b-102", "hotel": "The Savoy", "city": "London", "check_in": "2027-01-14"},
    {"booking_id": "b-103", "hotel": "Hotel Sacher", "city": "Vienna", "check_in": "2027-02-20"},
]


async def seed(channel: grpc.aio.Channel) -> dpb.RecipientBatch:
    profiles = profile_service_pb2_grpc.ProfileServiceStub(channel)
    await profiles.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name="profiles/ines",
                    first_name="Inès",
                    identities=[value_pb2.Identity(namespace="email", value="ines@example.com")],
                    consents=[
                        profile_pb2.Consent(
                            channel=channel_pb2.CHANNEL_EMAIL, state=profile_pb2.CONSENT_STATE_OPTED_IN, source="e2e"
                        )
                    ],
                )
            ]
        ),
        metadata=METADATA,
    )
    return dpb.RecipientBatch(
        sequence=1,
        recipients=[
            dpb.Recipient(
                identity=value_pb2.Identity(namespace="email", value="ines@example.com"),
                entity_key=booking["booking_id"],
                target=to_value_map(booking),
            )
            for booking in BOOKINGS
        ],
    )


async def send(delivery: delivery_service_pb2_grpc.DeliveryServiceStub, batch: dpb.RecipientBatch) -> dpb.SendResponse:
    async def stream() -> AsyncIterator[dpb.SendRequest]:
        yield dpb.SendRequest(header=HEADER)
        yield dpb.SendRequest(batch=batch)

    (ack,) = [ack async for ack in delivery.Send(stream(), metadata=METADATA)]
    return ack


async def test_a_profile_with_three_bookings_gets_one_personalised_email_per_booking_exactly_once(
    stack: Stack,
) -> None:
    async with (
        grpc.aio.insecure_channel(stack.endpoints.delivery) as delivery_channel,
        grpc.aio.insecure_channel(stack.endpoints.profile) as profile_channel,
    ):
        delivery = delivery_service_pb2_grpc.DeliveryServiceStub(delivery_channel)
        await delivery.CreateTemplate(
            dpb.CreateTemplateRequest(
                template_id="booking",
                template=template_pb2.Template(
                    channel=channel_pb2.CHANNEL_EMAIL,
                    email=template_pb2.EmailContent(
                        subject="Your stay in {{ target.city }}",
                        text_body="Hello {{ profile.first_name }}, {{ target.hotel }} expects you on "
                        "{{ target.check_in }} (booking {{ target.booking_id }}).",
                    ),
                ),
            ),
            metadata=METADATA,
        )
        batch = await seed(profile_channel)

        ack = await send(delivery, batch)
        replay = await send(delivery, batch)
        report = await delivery.GetDeliveryReport(
            dpb.GetDeliveryReportRequest(run=HEADER.run, activity=HEADER.activity), metadata=METADATA
        )

    assert (ack.sent, replay.sent, replay.already_sent) == (3, 0, 3)
    assert Counter(stack.smtp.recipients()) == {"ines@example.com": 3}
    bodies = {}
    for mail in stack.smtp.messages:
        body = mail.message.get_body(("plain",))
        assert body is not None
        bodies[str(mail.message["Subject"])] = body.get_content().strip()
    assert bodies == {
        f"Your stay in {b['city']}": f"Hello Inès, {b['hotel']} expects you on {b['check_in']} "
        f"(booking {b['booking_id']})."
        for b in BOOKINGS
    }
    assert len({str(mail.message["Message-ID"]) for mail in stack.smtp.messages}) == 3
    assert (report.report.targeted, report.report.sent) == (3, 3)
