"""The CampaignService servicer: translates protobuf requests to store calls and results back.

No SQL and no outbound calls here: the campaign and run stores do the work on the database worker
pool, in the caller's sandbox. Output-only fields of a request's campaign (name, state, times) are
ignored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import cast

import grpc

from carillon.audience.v1 import audience_service_pb2, working_set_pb2
from carillon.delivery.v1 import delivery_service_pb2
from carillon.scheduler.v1 import campaign_pb2, run_pb2, scheduler_service_pb2, scheduler_service_pb2_grpc
from carillon.type.v1 import channel_pb2
from carillon_chassis.channels import category_name, category_value, channel_name, channel_value
from carillon_chassis.names import parse_name, validate_id
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.values import from_timestamp, to_timestamp
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.lifecycle import Lifecycle
from scheduler_svc.model import (
    Activity,
    ActivityKind,
    Branch,
    BranchTest,
    BuildAudience,
    Campaign,
    CampaignState,
    Canvas,
    ChangeDimension,
    ChannelSend,
    Combine,
    Condition,
    Daily,
    Deduplicate,
    End,
    Enrich,
    Fork,
    Interval,
    Join,
    LocalTime,
    LogEntry,
    LogLevel,
    Monthly,
    ReadAudience,
    Reconcile,
    Recurrence,
    Run,
    RunKey,
    RunState,
    RunTrigger,
    SaveAudience,
    Schedule,
    SendWindow,
    Split,
    SplitSubset,
    Task,
    TaskState,
    Transition,
    Wait,
    Weekly,
)
from scheduler_svc.runs import RunStore
from scheduler_svc.watch import watch_run

_CAMPAIGN_STATES = {
    CampaignState.DRAFT: campaign_pb2.CAMPAIGN_STATE_DRAFT,
    CampaignState.SCHEDULED: campaign_pb2.CAMPAIGN_STATE_SCHEDULED,
    CampaignState.LIVE: campaign_pb2.CAMPAIGN_STATE_LIVE,
    CampaignState.COMPLETED: campaign_pb2.CAMPAIGN_STATE_COMPLETED,
    CampaignState.STOPPED: campaign_pb2.CAMPAIGN_STATE_STOPPED,
    CampaignState.CLOSED: campaign_pb2.CAMPAIGN_STATE_CLOSED,
    CampaignState.ARCHIVED: campaign_pb2.CAMPAIGN_STATE_ARCHIVED,
}
_RUN_STATES = {
    RunState.PENDING: run_pb2.RUN_STATE_PENDING,
    RunState.RUNNING: run_pb2.RUN_STATE_RUNNING,
    RunState.SUCCEEDED: run_pb2.RUN_STATE_SUCCEEDED,
    RunState.FAILED: run_pb2.RUN_STATE_FAILED,
    RunState.CANCELLED: run_pb2.RUN_STATE_CANCELLED,
    RunState.WAITING: run_pb2.RUN_STATE_WAITING,
    RunState.SUSPENDED: run_pb2.RUN_STATE_SUSPENDED,
}
_ERROR_HANDLINGS = {
    campaign_pb2.ERROR_HANDLING_UNSPECIFIED: "abort",
    campaign_pb2.ERROR_HANDLING_ABORT: "abort",
    campaign_pb2.ERROR_HANDLING_IGNORE: "ignore",
    campaign_pb2.ERROR_HANDLING_SUSPEND: "suspend",
}
_ERROR_HANDLING_VALUES = {
    "abort": campaign_pb2.ERROR_HANDLING_ABORT,
    "ignore": campaign_pb2.ERROR_HANDLING_IGNORE,
    "suspend": campaign_pb2.ERROR_HANDLING_SUSPEND,
}
_LOG_LEVELS = {
    LogLevel.INFO: run_pb2.RUN_LOG_LEVEL_INFO,
    LogLevel.WARNING: run_pb2.RUN_LOG_LEVEL_WARNING,
    LogLevel.ERROR: run_pb2.RUN_LOG_LEVEL_ERROR,
}
_RUN_TRIGGERS = {
    RunTrigger.SCHEDULE: run_pb2.RUN_TRIGGER_SCHEDULE,
    RunTrigger.SIGNAL: run_pb2.RUN_TRIGGER_SIGNAL,
    RunTrigger.TEST: run_pb2.RUN_TRIGGER_TEST,
}
_TASK_STATES = {
    TaskState.PENDING: run_pb2.TASK_STATE_PENDING,
    TaskState.RUNNING: run_pb2.TASK_STATE_RUNNING,
    TaskState.SUCCEEDED: run_pb2.TASK_STATE_SUCCEEDED,
    TaskState.FAILED: run_pb2.TASK_STATE_FAILED,
    TaskState.SKIPPED: run_pb2.TASK_STATE_SKIPPED,
    TaskState.WAITING: run_pb2.TASK_STATE_WAITING,
}


def canvas_from_proto(message: campaign_pb2.Campaign) -> Canvas:
    """The domain canvas of a Campaign message's activities, transitions and schedule."""
    activities = []
    for item in message.activities:
        which = item.WhichOneof("kind")
        kind: ActivityKind | None = None
        if which == "build_audience":
            b = item.build_audience
            kind = BuildAudience(query=b.query, incremental=b.incremental if b.HasField("incremental") else None)
        elif which == "channel":
            c = item.channel
            w = c.send_window
            kind = ChannelSend(
                channel=channel_name(c.channel),
                category=category_name(c.category),
                template=c.template,
                batch_size=c.batch_size,
                target_attributes=list(c.target_attributes),
                rate_limit_per_second=c.rate_limit_per_second,
                send_window=SendWindow(w.start_local_time, w.end_local_time, tuple(w.days_of_week), w.default_time_zone)
                if c.HasField("send_window")
                else None,
                time_limit_s=_time_limit_s(c),
                confirm_before_sending=c.confirm_before_sending,
            )
        elif which is not None:
            kind = _flow_from_proto(item) or _targeting_from_proto(item)
        activities.append(Activity(id=item.id, display_name=item.display_name, kind=kind))
    return Canvas(
        activities=activities,
        transitions=[Transition(t.source, t.target, t.output) for t in message.transitions],
        schedule=schedule_from_proto(message.schedule),
        variables=dict(message.variables),
        error_handling=_ERROR_HANDLINGS.get(message.error_handling, ""),
    )


