"""Recurring campaigns on both backends: first run at publish, one run per launch time across replicas,
missed launch times rolled over, completion at the end of the validity window, and PreviewSchedule."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from carillon.audience.v1 import query_pb2
from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import FailedPrecondition, InvalidArgument
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.model import (
    Activity,
    BuildAudience,
    CampaignState,
    Canvas,
    ChannelSend,
    Daily,
    Interval,
    LocalTime,
    RunState,
    Schedule,
    Transition,
)
from scheduler_svc.runner import Runner, StoreJournal
from scheduler_svc.runs import Lease, RunStore
from scheduler_svc.tables import RUNS
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery

A = Lease("replica-a", 60)
GRACE_S = 300.0


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def canvas(schedule: Schedule) -> Canvas:
    return Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("email", kind=ChannelSend("email", "marketing", "templates/offer", 3, [])),
        ],
        transitions=[Transition("audience", "email")],
        schedule=schedule,
    )


DAILY_9_STOCKHOLM = Schedule(time_zone="Europe/Stockholm", recurrence=Daily(times=[LocalTime(9, 0)]))


def slots_of(database: Database, campaign_id: str) -> list[datetime]:
    with database.engine.connect() as conn:
        values = conn.execute(
            sa.select(RUNS.c.scheduled_time).where(RUNS.c.campaign_id == campaign_id).order_by(RUNS.c.scheduled_time)
        ).scalars()
        return [v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC) for v in values]


def test_publishing_a_recurring_campaign_schedules_its_first_launch_and_shows_the_next(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    campaigns.create("prod", "daily", "", canvas(DAILY_9_STOCKHOLM))

    campaign, key = campaigns.publish("prod", "daily", now=utc(2024, 3, 30, 12))

    assert runs.get(key).scheduled_time == utc(2024, 3, 31, 7)  # 09:00 CEST, the day DST starts
    assert campaign.next_run_time == utc(2024, 4, 1, 7)
    assert campaigns.get("prod", "daily").next_run_time == utc(2024, 4, 1, 7)


def test_a_due_launch_time_gets_one_run_and_the_next_launch_time_moves_on(
    database: Database, campaigns: CampaignStore
) -> None:
    campaigns.create("prod", "daily", "", canvas(DAILY_9_STOCKHOLM))
    campaigns.publish("prod", "daily", now=utc(2024, 3, 30, 12))

    assert campaigns.create_due_runs(GRACE_S, now=utc(2024, 4, 1, 6, 59)) == []
    assert len(campaigns.create_due_runs(GRACE_S, now=utc(2024, 4, 1, 7, 0))) == 1
    assert campaigns.create_due_runs(GRACE_S, now=utc(2024, 4, 1, 7, 1)) == []

    assert slots_of(database, "daily") == [utc(2024, 3, 31, 7), utc(2024, 4, 1, 7)]
    assert campaigns.get("prod", "daily").next_run_time == utc(2024, 4, 2, 7)


def test_two_replicas_creating_due_runs_at_once_create_one_run_per_launch_time(
    database: Database, campaigns: CampaignStore
) -> None:
    every_15 = Schedule(recurrence=Interval(minutes=15))
    for i in range(20):
        campaigns.create("prod", f"c{i}", "", canvas(every_15))
        campaigns.publish("prod", f"c{i}", now=utc(2024, 5, 1, 8, 1))
    replicas = [CampaignStore(database), CampaignStore(database)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        created = list(pool.map(lambda store: store.create_due_runs(GRACE_S, now=utc(2024, 5, 1, 8, 30)), replicas))

    assert sum(len(c) for c in created) == 20
    for i in range(20):
        assert slots_of(database, f"c{i}") == [utc(2024, 5, 1, 8, 15), utc(2024, 5, 1, 8, 30)]


def test_a_launch_time_missed_during_an_outage_rolls_over_to_the_next_one_without_catch_up_runs(
    database: Database, campaigns: CampaignStore
) -> None:
    campaigns.create("prod", "daily", "", canvas(DAILY_9_STOCKHOLM))
    campaigns.publish("prod", "daily", now=utc(2024, 3, 30, 12))

    # The scheduler was down from 1 April until 4 April 12:00: three launch times passed.
    assert campaigns.create_due_runs(GRACE_S, now=utc(2024, 4, 4, 12)) == []
    assert campaigns.get("prod", "daily").next_run_time == utc(2024, 4, 5, 7)
    assert len(campaigns.create_due_runs(GRACE_S, now=utc(2024, 4, 5, 7, 2))) == 1

    assert slots_of(database, "daily") == [utc(2024, 3, 31, 7), utc(2024, 4, 5, 7)]


def test_a_recurring_campaign_completes_when_its_last_launch_times_run_has_ended(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    schedule = Schedule(recurrence=Daily(times=[LocalTime(9, 0)]), valid_until=utc(2024, 1, 2, 12))
    campaigns.create("prod", "short", "", canvas(schedule))
    _, first = campaigns.publish("prod", "short", now=utc(2024, 1, 1, 8))
    (second,) = campaigns.create_due_runs(GRACE_S, now=utc(2024, 1, 2, 9))
    assert campaigns.get("prod", "short").next_run_time is None

    for key, now in ((first, utc(2024, 1, 1, 9)), (second, utc(2024, 1, 2, 9))):
        assert runs.claim_due_runs(A, limit=1, now=now)[0].run.key == key
        assert campaigns.get("prod", "short").state == CampaignState.LIVE
        runs.succeed_run(key, A)

    assert campaigns.get("prod", "short").state == CampaignState.COMPLETED


def test_a_campaign_whose_validity_window_has_passed_cannot_be_published(campaigns: CampaignStore) -> None:
    schedule = Schedule(recurrence=Daily(times=[LocalTime(9, 0)]), valid_until=utc(2024, 1, 2))
    campaigns.create("prod", "late", "", canvas(schedule))

    with pytest.raises(FailedPrecondition) as caught:
        campaigns.publish("prod", "late", now=utc(2024, 2, 1))

    assert caught.value.reason == "SCHEDULE_EXHAUSTED"
    assert campaigns.get("prod", "late").state == CampaignState.DRAFT


def test_preview_lists_the_next_launch_times_of_a_stored_or_given_schedule(campaigns: CampaignStore) -> None:
    campaigns.create("prod", "daily", "", canvas(DAILY_9_STOCKHOLM))

    stored = campaigns.preview_schedule("prod", "daily", None, 3, utc(2024, 3, 30, 12))
    given = campaigns.preview_schedule("prod", "", DAILY_9_STOCKHOLM, 3, utc(2024, 3, 30, 12))

    assert stored == given == [utc(2024, 3, 31, 7), utc(2024, 4, 1, 7), utc(2024, 4, 2, 7)]


def test_preview_of_an_invalid_schedule_names_the_field(campaigns: CampaignStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        campaigns.preview_schedule("prod", "", Schedule(recurrence=Interval(minutes=1)), 3)

    assert caught.value.reason == "INVALID_SCHEDULE"
    assert [v.field for v in caught.value.violations] == ["schedule.interval.interval_minutes"]


async def test_the_runner_creates_and_executes_the_run_of_a_due_recurring_campaign(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    now = utcnow()
    campaigns.create("prod", "often", "", canvas(Schedule(recurrence=Interval(minutes=15))))
    # Published 30 minutes ago: its first run (within 15 minutes after that) and its next launch
    # time (15 minutes later, so at the latest now) are both due.
    _, first = campaigns.publish("prod", "often", now=now - timedelta(minutes=30))
    due = campaigns.get("prod", "often").next_run_time
    assert due is not None and due <= now
    engine = Engine(FakeAudience(size=4), {"email": FakeDelivery()}, StoreJournal(database, runs, A), EngineOptions())
    runner = Runner(
        database=database,
        runs=runs,
        engine=engine,
        lease=A,
        poll_interval_s=0.05,
        max_concurrent_runs=4,
        campaigns=campaigns,
        misfire_grace_s=3600,
    )

    claimed = await runner.poll_once()
    async with asyncio.timeout(30):  # a guard against a hang, not a speed requirement
        while runner.executing:
            await asyncio.sleep(0.01)

    assert len(claimed) == 2 and first in claimed
    assert sorted(runs.get(key).scheduled_time for key in claimed) == slots_of(database, "often")
    assert slots_of(database, "often")[1] == due
    assert all(runs.get(key).state == RunState.SUCCEEDED for key in claimed)
    assert campaigns.get("prod", "often").next_run_time == due + timedelta(minutes=15)
