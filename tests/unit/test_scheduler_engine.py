"""The run engine against fake gateways and an in-memory journal: order, counts, resume, failure."""

from __future__ import annotations

from carillon_chassis.errors import NotFound, Unavailable
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.model import RunState, RunTrigger, Task, TaskState
from tests.unit.test_scheduler_fakes import (
    FakeAudience,
    FakeDelivery,
    FakeJournal,
    claimed,
    two_step_canvas,
)

FAST = EngineOptions(max_unacked_batches=2, default_batch_size=4, activity_attempts=3, retry_initial_s=0)


def engine_for(
    audience: FakeAudience, delivery: FakeDelivery | None, journal: FakeJournal, options: EngineOptions = FAST
) -> Engine:
    deliveries = {"email": delivery} if delivery is not None else {}
    return Engine(audience, deliveries, journal, options)


async def test_a_run_builds_the_audience_then_sends_every_row_and_stores_the_counts() -> None:
    audience, delivery = FakeAudience(size=10), FakeDelivery(opted_out={"p2@example.com", "p7@example.com"})
    run = claimed(two_step_canvas(batch_size=3))
    journal = FakeJournal.of(run)

    state = await engine_for(audience, delivery, journal).execute(run)

    assert state == RunState.SUCCEEDED
    assert journal.run.state == RunState.SUCCEEDED
    assert audience.builds == [("tenant", "campaigns/spring/runs/r1", "audience", "entities/customers")]
    built, sent = journal.task("audience"), journal.task("send")
    assert (built.state, built.working_set, built.targeted) == (TaskState.SUCCEEDED, "workingSets/audience", 10)
    assert (sent.state, sent.targeted, sent.sent, sent.skipped, sent.checkpoint) == (
        TaskState.SUCCEEDED,
        10,
        8,
        {"NO_CONSENT": 2},
        10,
    )
    assert delivery.delivered == [f"k{n}" for n in range(1, 11)]


async def test_the_send_header_and_stream_carry_the_run_activity_and_channel_settings() -> None:
    audience, delivery = FakeAudience(size=2), FakeDelivery()
    run = claimed(two_step_canvas(batch_size=0))

    await engine_for(audience, delivery, FakeJournal.of(run)).execute(run)

    (stream,) = delivery.streams
    assert stream.sandbox == "tenant"
    assert (stream.header.campaign, stream.header.run, stream.header.activity) == (
        "campaigns/spring",
        "campaigns/spring/runs/r1",
        "send",
    )
    assert (stream.header.channel, stream.header.category, stream.header.template) == (
        "email",
        "marketing",
        "templates/offer",
    )
    (call,) = audience.streams
    assert (call.sandbox, call.working_set, call.after_position, call.batch_size, call.attributes) == (
        "tenant",
        "workingSets/audience",
        0,
        FAST.default_batch_size,
        ["tier"],
    )


async def test_a_resumed_run_streams_only_the_rows_after_the_checkpoint() -> None:
    audience, delivery = FakeAudience(size=10), FakeDelivery()
    tasks = [
        Task("audience", TaskState.SUCCEEDED, targeted=10, working_set="workingSets/audience"),
        Task("send", TaskState.RUNNING, targeted=10, sent=6, checkpoint=6),
    ]
    run = claimed(two_step_canvas(batch_size=3), tasks=tasks)
    journal = FakeJournal.of(run)

    await engine_for(audience, delivery, journal).execute(run)

    assert audience.builds == []  # the working set is reused
    assert [s.after_position for s in audience.streams] == [6]
    assert delivery.delivered == ["k7", "k8", "k9", "k10"]
    assert (journal.task("send").sent, journal.task("send").checkpoint) == (10, 10)


async def test_a_failing_activity_fails_the_run_and_skips_the_rest() -> None:
    audience = FakeAudience(build_failures=[NotFound("entities/customers does not exist")])
    delivery = FakeDelivery()
    run = claimed(two_step_canvas())
    journal = FakeJournal.of(run)

    state = await engine_for(audience, delivery, journal).execute(run)

    assert state == RunState.FAILED
    assert journal.run.state == RunState.FAILED and journal.run.error
    assert journal.task("audience").state == TaskState.FAILED and journal.task("audience").message
    assert journal.task("send").state == TaskState.SKIPPED
    assert delivery.streams == []


