"""Channel activity options against fakes: the rate limit and send window travel in the send header;
batches with recipients deferred by the window are sent again once it opens (the run waits on a
durable timer meanwhile) with exact counts; recipients still deferred when the time limit has passed
are excluded and counted; and the canvas rules of these options. Also: branches after a fork run at
the same time."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.errors import InvalidArgument
from scheduler_svc.engine import NOT_CONFIRMED, TIME_LIMIT_EXCEEDED, Engine, EngineOptions
from scheduler_svc.gateways import Batch, SendHeader
from scheduler_svc.model import (
    Ack,
    Activity,
    BuildAudience,
    Canvas,
    ChannelSend,
    Fork,
    RunState,
    SendWindow,
    TaskState,
    Transition,
)
from scheduler_svc.validation import Limits, validate_campaign
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery, FakeJournal, FakeSendStream, claimed

FAST = EngineOptions(max_unacked_batches=2, default_batch_size=4, activity_attempts=1, retry_initial_s=0)
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
WINDOW = SendWindow("09:00", "18:00", (1, 2, 3, 4, 5), "Europe/Paris")


class Clock:
    """A settable clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def windowed(time_limit_s: int = 0, rate: int = 0, limits: Limits | None = None) -> Canvas:
    channel = ChannelSend(
        "email",
        "marketing",
        "templates/offer",
        2,
        [],
        rate_limit_per_second=rate,
        send_window=WINDOW,
        time_limit_s=time_limit_s,
    )
    canvas = Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("send", kind=channel),
        ],
        transitions=[Transition("audience", "send")],
    )
    validate_campaign("", canvas, limits or Limits())
    return canvas


def deferring(clock: Clock, opens: datetime) -> FakeDelivery:
    """A worker whose window opens at ``opens`` for p3 and p4 (the others are inside it already)."""
    return FakeDelivery(
        window_opens=opens, outside={"p3@example.com", "p4@example.com"}, opted_out={"p6@example.com"}, clock=clock
    )


async def test_the_send_header_carries_the_rate_limit_and_the_send_window() -> None:
    delivery = FakeDelivery()
    run = claimed(windowed(rate=150))

    await Engine(FakeAudience(size=1), {"email": delivery}, FakeJournal.of(run), FAST).execute(run)

    (stream,) = delivery.streams
    assert (stream.header.rate_limit_per_second, stream.header.send_window) == (150, WINDOW)


async def test_deferred_recipients_make_the_run_wait_for_the_window_then_are_sent_exactly_once() -> None:
    clock = Clock(T0)
    opens = T0 + timedelta(hours=1)
    audience, delivery = FakeAudience(size=6), deferring(clock, opens)
    run = claimed(windowed())
    journal = FakeJournal(run.run, clock=clock)
    engine = Engine(audience, {"email": delivery}, journal, FAST, clock=clock)

    assert await engine.execute(run) == RunState.WAITING
    waiting = journal.task("send")
    assert (waiting.state, waiting.wake_time, waiting.sent, waiting.deferred) == (TaskState.WAITING, opens, 3, 2)
    assert journal.run.scheduled_time == opens

    clock.now = opens  # the run is claimed again when it is due
    assert await engine.execute(run) == RunState.SUCCEEDED

    send = journal.task("send")
    assert (send.sent, send.already_sent, send.skipped, send.deferred, send.checkpoint) == (
        5,
        0,
        {"NO_CONSENT": 1},
        0,
        6,
    )
    assert Counter(delivery.delivered) == Counter(["k1", "k2", "k3", "k4", "k5"])
    assert journal.replays == [("send", 4)]  # only the batch (k3, k4) is sent again


async def test_an_early_wake_keeps_waiting_without_sending_again() -> None:
    clock = Clock(T0)
    opens = T0 + timedelta(hours=1)
    delivery = deferring(clock, opens)
    run = claimed(windowed())
    journal = FakeJournal(run.run, clock=clock)
    engine = Engine(FakeAudience(size=6), {"email": delivery}, journal, FAST, clock=clock)
    await engine.execute(run)
    streams = len(delivery.streams)

    clock.now = T0 + timedelta(minutes=30)
    assert await engine.execute(run) == RunState.WAITING

    assert len(delivery.streams) == streams
    assert journal.task("send").wake_time == opens


async def test_recipients_still_deferred_at_the_time_limit_are_excluded_and_counted() -> None:
    clock = Clock(T0)
    delivery = deferring(clock, T0 + timedelta(hours=1))
    run = claimed(windowed(time_limit_s=1800))  # the window opens after the 30-minute limit
    journal = FakeJournal(run.run, clock=clock)

    state = await Engine(FakeAudience(size=6), {"email": delivery}, journal, FAST, clock=clock).execute(run)

    assert state == RunState.SUCCEEDED
    send = journal.task("send")
    assert (send.sent, send.skipped, send.deferred) == (3, {"NO_CONSENT": 1, TIME_LIMIT_EXCEEDED: 2}, 0)
    assert sorted(delivery.delivered) == ["k1", "k2", "k5"]


