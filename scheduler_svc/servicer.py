"""The CampaignService servicer: translates protobuf requests to store calls and results back.

No SQL and no outbound calls here: the campaign and run stores do the work on the database worker
pool, in the caller's sandbox. Output-only fields of a request's campaign (name, state, times) are
ignored.
"""

from __future__ import annotations

from typing import cast

import grpc

from carillon.scheduler.v1 import campaign_pb2, run_pb2, scheduler_service_pb2, scheduler_service_pb2_grpc
from carillon.type.v1 import channel_pb2
from carillon_chassis.channels import category_name, category_value, channel_name, channel_value
from carillon_chassis.names import parse_name
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.values import from_timestamp, to_timestamp
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.model import (
    Activity,
    ActivityKind,
    BuildAudience,
    Campaign,
    CampaignState,
    Canvas,
    ChannelSend,
    Run,
    RunKey,
    RunState,
    Schedule,
    Task,
    TaskState,
    Transition,
)
from scheduler_svc.runs import RunStore

_CAMPAIGN_STATES = {
    CampaignState.DRAFT: campaign_pb2.CAMPAIGN_STATE_DRAFT,
    CampaignState.SCHEDULED: campaign_pb2.CAMPAIGN_STATE_SCHEDULED,
    CampaignState.LIVE: campaign_pb2.CAMPAIGN_STATE_LIVE,
    CampaignState.COMPLETED: campaign_pb2.CAMPAIGN_STATE_COMPLETED,
    CampaignState.STOPPED: campaign_pb2.CAMPAIGN_STATE_STOPPED,
}
_RUN_STATES = {
    RunState.PENDING: run_pb2.RUN_STATE_PENDING,
    RunState.RUNNING: run_pb2.RUN_STATE_RUNNING,
    RunState.SUCCEEDED: run_pb2.RUN_STATE_SUCCEEDED,
    RunState.FAILED: run_pb2.RUN_STATE_FAILED,
}
_TASK_STATES = {
    TaskState.PENDING: run_pb2.TASK_STATE_PENDING,
    TaskState.RUNNING: run_pb2.TASK_STATE_RUNNING,
    TaskState.SUCCEEDED: run_pb2.TASK_STATE_SUCCEEDED,
    TaskState.FAILED: run_pb2.TASK_STATE_FAILED,
    TaskState.SKIPPED: run_pb2.TASK_STATE_SKIPPED,
}


def canvas_from_proto(message: campaign_pb2.Campaign) -> Canvas:
    """The domain canvas of a Campaign message's activities, transitions and schedule."""
    activities = []
    for item in message.activities:
        which = item.WhichOneof("kind")
        kind: ActivityKind | None = None
        if which == "build_audience":
            kind = BuildAudience(query=item.build_audience.query)
        elif which == "channel":
            c = item.channel
            kind = ChannelSend(
                channel=channel_name(c.channel),
                category=category_name(c.category),
                template=c.template,
                batch_size=c.batch_size,
                target_attributes=list(c.target_attributes),
            )
        activities.append(Activity(id=item.id, display_name=item.display_name, kind=kind))
    once = message.schedule.once
    start = from_timestamp(once.start_time) if once.HasField("start_time") else None
    return Canvas(
        activities=activities,
        transitions=[Transition(t.source, t.target) for t in message.transitions],
        schedule=Schedule(start_time=start, time_zone=message.schedule.time_zone),
    )


def campaign_to_proto(campaign: Campaign) -> campaign_pb2.Campaign:
    """The Campaign message of a domain campaign."""
    canvas = campaign.canvas
    message = campaign_pb2.Campaign(
        name=campaign.name,
        display_name=campaign.display_name,
        state=_CAMPAIGN_STATES[campaign.state],
        transitions=[campaign_pb2.Transition(source=t.source, target=t.target) for t in canvas.transitions],
        create_time=to_timestamp(campaign.create_time),
        update_time=to_timestamp(campaign.update_time),
    )
    for activity in canvas.activities:
        item = message.activities.add(id=activity.id, display_name=activity.display_name)
        kind = activity.kind
        if isinstance(kind, BuildAudience):
            item.build_audience.query.CopyFrom(kind.query)
        elif isinstance(kind, ChannelSend):
            item.channel.CopyFrom(
                campaign_pb2.ChannelActivity(
                    channel=cast(channel_pb2.Channel.ValueType, channel_value(kind.channel)),
                    category=cast(channel_pb2.MessageCategory.ValueType, category_value(kind.category)),
                    template=kind.template,
                    batch_size=kind.batch_size,
                    target_attributes=kind.target_attributes,
                )
            )
    message.schedule.once.SetInParent()
    if canvas.schedule.start_time is not None:
        message.schedule.once.start_time.CopyFrom(to_timestamp(canvas.schedule.start_time))
    message.schedule.time_zone = canvas.schedule.time_zone
    if campaign.publish_time is not None:
        message.publish_time.CopyFrom(to_timestamp(campaign.publish_time))
    return message


