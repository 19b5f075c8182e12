"""The real scheduler gRPC server on both backends, with in-process fake audience and delivery servers.

The fakes speak the real contracts over real channels, so these tests also exercise the gRPC
gateways: sandbox metadata, the working-set stream and the acknowledged ``Send`` stream.
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from rich.console import Console

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import audience_service_pb2_grpc as aud_grpc
from carillon.audience.v1 import query_pb2, working_set_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.delivery.v1 import delivery_service_pb2_grpc as dlv_grpc
from carillon.scheduler.v1 import campaign_pb2, run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon.scheduler.v1 import scheduler_service_pb2_grpc as sch_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.clients import call_metadata, open_channel
from carillon_chassis.errors import Unavailable
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.server import GrpcServer
from carillon_chassis.values import to_timestamp, to_value
from carillon_cli.runs_watch import watch
from scheduler_svc.app import build_server
from scheduler_svc.gateways import GrpcDeliveryGateway, SendHeader
from scheduler_svc.settings import SchedulerSettings
from tests.conftest import DatabaseFactory
from tests.rpc_errors import failure_of

SANDBOX = "tenant"
ROWS = 7


@dataclass
class Peers:
    """What the fake peers saw."""

    sandboxes: set[str] = field(default_factory=set)
    headers: list[dlv.SendHeader] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    audience: GrpcServer | None = None
    delivery: GrpcServer | None = None


class FakeAudienceServicer(aud_grpc.AudienceServiceServicer):
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def BuildWorkingSet(
        self, request: aud.BuildWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> aud.BuildWorkingSetResponse:
        self.peers.sandboxes.add(current_sandbox())
        return aud.BuildWorkingSetResponse(
            working_set=working_set_pb2.WorkingSet(
                name="workingSets/ws1", run=request.run, activity=request.activity, count=ROWS
            )
        )

    async def StreamWorkingSet(
        self, request: aud.StreamWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[aud.StreamWorkingSetResponse]:
        self.peers.sandboxes.add(current_sandbox())
        positions = list(range(request.after_position + 1, ROWS + 1))
        for start in range(0, len(positions), request.batch_size):
            yield aud.StreamWorkingSetResponse(
                rows=[
                    working_set_pb2.WorkingSetRow(
                        position=p,
                        entity_key=f"k{p}",
                        identity=value_pb2.Identity(namespace="email", value=f"p{p}@example.com"),
                        values={"tier": to_value("gold")},
                    )
                    for p in positions[start : start + request.batch_size]
                ]
            )


class FakeDeliveryServicer(dlv_grpc.DeliveryServiceServicer):
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def Send(
        self, requests: AsyncIterator[dlv.SendRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dlv.SendResponse]:
        self.peers.sandboxes.add(current_sandbox())
        async for request in requests:
            if request.HasField("header"):
                self.peers.headers.append(request.header)
                continue
            self.peers.received += [r.entity_key for r in request.batch.recipients]
            skipped = sum(r.identity.value == "p3@example.com" for r in request.batch.recipients)
            yield dlv.SendResponse(
                sequence=request.batch.sequence,
                sent=len(request.batch.recipients) - skipped,
                skipped={"NO_CONSENT": skipped} if skipped else {},
            )


def fake_server(name: str, register_fn: object, servicer: object) -> GrpcServer:
    def register(server: grpc.aio.Server) -> list[str]:
        register_fn(servicer, server)  # type: ignore[operator]
        return [name]

    return GrpcServer(name=name, domain=f"{name}.test", host="127.0.0.1", port=0, register=register)


@dataclass
class Scheduler:
    stub: sch_grpc.CampaignServiceStub
    peers: Peers
    address: str = ""


@pytest.fixture
async def scheduler(database_factory: DatabaseFactory) -> AsyncIterator[Scheduler]:
    peers = Peers()
    audience = fake_server(
        "carillon.audience.v1.AudienceService",
        aud_grpc.add_AudienceServiceServicer_to_server,
        FakeAudienceServicer(peers),  # type: ignore[abstract]
    )
    delivery = fake_server(
        "carillon.delivery.v1.DeliveryService",
        dlv_grpc.add_DeliveryServiceServicer_to_server,
        FakeDeliveryServicer(peers),  # type: ignore[abstract]
    )
    await audience.start()
    await delivery.start()
    url, schema = database_factory.url_and_schema("scheduler")
    server = await build_server(
        SchedulerSettings(
            port=0,
            database_url=url,
            database_schema=schema,
            poll_interval_s=0.05,
            watch_interval_s=0.05,
            audience_target=audience.address,
            delivery_targets={"email": delivery.address},
        )
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Scheduler(sch_grpc.CampaignServiceStub(channel), peers, server.address)
    finally:
        await server.stop(0)
        await delivery.stop(0)
        await audience.stop(0)


def campaign(start: datetime | None = None, template: str = "templates/offer") -> campaign_pb2.Campaign:
    message = campaign_pb2.Campaign(
        display_name="Spring",
        activities=[
            campaign_pb2.Activity(
                id="audience",
                build_audience=campaign_pb2.BuildAudienceActivity(
                    query=query_pb2.AudienceQuery(dimension="entities/customers")
                ),
            ),
            campaign_pb2.Activity(
                id="email",
                channel=campaign_pb2.ChannelActivity(
                    channel=channel_pb2.CHANNEL_EMAIL,
                    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
                    template=template,
                    batch_size=2,
                    target_attributes=["tier"],
                ),
            ),
        ],
        transitions=[campaign_pb2.Transition(source="audience", target="email")],
    )
    if start is not None:
        message.schedule.once.start_time.CopyFrom(to_timestamp(start))
    return message


LATER = datetime(2099, 1, 1, tzinfo=UTC)
META = call_metadata(SANDBOX)


async def test_a_bad_canvas_is_invalid_argument_naming_the_field_and_writes_nothing(scheduler: Scheduler) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.CreateCampaign(
            sch.CreateCampaignRequest(campaign=campaign(template="offer"), request_id="r1"), metadata=META
        )

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.domain) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CANVAS",
        "scheduler.carillon.dev",
    )
    assert failure.fields == ["campaign.activities[1].channel.template"]
    listed = await scheduler.stub.ListCampaigns(sch.ListCampaignsRequest(), metadata=META)
    assert list(listed.campaigns) == []


async def test_publishing_twice_is_failed_precondition(scheduler: Scheduler) -> None:
    created = await scheduler.stub.CreateCampaign(
        sch.CreateCampaignRequest(campaign_id="spring", campaign=campaign(start=LATER)), metadata=META
    )
    first = await scheduler.stub.PublishCampaign(sch.PublishCampaignRequest(name=created.campaign.name), metadata=META)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.PublishCampaign(sch.PublishCampaignRequest(name=created.campaign.name), metadata=META)

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ILLEGAL_TRANSITION")
    assert first.campaign.state == campaign_pb2.CAMPAIGN_STATE_SCHEDULED
    assert first.run.startswith("campaigns/spring/runs/")


async def test_a_repeated_create_request_returns_the_first_campaign(scheduler: Scheduler) -> None:
    request = sch.CreateCampaignRequest(campaign=campaign(), request_id="once")

    first = await scheduler.stub.CreateCampaign(request, metadata=META)
    again = await scheduler.stub.CreateCampaign(request, metadata=META)

    assert again.campaign.name == first.campaign.name
    assert first.campaign.state == campaign_pb2.CAMPAIGN_STATE_DRAFT
    assert first.campaign.activities == campaign().activities
    listed = await scheduler.stub.ListCampaigns(sch.ListCampaignsRequest(), metadata=META)
    assert [c.name for c in listed.campaigns] == [first.campaign.name]


@pytest.mark.parametrize(
    ("method", "request_message", "code"),
    [
        ("GetRun", sch.GetRunRequest(name="campaigns/ghost/runs/r1"), grpc.StatusCode.NOT_FOUND),
        ("ListRuns", sch.ListRunsRequest(parent="campaigns/ghost"), grpc.StatusCode.NOT_FOUND),
        ("GetCampaign", sch.GetCampaignRequest(name="campaigns/ghost"), grpc.StatusCode.NOT_FOUND),
        ("PublishCampaign", sch.PublishCampaignRequest(name="campaigns/ghost"), grpc.StatusCode.NOT_FOUND),
        ("GetRun", sch.GetRunRequest(name="runs/r1"), grpc.StatusCode.INVALID_ARGUMENT),
        ("ListCampaigns", sch.ListCampaignsRequest(page_token="garbage"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_unknown_or_malformed_names_get_their_status_code(
    scheduler: Scheduler, method: str, request_message: object, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(scheduler.stub, method)(request_message, metadata=META)
    assert caught.value.code() == code


async def test_a_published_campaign_runs_through_the_peers_and_get_run_shows_the_counts(scheduler: Scheduler) -> None:
    created = await scheduler.stub.CreateCampaign(
        sch.CreateCampaignRequest(campaign_id="spring", campaign=campaign()), metadata=META
    )
    published = await scheduler.stub.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=META
    )

    async with asyncio.timeout(60):  # a guard against a hang, not a speed requirement
        while True:
            run = (await scheduler.stub.GetRun(sch.GetRunRequest(name=published.run), metadata=META)).run
            if run.state in (run_pb2.RUN_STATE_SUCCEEDED, run_pb2.RUN_STATE_FAILED):
                break
            await asyncio.sleep(0.05)

    assert run.state == run_pb2.RUN_STATE_SUCCEEDED, run.error
    audience, email = run.tasks
    assert (audience.activity, audience.working_set, audience.targeted) == ("audience", "workingSets/ws1", ROWS)
    assert (email.activity, email.state, email.targeted, email.sent, dict(email.skipped), email.checkpoint) == (
        "email",
        run_pb2.TASK_STATE_SUCCEEDED,
        ROWS,
        ROWS - 1,
        {"NO_CONSENT": 1},
        ROWS,
    )
    assert email.HasField("start_time") and email.HasField("end_time")
    assert scheduler.peers.received == [f"k{p}" for p in range(1, ROWS + 1)]
    assert scheduler.peers.sandboxes == {SANDBOX}
    (header,) = scheduler.peers.headers
    assert (header.run, header.activity, header.channel, header.template) == (
        published.run,
        "email",
        channel_pb2.CHANNEL_EMAIL,
        "templates/offer",
    )
    final = await scheduler.stub.GetCampaign(sch.GetCampaignRequest(name="campaigns/spring"), metadata=META)
    assert final.campaign.state == campaign_pb2.CAMPAIGN_STATE_COMPLETED
    listed = await scheduler.stub.ListRuns(sch.ListRunsRequest(parent="campaigns/spring"), metadata=META)
    assert [r.name for r in listed.runs] == [published.run]


async def test_a_delivery_worker_that_cannot_be_reached_is_unavailable_not_a_hang() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once the socket is closed
    channel = open_channel(target)
    gateway = GrpcDeliveryGateway(channel, target, connect_timeout_s=0.2)
    header = SendHeader("campaigns/c", "campaigns/c/runs/r", "email", "email", "marketing", "templates/t")

    try:
        with pytest.raises(Unavailable) as caught:
            await gateway.open(SANDBOX, header)
    finally:
        await channel.close()
    assert caught.value.reason == "PEER_UNREACHABLE"


def weekly_monday_nine_stockholm() -> campaign_pb2.Schedule:
    return campaign_pb2.Schedule(
        time_zone="Europe/Stockholm",
        weekly=campaign_pb2.WeeklySchedule(
            interval_weeks=1, days=[campaign_pb2.WEEKDAY_MONDAY], times=[campaign_pb2.LocalTime(hours=9, minutes=0)]
        ),
        validity_end_time=to_timestamp(datetime(2099, 1, 1, tzinfo=UTC)),
    )


@pytest.mark.parametrize(
    "schedule",
    [
        weekly_monday_nine_stockholm(),
        campaign_pb2.Schedule(
            daily=campaign_pb2.DailySchedule(
                days=[campaign_pb2.WEEKDAY_SATURDAY, campaign_pb2.WEEKDAY_SUNDAY],
                times=[campaign_pb2.LocalTime(hours=8), campaign_pb2.LocalTime(hours=20, minutes=30)],
            )
        ),
        campaign_pb2.Schedule(
            interval=campaign_pb2.IntervalSchedule(
                interval_minutes=20,
                window_start=campaign_pb2.LocalTime(hours=8),
                window_end=campaign_pb2.LocalTime(hours=18),
            )
        ),
        campaign_pb2.Schedule(
            monthly=campaign_pb2.MonthlySchedule(
                nth_weekday=campaign_pb2.NthWeekday(ordinal=-1, weekday=campaign_pb2.WEEKDAY_FRIDAY),
                times=[campaign_pb2.LocalTime(hours=9)],
            )
        ),
        campaign_pb2.Schedule(
            monthly=campaign_pb2.MonthlySchedule(last_day=True, times=[campaign_pb2.LocalTime(hours=9)])
        ),
    ],
)
async def test_a_recurring_schedule_reads_back_as_it_was_written(
    scheduler: Scheduler, schedule: campaign_pb2.Schedule
) -> None:
    message = campaign()
    message.schedule.CopyFrom(schedule)

    created = await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)
    got = await scheduler.stub.GetCampaign(sch.GetCampaignRequest(name=created.campaign.name), metadata=META)

    assert got.campaign.schedule == schedule


async def test_preview_schedule_lists_the_next_launch_times_of_a_campaign(scheduler: Scheduler) -> None:
    message = campaign()
    message.schedule.CopyFrom(weekly_monday_nine_stockholm())
    created = await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)

    preview = await scheduler.stub.PreviewSchedule(
        sch.PreviewScheduleRequest(
            name=created.campaign.name, count=3, after_time=to_timestamp(datetime(2024, 3, 20, tzinfo=UTC))
        ),
        metadata=META,
    )

    assert [t.ToDatetime(tzinfo=UTC) for t in preview.launch_times] == [
        datetime(2024, 3, 25, 8, tzinfo=UTC),  # 09:00 CET
        datetime(2024, 4, 1, 7, tzinfo=UTC),  # 09:00 CEST
        datetime(2024, 4, 8, 7, tzinfo=UTC),
    ]


async def test_preview_schedule_of_a_too_frequent_interval_is_invalid_argument_naming_it(
    scheduler: Scheduler,
) -> None:
    schedule = campaign_pb2.Schedule(interval=campaign_pb2.IntervalSchedule(interval_minutes=5))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.PreviewSchedule(sch.PreviewScheduleRequest(schedule=schedule), metadata=META)

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCHEDULE")
    assert failure.fields == ["schedule.interval.interval_minutes"]


async def test_publishing_a_recurring_campaign_shows_its_next_run_time(scheduler: Scheduler) -> None:
    message = campaign()
    message.schedule.CopyFrom(weekly_monday_nine_stockholm())
    created = await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)

    published = await scheduler.stub.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=META
    )
    run = await scheduler.stub.GetRun(sch.GetRunRequest(name=published.run), metadata=META)

    first = run.run.scheduled_time.ToDatetime(tzinfo=UTC)
    following = published.campaign.next_run_time.ToDatetime(tzinfo=UTC)
    assert first.weekday() == 0 and following - first == timedelta(days=7)
    assert run.run.state == run_pb2.RUN_STATE_PENDING


async def test_update_campaign_applies_the_field_mask_to_a_draft(scheduler: Scheduler) -> None:
    created = await scheduler.stub.CreateCampaign(
        sch.CreateCampaignRequest(campaign_id="spring", campaign=campaign()), metadata=META
    )
    change = campaign(template="templates/other")
    change.name = created.campaign.name
    change.display_name = "Autumn"

    updated = await scheduler.stub.UpdateCampaign(
        sch.UpdateCampaignRequest(campaign=change, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])),
        metadata=META,
    )

    assert updated.campaign.display_name == "Autumn"
    assert updated.campaign.activities == campaign().activities


async def test_lifecycle_rpcs_refuse_illegal_transitions_with_failed_precondition(scheduler: Scheduler) -> None:
    created = await scheduler.stub.CreateCampaign(
        sch.CreateCampaignRequest(campaign_id="spring", campaign=campaign(start=LATER)), metadata=META
    )
    name = created.campaign.name
    await scheduler.stub.PublishCampaign(sch.PublishCampaignRequest(name=name), metadata=META)

    refusals = []
    for call in (
        scheduler.stub.DeleteCampaign(sch.DeleteCampaignRequest(name=name), metadata=META),
        scheduler.stub.ArchiveCampaign(sch.ArchiveCampaignRequest(name=name), metadata=META),
        scheduler.stub.UpdateCampaign(sch.UpdateCampaignRequest(campaign=created.campaign), metadata=META),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        failure = failure_of(caught.value)
        refusals.append((failure.code, failure.reason))

    assert refusals == [
        (grpc.StatusCode.FAILED_PRECONDITION, "ILLEGAL_TRANSITION"),
        (grpc.StatusCode.FAILED_PRECONDITION, "ILLEGAL_TRANSITION"),
        (grpc.StatusCode.FAILED_PRECONDITION, "CAMPAIGN_READ_ONLY"),
    ]
    stopped = await scheduler.stub.StopCampaign(sch.StopCampaignRequest(name=name), metadata=META)
    archived = await scheduler.stub.ArchiveCampaign(sch.ArchiveCampaignRequest(name=name), metadata=META)
    assert (stopped.campaign.state, archived.campaign.state) == (
        campaign_pb2.CAMPAIGN_STATE_STOPPED,
        campaign_pb2.CAMPAIGN_STATE_ARCHIVED,
    )


async def test_signal_campaign_runs_it_with_parameters_and_a_second_signal_is_resource_exhausted(
    scheduler: Scheduler,
) -> None:
    message = campaign()
    message.schedule.signal.SetInParent()
    created = await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)
    published = await scheduler.stub.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=META
    )
    assert published.run == ""

    signalled = await scheduler.stub.SignalCampaign(
        sch.SignalCampaignRequest(name=created.campaign.name, parameters={"city": to_value("Miami")}, request_id="s1"),
        metadata=META,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.SignalCampaign(
            sch.SignalCampaignRequest(name=created.campaign.name, request_id="s2"), metadata=META
        )

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SIGNAL_RATE_LIMITED")
    run = await scheduler.stub.GetRun(sch.GetRunRequest(name=signalled.run), metadata=META)
    assert run.run.trigger == run_pb2.RUN_TRIGGER_SIGNAL
    assert dict(run.run.parameters) == {"city": to_value("Miami")}


async def test_watch_run_streams_progress_until_the_end_and_the_log_pages_agree(scheduler: Scheduler) -> None:
    created = await scheduler.stub.CreateCampaign(
        sch.CreateCampaignRequest(campaign_id="spring", campaign=campaign()), metadata=META
    )
    published = await scheduler.stub.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=META
    )

    events = [e async for e in scheduler.stub.WatchRun(sch.WatchRunRequest(name=published.run), metadata=META)]

    final = events[-1].run
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED
    assert list(final.transitions) == [
        run_pb2.TransitionCount(source="audience", target="email", output="", taken=True, count=7)
    ]
    assert all(e.run.state != run_pb2.RUN_STATE_SUCCEEDED for e in events[:-1])
    got = await scheduler.stub.GetRun(sch.GetRunRequest(name=published.run), metadata=META)
    assert final.tasks == got.run.tasks
    watched = [entry for e in events for entry in e.entries]
    sequences = [entry.sequence for entry in watched]
    assert sequences == sorted(set(sequences))
    assert (watched[-1].message, watched[-1].activity) == ("run succeeded", "")
    assert ("email", "activity succeeded: targeted 7, sent 6, already sent 0, skipped NO_CONSENT 1") in [
        (entry.activity, entry.message) for entry in watched
    ]
    paged: list[run_pb2.RunLogEntry] = []
    token = ""
    while True:
        page = await scheduler.stub.ListRunLogs(
            sch.ListRunLogsRequest(parent=published.run, page_size=2, page_token=token), metadata=META
        )
        paged += page.entries
        token = page.next_page_token
        if not token:
            break
    assert paged == watched


@pytest.mark.parametrize("method", ["WatchRun", "ListRunLogs"])
async def test_following_an_unknown_run_is_not_found(scheduler: Scheduler, method: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "WatchRun":
            async for _ in scheduler.stub.WatchRun(sch.WatchRunRequest(name="campaigns/ghost/runs/r1"), metadata=META):
                pass
        else:
            await scheduler.stub.ListRunLogs(sch.ListRunLogsRequest(parent="campaigns/ghost/runs/r1"), metadata=META)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_runs_watch_command_draws_the_run_to_its_end(scheduler: Scheduler) -> None:
    created = await scheduler.stub.CreateCampaign(
        sch.CreateCampaignRequest(campaign_id="spring", campaign=campaign()), metadata=META
    )
    published = await scheduler.stub.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=META
    )
    output = io.StringIO()

    def follow() -> int:
        with grpc.insecure_channel(scheduler.address) as channel:
            return watch(sch_grpc.CampaignServiceStub(channel), published.run, SANDBOX, Console(file=output, width=200))

    code = await asyncio.to_thread(follow)

    assert code == 0
    lines = output.getvalue().splitlines()
    assert lines[-1] == f"{published.run}: succeeded"
    assert any("[email] activity succeeded: targeted 7, sent 6" in line for line in lines)


async def test_a_test_mode_run_of_a_draft_sends_nothing_and_reports_who_would_be_sent(scheduler: Scheduler) -> None:
    created = await scheduler.stub.CreateCampaign(
        sch.CreateCampaignRequest(campaign_id="spring", campaign=campaign()), metadata=META
    )

    tested = await scheduler.stub.TestCampaign(
        sch.TestCampaignRequest(name=created.campaign.name, request_id="t1"), metadata=META
    )
    events = [e async for e in scheduler.stub.WatchRun(sch.WatchRunRequest(name=tested.run), metadata=META)]

    run = events[-1].run
    assert (run.state, run.trigger) == (run_pb2.RUN_STATE_SUCCEEDED, run_pb2.RUN_TRIGGER_TEST)
    email = run.tasks[1]
    assert (email.activity, email.targeted, email.sent, email.checkpoint) == ("email", 7, 0, 0)
    assert scheduler.peers.received == [] and scheduler.peers.headers == []
    got = await scheduler.stub.GetCampaign(sch.GetCampaignRequest(name=created.campaign.name), metadata=META)
    assert got.campaign.state == campaign_pb2.CAMPAIGN_STATE_DRAFT


async def test_a_flow_canvas_reads_back_as_it_was_written(scheduler: Scheduler) -> None:
    message = campaign()
    message.activities.extend(
        [
            campaign_pb2.Activity(id="f", fork=campaign_pb2.ForkActivity()),
            campaign_pb2.Activity(
                id="w", wait=campaign_pb2.WaitActivity(duration=duration_pb2.Duration(seconds=259200))
            ),
            campaign_pb2.Activity(
                id="t",
                test=campaign_pb2.TestActivity(
                    branches=[
                        campaign_pb2.TestBranch(
                            output="vip",
                            variable=campaign_pb2.VariableCondition(
                                name="tier", comparison=campaign_pb2.COMPARISON_EQUAL, value="gold"
                            ),
                        ),
                        campaign_pb2.TestBranch(
                            output="many",
                            population=campaign_pb2.PopulationCondition(
                                comparison=campaign_pb2.COMPARISON_GREATER, value=100
                            ),
                        ),
                    ],
                    default_output="rest",
                ),
            ),
            campaign_pb2.Activity(id="e1", end=campaign_pb2.EndActivity()),
            campaign_pb2.Activity(id="e2", end=campaign_pb2.EndActivity()),
            campaign_pb2.Activity(id="e3", end=campaign_pb2.EndActivity()),
            campaign_pb2.Activity(id="j", join=campaign_pb2.JoinActivity(primary="w")),
            campaign_pb2.Activity(
                id="e4",
                end=campaign_pb2.EndActivity(signal_campaign="campaigns/storm", parameters={"n": to_value(3)}),
            ),
        ]
    )
    message.transitions.extend(
        [
            campaign_pb2.Transition(source="audience", target="f"),
            campaign_pb2.Transition(source="f", target="w"),
            campaign_pb2.Transition(source="f", target="t"),
            campaign_pb2.Transition(source="t", target="e1", output="vip"),
            campaign_pb2.Transition(source="t", target="e2", output="many"),
            campaign_pb2.Transition(source="t", target="e3", output="rest"),
            campaign_pb2.Transition(source="w", target="j"),
            campaign_pb2.Transition(source="email", target="j"),
            campaign_pb2.Transition(source="j", target="e4"),
        ]
    )
    message.variables["tier"] = "gold"

    created = await scheduler.stub.CreateCampaign(sch.CreateCampaignRequest(campaign=message), metadata=META)
    got = await scheduler.stub.GetCampaign(sch.GetCampaignRequest(name=created.campaign.name), metadata=META)

    assert list(got.campaign.activities) == list(message.activities)
    assert list(got.campaign.transitions) == list(message.transitions)
    assert dict(got.campaign.variables) == {"tier": "gold"}