_COMPARISONS = {
    campaign_pb2.COMPARISON_EQUAL: "=",
    campaign_pb2.COMPARISON_NOT_EQUAL: "!=",
    campaign_pb2.COMPARISON_LESS: "<",
    campaign_pb2.COMPARISON_LESS_OR_EQUAL: "<=",
    campaign_pb2.COMPARISON_GREATER: ">",
    campaign_pb2.COMPARISON_GREATER_OR_EQUAL: ">=",
}
_COMPARISON_VALUES = {v: k for k, v in _COMPARISONS.items()}


def _flow_from_proto(item: campaign_pb2.Activity) -> ActivityKind | None:
    which = item.WhichOneof("kind")
    if which == "fork":
        return Fork()
    if which == "join":
        return Join(primary=item.join.primary)
    if which == "end":
        return End(signal_campaign=item.end.signal_campaign, parameters=dict(item.end.parameters))
    if which == "wait":
        w = item.wait
        if w.WhichOneof("until") == "until_time":
            return Wait(until=from_timestamp(w.until_time))
        return Wait(duration_s=int(w.duration.ToTimedelta().total_seconds()) if w.HasField("duration") else 0)
    if which == "test":
        branches = []
        for b in item.test.branches:
            if b.WhichOneof("condition") == "variable":
                condition = Condition(_COMPARISONS.get(b.variable.comparison, ""), b.variable.value, b.variable.name)
            else:
                condition = Condition(_COMPARISONS.get(b.population.comparison, ""), str(b.population.value))
            branches.append(Branch(b.output, condition))
        return BranchTest(branches=branches, default_output=item.test.default_output or "default")
    return None


def _time_limit_s(channel: campaign_pb2.ChannelActivity) -> int:
    """The time limit in whole seconds; -1 (refused by validation) when set but not positive."""
    if not channel.HasField("time_limit"):
        return 0
    seconds = channel.time_limit.ToTimedelta().total_seconds()
    return int(seconds) if seconds >= 1 else -1