async def test_a_channel_without_a_delivery_worker_fails_its_task_and_sends_nothing() -> None:
    audience = FakeAudience(size=3)
    run = claimed(two_step_canvas(channel="sms"))
    journal = FakeJournal.of(run)

    state = await engine_for(audience, FakeDelivery(), journal).execute(run)

    assert state == RunState.FAILED
    assert journal.task("audience").state == TaskState.SUCCEEDED
    assert journal.task("send").state == TaskState.FAILED and journal.task("send").message
    assert audience.streams == []


async def test_no_more_than_max_unacked_batches_await_acknowledgement() -> None:
    audience, delivery = FakeAudience(size=30), FakeDelivery()
    run = claimed(two_step_canvas(batch_size=2))

    await engine_for(audience, delivery, FakeJournal.of(run), FAST).execute(run)

    assert delivery.acks == 15
    assert delivery.max_unacked == FAST.max_unacked_batches


async def test_an_unavailable_peer_is_retried_and_the_run_then_succeeds() -> None:
    audience = FakeAudience(size=4, build_failures=[Unavailable("audience restarting")])
    run = claimed(two_step_canvas())
    journal = FakeJournal.of(run)

    state = await engine_for(audience, FakeDelivery(), journal).execute(run)

    assert state == RunState.SUCCEEDED
    assert len(audience.builds) == 2


async def test_a_worker_failing_mid_stream_keeps_the_counts_of_the_batches_it_acknowledged() -> None:
    audience = FakeAudience(size=10)
    delivery = FakeDelivery(fail_after=2, failure=NotFound("template gone"))
    run = claimed(two_step_canvas(batch_size=3))
    journal = FakeJournal.of(run)

    state = await engine_for(audience, delivery, journal).execute(run)

    assert state == RunState.FAILED
    task = journal.task("send")
    assert (task.state, task.sent, task.checkpoint) == (TaskState.FAILED, 6, 6)
    assert all(s.cancelled for s in delivery.streams)


async def test_an_unavailable_worker_is_retried_from_the_checkpoint_without_resending_acknowledged_rows() -> None:
    audience = FakeAudience(size=10)
    delivery = FakeDelivery(fail_after=2, failing_streams=1, failure=Unavailable("worker restarting"))
    run = claimed(two_step_canvas(batch_size=3))
    journal = FakeJournal.of(run)

    state = await engine_for(audience, delivery, journal).execute(run)

    assert state == RunState.SUCCEEDED
    assert [s.after_position for s in audience.streams] == [0, 6]
    assert delivery.delivered == [f"k{n}" for n in range(1, 11)]
    assert (journal.task("send").sent, journal.task("send").checkpoint) == (10, 10)


async def test_in_test_mode_a_channel_activity_sends_nothing_and_reports_who_would_be_sent() -> None:
    audience, delivery = FakeAudience(size=10), FakeDelivery()
    run = claimed(two_step_canvas(batch_size=3))
    run.run.trigger = RunTrigger.TEST
    journal = FakeJournal.of(run)

    state = await engine_for(audience, delivery, journal).execute(run)

    assert state == RunState.SUCCEEDED
    assert delivery.streams == [] and audience.streams == []
    sent = journal.task("send")
    assert (sent.state, sent.targeted, sent.sent, sent.checkpoint) == (TaskState.SUCCEEDED, 10, 0, 0)
    assert journal.notes["send"] == "test mode: would send to 10 recipients; nothing was sent"


async def test_a_test_run_needs_no_delivery_worker() -> None:
    run = claimed(two_step_canvas(batch_size=3))
    run.run.trigger = RunTrigger.TEST
    journal = FakeJournal.of(run)

    assert await engine_for(FakeAudience(size=4), None, journal).execute(run) == RunState.SUCCEEDED
