"""The scheduler's flows on the real stack (four servers, SMTP): test mode sends nothing, a durable
wait resumes and sends to everyone exactly once, and an illegal transition is refused."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from carillon.scheduler.v1 import campaign_pb2, run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon_cli.demo import BOOKINGS, CUSTOMERS, Demo, demo_campaign, expected_recipients, read_rows
from tests.e2e.conftest import Stack
from tests.rpc_errors import failure_of

FINAL = (
    run_pb2.RUN_STATE_SUCCEEDED,
    run_pb2.RUN_STATE_FAILED,
    run_pb2.RUN_STATE_CANCELLED,
    run_pb2.RUN_STATE_SUSPENDED,
)


async def prepared(stack: Stack) -> Demo:
    demo = Demo(stack.endpoints, sandbox="flows")
    await demo.ensure_entity("customers", CUSTOMERS)
    await demo.ensure_entity("bookings", BOOKINGS)
    await demo.ingest("customers", CUSTOMERS, read_rows("customers"))
    await demo.ingest("bookings", BOOKINGS, read_rows("bookings"))
    await demo.load_profiles()
    await demo.ensure_template()
    return demo


async def watch_to_end(demo: Demo, run: str) -> list[run_pb2.Run]:
    states: list[run_pb2.Run] = []
    async with asyncio.timeout(120):  # a guard against a hang, not a speed requirement
        while not states or states[-1].state not in FINAL:
            async for event in demo.campaigns.WatchRun(sch.WatchRunRequest(name=run), metadata=demo.metadata):
                states.append(event.run)
    return states


def audience_size() -> int:
    return len(
        [c for c in read_rows("customers") if c["loyalty_tier"] in ("gold", "platinum") and c["country"] != "US"]
    )


async def test_a_test_mode_run_reports_who_would_be_sent_and_sends_nothing(stack: Stack) -> None:
    demo = await prepared(stack)
    try:
        created = await demo.campaigns.CreateCampaign(
            sch.CreateCampaignRequest(campaign=demo_campaign(), request_id="flows-test"), metadata=demo.metadata
        )
        tested = await demo.campaigns.TestCampaign(
            sch.TestCampaignRequest(name=created.campaign.name, request_id="t1"), metadata=demo.metadata
        )
        final = (await watch_to_end(demo, tested.run))[-1]
        await demo.campaigns.PublishCampaign(
            sch.PublishCampaignRequest(name=created.campaign.name), metadata=demo.metadata
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await demo.campaigns.TestCampaign(
                sch.TestCampaignRequest(name=created.campaign.name), metadata=demo.metadata
            )
    finally:
        await demo.close()

    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.error
    email = final.tasks[1]
    assert (email.targeted, email.sent, email.checkpoint) == (audience_size(), 0, 0)
    assert stack.smtp.recipients() == []
    failure = failure_of(caught.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ILLEGAL_TRANSITION")


async def test_a_durable_wait_suspends_the_run_then_everyone_is_emailed_exactly_once(stack: Stack) -> None:
    campaign = demo_campaign()
    campaign.activities.insert(1, campaign_pb2.Activity(id="pause", wait=campaign_pb2.WaitActivity()))
    campaign.activities[1].wait.duration.FromMilliseconds(1000)
    del campaign.transitions[:]
    campaign.transitions.extend(
        [
            campaign_pb2.Transition(source="audience", target="pause"),
            campaign_pb2.Transition(source="pause", target="email"),
        ]
    )
    demo = await prepared(stack)
    try:
        created = await demo.campaigns.CreateCampaign(
            sch.CreateCampaignRequest(campaign=campaign, request_id="flows-wait"), metadata=demo.metadata
        )
        published = await demo.campaigns.PublishCampaign(
            sch.PublishCampaignRequest(name=created.campaign.name), metadata=demo.metadata
        )
        states = await watch_to_end(demo, published.run)
    finally:
        await demo.close()

    final = states[-1]
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.error
    assert run_pb2.RUN_STATE_WAITING in [s.state for s in states]
    assert Counter(stack.smtp.recipients()) == Counter(expected_recipients())
    assert [(t.source, t.target, t.count) for t in final.transitions] == [
        ("audience", "pause", audience_size()),
        ("pause", "email", audience_size()),
    ]