_COMBINE_OPERATIONS = {
    audience_service_pb2.COMBINE_OPERATION_UNION: "union",
    audience_service_pb2.COMBINE_OPERATION_INTERSECTION: "intersection",
    audience_service_pb2.COMBINE_OPERATION_EXCLUSION: "exclusion",
}
_COMBINE_OPERATION_VALUES = {v: k for k, v in _COMBINE_OPERATIONS.items()}
_DEDUPLICATION_METHODS = {
    audience_service_pb2.DEDUPLICATION_METHOD_RANDOM: "random",
    audience_service_pb2.DEDUPLICATION_METHOD_HIGHEST: "highest",
    audience_service_pb2.DEDUPLICATION_METHOD_LOWEST: "lowest",
    audience_service_pb2.DEDUPLICATION_METHOD_NON_EMPTY: "non_empty",
    audience_service_pb2.DEDUPLICATION_METHOD_PRIORITY: "priority",
}
_DEDUPLICATION_METHOD_VALUES = {v: k for k, v in _DEDUPLICATION_METHODS.items()}


def _targeting_from_proto(item: campaign_pb2.Activity) -> ActivityKind | None:
    which = item.WhichOneof("kind")
    if which == "read_audience":
        return ReadAudience(item.read_audience.audience, item.read_audience.dimension)
    if which == "combine":
        c = item.combine
        return Combine(_COMBINE_OPERATIONS.get(c.operation, ""), c.primary, c.complement_output)
    if which == "change_dimension":
        return ChangeDimension(item.change_dimension.link, item.change_dimension.dimension)
    if which == "split":
        sp = item.split
        return Split(
            subsets=[
                SplitSubset(
                    output=x.output,
                    filter=x.filter if x.HasField("filter") else None,
                    limit=x.limit,
                    limit_percent=x.limit_percent,
                    order_by=[(k.attribute, k.descending) for k in x.order_by],
                )
                for x in sp.subsets
            ],
            complement_output=sp.complement_output,
            overlap=sp.overlap,
        )
    if which == "deduplicate":
        d = item.deduplicate
        return Deduplicate(
            fields=list(d.fields),
            keep=d.keep,
            method=_DEDUPLICATION_METHODS.get(d.method, ""),
            attribute=d.attribute,
            priority=list(d.priority),
            removed_output=d.removed_output,
        )
    if which == "reconcile":
        r = item.reconcile
        pairs = [(pair.source_attribute, pair.target_attribute) for pair in r.pairs]
        return Reconcile(r.target, pairs, r.unreconciled_output)
    if which == "save_audience":
        return SaveAudience(item.save_audience.audience_id, item.save_audience.display_name)
    if which == "enrich":
        e = item.enrich
        return Enrich(
            attributes=[(a.alias, a.path) for a in e.attributes],
            aggregates=list(e.aggregates),
            collections=list(e.collections),
        )
    return None


def _targeting_to_proto(item: campaign_pb2.Activity, kind: ActivityKind | None) -> None:
    if isinstance(kind, ReadAudience):
        item.read_audience.CopyFrom(campaign_pb2.ReadAudienceActivity(audience=kind.audience, dimension=kind.dimension))
    elif isinstance(kind, Combine):
        item.combine.CopyFrom(
            campaign_pb2.CombineActivity(
                operation=_COMBINE_OPERATION_VALUES.get(
                    kind.operation, audience_service_pb2.COMBINE_OPERATION_UNSPECIFIED
                ),
                primary=kind.primary,
                complement_output=kind.complement_output,
            )
        )
    elif isinstance(kind, ChangeDimension):
        item.change_dimension.CopyFrom(campaign_pb2.ChangeDimensionActivity(link=kind.link, dimension=kind.dimension))
    elif isinstance(kind, Split):
        item.split.SetInParent()
        item.split.complement_output = kind.complement_output
        item.split.overlap = kind.overlap
        for subset in kind.subsets:
            added = item.split.subsets.add(output=subset.output, limit=subset.limit, limit_percent=subset.limit_percent)
            if subset.filter is not None:
                added.filter.CopyFrom(subset.filter)
            added.order_by.extend(audience_service_pb2.SortKey(attribute=a, descending=d) for a, d in subset.order_by)
    elif isinstance(kind, Deduplicate):
        item.deduplicate.CopyFrom(
            campaign_pb2.DeduplicateActivity(
                fields=kind.fields,
                keep=kind.keep,
                method=_DEDUPLICATION_METHOD_VALUES.get(
                    kind.method, audience_service_pb2.DEDUPLICATION_METHOD_UNSPECIFIED
                ),
                attribute=kind.attribute,
                priority=kind.priority,
                removed_output=kind.removed_output,
            )
        )
    elif isinstance(kind, Reconcile):
        item.reconcile.CopyFrom(
            campaign_pb2.ReconcileActivity(
                target=kind.target,
                pairs=[
                    working_set_pb2.ReconciliationPair(source_attribute=a, target_attribute=b) for a, b in kind.pairs
                ],
                unreconciled_output=kind.unreconciled_output,
            )
        )
    elif isinstance(kind, SaveAudience):
        item.save_audience.CopyFrom(
            campaign_pb2.SaveAudienceActivity(audience_id=kind.audience_id, display_name=kind.display_name)
        )
    elif isinstance(kind, Enrich):
        item.enrich.CopyFrom(
            campaign_pb2.EnrichActivity(
                attributes=[campaign_pb2.EnrichAttribute(alias=a, path=p) for a, p in kind.attributes],
                aggregates=kind.aggregates,
                collections=kind.collections,
            )
        )


