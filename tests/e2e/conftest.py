"""The e2e stack: the four real gRPC servers on ephemeral ports and a real SMTP server (aiosmtpd).

Each service gets its own database on the test's backend (SQLite files or PostgreSQL schemas), the
delivery worker sends over SMTP to an aiosmtpd server that records every envelope, and the
scheduler polls quickly. Clients talk to the servers over real TCP channels.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from audience_svc.app import build_server as build_audience
from audience_svc.settings import AudienceSettings
from carillon_chassis.server import GrpcServer
from carillon_cli.endpoints import Endpoints
from delivery_svc.app import build_server as build_delivery
from delivery_svc.settings import DeliverySettings
from profile_stub.app import build_server as build_profile
from profile_stub.settings import ProfileSettings
from scheduler_svc.app import build_server as build_scheduler
from scheduler_svc.settings import SchedulerSettings
from tests.conftest import DatabaseFactory


@dataclass
class ReceivedMail:
    """One message as the SMTP server received it."""

    sender: str
    recipients: list[str]
    message: EmailMessage


@dataclass
class RecordingHandler:
    """An aiosmtpd handler that keeps every message it accepts."""

    messages: list[ReceivedMail] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        self.messages.append(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), parsed))  # type: ignore[arg-type]
        return "250 OK"

    def recipients(self) -> list[str]:
        """Every RCPT address, one per message (duplicates kept, so they can be detected)."""
        return [rcpt for mail in self.messages for rcpt in mail.recipients]


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0 themselves)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def smtp_server() -> Iterator[tuple[RecordingHandler, int]]:
    """A real SMTP server on 127.0.0.1 that records what it receives."""
    handler = RecordingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


@dataclass
class Stack:
    """The running services, their addresses and the SMTP recorder."""

    endpoints: Endpoints
    smtp: RecordingHandler
    servers: dict[str, GrpcServer]


@pytest.fixture
async def stack(database_factory: DatabaseFactory, smtp_server: tuple[RecordingHandler, int]) -> AsyncIterator[Stack]:
    """All four services, wired to one another, on the test's database backend."""
    handler, smtp_port = smtp_server
    servers: dict[str, GrpcServer] = {}

    def db(service: str) -> dict[str, Any]:
        url, schema = database_factory.url_and_schema(service)
        return {"database_url": url, "database_schema": schema, "port": 0, "grace_period_s": 1.0}

    try:
        servers["audience"] = await build_audience(AudienceSettings(**db("audience")))
        await servers["audience"].start()
        servers["profile"] = await build_profile(ProfileSettings(**db("profile")))
        await servers["profile"].start()
        servers["delivery"] = await build_delivery(
            DeliverySettings(
                **db("delivery"),
                profile_target=servers["profile"].address,
                audience_target=servers["audience"].address,
                message_log_interval_s=0.1,
                email_provider="smtp",
                smtp_host="127.0.0.1",
                smtp_port=smtp_port,
            )
        )
        await servers["delivery"].start()
        servers["scheduler"] = await build_scheduler(
            SchedulerSettings(
                **db("scheduler"),
                audience_target=servers["audience"].address,
                delivery_targets={"email": servers["delivery"].address},
                poll_interval_s=0.05,
            )
        )
        await servers["scheduler"].start()
        endpoints = Endpoints(**{name: server.address for name, server in servers.items()})
        yield Stack(endpoints, handler, servers)
    finally:
        for name in ("scheduler", "delivery", "audience", "profile"):
            if name in servers:
                await servers[name].stop(0)
