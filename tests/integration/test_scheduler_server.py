"""The real scheduler gRPC server on both backends, with in-process fake audience and delivery servers.

The fakes speak the real contracts over real channels, so these tests also exercise the gRPC
gateways: sandbox metadata, the working-set stream and the acknowledged ``Send`` stream.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import pytest

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
            audience_target=audience.address,
            delivery_targets={"email": delivery.address},
        )
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Scheduler(sch_grpc.CampaignServiceStub(channel), peers)
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
