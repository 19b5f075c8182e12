"""Run claiming with leases and progress recording on both backends, and a crashed run resumed elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.database import Database, utcnow
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.model import (
    Ack,
    Activity,
    BuildAudience,
    CampaignState,
    Canvas,
    ChannelSend,
    LeaseLost,
    RunKey,
    RunState,
    TaskState,
    Transition,
    Wait,
)
from scheduler_svc.runner import Runner, StoreJournal
from scheduler_svc.runs import Lease, RunStore
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery

A = Lease("replica-a", 60)
B = Lease("replica-b", 60)


def canvas(start: datetime | None = None, batch_size: int = 3) -> Canvas:
    result = Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("email", kind=ChannelSend("email", "marketing", "templates/offer", batch_size, ["tier"])),
        ],
        transitions=[Transition("audience", "email")],
    )
    result.schedule.start_time = start
    return result


def publish(campaigns: CampaignStore, campaign_id: str = "spring", start: datetime | None = None) -> RunKey:
    campaigns.create("prod", campaign_id, "", canvas(start))
    return campaigns.publish("prod", campaign_id)[1]


def test_a_due_run_is_claimed_running_with_a_lease_and_its_campaign_goes_live(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)

    (claimed,) = runs.claim_due_runs(A, limit=5)

    assert claimed.run.key == key
    assert claimed.canvas == canvas()
    run = runs.get(key)
    assert (run.state, run.lease_owner) == (RunState.RUNNING, "replica-a")
    assert run.lease_expires is not None and run.lease_expires > utcnow()
    assert run.start_time is not None
    assert campaigns.get("prod", "spring").state == CampaignState.LIVE


def test_a_run_scheduled_later_is_not_claimed_before_its_time(campaigns: CampaignStore, runs: RunStore) -> None:
    start = utcnow() + timedelta(hours=1)
    publish(campaigns, start=start)

    assert runs.claim_due_runs(A, limit=5) == []
    assert len(runs.claim_due_runs(A, limit=5, now=start)) == 1


def test_a_claimed_run_is_not_claimed_by_another_replica_until_its_lease_expires(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)
    now = utcnow()
    runs.claim_due_runs(A, limit=5, now=now)

    assert runs.claim_due_runs(B, limit=5, now=now + timedelta(seconds=59)) == []
    (taken,) = runs.claim_due_runs(B, limit=5, now=now + timedelta(seconds=61))
    assert taken.run.key == key
    assert runs.get(key).lease_owner == "replica-b"


def test_a_replica_that_lost_its_lease_can_no_longer_record_progress(campaigns: CampaignStore, runs: RunStore) -> None:
    key = publish(campaigns)
    now = utcnow()
    runs.claim_due_runs(A, limit=5, now=now)
    runs.claim_due_runs(B, limit=5, now=now + timedelta(seconds=61))

    with pytest.raises(LeaseLost):
        runs.record_ack(key, A, "email", Ack(sequence=3, sent=3))
    assert runs.renew_lease(key, A) is False
    assert runs.get(key).tasks[1].checkpoint == 0


def test_a_released_run_can_be_claimed_at_once(campaigns: CampaignStore, runs: RunStore) -> None:
    key = publish(campaigns)
    runs.claim_due_runs(A, limit=5)

    runs.release_lease(key, A)

    assert [c.run.key for c in runs.claim_due_runs(B, limit=5)] == [key]


def test_concurrent_claims_take_each_run_exactly_once(campaigns: CampaignStore, runs: RunStore) -> None:
    keys = {publish(campaigns, f"c{i}") for i in range(8)}
    leases = [Lease(f"replica-{i}", 60) for i in range(4)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        claims = list(pool.map(lambda lease: runs.claim_due_runs(lease, limit=8), leases))

    taken = [c.run.key for batch in claims for c in batch]
    assert sorted(taken, key=str) == sorted(keys, key=str)


def test_acks_add_their_counts_and_move_the_checkpoint_and_a_repeated_ack_is_ignored(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)
    runs.claim_due_runs(A, limit=5)
    runs.start_task(key, A, "email", targeted=7)

    assert runs.record_ack(key, A, "email", Ack(sequence=3, sent=2, skipped={"NO_CONSENT": 1})) is True
    assert runs.record_ack(key, A, "email", Ack(sequence=7, sent=1, already_sent=1, skipped={"NO_CONSENT": 2}))
    assert runs.record_ack(key, A, "email", Ack(sequence=7, sent=4)) is False

    task = runs.get(key).tasks[1]
    assert (task.state, task.targeted, task.sent, task.already_sent, task.skipped, task.checkpoint) == (
        TaskState.RUNNING,
        7,
        3,
        1,
        {"NO_CONSENT": 3},
        7,
    )


def test_a_failed_run_fails_its_task_skips_the_rest_and_completes_the_campaign(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)
    runs.claim_due_runs(A, limit=5)

    runs.fail_run(key, A, "audience", "NOT_FOUND: no entity customers")

    run = runs.get(key)
    assert run.state == RunState.FAILED and run.error and run.end_time is not None
    assert [(t.activity, t.state) for t in run.tasks] == [
        ("audience", TaskState.FAILED),
        ("email", TaskState.SKIPPED),
    ]
    assert run.tasks[0].message == "NOT_FOUND: no entity customers"
    assert run.lease_owner is None
    assert campaigns.get("prod", "spring").state == CampaignState.COMPLETED


async def test_a_run_executed_on_the_real_store_records_every_count(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)
    (claimed,) = runs.claim_due_runs(A, limit=5)
    delivery = FakeDelivery(opted_out={"p4@example.com"})
    engine = Engine(FakeAudience(size=8), {"email": delivery}, StoreJournal(database, runs, A), EngineOptions())

    assert await engine.execute(claimed) == RunState.SUCCEEDED

    run = runs.get(key)
    audience, email = run.tasks
    assert (audience.state, audience.working_set, audience.targeted) == (TaskState.SUCCEEDED, "workingSets/audience", 8)
    assert (email.state, email.targeted, email.sent, email.skipped, email.checkpoint) == (
        TaskState.SUCCEEDED,
        8,
        7,
        {"NO_CONSENT": 1},
        8,
    )
    assert run.state == RunState.SUCCEEDED and run.lease_owner is None
    assert campaigns.get("prod", "spring").state == CampaignState.COMPLETED


async def test_a_run_whose_replica_crashed_is_resumed_by_another_from_the_checkpoint(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)
    now = utcnow()
    (first,) = runs.claim_due_runs(A, limit=5, now=now)
    stalling = FakeDelivery(stall_after=2)  # acknowledges two batches of 3, then never answers again
    engine_a = Engine(FakeAudience(size=10), {"email": stalling}, StoreJournal(database, runs, A), EngineOptions())
    execution = asyncio.create_task(engine_a.execute(first))
    async with asyncio.timeout(30):  # a guard against a hang, not a speed requirement
        while runs.get(key).tasks[1].checkpoint < 6:
            await asyncio.sleep(0.01)
    execution.cancel()  # the replica dies
    with pytest.raises(asyncio.CancelledError):
        await execution

    (second,) = runs.claim_due_runs(B, limit=5, now=now + timedelta(seconds=61))
    audience, delivery = FakeAudience(size=10), FakeDelivery()
    engine_b = Engine(audience, {"email": delivery}, StoreJournal(database, runs, B), EngineOptions())

    assert await engine_b.execute(second) == RunState.SUCCEEDED
    assert [s.after_position for s in audience.streams] == [6]
    assert delivery.delivered == ["k7", "k8", "k9", "k10"]
    email = runs.get(key).tasks[1]
    assert (email.sent, email.checkpoint) == (10, 10)


def runner_for(database: Database, runs: RunStore, lease: Lease, delivery: FakeDelivery, max_runs: int = 4) -> Runner:
    engine = Engine(FakeAudience(size=10), {"email": delivery}, StoreJournal(database, runs, lease), EngineOptions())
    return Runner(
        database=database, runs=runs, engine=engine, lease=lease, poll_interval_s=0.05, max_concurrent_runs=max_runs
    )


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):  # a guard against a hang, not a speed requirement
        while not condition():
            await asyncio.sleep(0.01)


async def test_the_runner_claims_no_more_runs_than_it_may_execute_at_once(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    for i in range(3):
        publish(campaigns, f"c{i}")
    runner = runner_for(database, runs, A, FakeDelivery(stall_after=0), max_runs=2)

    try:
        assert len(await runner.poll_once()) == 2
        assert await runner.poll_once() == []
    finally:
        await runner.stop()


async def test_stopping_the_runner_mid_run_releases_the_lease_for_another_replica(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)
    runner = runner_for(database, runs, A, FakeDelivery(stall_after=1))
    await runner.poll_once()
    await until(lambda: runs.get(key).tasks[1].checkpoint == 3)

    await runner.stop()

    assert runner.executing == []
    assert runs.get(key).state == RunState.RUNNING
    assert [c.run.key for c in runs.claim_due_runs(B, limit=5)] == [key]


async def test_a_runner_whose_lease_was_taken_abandons_the_run(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)
    short = Lease("replica-a", 0.3)
    runner = runner_for(database, runs, short, FakeDelivery(stall_after=1))
    await runner.poll_once()
    await until(lambda: runs.get(key).tasks[1].checkpoint == 3)

    runs.claim_due_runs(B, limit=5, now=utcnow() + timedelta(seconds=1))
    await until(lambda: runner.executing == [])

    assert runs.get(key).lease_owner == "replica-b"
    await runner.stop()


async def test_an_unexpected_error_fails_the_run_and_its_running_task_instead_of_retrying_forever(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns)
    buggy = FakeAudience(build_failures=[RuntimeError("a bug")])
    engine = Engine(buggy, {"email": FakeDelivery()}, StoreJournal(database, runs, A), EngineOptions())
    runner = Runner(database=database, runs=runs, engine=engine, lease=A, poll_interval_s=0.05, max_concurrent_runs=1)

    await runner.poll_once()
    await until(lambda: runner.executing == [])

    run = runs.get(key)
    assert run.state == RunState.FAILED and run.error
    assert [(t.activity, t.state) for t in run.tasks] == [("audience", TaskState.FAILED), ("email", TaskState.SKIPPED)]
    assert runs.claim_due_runs(B, limit=5, now=utcnow() + timedelta(hours=1)) == []
    await runner.stop()


async def test_a_waiting_run_holds_no_lease_and_is_resumed_by_the_runner_when_its_timer_is_due(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    waiting = Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("pause", kind=Wait(until=utcnow() + timedelta(milliseconds=500))),
            Activity("email", kind=ChannelSend("email", "marketing", "templates/offer", 3, [])),
        ],
        transitions=[Transition("audience", "pause"), Transition("pause", "email")],
    )
    campaigns.create("prod", "later", "", waiting)
    key = campaigns.publish("prod", "later")[1]
    assert key is not None
    delivery = FakeDelivery()
    runner = runner_for(database, runs, A, delivery, max_runs=2)

    assert await runner.poll_once() == [key]
    await until(lambda: not runner.executing)
    run = runs.get(key)
    assert (run.state, run.lease_owner) == (RunState.WAITING, None)
    assert [t.state for t in run.tasks] == [TaskState.SUCCEEDED, TaskState.WAITING, TaskState.PENDING]
    assert run.scheduled_time == run.tasks[1].wake_time

    async with asyncio.timeout(30):  # a guard against a hang, not a speed requirement
        while not await runner.poll_once():
            await asyncio.sleep(0.05)
    await until(lambda: not runner.executing)

    run = runs.get(key)
    assert run.state == RunState.SUCCEEDED
    assert run.tasks[1].outputs == {"": 10}
    assert delivery.delivered == [f"k{n}" for n in range(1, 11)]
    assert campaigns.get("prod", "later").state == CampaignState.COMPLETED
