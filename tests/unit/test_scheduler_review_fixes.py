"""Regression tests for the review of the scheduler's canvas activities, channel options and parallel
branches, against fakes: each test pins one bug found in review."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.errors import InvalidArgument
from scheduler_svc.engine import NOT_CONFIRMED, Engine, EngineOptions
from scheduler_svc.model import (
    Activity,
    BuildAudience,
    Canvas,
    ChannelSend,
    Combine,
    End,
    RunState,
    Split,
    SplitSubset,
    Task,
    TaskState,
    Transition,
)
from scheduler_svc.validation import Limits, validate_campaign
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery, FakeJournal, claimed

FAST = EngineOptions(max_unacked_batches=2, default_batch_size=4, activity_attempts=1, retry_initial_s=0)
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)

CUSTOMERS = "entities/customers"


def build(activity_id: str) -> Activity:
    return Activity(activity_id, kind=BuildAudience(query_pb2.AudienceQuery(dimension=CUSTOMERS)))


def send(activity_id: str) -> Activity:
    return Activity(activity_id, kind=ChannelSend("email", "marketing", "templates/offer", 3, []))


def end(activity_id: str) -> Activity:
    return Activity(activity_id, kind=End())


def violations(canvas: Canvas) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_campaign("", canvas, Limits())
    return [v.field for v in caught.value.violations]


def test_an_activity_id_equal_to_the_working_set_id_of_a_split_output_is_refused() -> None:
    canvas = Canvas(
        activities=[
            build("seg"),
            Activity("split", kind=Split(subsets=[SplitSubset("vip")])),
            build("split--vip"),
            send("mail"),
            send("mail2"),
        ],
        transitions=[
            Transition("seg", "split"),
            Transition("split", "mail", "vip"),
            Transition("split--vip", "mail2"),
        ],
    )

    assert violations(canvas) == ["campaign.activities[2].id"]


def test_an_activity_id_equal_to_the_union_working_set_of_an_intersection_complement_is_refused() -> None:
    canvas = Canvas(
        activities=[
            build("both--union-all"),
            build("b"),
            Activity("both", kind=Combine("intersection", primary="both--union-all", complement_output="rest")),
            send("mail"),
            end("rest_end"),
        ],
        transitions=[
            Transition("both--union-all", "both"),
            Transition("b", "both"),
            Transition("both", "mail"),
            Transition("both", "rest_end", "rest"),
        ],
    )

    assert violations(canvas) == ["campaign.activities[0].id"]


def confirmed_canvas(time_limit_s: int) -> Canvas:
    channel = ChannelSend(
        "email", "marketing", "templates/offer", 2, [], time_limit_s=time_limit_s, confirm_before_sending=True
    )
    canvas = Canvas(
        activities=[build("audience"), Activity("send", kind=channel)],
        transitions=[Transition("audience", "send")],
    )
    validate_campaign("", canvas, Limits())
    return canvas


async def test_a_run_resumed_after_counting_the_unconfirmed_recipients_does_not_count_them_again() -> None:
    # The replica counted the recipients skipped NOT_CONFIRMED, then died before finishing the task.
    built = Task("audience", TaskState.SUCCEEDED, targeted=3, working_set="workingSets/audience", outputs={"": 3})
    send = Task("send", TaskState.RUNNING, targeted=3, start_time=T0, skipped={NOT_CONFIRMED: 3})
    send.confirmation, send.wake_time = "awaiting", T0 + timedelta(minutes=10)
    run = claimed(confirmed_canvas(time_limit_s=600), tasks=[built, send])
    delivery = FakeDelivery()
    now = T0 + timedelta(minutes=11)
    journal = FakeJournal(run.run, clock=lambda: now)
    engine = Engine(FakeAudience(size=3), {"email": delivery}, journal, FAST, clock=lambda: now)

    assert await engine.execute(run) == RunState.SUCCEEDED
    assert (journal.task("send").state, journal.task("send").skipped, delivery.streams) == (
        TaskState.SUCCEEDED,
        {NOT_CONFIRMED: 3},
        [],
    )
