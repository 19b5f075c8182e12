"""Feedback, reports and send headers over the real DeliveryService, with a real profile_stub.

Every test runs on SQLite and on PostgreSQL (the ``start_stack`` fixture of the server tests).
"""

from __future__ import annotations

import grpc
import pytest

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.profile.v1 import profile_pb2, profile_service_pb2
from carillon.type.v1 import channel_pb2
from carillon_chassis.database import utcnow
from tests.integration import test_delivery_server as server_tests
from tests.integration.test_delivery_server import (
    BATCH,
    HEADER,
    METADATA,
    Stack,
    StartStack,
    recipient,
    seed,
    send,
)
from tests.rpc_errors import failure_of

KIND = dpb.FeedbackKind
serving = server_tests.start_stack  # the fixture, under a name of this module


async def sent_message_id(stack: Stack) -> str:
    (envelope,) = stack.smtp.envelopes
    return str(envelope.message["X-Carillon-Message-Id"])


def event(event_id: str, message_id: str, kind: int) -> dpb.FeedbackEvent:
    return dpb.FeedbackEvent(event_id=event_id, message_id=message_id, kind=kind)  # type: ignore[arg-type]


async def report(stack: Stack) -> dpb.DeliveryReport:
    response = await stack.delivery.GetDeliveryReport(
        dpb.GetDeliveryReportRequest(run=HEADER.run, activity=HEADER.activity), metadata=METADATA
    )
    return response.report


async def test_the_report_counts_every_outcome_and_every_kind_of_feedback(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)
    await send(stack, [BATCH])
    mid = await sent_message_id(stack)

    response = await stack.delivery.RecordFeedback(
        dpb.RecordFeedbackRequest(
            events=[
                event("e1", mid, KIND.FEEDBACK_KIND_DELIVERED),
                event("e2", mid, KIND.FEEDBACK_KIND_OPENED),
                event("e3", mid, KIND.FEEDBACK_KIND_CLICKED),
                event("e4", mid, KIND.FEEDBACK_KIND_OPENED),  # a second open: counted once per message
            ]
        ),
        metadata=METADATA,
    )
    got = await report(stack)

    assert (response.recorded, response.duplicates) == (4, 0)
    assert (got.run, got.activity) == (HEADER.run, HEADER.activity)
    assert (got.targeted, got.sent, got.pending, got.deferred) == (4, 1, 0, 0)
    assert dict(got.skipped) == {"NO_CONSENT": 2, "UNKNOWN_PROFILE": 1}
    assert dict(got.failed) == {}
    assert (got.delivered, got.opened, got.clicked, got.bounced) == (1, 1, 1, 0)


async def test_recording_the_same_event_id_twice_changes_nothing(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)
    await send(stack, [BATCH])
    mid = await sent_message_id(stack)
    request = dpb.RecordFeedbackRequest(events=[event("bounce-1", mid, KIND.FEEDBACK_KIND_SOFT_BOUNCE)])

    first = await stack.delivery.RecordFeedback(request, metadata=METADATA)
    second = await stack.delivery.RecordFeedback(request, metadata=METADATA)

    assert (first.recorded, first.duplicates) == (1, 0)
    assert (second.recorded, second.duplicates) == (0, 1)
    assert (await report(stack)).bounced == 1


async def test_an_unsubscribe_opts_the_profile_out_and_its_next_message_is_skipped(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)
    await send(stack, [BATCH])
    mid = await sent_message_id(stack)

    await stack.delivery.RecordFeedback(
        dpb.RecordFeedbackRequest(events=[event("u1", mid, KIND.FEEDBACK_KIND_UNSUBSCRIBE)]), metadata=METADATA
    )
    profile = await stack.profiles.GetProfile(
        profile_service_pb2.GetProfileRequest(name="profiles/ada"), metadata=METADATA
    )
    later = dpb.SendHeader()
    later.CopyFrom(HEADER)
    later.activity = "email2"
    (ack,) = await send(stack, [dpb.RecipientBatch(sequence=1, recipients=[recipient("ada@example.com")])], later)

    states = {c.channel: c.state for c in profile.profile.consents}
    assert states[channel_pb2.CHANNEL_EMAIL] == profile_pb2.CONSENT_STATE_OPTED_OUT
    assert (ack.sent, dict(ack.skipped)) == (0, {"NO_CONSENT": 1})
    assert (await report(stack)).unsubscribed == 1


