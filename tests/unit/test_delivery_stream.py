"""The Send stream of the delivery servicer: batches overlap, acknowledgements stay in order.

While batch n is sent, the eligibility check of batch n+1 (read ahead from the stream) runs, and the
communications of batch n-1 are recorded before its acknowledgement. Driven through
``DeliveryServicer.Send`` with the pipeline harness's fakes (SQLite ledger, fake gateway and provider).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from google.rpc import code_pb2

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.errors import InvalidArgument, Unavailable
from delivery_svc.eligibility import Communication, Identity, Verdict
from delivery_svc.feedback import FeedbackService
from delivery_svc.pipeline import Prepared, SendSession
from delivery_svc.servicer import DeliveryServicer
from tests.unit.test_delivery_pipeline import HEADER, SANDBOX, FakeGateway, Harness, harness, to
from tests.unit.test_delivery_review_fixes import NoForwarding

__all__ = ["harness"]  # the fixture, imported for this module's tests

PROTO_HEADER = dpb.SendHeader(
    campaign=HEADER.campaign,
    run=HEADER.run,
    activity=HEADER.activity,
    channel=channel_pb2.CHANNEL_EMAIL,
    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
    template=HEADER.template,
    accepts_refusal=True,
)


class SlowGateway(FakeGateway):
    """A FakeGateway whose calls log when they start and end, and whose history records wait for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def check(self, sandbox: str, channel: str, category: str, identities: Sequence[Identity]) -> list[Verdict]:
        self.events.append(f"check {identities[0][1]}")
        return await super().check(sandbox, channel, category, identities)

    async def record(self, sandbox: str, communications: Sequence[Communication]) -> int:
        self.events.append(f"record start {len(self.recorded)}")
        await self.gate.wait()
        recorded = await super().record(sandbox, communications)
        self.events.append("record end")
        return recorded


def servicer(harness: Harness) -> DeliveryServicer:
    return DeliveryServicer(
        harness.pipeline.templates,
        harness.pipeline,
        harness.ledger,
        FeedbackService(harness.database, harness.ledger, NoForwarding()),
    )


def batch(sequence: int, *addresses: str) -> dpb.SendRequest:
    return dpb.SendRequest(
        batch=dpb.RecipientBatch(
            sequence=sequence,
            recipients=[
                dpb.Recipient(
                    identity=value_pb2.Identity(namespace="email", value=a),
                    target={"hotel": value_pb2.Value(string_value="Ritz")},
                )
                for a in addresses
            ],
        )
    )


async def stream(requests: list[dpb.SendRequest]) -> AsyncIterator[dpb.SendRequest]:
    for request in requests:
        yield request


async def run(harness: Harness, requests: list[dpb.SendRequest]) -> list[dpb.SendResponse]:
    context: Any = None  # Send does not use its context
    return [ack async for ack in servicer(harness).Send(stream(requests), context)]


@pytest.fixture
def slow(harness: Harness) -> SlowGateway:
    gateway = SlowGateway()
    harness.pipeline.gateway = gateway
    harness.gateway = gateway
    return gateway


def allow(gateway: FakeGateway, count: int) -> list[str]:
    addresses = [f"p{i}@example.com" for i in range(count)]
    for i, address in enumerate(addresses):
        gateway.allow(address, f"p{i}", f"First{i}")
    return addresses


async def test_every_batch_is_acknowledged_in_order_with_its_own_counts(harness: Harness, slow: SlowGateway) -> None:
    a = allow(slow, 8)
    requests = [dpb.SendRequest(header=PROTO_HEADER)] + [batch(s, a[2 * s], a[2 * s + 1]) for s in range(4)]
    requests.append(batch(4, a[0], a[7]))  # both sent already: counted, not sent again

    acks = await run(harness, requests)

    assert [(ack.sequence, ack.sent, ack.already_sent) for ack in acks] == [
        (0, 2, 0),
        (1, 2, 0),
        (2, 2, 0),
        (3, 2, 0),
        (4, 0, 2),
    ]
    assert sorted(harness.provider.recipients()) == sorted(a)
    assert sorted(c.profile_id for c in slow.recorded) == sorted([f"p{i}" for i in range(8)] + ["p0", "p7"])


