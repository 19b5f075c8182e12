"""Regression tests for the review of the scheduler's durable waits, on both backends: each test
pins one bug found in review."""

from __future__ import annotations

from datetime import UTC, datetime

from carillon.audience.v1 import query_pb2
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.lifecycle import Lifecycle
from scheduler_svc.model import (
    Activity,
    BuildAudience,
    CampaignState,
    Canvas,
    ChannelSend,
    RunKey,
    RunState,
    TaskState,
    Transition,
)
from scheduler_svc.runs import Lease, RunStore

A = Lease("replica-a", 60)
WAKE = datetime(2090, 1, 1, tzinfo=UTC)
AFTER_WAKE = datetime(2090, 1, 2, tzinfo=UTC)


def canvas() -> Canvas:
    return Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("email", kind=ChannelSend("email", "marketing", "templates/offer", 3, [])),
        ],
        transitions=[Transition("audience", "email")],
    )


def waiting_run(campaigns: CampaignStore, runs: RunStore) -> RunKey:
    """A published campaign whose run waits (a durable wait: no lease) until ``WAKE``."""
    campaigns.create("prod", "spring", "Spring", canvas())
    key = campaigns.publish("prod", "spring")[1]
    assert key is not None
    (claimed,) = runs.claim_due_runs(A, limit=1)
    assert claimed.run.key == key
    runs.finish_task(key, A, "audience")
    runs.wait_task(key, A, "email", WAKE)
    runs.suspend_run(key, A, WAKE)
    assert runs.get(key).state == RunState.WAITING
    return key


def test_stopping_a_campaign_cancels_its_waiting_run_so_it_never_wakes_to_send(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = waiting_run(campaigns, runs)

    stopped = Lifecycle(campaigns).stop("prod", "spring")

    assert stopped.state == CampaignState.STOPPED
    run = runs.get(key)
    assert run.state == RunState.CANCELLED
    assert [(t.activity, t.state) for t in run.tasks] == [
        ("audience", TaskState.SUCCEEDED),
        ("email", TaskState.SKIPPED),
    ]
    assert runs.claim_due_runs(A, limit=5, now=AFTER_WAKE) == []


def test_stopping_a_campaign_cancels_its_suspended_run_so_it_cannot_be_resumed_to_send(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    campaigns.create("prod", "spring", "Spring", canvas())
    key = campaigns.publish("prod", "spring")[1]
    assert key is not None
    runs.claim_due_runs(A, limit=1)
    runs.finish_task(key, A, "audience")
    runs.suspend_failed_run(key, A, "email", "the worker refused the batch")
    assert runs.get(key).state == RunState.SUSPENDED

    Lifecycle(campaigns).stop("prod", "spring")

    assert runs.get(key).state == RunState.CANCELLED