def _flow_to_proto(item: campaign_pb2.Activity, kind: ActivityKind | None) -> None:
    if isinstance(kind, Fork):
        item.fork.SetInParent()
    elif isinstance(kind, Join):
        item.join.primary = kind.primary
    elif isinstance(kind, End):
        item.end.SetInParent()
        if kind.signal_campaign:
            item.end.signal_campaign = kind.signal_campaign
        for name, value in kind.parameters.items():
            item.end.parameters[name].CopyFrom(value)
    elif isinstance(kind, Wait):
        if kind.until is not None:
            item.wait.until_time.CopyFrom(to_timestamp(kind.until))
        else:
            item.wait.duration.FromSeconds(kind.duration_s)
    elif isinstance(kind, BranchTest):
        item.test.default_output = kind.default_output
        for branch in kind.branches:
            c = branch.condition
            added = item.test.branches.add(output=branch.output)
            comparison = _COMPARISON_VALUES.get(c.comparison, campaign_pb2.COMPARISON_UNSPECIFIED)
            if c.variable:
                added.variable.CopyFrom(
                    campaign_pb2.VariableCondition(name=c.variable, comparison=comparison, value=c.value)
                )
            else:
                added.population.CopyFrom(campaign_pb2.PopulationCondition(comparison=comparison, value=int(c.value)))


def _local_time(message: campaign_pb2.LocalTime) -> LocalTime:
    return LocalTime(message.hours, message.minutes)


def _days(days: Iterable[int]) -> list[int]:
    # Weekday values are ISO weekdays (1 = Monday); WEEKDAY_UNSPECIFIED (0) is reported by validation.
    return [int(d) for d in days]


def schedule_from_proto(message: campaign_pb2.Schedule) -> Schedule:
    """The domain schedule of a Schedule message."""
    which = message.WhichOneof("kind")
    recurrence: Recurrence | None = None
    start = None
    if which == "daily":
        recurrence = Daily(days=_days(message.daily.days), times=[_local_time(t) for t in message.daily.times])
    elif which == "interval":
        i = message.interval
        recurrence = Interval(
            minutes=i.interval_minutes,
            days=_days(i.days),
            window_start=_local_time(i.window_start) if i.HasField("window_start") else None,
            window_end=_local_time(i.window_end) if i.HasField("window_end") else None,
        )
    elif which == "weekly":
        w = message.weekly
        recurrence = Weekly(every=w.interval_weeks or 1, days=_days(w.days), times=[_local_time(t) for t in w.times])
    elif which == "monthly":
        m = message.monthly
        day = m.WhichOneof("day")
        recurrence = Monthly(
            day_of_month=m.day_of_month if day == "day_of_month" else 0,
            last_day=m.last_day if day == "last_day" else False,
            ordinal=m.nth_weekday.ordinal if day == "nth_weekday" else 0,
            weekday=int(m.nth_weekday.weekday) if day == "nth_weekday" else 0,
            times=[_local_time(t) for t in m.times],
        )
    elif which == "signal":
        pass
    elif message.once.HasField("start_time"):
        start = from_timestamp(message.once.start_time)
    return Schedule(
        start_time=start,
        time_zone=message.time_zone,
        recurrence=recurrence,
        valid_from=from_timestamp(message.validity_start_time) if message.HasField("validity_start_time") else None,
        valid_until=from_timestamp(message.validity_end_time) if message.HasField("validity_end_time") else None,
        signal=which == "signal",
    )