async def test_the_next_batch_is_checked_while_the_batch_before_is_still_being_recorded(
    harness: Harness, slow: SlowGateway
) -> None:
    a = allow(slow, 4)
    slow.gate.clear()  # history records wait until the second batch's check has started
    requests = [dpb.SendRequest(header=PROTO_HEADER), batch(1, a[0], a[1]), batch(2, a[2], a[3])]

    async def open_the_gate_once_the_second_batch_is_checked() -> None:
        while f"check {a[2]}" not in slow.events:
            await asyncio.sleep(0.001)
        slow.gate.set()

    opener = asyncio.ensure_future(open_the_gate_once_the_second_batch_is_checked())
    async with asyncio.timeout(30):  # a guard against a hang (no overlap would wait forever), not a speed check
        acks = await run(harness, requests)
    await opener

    assert [(ack.sequence, ack.sent) for ack in acks] == [(1, 2), (2, 2)]
    assert slow.events.index(f"check {a[2]}") < slow.events.index("record end")


async def test_a_bad_batch_ends_the_stream_after_the_batches_before_it_are_acknowledged(
    harness: Harness, slow: SlowGateway
) -> None:
    a = allow(slow, 4)
    bad = dpb.SendRequest(batch=dpb.RecipientBatch(sequence=2, recipients=[dpb.Recipient()]))
    requests = [dpb.SendRequest(header=PROTO_HEADER), batch(1, a[0], a[1]), bad, batch(3, a[2], a[3])]
    acks: list[dpb.SendResponse] = []

    with pytest.raises(InvalidArgument) as raised:
        async for ack in servicer(harness).Send(stream(requests), None):
            acks.append(ack)

    assert [(ack.sequence, ack.sent) for ack in acks[:-1]] == [(1, 2)]
    assert acks[-1].refusal.code == code_pb2.INVALID_ARGUMENT  # the refusal comes last, then the error
    assert [v.field for v in raised.value.violations] == ["batch.recipients[0].identity"]
    assert harness.provider.recipients() == [a[0], a[1]]


async def test_a_header_after_the_first_batch_ends_the_stream_with_invalid_argument(
    harness: Harness, slow: SlowGateway
) -> None:
    a = allow(slow, 2)
    requests = [dpb.SendRequest(header=PROTO_HEADER), batch(1, a[0]), dpb.SendRequest(header=PROTO_HEADER)]
    acks: list[dpb.SendResponse] = []

    with pytest.raises(InvalidArgument) as raised:
        async for ack in servicer(harness).Send(stream(requests), None):
            acks.append(ack)

    assert [ack.sequence for ack in acks[:-1]] == [1]
    assert acks[-1].refusal.code == code_pb2.INVALID_ARGUMENT
    assert [v.field for v in raised.value.violations] == ["header"]


async def test_a_history_that_cannot_be_recorded_fails_the_stream_at_its_batch(
    harness: Harness, slow: SlowGateway
) -> None:
    a = allow(slow, 4)
    slow.history_down = True
    requests = [dpb.SendRequest(header=PROTO_HEADER), batch(1, a[0], a[1]), batch(2, a[2], a[3])]
    acks: list[dpb.SendResponse] = []

    with pytest.raises(Unavailable):
        async for ack in servicer(harness).Send(stream(requests), None):
            acks.append(ack)

    # The first batch's acknowledgement waits for its history, which failed: only the refusal comes.
    assert [ack.refusal.code for ack in acks] == [code_pb2.UNAVAILABLE]
    # The second batch may have been sent meanwhile (a replay records its history): never twice.
    assert harness.provider.recipients()[:2] == [a[0], a[1]]
    assert len(set(harness.provider.recipients())) == len(harness.provider.recipients())