async def test_feedback_about_an_unknown_message_is_not_found_and_writes_nothing(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)
    await send(stack, [BATCH])
    mid = await sent_message_id(stack)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.RecordFeedback(
            dpb.RecordFeedbackRequest(
                events=[event("ok", mid, KIND.FEEDBACK_KIND_OPENED), event("bad", "m-nope", KIND.FEEDBACK_KIND_OPENED)]
            ),
            metadata=METADATA,
        )

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.NOT_FOUND,
        "MESSAGE_NOT_FOUND",
        ["events[1].message_id"],
    )
    assert (await report(stack)).opened == 0


async def test_feedback_without_a_kind_is_invalid_and_names_the_field(serving: StartStack) -> None:
    stack = await serving()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.RecordFeedback(
            dpb.RecordFeedbackRequest(events=[dpb.FeedbackEvent(event_id="e", message_id="m1")]), metadata=METADATA
        )

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FEEDBACK",
        ["events[0].kind"],
    )


async def test_a_report_of_a_malformed_run_is_invalid(serving: StartStack) -> None:
    stack = await serving()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.GetDeliveryReport(
            dpb.GetDeliveryReportRequest(run="runs/x", activity="email1"), metadata=METADATA
        )

    assert failure_of(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure_of(caught.value).fields == ["run"]


async def test_a_send_window_in_the_header_defers_recipients_outside_it(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)
    header = dpb.SendHeader()
    header.CopyFrom(HEADER)
    # A one-minute window twelve hours away from now: a UTC profile is always outside it.

    opening = (utcnow().hour + 12) % 24
    header.send_window.CopyFrom(
        dpb.SendWindow(
            start_local_time=f"{opening:02d}:00", end_local_time=f"{opening:02d}:01", default_time_zone="UTC"
        )
    )

    (ack,) = await send(stack, [BATCH], header)

    assert (ack.sent, ack.deferred) == (0, 1)
    assert ack.next_window_time.ToDatetime().hour == opening
    assert stack.smtp.envelopes == []
    assert (await report(stack)).deferred == 1


async def test_a_malformed_send_window_is_invalid_and_names_the_field(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)
    header = dpb.SendHeader()
    header.CopyFrom(HEADER)
    header.send_window.CopyFrom(dpb.SendWindow(start_local_time="25:00", end_local_time="10:00"))
    header.accepts_refusal = True

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # Batches after the refused header: the worker (the header accepts refusals) ends the stream once
        # they are written and the client half-closed, so the status is not lost to grpc/grpc#36066.
        await send(stack, [BATCH], header)

    failure = failure_of(caught.value)
    assert (failure.code, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["header.send_window.start_local_time"],
    )


async def test_a_hard_bounce_quarantines_the_address_and_its_next_message_is_skipped(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)
    await send(stack, [BATCH])
    mid = await sent_message_id(stack)

    await stack.delivery.RecordFeedback(
        dpb.RecordFeedbackRequest(events=[event("hb1", mid, KIND.FEEDBACK_KIND_HARD_BOUNCE)]), metadata=METADATA
    )
    quarantine = await stack.profiles.GetQuarantine(
        profile_service_pb2.GetQuarantineRequest(channel=channel_pb2.CHANNEL_EMAIL, address="ada@example.com"),
        metadata=METADATA,
    )
    later = dpb.SendHeader()
    later.CopyFrom(HEADER)
    later.activity = "email2"
    (ack,) = await send(stack, [dpb.RecipientBatch(sequence=1, recipients=[recipient("ada@example.com")])], later)

    assert quarantine.quarantine.quarantined
    assert (ack.sent, dict(ack.skipped)) == (0, {"QUARANTINED": 1})
    assert (await report(stack)).bounced == 1