def _times_to_proto(times: list[LocalTime]) -> list[campaign_pb2.LocalTime]:
    return [campaign_pb2.LocalTime(hours=t.hour, minutes=t.minute) for t in times]


def _weekdays(days: list[int]) -> list[campaign_pb2.Weekday.ValueType]:
    return [cast(campaign_pb2.Weekday.ValueType, d) for d in days]


def schedule_to_proto(schedule: Schedule) -> campaign_pb2.Schedule:
    """The Schedule message of a domain schedule."""
    message = campaign_pb2.Schedule(time_zone=schedule.time_zone)
    r = schedule.recurrence
    if isinstance(r, Daily):
        message.daily.CopyFrom(campaign_pb2.DailySchedule(days=_weekdays(r.days), times=_times_to_proto(r.times)))
    elif isinstance(r, Interval):
        message.interval.CopyFrom(campaign_pb2.IntervalSchedule(days=_weekdays(r.days), interval_minutes=r.minutes))
        if r.window_start is not None:
            message.interval.window_start.CopyFrom(_times_to_proto([r.window_start])[0])
        if r.window_end is not None:
            message.interval.window_end.CopyFrom(_times_to_proto([r.window_end])[0])
    elif isinstance(r, Weekly):
        message.weekly.CopyFrom(
            campaign_pb2.WeeklySchedule(interval_weeks=r.every, days=_weekdays(r.days), times=_times_to_proto(r.times))
        )
    elif isinstance(r, Monthly):
        message.monthly.times.extend(_times_to_proto(r.times))
        if r.day_of_month:
            message.monthly.day_of_month = r.day_of_month
        elif r.last_day:
            message.monthly.last_day = True
        else:
            message.monthly.nth_weekday.CopyFrom(
                campaign_pb2.NthWeekday(ordinal=r.ordinal, weekday=cast(campaign_pb2.Weekday.ValueType, r.weekday))
            )
    elif schedule.signal:
        message.signal.SetInParent()
    else:
        message.once.SetInParent()
        if schedule.start_time is not None:
            message.once.start_time.CopyFrom(to_timestamp(schedule.start_time))
    if schedule.valid_from is not None:
        message.validity_start_time.CopyFrom(to_timestamp(schedule.valid_from))
    if schedule.valid_until is not None:
        message.validity_end_time.CopyFrom(to_timestamp(schedule.valid_until))
    return message