async def test_a_batch_read_ahead_of_a_failed_stream_leaves_no_reservation_behind(
    harness: Harness, slow: SlowGateway
) -> None:
    a = allow(slow, 6)
    slow.history_down = True  # the first batch's acknowledgement fails: the stream ends there
    requests = [dpb.SendRequest(header=PROTO_HEADER)] + [batch(s, a[2 * s], a[2 * s + 1]) for s in range(3)]

    with pytest.raises(Unavailable):
        async for _ in servicer(harness).Send(stream(requests), None):
            pass
    await asyncio.sleep(0)  # a reader cancelled while holding a batch releases it in the background

    sent = set(harness.provider.recipients())
    assert a[0] in sent and a[4] not in sent and a[5] not in sent  # the third batch was never sent
    never_sent = {mid for mid in slow.live} - {m.message_id for m in harness.provider.sent}
    assert never_sent == set()  # released, or never reserved


async def test_abandoning_a_batch_whose_check_is_under_way_waits_for_it_and_releases_what_it_reserved(
    harness: Harness,
) -> None:
    gateway = harness.gateway
    gateway.answer = asyncio.Event()
    a = allow(gateway, 2)
    session = await harness.pipeline.open(SANDBOX, HEADER)
    checked = session.start_check([to(a[0]), to(a[1])])

    abandoning = asyncio.ensure_future(session.abandon(checked))
    for _ in range(20):  # loop turns: the check reserves, its answer is held, the abandon begins
        await asyncio.sleep(0)
    waiting = not abandoning.done()
    gateway.answer.set()
    await abandoning

    (reserved,) = gateway.reservations
    assert waiting and len(reserved) == 2  # not cancelled: the reservations were made already
    assert sorted(gateway.released) == sorted(reserved) and gateway.live == set()


async def test_a_stream_cancelled_while_a_batch_is_prepared_releases_what_the_batch_reserved(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = harness.gateway
    gateway.answer = asyncio.Event()
    a = allow(gateway, 2)
    requests = [dpb.SendRequest(header=PROTO_HEADER), batch(0, a[0], a[1])]
    preparing = asyncio.Event()
    prepare = SendSession.prepare

    async def watched(self: SendSession, *args: Any) -> Prepared:
        preparing.set()
        return await prepare(self, *args)

    monkeypatch.setattr(SendSession, "prepare", watched)

    async def consume() -> None:
        async for _ in servicer(harness).Send(stream(requests), None):
            pass

    sending = asyncio.ensure_future(consume())
    await asyncio.wait_for(preparing.wait(), 30)  # the prepare waits for the check, whose answer is held
    sending.cancel()  # the caller goes away
    gateway.answer.set()  # the prepare completes (a step runs to its end), and is never transmitted
    with pytest.raises(asyncio.CancelledError):
        await sending

    (reserved,) = gateway.reservations
    assert len(reserved) == 2 and sorted(gateway.released) == sorted(reserved)
    assert harness.provider.recipients() == []


async def test_a_stream_cancelled_while_the_batch_before_records_its_history_still_records_the_last_batch(
    harness: Harness, slow: SlowGateway
) -> None:
    # Batch 1 is transmitted while batch 0 records its history (held by the gate): the stream then waits
    # for batch 0's acknowledgement before it starts batch 1's finish. Cancelled there, batch 1's sent
    # message must still be recorded (its reservation confirmed), as a batch in flight is.
    a = allow(slow, 2)
    slow.gate.clear()
    requests = [dpb.SendRequest(header=PROTO_HEADER), batch(0, a[0]), batch(1, a[1])]

    async def consume() -> None:
        async for _ in servicer(harness).Send(stream(requests), None):
            pass

    sending = asyncio.ensure_future(consume())
    for _ in range(3000):  # both batches sent, batch 0's history held
        if len(harness.provider.recipients()) == 2 and "record start 0" in slow.events:
            break
        await asyncio.sleep(0.01)
    for _ in range(50):  # the stream reaches its wait for batch 0's acknowledgement
        await asyncio.sleep(0)
    sending.cancel()  # the caller goes away
    slow.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await sending

    assert harness.provider.recipients() == [a[0], a[1]]
    assert sorted(c.profile_id for c in slow.recorded) == ["p0", "p1"]