def test_channel_options_are_validated_naming_each_field() -> None:
    canvas = windowed()
    channel = canvas.activities[1].kind
    assert isinstance(channel, ChannelSend)
    channel.rate_limit_per_second = 2001
    channel.send_window = SendWindow("9:00", "25:00", (0, 1, 1), "Mars/Olympus")
    channel.time_limit_s = -1

    with pytest.raises(InvalidArgument) as caught:
        validate_campaign("", canvas, Limits())

    assert [v.field for v in caught.value.violations] == [
        "campaign.activities[1].channel.rate_limit_per_second",
        "campaign.activities[1].channel.send_window.start_local_time",
        "campaign.activities[1].channel.send_window.end_local_time",
        "campaign.activities[1].channel.send_window.days_of_week",
        "campaign.activities[1].channel.send_window.default_time_zone",
        "campaign.activities[1].channel.time_limit",
    ]


def test_a_higher_rate_limit_is_allowed_when_configured() -> None:
    canvas = windowed(rate=5000, limits=Limits(max_rate_per_second=10000))

    assert canvas.activities[1].kind == windowed(rate=5000, limits=Limits(max_rate_per_second=5000)).activities[1].kind


# -- branches run concurrently ---------------------------------------------------------------------
class GatedDelivery(FakeDelivery):
    """A worker whose ``mail`` stream answers only after the ``text`` stream has acknowledged a batch:
    with branches run one after the other, the run would never end."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def open(self, sandbox: str, header: SendHeader) -> FakeSendStream:
        stream = GatedStream(self, sandbox, header)
        self.streams.append(stream)
        return stream


class GatedStream(FakeSendStream):
    async def read(self) -> Ack | None:
        worker = self.worker
        assert isinstance(worker, GatedDelivery)
        if self.header.activity == "mail":
            await worker.gate.wait()
        ack = await super().read()
        if self.header.activity == "text":
            worker.gate.set()
        return ack

    async def write(self, batch: Batch) -> None:
        await super().write(batch)


async def test_the_branches_after_a_fork_run_at_the_same_time() -> None:
    send = ChannelSend("email", "marketing", "templates/offer", 2, [])
    canvas = Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("fork", kind=Fork()),
            Activity("mail", kind=send),
            Activity("text", kind=ChannelSend("sms", "marketing", "templates/offer", 2, [])),
        ],
        transitions=[Transition("audience", "fork"), Transition("fork", "mail"), Transition("fork", "text")],
    )
    validate_campaign("", canvas, Limits())
    delivery = GatedDelivery()
    run = claimed(canvas)
    journal = FakeJournal.of(run)

    async with asyncio.timeout(30):  # a guard against the deadlock of sequential branches, not a speed check
        state = await Engine(FakeAudience(size=4), {"email": delivery, "sms": delivery}, journal, FAST).execute(run)

    assert state == RunState.SUCCEEDED
    assert (journal.task("mail").sent, journal.task("text").sent) == (4, 4)


# -- confirmation before sending -------------------------------------------------------------------
def confirmed_canvas(time_limit_s: int = 3600) -> Canvas:
    canvas = windowed(time_limit_s=time_limit_s)
    channel = canvas.activities[1].kind
    assert isinstance(channel, ChannelSend)
    channel.send_window, channel.confirm_before_sending = None, True
    return canvas


async def test_an_activity_that_asks_for_a_confirmation_waits_for_it_then_sends() -> None:
    clock = Clock(T0)
    delivery = FakeDelivery()
    run = claimed(confirmed_canvas())
    journal = FakeJournal(run.run, clock=clock)
    engine = Engine(FakeAudience(size=3), {"email": delivery}, journal, FAST, clock=clock)

    assert await engine.execute(run) == RunState.WAITING
    send = journal.task("send")
    assert (send.state, send.confirmation, send.wake_time, delivery.streams) == (
        TaskState.WAITING,
        "awaiting",
        T0 + timedelta(hours=1),
        [],
    )

    clock.now = T0 + timedelta(minutes=5)
    journal.confirm("send", clock.now)
    assert await engine.execute(run) == RunState.SUCCEEDED
    assert (journal.task("send").sent, delivery.delivered) == (3, ["k1", "k2", "k3"])


async def test_an_activity_not_confirmed_within_its_time_limit_sends_nothing_and_counts_everyone() -> None:
    clock = Clock(T0)
    delivery = FakeDelivery()
    run = claimed(confirmed_canvas(time_limit_s=600))
    journal = FakeJournal(run.run, clock=clock)
    engine = Engine(FakeAudience(size=3), {"email": delivery}, journal, FAST, clock=clock)
    await engine.execute(run)

    clock.now = T0 + timedelta(minutes=10)
    assert await engine.execute(run) == RunState.SUCCEEDED

    send = journal.task("send")
    assert (send.sent, send.skipped, delivery.streams) == (0, {NOT_CONFIRMED: 3}, [])