def campaign_to_proto(campaign: Campaign) -> campaign_pb2.Campaign:
    """The Campaign message of a domain campaign."""
    canvas = campaign.canvas
    message = campaign_pb2.Campaign(
        name=campaign.name,
        display_name=campaign.display_name,
        state=_CAMPAIGN_STATES[campaign.state],
        transitions=[
            campaign_pb2.Transition(source=t.source, target=t.target, output=t.output) for t in canvas.transitions
        ],
        create_time=to_timestamp(campaign.create_time),
        update_time=to_timestamp(campaign.update_time),
    )
    for activity in canvas.activities:
        item = message.activities.add(id=activity.id, display_name=activity.display_name)
        kind = activity.kind
        if isinstance(kind, BuildAudience):
            item.build_audience.query.CopyFrom(kind.query)
            if kind.incremental is not None:
                item.build_audience.incremental.CopyFrom(kind.incremental)
        elif isinstance(kind, ChannelSend):
            item.channel.CopyFrom(
                campaign_pb2.ChannelActivity(
                    channel=cast(channel_pb2.Channel.ValueType, channel_value(kind.channel)),
                    category=cast(channel_pb2.MessageCategory.ValueType, category_value(kind.category)),
                    template=kind.template,
                    batch_size=kind.batch_size,
                    target_attributes=kind.target_attributes,
                    rate_limit_per_second=kind.rate_limit_per_second,
                    confirm_before_sending=kind.confirm_before_sending,
                )
            )
            window = kind.send_window
            if window is not None:
                item.channel.send_window.CopyFrom(
                    delivery_service_pb2.SendWindow(
                        start_local_time=window.start_local_time,
                        end_local_time=window.end_local_time,
                        days_of_week=window.days,
                        default_time_zone=window.default_time_zone,
                    )
                )
            if kind.time_limit_s > 0:
                item.channel.time_limit.FromSeconds(kind.time_limit_s)
        else:
            _flow_to_proto(item, kind)
            _targeting_to_proto(item, kind)
    message.schedule.CopyFrom(schedule_to_proto(canvas.schedule))
    message.variables.update(canvas.variables)
    message.error_handling = _ERROR_HANDLING_VALUES[canvas.error_handling]
    if campaign.publish_time is not None:
        message.publish_time.CopyFrom(to_timestamp(campaign.publish_time))
    if campaign.next_run_time is not None:
        message.next_run_time.CopyFrom(to_timestamp(campaign.next_run_time))
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
        outputs=task.outputs,
        deferred=task.deferred,
        awaiting_confirmation=task.confirmation == "awaiting",
    )
    if task.wake_time is not None:
        message.wake_time.CopyFrom(to_timestamp(task.wake_time))
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
        trigger=_RUN_TRIGGERS[run.trigger],
        parameters=run.parameters,
        transitions=[
            run_pb2.TransitionCount(source=t.source, target=t.target, output=t.output, taken=t.taken, count=t.count)
            for t in run.transitions
        ],
    )
    if run.start_time is not None:
        message.start_time.CopyFrom(to_timestamp(run.start_time))
    if run.end_time is not None:
        message.end_time.CopyFrom(to_timestamp(run.end_time))
    return message


def log_entry_to_proto(entry: LogEntry) -> run_pb2.RunLogEntry:
    """The RunLogEntry message of a domain log entry."""
    return run_pb2.RunLogEntry(
        sequence=entry.sequence,
        time=to_timestamp(entry.time),
        level=_LOG_LEVELS[entry.level],
        activity=entry.activity,
        message=entry.message,
    )


