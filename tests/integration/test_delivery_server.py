"""delivery_svc as a real gRPC server, with a real profile_stub server and a real SMTP server.

Both services run in-process on ``127.0.0.1:0`` over real grpc.aio channels; emails go to an aiosmtpd
server on a free port (or to an outbox directory). Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller
from google.rpc import error_details_pb2, status_pb2

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.delivery.v1 import delivery_service_pb2_grpc, template_pb2
from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.clients import call_metadata
from carillon_chassis.server import GrpcServer
from delivery_svc.app import build_server
from delivery_svc.emails import MESSAGE_ID_HEADER
from delivery_svc.settings import DeliverySettings
from profile_stub.app import build_server as build_profile
from profile_stub.settings import ProfileSettings
from tests.conftest import DatabaseFactory

SANDBOX = "prod"
METADATA = call_metadata(SANDBOX)
HEADER = dpb.SendHeader(
    campaign="campaigns/spring",
    run="campaigns/spring/runs/r1",
    activity="email1",
    channel=channel_pb2.CHANNEL_EMAIL,
    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
    template="templates/welcome",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Envelope:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class CollectingHandler:
    """An aiosmtpd handler that keeps every envelope it receives."""

    envelopes: list[Envelope] = field(default_factory=list)
    delay_s: float = 0.0  # how long it takes to accept each message

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.envelopes.append(Envelope(envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 OK"

    def recipients(self) -> set[str]:
        return {rcpt for e in self.envelopes for rcpt in e.rcpt_tos}


@dataclass
class Stack:
    """The running servers and stubs of one test."""

    delivery: delivery_service_pb2_grpc.DeliveryServiceStub
    profiles: profile_service_pb2_grpc.ProfileServiceStub
    smtp: CollectingHandler
    outbox: Path
    delivery_address: str = ""  # where delivery_svc listens (for a client that opens its own channel)


StartStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def start_stack(database_factory: DatabaseFactory, tmp_path: Path) -> AsyncIterator[StartStack]:
    """Starts profile_stub, an SMTP server and delivery_svc (settings overridable); stops them after."""
    servers: list[GrpcServer] = []
    channels: list[grpc.aio.Channel] = []
    controllers: list[Controller] = []

    async def start(smtp_delay_s: float = 0.0, **overrides: Any) -> Stack:
        url, schema = database_factory.url_and_schema("profile")
        profile = await build_profile(ProfileSettings(port=0, database_url=url, database_schema=schema))
        servers.append(profile)
        await profile.start()
        handler = CollectingHandler(delay_s=smtp_delay_s)
        smtp_port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=smtp_port)
        controller.start()
        controllers.append(controller)
        url, schema = database_factory.url_and_schema("delivery")
        settings: dict[str, Any] = {
            "port": 0,
            "database_url": url,
            "database_schema": schema,
            "data_dir": tmp_path,
            "profile_target": profile.address,
            "profile_timeout_s": 10,
            "email_provider": "smtp",
            "smtp_port": smtp_port,
            "sender_address": "news@example.com",
            "send_attempts": 2,
            "send_retry_initial_s": 0.01,
            "audience_target": "",  # no message logs unless a test gives an audience server
            **overrides,
        }
        delivery = await build_server(DeliverySettings(**settings))
        servers.append(delivery)
        await delivery.start()
        delivery_channel = grpc.aio.insecure_channel(delivery.address)
        profile_channel = grpc.aio.insecure_channel(profile.address)
        channels.extend([delivery_channel, profile_channel])
        return Stack(
            delivery=delivery_service_pb2_grpc.DeliveryServiceStub(delivery_channel),
            profiles=profile_service_pb2_grpc.ProfileServiceStub(profile_channel),
            smtp=handler,
            outbox=tmp_path / "outbox",
            delivery_address=delivery.address,
        )

    yield start
    for channel in channels:
        await channel.close()
    for server in reversed(servers):
        await server.stop(0)
    for controller in controllers:
        controller.stop()


def email_identity(address: str) -> value_pb2.Identity:
    return value_pb2.Identity(namespace="email", value=address)


def profile(profile_id: str, first_name: str, consent: int | None) -> profile_pb2.Profile:
    message = profile_pb2.Profile(
        name=f"profiles/{profile_id}",
        identities=[email_identity(f"{profile_id}@example.com")],
        first_name=first_name,
    )
    if consent is not None:
        message.consents.add(channel=channel_pb2.CHANNEL_EMAIL, state=consent, source="test")
    return message


async def seed(stack: Stack) -> None:
    """Profiles ada (opted in), bob (opted out) and cy (no consent), and the template "welcome"."""
    await stack.profiles.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile("ada", "Ada", profile_pb2.CONSENT_STATE_OPTED_IN),
                profile("bob", "Bob", profile_pb2.CONSENT_STATE_OPTED_OUT),
                profile("cy", "Cy", None),
            ]
        ),
        metadata=METADATA,
    )
    await stack.delivery.CreateTemplate(
        dpb.CreateTemplateRequest(
            template_id="welcome",
            template=template_pb2.Template(
                channel=channel_pb2.CHANNEL_EMAIL,
                display_name="Welcome",
                email=template_pb2.EmailContent(
                    subject="Welcome {{ profile.first_name }}",
                    text_body="Hello {{ profile.first_name }}, see you at {{ target.hotel }}.",
                    html_body="<p>Hello {{ profile.first_name }}, see you at {{ target.hotel }}.</p>",
                ),
            ),
        ),
        metadata=METADATA,
    )


def recipient(address: str, entity_key: str = "", hotel: str = "Ritz") -> dpb.Recipient:
    return dpb.Recipient(
        identity=email_identity(address),
        entity_key=entity_key,
        target={"hotel": value_pb2.Value(string_value=hotel)},
    )


BATCH = dpb.RecipientBatch(
    sequence=7,
    recipients=[
        recipient("ada@example.com", "r1", "Ritz <Paris>"),
        recipient("bob@example.com", "r2"),
        recipient("cy@example.com", "r3"),
        recipient("nobody@example.com", "r4"),
    ],
)


async def send(
    stack: Stack, batches: Iterable[dpb.RecipientBatch], header: dpb.SendHeader | None = HEADER
) -> list[dpb.SendResponse]:
    requests = ([dpb.SendRequest(header=header)] if header is not None else []) + [
        dpb.SendRequest(batch=b) for b in batches
    ]

    async def stream() -> AsyncIterator[dpb.SendRequest]:
        for request in requests:
            yield request

    return [response async for response in stack.delivery.Send(stream(), metadata=METADATA)]


def rich_error(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, list[str]]:
    """The status code, ErrorInfo reason and BadRequest field paths of a failed call."""
    reason, fields = "", []
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason = info.reason
            elif detail.Unpack(bad):
                fields = [v.field for v in bad.field_violations]
    return error.code(), reason, fields


async def test_a_batch_reaches_exactly_the_eligible_recipients_personalised(start_stack: StartStack) -> None:
    stack = await start_stack()
    await seed(stack)

    (ack,) = await send(stack, [BATCH])

    assert ack.sequence == 7
    assert (ack.sent, ack.already_sent, dict(ack.failed)) == (1, 0, {})
    assert dict(ack.skipped) == {"NO_CONSENT": 2, "UNKNOWN_PROFILE": 1}
    assert stack.smtp.recipients() == {"ada@example.com"}
    (envelope,) = stack.smtp.envelopes
    assert envelope.mail_from == "news@example.com"
    assert envelope.message["Subject"] == "Welcome Ada"
    text = envelope.message.get_body(("plain",))
    html = envelope.message.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().strip() == "Hello Ada, see you at Ritz <Paris>."
    assert html.get_content().strip() == "<p>Hello Ada, see you at Ritz &lt;Paris&gt;.</p>"
    message_id = envelope.message[MESSAGE_ID_HEADER]
    assert envelope.message["Message-ID"] == f"<{message_id}@carillon>"


async def test_a_replayed_batch_sends_nothing_new_and_counts_already_sent(start_stack: StartStack) -> None:
    stack = await start_stack()
    await seed(stack)
    await send(stack, [BATCH])

    (replay,) = await send(stack, [BATCH])

    assert (replay.sequence, replay.sent, replay.already_sent) == (7, 0, 1)
    assert dict(replay.skipped) == {"NO_CONSENT": 2, "UNKNOWN_PROFILE": 1}
    assert len(stack.smtp.envelopes) == 1


async def test_every_batch_of_a_stream_is_acknowledged_in_order(start_stack: StartStack) -> None:
    stack = await start_stack()
    await seed(stack)

    acks = await send(
        stack,
        [
            dpb.RecipientBatch(sequence=1, recipients=[recipient("ada@example.com", "r1")]),
            dpb.RecipientBatch(sequence=2, recipients=[recipient("ada@example.com", "r2")]),
        ],
    )

    assert [(a.sequence, a.sent) for a in acks] == [(1, 1), (2, 1)]
    assert len(stack.smtp.envelopes) == 2


async def test_a_batch_repeating_a_message_of_the_batch_in_flight_does_not_send_it_again(
    start_stack: StartStack,
) -> None:
    # The next batch is prepared while the one before is transmitted; one that shares a ledger key
    # with it waits for that transmission, or it would find the message still pending and send it
    # again. The relay is slow, so that the second batch arrives while the first is being sent.
    stack = await start_stack(smtp_delay_s=0.3)
    await seed(stack)

    acks = await send(
        stack,
        [
            dpb.RecipientBatch(sequence=1, recipients=[recipient("ada@example.com", "r1")]),
            dpb.RecipientBatch(sequence=2, recipients=[recipient("ada@example.com", "r1")]),
            dpb.RecipientBatch(sequence=3, recipients=[recipient("ada@example.com", "r2")]),
        ],
    )

    assert [(a.sequence, a.sent, a.already_sent) for a in acks] == [(1, 1, 0), (2, 0, 1), (3, 1, 0)]
    assert len(stack.smtp.envelopes) == 2


async def test_a_client_that_waits_for_each_acknowledgement_gets_it_before_it_sends_more(
    start_stack: StartStack,
) -> None:
    # The scheduler may hold the next batch until the last one is acknowledged (its window); the
    # worker must not hold an acknowledgement until more arrives.
    stack = await start_stack()
    await seed(stack)
    acknowledged = asyncio.Event()

    async def stream() -> AsyncIterator[dpb.SendRequest]:
        yield dpb.SendRequest(header=HEADER)
        yield dpb.SendRequest(batch=dpb.RecipientBatch(sequence=1, recipients=[recipient("ada@example.com", "r1")]))
        await asyncio.wait_for(acknowledged.wait(), timeout=10)
        yield dpb.SendRequest(batch=dpb.RecipientBatch(sequence=2, recipients=[recipient("ada@example.com", "r2")]))

    acks = []
    async for ack in stack.delivery.Send(stream(), metadata=METADATA, timeout=20):
        acks.append(ack)
        acknowledged.set()

    assert [(a.sequence, a.sent) for a in acks] == [(1, 1), (2, 1)]


async def test_the_outbox_provider_writes_one_eml_file_per_message(start_stack: StartStack, tmp_path: Path) -> None:
    stack = await start_stack(email_provider="outbox")
    await seed(stack)

    (ack,) = await send(
        stack,
        [
            dpb.RecipientBatch(
                sequence=1, recipients=[recipient("ada@example.com", "r1"), recipient("ada@example.com", "r2")]
            )
        ],
    )

    files = sorted(stack.outbox.glob("*.eml"))
    assert ack.sent == 2
    assert len(files) == 2
    for path in files:
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert message[MESSAGE_ID_HEADER] == path.stem
        assert message["To"] == "ada@example.com"
    assert stack.smtp.envelopes == []


async def test_a_stream_without_a_header_first_is_invalid_argument(start_stack: StartStack) -> None:
    stack = await start_stack()
    await seed(stack)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stack, [BATCH], header=None)

    assert rich_error(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REQUIRED", ["header"])


async def test_a_header_for_another_channel_is_invalid_argument(start_stack: StartStack) -> None:
    stack = await start_stack()
    await seed(stack)
    header = dpb.SendHeader()
    header.CopyFrom(HEADER)
    header.channel = channel_pb2.CHANNEL_SMS

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stack, [BATCH], header=header)

    assert rich_error(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "CHANNEL_NOT_SERVED", ["header.channel"])


async def test_a_header_naming_an_unknown_template_is_not_found(start_stack: StartStack) -> None:
    stack = await start_stack()
    header = dpb.SendHeader()
    header.CopyFrom(HEADER)
    header.template = "templates/missing"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stack, [BATCH], header=header)

    assert rich_error(caught.value) == (grpc.StatusCode.NOT_FOUND, "TEMPLATE_NOT_FOUND", ["header.template"])


async def test_an_unreachable_profile_service_is_unavailable(start_stack: StartStack) -> None:
    stack = await start_stack(profile_target=f"127.0.0.1:{free_port()}", profile_timeout_s=1)
    await seed(stack)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stack, [BATCH])

    assert rich_error(caught.value)[:2] == (grpc.StatusCode.UNAVAILABLE, "PROFILE_UNAVAILABLE")
    assert stack.smtp.envelopes == []


async def test_a_template_that_does_not_compile_is_invalid_argument_naming_the_part(start_stack: StartStack) -> None:
    stack = await start_stack()
    request = dpb.CreateTemplateRequest(
        template_id="broken",
        template=template_pb2.Template(
            channel=channel_pb2.CHANNEL_EMAIL,
            email=template_pb2.EmailContent(subject="Hi {{ profile.first_name", text_body="Hello"),
        ),
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.CreateTemplate(request, metadata=METADATA)

    assert rich_error(caught.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TEMPLATE_SYNTAX_ERROR",
        ["template.email.subject"],
    )


async def test_templates_are_created_read_and_listed(start_stack: StartStack) -> None:
    stack = await start_stack()
    await seed(stack)

    got = await stack.delivery.GetTemplate(dpb.GetTemplateRequest(name="templates/welcome"), metadata=METADATA)
    listed = await stack.delivery.ListTemplates(dpb.ListTemplatesRequest(page_size=10), metadata=METADATA)

    assert got.template.name == "templates/welcome"
    assert got.template.channel == channel_pb2.CHANNEL_EMAIL
    assert got.template.email.subject == "Welcome {{ profile.first_name }}"
    assert got.template.HasField("create_time")
    assert [t.name for t in listed.templates] == ["templates/welcome"]
    assert listed.next_page_token == ""


async def test_a_taken_template_id_is_already_exists(start_stack: StartStack) -> None:
    stack = await start_stack()
    await seed(stack)
    request = dpb.CreateTemplateRequest(
        template_id="welcome",
        template=template_pb2.Template(
            channel=channel_pb2.CHANNEL_EMAIL, email=template_pb2.EmailContent(subject="x", text_body="y")
        ),
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.CreateTemplate(request, metadata=METADATA)

    assert rich_error(caught.value)[:2] == (grpc.StatusCode.ALREADY_EXISTS, "TEMPLATE_ALREADY_EXISTS")


async def test_an_unknown_template_name_is_not_found(start_stack: StartStack) -> None:
    stack = await start_stack()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.GetTemplate(dpb.GetTemplateRequest(name="templates/nope"), metadata=METADATA)

    assert rich_error(caught.value)[:2] == (grpc.StatusCode.NOT_FOUND, "TEMPLATE_NOT_FOUND")


async def test_two_campaigns_sending_at_once_never_push_a_profile_over_its_daily_cap(start_stack: StartStack) -> None:
    stack = await start_stack()
    await seed(stack)
    people = [f"p{i:02d}" for i in range(12)]
    await stack.profiles.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[profile(p, p.upper(), profile_pb2.CONSENT_STATE_OPTED_IN) for p in people]
        ),
        metadata=METADATA,
    )
    await stack.profiles.CreateCappingRule(
        profile_service_pb2.CreateCappingRuleRequest(
            capping_rule_id="daily",
            capping_rule=profile_pb2.CappingRule(
                channel=channel_pb2.CHANNEL_EMAIL,
                max_messages=1,
                period=profile_pb2.CAPPING_PERIOD_DAY,
                time_basis=profile_pb2.CAPPING_TIME_BASIS_UTC,
            ),
        ),
        metadata=METADATA,
    )
    headers = []
    for campaign in ("spring", "summer"):
        header = dpb.SendHeader()
        header.CopyFrom(HEADER)
        header.campaign, header.run = f"campaigns/{campaign}", f"campaigns/{campaign}/runs/r1"
        headers.append(header)
    # Each campaign sends every profile in batches of three; the two streams run at the same time.
    batches = [
        dpb.RecipientBatch(sequence=n + 1, recipients=[recipient(f"{p}@example.com") for p in people[i : i + 3]])
        for n, i in enumerate(range(0, len(people), 3))
    ]

    spring, summer = await asyncio.gather(*(send(stack, batches, header=h) for h in headers))

    acks = [*spring, *summer]
    assert sorted(rcpt for e in stack.smtp.envelopes for rcpt in e.rcpt_tos) == sorted(
        f"{p}@example.com" for p in people
    )
    assert sum(a.sent for a in acks) == len(people)
    assert sum(a.skipped["CAPPED"] for a in acks) == len(people)
    history = await stack.profiles.ListCommunications(
        profile_service_pb2.ListCommunicationsRequest(profile="profiles/p00"), metadata=METADATA
    )
    assert len(history.communications) == 1


async def test_a_message_interrupted_under_a_cap_of_one_is_sent_once_when_its_batch_is_replayed(
    start_stack: StartStack,
) -> None:
    smtp_port = free_port()  # nothing listens yet: the first attempt finds the provider unavailable
    stack = await start_stack(smtp_port=smtp_port)
    await seed(stack)
    await stack.profiles.CreateCappingRule(
        profile_service_pb2.CreateCappingRuleRequest(
            capping_rule_id="daily",
            capping_rule=profile_pb2.CappingRule(max_messages=1, period=profile_pb2.CAPPING_PERIOD_DAY),
        ),
        metadata=METADATA,
    )
    batch = dpb.RecipientBatch(sequence=1, recipients=[recipient("ada@example.com", "r1")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stack, [batch])
    handler = CollectingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        (replay,) = await send(stack, [batch])  # the message's own reservation must not cap it
    finally:
        controller.stop()

    assert rich_error(caught.value)[:2] == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert (replay.sent, dict(replay.skipped)) == (1, {})
    assert [e.rcpt_tos for e in handler.envelopes] == [["ada@example.com"]]