def task_to_proto(task: Task) -> run_pb2.ActivityTask:
    """The ActivityTask message of a domain task."""
    message = run_pb2.ActivityTask(
        activity=task.activity,
        state=_TASK_STATES[task.state],
        targeted=task.targeted,
        sent=task.sent,
        already_sent=task.already_sent,
        skipped=task.skipped,
        failed=task.failed,
        working_set=task.working_set,
        checkpoint=task.checkpoint,
        message=task.message,
    )
    if task.start_time is not None:
        message.start_time.CopyFrom(to_timestamp(task.start_time))
    if task.end_time is not None:
        message.end_time.CopyFrom(to_timestamp(task.end_time))
    return message


def run_to_proto(run: Run) -> run_pb2.Run:
    """The Run message of a domain run."""
    message = run_pb2.Run(
        name=run.key.name,
        state=_RUN_STATES[run.state],
        tasks=[task_to_proto(t) for t in run.tasks],
        scheduled_time=to_timestamp(run.scheduled_time),
        error=run.error,
    )
    if run.start_time is not None:
        message.start_time.CopyFrom(to_timestamp(run.start_time))
    if run.end_time is not None:
        message.end_time.CopyFrom(to_timestamp(run.end_time))
    return message


class CampaignServicer(scheduler_service_pb2_grpc.CampaignServiceServicer):
    """CampaignService over the campaign and run stores."""

    def __init__(self, campaigns: CampaignStore, runs: RunStore) -> None:
        self.campaigns = campaigns
        self.runs = runs
        self.database = campaigns.database

    async def CreateCampaign(
        self, request: scheduler_service_pb2.CreateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.CreateCampaignResponse:
        campaign = await self.database.run(
            self.campaigns.create,
            current_sandbox(),
            request.campaign_id,
            request.campaign.display_name,
            canvas_from_proto(request.campaign),
            request.request_id,
        )
        return scheduler_service_pb2.CreateCampaignResponse(campaign=campaign_to_proto(campaign))

    async def GetCampaign(
        self, request: scheduler_service_pb2.GetCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.GetCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        campaign = await self.database.run(self.campaigns.get, current_sandbox(), campaign_id)
        return scheduler_service_pb2.GetCampaignResponse(campaign=campaign_to_proto(campaign))

    async def ListCampaigns(
        self, request: scheduler_service_pb2.ListCampaignsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.ListCampaignsResponse:
        campaigns, token = await self.database.run(
            self.campaigns.list_campaigns, current_sandbox(), request.page_size, request.page_token
        )
        return scheduler_service_pb2.ListCampaignsResponse(
            campaigns=[campaign_to_proto(c) for c in campaigns], next_page_token=token
        )

    async def PublishCampaign(
        self, request: scheduler_service_pb2.PublishCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.PublishCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        campaign, run = await self.database.run(self.campaigns.publish, current_sandbox(), campaign_id)
        return scheduler_service_pb2.PublishCampaignResponse(campaign=campaign_to_proto(campaign), run=run.name)

    async def GetRun(
        self, request: scheduler_service_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.GetRunResponse:
        campaign_id, run_id = parse_name(request.name, "campaigns", "runs")
        run = await self.database.run(self.runs.get, RunKey(current_sandbox(), campaign_id, run_id))
        return scheduler_service_pb2.GetRunResponse(run=run_to_proto(run))

    async def ListRuns(
        self, request: scheduler_service_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.ListRunsResponse:
        (campaign_id,) = parse_name(request.parent, "campaigns", field="parent")
        runs, token = await self.database.run(
            self.runs.list_runs, current_sandbox(), campaign_id, request.page_size, request.page_token
        )
        return scheduler_service_pb2.ListRunsResponse(runs=[run_to_proto(r) for r in runs], next_page_token=token)