class CampaignServicer(scheduler_service_pb2_grpc.CampaignServiceServicer):
    """CampaignService over the campaign and run stores."""

    def __init__(
        self,
        campaigns: CampaignStore,
        runs: RunStore,
        lifecycle: Lifecycle | None = None,
        watch_interval_s: float = 0.5,
    ) -> None:
        self.watch_interval_s = watch_interval_s
        self.campaigns = campaigns
        self.runs = runs
        self.lifecycle = lifecycle or Lifecycle(campaigns)
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
        return scheduler_service_pb2.PublishCampaignResponse(
            campaign=campaign_to_proto(campaign), run=run.name if run is not None else ""
        )

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

    async def PreviewSchedule(
        self, request: scheduler_service_pb2.PreviewScheduleRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.PreviewScheduleResponse:
        campaign_id = ""
        if request.name:
            (campaign_id,) = parse_name(request.name, "campaigns")
        times = await self.database.run(
            self.campaigns.preview_schedule,
            current_sandbox(),
            campaign_id,
            schedule_from_proto(request.schedule) if request.HasField("schedule") else None,
            request.count,
            from_timestamp(request.after_time) if request.HasField("after_time") else None,
        )
        return scheduler_service_pb2.PreviewScheduleResponse(launch_times=[to_timestamp(t) for t in times])

    async def UpdateCampaign(
        self, request: scheduler_service_pb2.UpdateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.UpdateCampaignResponse:
        (campaign_id,) = parse_name(request.campaign.name, "campaigns", field="campaign.name")
        campaign = await self.database.run(
            self.lifecycle.update,
            current_sandbox(),
            campaign_id,
            request.campaign.display_name,
            canvas_from_proto(request.campaign),
            list(request.update_mask.paths),
        )
        return scheduler_service_pb2.UpdateCampaignResponse(campaign=campaign_to_proto(campaign))

    async def StopCampaign(
        self, request: scheduler_service_pb2.StopCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.StopCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        campaign = await self.database.run(self.lifecycle.stop, current_sandbox(), campaign_id)
        return scheduler_service_pb2.StopCampaignResponse(campaign=campaign_to_proto(campaign))

    async def CloseCampaign(
        self, request: scheduler_service_pb2.CloseCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.CloseCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        campaign = await self.database.run(self.lifecycle.close, current_sandbox(), campaign_id)
        return scheduler_service_pb2.CloseCampaignResponse(campaign=campaign_to_proto(campaign))

    async def ArchiveCampaign(
        self, request: scheduler_service_pb2.ArchiveCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.ArchiveCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        campaign = await self.database.run(self.lifecycle.archive, current_sandbox(), campaign_id)
        return scheduler_service_pb2.ArchiveCampaignResponse(campaign=campaign_to_proto(campaign))

    async def RevertCampaignToDraft(
        self, request: scheduler_service_pb2.RevertCampaignToDraftRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.RevertCampaignToDraftResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        campaign = await self.database.run(self.lifecycle.revert_to_draft, current_sandbox(), campaign_id)
        return scheduler_service_pb2.RevertCampaignToDraftResponse(campaign=campaign_to_proto(campaign))

    async def DeleteCampaign(
        self, request: scheduler_service_pb2.DeleteCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.DeleteCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        await self.database.run(self.lifecycle.delete, current_sandbox(), campaign_id)
        return scheduler_service_pb2.DeleteCampaignResponse()

    async def DuplicateCampaign(
        self, request: scheduler_service_pb2.DuplicateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.DuplicateCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        campaign = await self.database.run(
            self.lifecycle.duplicate,
            current_sandbox(),
            campaign_id,
            request.campaign_id,
            request.display_name,
            request.request_id,
        )
        return scheduler_service_pb2.DuplicateCampaignResponse(campaign=campaign_to_proto(campaign))

    async def SignalCampaign(
        self, request: scheduler_service_pb2.SignalCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.SignalCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        run = await self.database.run(
            self.lifecycle.signal, current_sandbox(), campaign_id, dict(request.parameters), request.request_id
        )
        return scheduler_service_pb2.SignalCampaignResponse(run=run.name)

    async def ListRunLogs(
        self, request: scheduler_service_pb2.ListRunLogsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.ListRunLogsResponse:
        campaign_id, run_id = parse_name(request.parent, "campaigns", "runs", field="parent")
        entries, token = await self.database.run(
            self.runs.list_logs, RunKey(current_sandbox(), campaign_id, run_id), request.page_size, request.page_token
        )
        return scheduler_service_pb2.ListRunLogsResponse(
            entries=[log_entry_to_proto(e) for e in entries], next_page_token=token
        )

    async def WatchRun(
        self, request: scheduler_service_pb2.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_service_pb2.WatchRunResponse]:
        campaign_id, run_id = parse_name(request.name, "campaigns", "runs")
        key = RunKey(current_sandbox(), campaign_id, run_id)
        async for run, entries in watch_run(self.database, self.runs, key, self.watch_interval_s):
            yield scheduler_service_pb2.WatchRunResponse(
                run=run_to_proto(run), entries=[log_entry_to_proto(e) for e in entries]
            )

    async def TestCampaign(
        self, request: scheduler_service_pb2.TestCampaignRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.TestCampaignResponse:
        (campaign_id,) = parse_name(request.name, "campaigns")
        run = await self.database.run(self.lifecycle.test, current_sandbox(), campaign_id, request.request_id)
        return scheduler_service_pb2.TestCampaignResponse(run=run.name)

    async def ConfirmActivity(
        self, request: scheduler_service_pb2.ConfirmActivityRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.ConfirmActivityResponse:
        campaign_id, run_id = parse_name(request.run, "campaigns", "runs", field="run")
        validate_id(request.activity, "activity")
        task = await self.database.run(
            self.runs.confirm, RunKey(current_sandbox(), campaign_id, run_id), request.activity
        )
        return scheduler_service_pb2.ConfirmActivityResponse(task=task_to_proto(task))

    async def RestartRun(
        self, request: scheduler_service_pb2.RestartRunRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_service_pb2.RestartRunResponse:
        campaign_id, run_id = parse_name(request.name, "campaigns", "runs")
        run = await self.database.run(self.lifecycle.restart, RunKey(current_sandbox(), campaign_id, run_id))
        return scheduler_service_pb2.RestartRunResponse(run=run.name)
