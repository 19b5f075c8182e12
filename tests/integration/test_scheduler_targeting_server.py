"""The scheduler gRPC server with the targeting activities and channel options, on both backends:
a canvas with every targeting activity and a channel activity with a rate limit, send window and time
limit reads back as it was written, bad options are named, the send header carries them, and an
activity that asks for a confirmation waits for ConfirmActivity."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import duration_pb2

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import query_pb2, working_set_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.scheduler.v1 import campaign_pb2, run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon_chassis.values import to_value
from tests.integration.test_scheduler_server import META, ROWS, Scheduler, campaign, scheduler  # noqa: F401
from tests.rpc_errors import failure_of

Act = campaign_pb2.Activity
Tr = campaign_pb2.Transition
WINDOW = dlv.SendWindow(start_local_time="09:00", end_local_time="18:30", days_of_week=[1, 2, 3, 4, 5])


def targeting_canvas() -> campaign_pb2.Campaign:
    message = campaign()
    message.activities[0].build_audience.incremental.watermark.attribute = "signup_date"
    message.activities[1].channel.rate_limit_per_second = 250
    message.activities[1].channel.send_window.CopyFrom(WINDOW)
    message.activities[1].channel.time_limit.CopyFrom(duration_pb2.Duration(seconds=7200))
    gold = query_pb2.Filter(
        condition=query_pb2.Condition(attribute="tier", operator=query_pb2.OPERATOR_EQUAL, values=[to_value("gold")])
    )
    message.activities.extend(
        [
            Act(
                id="vip",
                read_audience=campaign_pb2.ReadAudienceActivity(
                    audience="audiences/vip", dimension="entities/customers"
                ),
            ),
            Act(
                id="both",
                combine=campaign_pb2.CombineActivity(
                    operation=aud.COMBINE_OPERATION_EXCLUSION, primary="vip", complement_output="excluded"
                ),
            ),
            Act(
                id="split",
                split=campaign_pb2.SplitActivity(
                    subsets=[
                        campaign_pb2.SplitSubsetActivity(
                            output="gold",
                            filter=gold,
                            limit=10,
                            order_by=[aud.SortKey(attribute="age", descending=True)],
                        ),
                        campaign_pb2.SplitSubsetActivity(output="some", limit_percent=12.5),
                    ],
                    complement_output="rest",
                    overlap=True,
                ),
            ),
            Act(
                id="dedup",
                deduplicate=campaign_pb2.DeduplicateActivity(
                    fields=["email"],
                    keep=2,
                    method=aud.DEDUPLICATION_METHOD_PRIORITY,
                    attribute="tier",
                    priority=[to_value("gold"), to_value("silver")],
                    removed_output="dupes",
                ),
            ),
            Act(
                id="save", save_audience=campaign_pb2.SaveAudienceActivity(audience_id="gold-vip", display_name="Gold")
            ),
            Act(
                id="bookings",
                change_dimension=campaign_pb2.ChangeDimensionActivity(link="bookings", dimension="entities/bookings"),
            ),
            Act(
                id="owners",
                reconcile=campaign_pb2.ReconcileActivity(
                    target="entities/customers",
                    pairs=[working_set_pb2.ReconciliationPair(source_attribute="customer_id", target_attribute="id")],
                    unreconciled_output="lost",
                ),
            ),
            *[Act(id=f"e{n}", end=campaign_pb2.EndActivity()) for n in range(1, 7)],
        ]
    )
    message.transitions.extend(
        [
            Tr(source="vip", target="both"),
            Tr(source="email", target="both"),
            Tr(source="both", target="split"),
            Tr(source="both", target="e1", output="excluded"),
            Tr(source="split", target="dedup", output="gold"),
            Tr(source="split", target="bookings", output="some"),
            Tr(source="split", target="e2", output="rest"),
            Tr(source="dedup", target="save"),
            Tr(source="dedup", target="e3", output="dupes"),
            Tr(source="save", target="e4"),
            Tr(source="bookings", target="owners"),
            Tr(source="owners", target="e5"),
            Tr(source="owners", target="e6", output="lost"),
        ]
    )
    return message


async def test_a_canvas_with_every_targeting_activity_and_channel_option_reads_back_as_written(
    scheduler: Scheduler,  # noqa: F811
) -> None:
    message = targeting_canvas()

    created = await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)
    got = await scheduler.stub.GetCampaign(sch.GetCampaignRequest(name=created.campaign.name), metadata=META)

    assert list(got.campaign.activities) == list(message.activities)
    assert list(got.campaign.transitions) == list(message.transitions)


async def test_bad_channel_options_and_an_unwired_output_are_named(scheduler: Scheduler) -> None:  # noqa: F811
    message = targeting_canvas()
    message.activities[1].channel.send_window.start_local_time = "9h"
    message.activities[1].channel.time_limit.CopyFrom(duration_pb2.Duration(nanos=5))
    del message.transitions[-1]  # the reconciliation's unreconciled output goes nowhere

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CANVAS",
        [
            "campaign.activities[1].channel.send_window.start_local_time",
            "campaign.activities[1].channel.time_limit",
            "campaign.activities[8]",
            "campaign.activities[14]",  # the end activity that lost its incoming transition
        ],
    )


async def test_the_send_header_carries_the_rate_limit_and_send_window(scheduler: Scheduler) -> None:  # noqa: F811
    message = campaign()
    message.activities[1].channel.rate_limit_per_second = 40
    message.activities[1].channel.send_window.CopyFrom(WINDOW)
    created = await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)
    published = await scheduler.stub.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=META
    )

    async with asyncio.timeout(60):  # a guard against a hang, not a speed requirement
        while not scheduler.peers.headers:
            await asyncio.sleep(0.05)

    header = scheduler.peers.headers[0]
    assert (header.run, header.rate_limit_per_second, header.send_window) == (published.run, 40, WINDOW)


async def run_state(scheduler: Scheduler, run: str, until: Callable[[run_pb2.Run], bool]) -> run_pb2.Run:  # noqa: F811
    async with asyncio.timeout(60):  # a guard against a hang, not a speed requirement
        while True:
            got = (await scheduler.stub.GetRun(sch.GetRunRequest(name=run), metadata=META)).run
            if until(got):
                return got
            await asyncio.sleep(0.05)


async def test_an_activity_waits_for_confirm_activity_before_sending(scheduler: Scheduler) -> None:  # noqa: F811
    message = campaign()
    message.activities[1].channel.confirm_before_sending = True
    created = await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)
    published = await scheduler.stub.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=META
    )

    waiting = await run_state(scheduler, published.run, lambda r: r.state == run_pb2.RUN_STATE_WAITING)
    assert (waiting.tasks[1].state, waiting.tasks[1].awaiting_confirmation) == (run_pb2.TASK_STATE_WAITING, True)
    assert scheduler.peers.received == []
    confirmed = await scheduler.stub.ConfirmActivity(
        sch.ConfirmActivityRequest(run=published.run, activity="email"), metadata=META
    )
    assert confirmed.task.awaiting_confirmation is False
    final = await run_state(scheduler, published.run, lambda r: r.state == run_pb2.RUN_STATE_SUCCEEDED)

    assert (final.tasks[1].sent, dict(final.tasks[1].skipped), len(scheduler.peers.received)) == (
        ROWS - 1,  # the fake worker skips one recipient
        {"NO_CONSENT": 1},
        ROWS,
    )
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await scheduler.stub.ConfirmActivity(
            sch.ConfirmActivityRequest(run=published.run, activity="email"), metadata=META
        )
    failure = failure_of(again.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_AWAITING_CONFIRMATION")


@pytest.mark.parametrize(
    ("run", "activity", "code", "reason"),
    [
        ("campaigns/x", "email", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME"),
        ("campaigns/x/runs/y", "Bad Id", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID"),
        ("campaigns/x/runs/y", "email", grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND"),
    ],
)
async def test_confirm_activity_names_what_is_wrong(
    scheduler: Scheduler,  # noqa: F811
    run: str,
    activity: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.ConfirmActivity(sch.ConfirmActivityRequest(run=run, activity=activity), metadata=META)

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason) == (code, reason)
