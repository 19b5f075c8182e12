"""A channel activity with a send window on the real stack (four servers, SMTP), on SQLite and
PostgreSQL: the window is closed when the run starts and opens a few seconds later (chosen from the
current UTC time), so the delivery worker defers every eligible recipient; the run waits on a durable
timer and, once the window is open, the scheduler sends the deferred batches again: everyone gets
exactly one email and the counts add up."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.scheduler.v1 import run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon_cli.demo import demo_campaign, expected_recipients
from tests.e2e.conftest import Stack
from tests.e2e.test_scheduler_flows import audience_size, prepared, watch_to_end


def window_opening_soon() -> dlv.SendWindow:
    """A UTC window that opens at the start of the next minute (at least 8 seconds away) for ten minutes."""
    now = datetime.now(UTC)
    opens = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if opens - now < timedelta(seconds=8):
        opens += timedelta(minutes=1)
    closes = opens + timedelta(minutes=10)
    return dlv.SendWindow(
        start_local_time=opens.strftime("%H:%M"), end_local_time=closes.strftime("%H:%M"), default_time_zone="UTC"
    )


async def test_recipients_outside_the_send_window_are_emailed_once_it_opens(stack: Stack) -> None:
    campaign = demo_campaign()
    campaign.activities[1].channel.send_window.CopyFrom(window_opening_soon())
    campaign.activities[1].channel.rate_limit_per_second = 500
    demo = await prepared(stack)
    try:
        created = await demo.campaigns.CreateCampaign(
            sch.CreateCampaignRequest(campaign=campaign, request_id="window"), metadata=demo.metadata
        )
        published = await demo.campaigns.PublishCampaign(
            sch.PublishCampaignRequest(name=created.campaign.name), metadata=demo.metadata
        )
        states = await watch_to_end(demo, published.run)
    finally:
        await demo.close()

    recipients = expected_recipients()
    waiting = [s.tasks[1] for s in states if s.state == run_pb2.RUN_STATE_WAITING]
    assert waiting and (waiting[-1].state, waiting[-1].sent, waiting[-1].deferred) == (
        run_pb2.TASK_STATE_WAITING,
        0,
        len(recipients),
    )
    final = states[-1]
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.error
    email = final.tasks[1]
    skipped = sum(email.skipped.values())
    assert (email.targeted, email.sent, email.already_sent, email.deferred) == (
        audience_size(),
        len(recipients),
        0,
        0,
    )
    assert email.sent + skipped == audience_size()
    assert Counter(stack.smtp.recipients()) == Counter(recipients)
