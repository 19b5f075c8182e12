"""Targeting outputs, deferred batches and the purge of archived campaigns on the real run store,
on SQLite and PostgreSQL: a split's working sets per output, a channel activity waiting for its send
window (durable timer) and then sending its deferred recipients exactly once, the time limit, and the
periodic purge of campaigns archived longer ago than the retention period."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from carillon.audience.v1 import query_pb2
from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import FailedPrecondition
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.engine import TIME_LIMIT_EXCEEDED, Engine, EngineOptions
from scheduler_svc.lifecycle import Lifecycle
from scheduler_svc.model import (
    Ack,
    Activity,
    BuildAudience,
    Canvas,
    ChannelSend,
    End,
    RunKey,
    RunState,
    SendWindow,
    Split,
    SplitSubset,
    TaskState,
    Transition,
)
from scheduler_svc.runner import Runner, StoreJournal
from scheduler_svc.runs import Lease, RunStore
from scheduler_svc.tables import RUN_LOGS, RUN_TASKS, RUNS
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery

A = Lease("replica-a", 60)
WINDOW = SendWindow("09:00", "17:00")


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


def build() -> Activity:
    return Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers")))


def publish(campaigns: CampaignStore, canvas: Canvas, campaign_id: str = "spring") -> RunKey:
    campaigns.create("prod", campaign_id, "", canvas)
    key = campaigns.publish("prod", campaign_id)[1]
    assert key is not None
    return key


def windowed(time_limit_s: int = 0) -> Canvas:
    channel = ChannelSend("email", "marketing", "templates/offer", 2, [], send_window=WINDOW, time_limit_s=time_limit_s)
    return Canvas(activities=[build(), Activity("email", kind=channel)], transitions=[Transition("audience", "email")])


async def test_a_split_stores_the_working_set_and_count_of_each_output(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    canvas = Canvas(
        activities=[
            build(),
            Activity("split", kind=Split([SplitSubset("first", limit=3)], complement_output="rest")),
            Activity("email", kind=ChannelSend("email", "marketing", "templates/offer", 2, [])),
            Activity("done", kind=End()),
        ],
        transitions=[
            Transition("audience", "split"),
            Transition("split", "email", "first"),
            Transition("split", "done", "rest"),
        ],
    )
    key = publish(campaigns, canvas)
    (claimed,) = runs.claim_due_runs(A, limit=5)
    delivery = FakeDelivery()
    engine = Engine(FakeAudience(size=8), {"email": delivery}, StoreJournal(database, runs, A), EngineOptions())

    assert await engine.execute(claimed) == RunState.SUCCEEDED

    run = runs.get(key)
    split = run.tasks[1]
    assert (split.state, split.outputs, split.output_working_sets) == (
        TaskState.SUCCEEDED,
        {"first": 3, "rest": 5},
        {"first": "workingSets/split--first", "rest": "workingSets/split--rest"},
    )
    assert delivery.delivered == ["k1", "k2", "k3"]
    assert [(t.output, t.count) for t in run.transitions] == [("", 8), ("first", 3), ("rest", 5)]


async def test_deferred_recipients_wait_durably_for_the_window_then_are_sent_once(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    clock = Clock()
    opens = clock.now + timedelta(hours=1)
    key = publish(campaigns, windowed())
    delivery = FakeDelivery(window_opens=opens, outside={"p2@example.com", "p5@example.com"}, clock=clock)
    engine = Engine(FakeAudience(size=6), {"email": delivery}, StoreJournal(database, runs, A), clock=clock)
    (first,) = runs.claim_due_runs(A, limit=5)

    assert await engine.execute(first) == RunState.WAITING
    waiting = runs.get(key)
    assert (waiting.state, waiting.scheduled_time, waiting.lease_owner) == (RunState.WAITING, opens, None)
    email = waiting.tasks[1]
    assert (email.state, email.wake_time, email.sent, email.deferred, email.checkpoint) == (
        TaskState.WAITING,
        opens,
        4,
        2,
        6,
    )
    assert runs.claim_due_runs(A, limit=5, now=opens - timedelta(seconds=1)) == []

    clock.now = opens
    (second,) = runs.claim_due_runs(A, limit=5, now=opens)
    assert await engine.execute(second) == RunState.SUCCEEDED

    email = runs.get(key).tasks[1]
    assert (email.state, email.sent, email.already_sent, email.skipped, email.deferred, email.deferred_batches) == (
        TaskState.SUCCEEDED,
        6,
        0,
        {},
        0,
        [],
    )
    assert sorted(delivery.delivered) == ["k1", "k2", "k3", "k4", "k5", "k6"]


async def test_recipients_deferred_past_the_time_limit_are_excluded_and_counted(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    clock = Clock()
    key = publish(campaigns, windowed(time_limit_s=600))
    delivery = FakeDelivery(
        window_opens=clock.now + timedelta(hours=2), outside={"p1@example.com", "p3@example.com"}, clock=clock
    )
    (claimed,) = runs.claim_due_runs(A, limit=5)

    engine = Engine(FakeAudience(size=4), {"email": delivery}, StoreJournal(database, runs, A), clock=clock)
    assert await engine.execute(claimed) == RunState.SUCCEEDED

    email = runs.get(key).tasks[1]
    assert (email.sent, email.skipped, email.deferred) == (2, {TIME_LIMIT_EXCEEDED: 2}, 0)


def test_a_replayed_batch_replaces_its_skip_counts_and_adds_what_it_sent(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns, windowed())
    runs.claim_due_runs(A, limit=5)
    first = Ack(sequence=4, sent=1, skipped={"NO_CONSENT": 1}, deferred=2, next_window_time=utcnow())
    runs.record_ack(key, A, "email", first, after=0)

    assert runs.record_replay(key, A, "email", Ack(sequence=4, sent=1, already_sent=1, skipped={"NO_CONSENT": 2}))
    assert not runs.record_replay(key, A, "email", Ack(sequence=9, sent=5))

    email = runs.get(key).tasks[1]
    assert (email.sent, email.already_sent, email.skipped, email.deferred, email.deferred_batches) == (
        2,
        0,
        {"NO_CONSENT": 2},
        0,
        [],
    )


# -- purge ----------------------------------------------------------------------------------------
def archived(campaigns: CampaignStore, lifecycle: Lifecycle, campaign_id: str) -> RunKey:
    key = publish(campaigns, windowed(), campaign_id)
    lifecycle.stop("prod", campaign_id)
    lifecycle.archive("prod", campaign_id)
    return key


def rows_of(database: Database, campaign_id: str) -> list[int]:
    with database.engine.connect() as conn:
        return [
            conn.execute(sa.select(sa.func.count()).select_from(t).where(t.c.campaign_id == campaign_id)).scalar_one()
            for t in (RUNS, RUN_TASKS, RUN_LOGS)
        ]


def test_campaigns_archived_longer_ago_than_the_retention_are_deleted_with_their_runs(
    database: Database, campaigns: CampaignStore
) -> None:
    lifecycle = Lifecycle(campaigns)
    archived(campaigns, lifecycle, "old")
    publish(campaigns, windowed(), "live")
    assert rows_of(database, "old")[:2] == [1, 2]

    purged = lifecycle.purge_archived(timedelta(days=90), now=utcnow() + timedelta(days=91))

    assert purged == ["prod/campaigns/old"]
    assert [c.campaign_id for c in campaigns.list_campaigns("prod")[0]] == ["live"]
    assert rows_of(database, "old") == [0, 0, 0]
    assert rows_of(database, "live")[:2] == [1, 2]


def test_a_campaign_archived_within_the_retention_is_kept(database: Database, campaigns: CampaignStore) -> None:
    lifecycle = Lifecycle(campaigns)
    archived(campaigns, lifecycle, "recent")

    assert lifecycle.purge_archived(timedelta(days=90), now=utcnow() + timedelta(days=89)) == []
    assert [c.campaign_id for c in campaigns.list_campaigns("prod")[0]] == ["recent"]


async def test_the_runner_sweep_purges_with_a_short_retention(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    lifecycle = Lifecycle(campaigns)
    archived(campaigns, lifecycle, "gone")
    runner = Runner(
        database=database,
        runs=runs,
        engine=Engine(FakeAudience(), {}, StoreJournal(database, runs, A)),
        lease=A,
        poll_interval_s=1,
        max_concurrent_runs=1,
        lifecycle=lifecycle,
        archived_retention=timedelta(microseconds=1),
    )

    assert await runner.purge_once() == ["prod/campaigns/gone"]
    assert campaigns.list_campaigns("prod")[0] == []


def test_a_confirmation_given_while_the_run_executes_makes_it_due_when_it_suspends(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns, windowed())
    runs.claim_due_runs(A, limit=5)
    far = utcnow() + timedelta(hours=12)
    runs.await_confirmation(key, A, "email", far)

    confirmed = runs.confirm(key, "email")
    runs.suspend_run(key, A, far)  # the execution ends with the deadline it knew

    run = runs.get(key)
    assert (confirmed.confirmation, run.state) == ("confirmed", RunState.WAITING)
    assert run.scheduled_time == confirmed.wake_time and run.scheduled_time < far


def test_a_confirmation_after_the_time_limit_is_refused_and_changes_nothing(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns, windowed())
    runs.claim_due_runs(A, limit=5)
    deadline = utcnow() - timedelta(minutes=1)  # passed, and no replica has picked the run up yet
    runs.await_confirmation(key, A, "email", deadline)

    with pytest.raises(FailedPrecondition) as refused:
        runs.confirm(key, "email")

    assert refused.value.reason == "CONFIRMATION_EXPIRED"
    email = runs.get(key).tasks[1]
    assert (email.confirmation, email.state, email.wake_time) == ("awaiting", TaskState.WAITING, deadline)


def test_recipients_sent_by_a_replay_whose_acknowledgement_was_lost_are_counted_once_as_already_sent(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish(campaigns, windowed())
    runs.claim_due_runs(A, limit=5)
    first = Ack(sequence=4, sent=1, skipped={"NO_CONSENT": 1}, deferred=4, next_window_time=utcnow())
    runs.record_ack(key, A, "email", first, after=0)
    # A replay sent 3 of the 4 deferred recipients, then the scheduler crashed before recording it;
    # the next replay finds them in the ledger and sends the last one.
    assert runs.record_replay(key, A, "email", Ack(sequence=4, sent=1, already_sent=4, skipped={"NO_CONSENT": 1}))

    email = runs.get(key).tasks[1]
    assert (email.sent, email.already_sent, email.skipped, email.deferred) == (2, 3, {"NO_CONSENT": 1}, 0)
    assert email.sent + email.already_sent + sum(email.skipped.values()) + email.deferred == 6
