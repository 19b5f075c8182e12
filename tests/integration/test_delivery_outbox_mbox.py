"""delivery_svc with the mbox outbox, as a real gRPC server with a real profile_stub server: one mbox file
per batch, and no message written twice when the ledger forgot it was sent (a crash between the durable
file and the ledger's ``sent`` mark). Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import mailbox
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.delivery.v1 import delivery_service_pb2_grpc
from carillon.profile.v1 import profile_service_pb2_grpc
from carillon_chassis.database import Database
from carillon_chassis.server import GrpcServer
from delivery_svc.app import build_server
from delivery_svc.emails import MESSAGE_ID_HEADER
from delivery_svc.providers import OutboxIndex
from delivery_svc.settings import DeliverySettings
from profile_stub.app import build_server as build_profile
from profile_stub.settings import ProfileSettings
from tests.conftest import DatabaseFactory
from tests.integration.test_delivery_server import CollectingHandler, Stack, recipient, seed, send

StartMbox = Callable[[], Awaitable[tuple[Stack, Database]]]


@pytest.fixture
async def start_mbox(database_factory: DatabaseFactory, tmp_path: Path) -> AsyncIterator[StartMbox]:
    """Starts profile_stub and an email delivery_svc writing mbox files to tmp_path/outbox; gives the
    stack and a handle on delivery_svc's database."""
    servers: list[GrpcServer] = []
    channels: list[grpc.aio.Channel] = []
    databases: list[Database] = []

    async def start() -> tuple[Stack, Database]:
        url, schema = database_factory.url_and_schema("profile")
        profile = await build_profile(ProfileSettings(port=0, database_url=url, database_schema=schema))
        servers.append(profile)
        await profile.start()
        url, schema = database_factory.url_and_schema("delivery")
        settings: dict[str, Any] = {
            "port": 0,
            "database_url": url,
            "database_schema": schema,
            "data_dir": tmp_path,
            "profile_target": profile.address,
            "email_provider": "outbox",
            "outbox_format": "mbox",
            "sender_address": "news@example.com",
            "audience_target": "",
        }
        delivery = await build_server(DeliverySettings(**settings))
        servers.append(delivery)
        await delivery.start()
        delivery_channel = grpc.aio.insecure_channel(delivery.address)
        profile_channel = grpc.aio.insecure_channel(profile.address)
        channels.extend([delivery_channel, profile_channel])
        database = Database(url, schema=schema, threads=1)
        databases.append(database)
        stack = Stack(
            delivery=delivery_service_pb2_grpc.DeliveryServiceStub(delivery_channel),
            profiles=profile_service_pb2_grpc.ProfileServiceStub(profile_channel),
            smtp=CollectingHandler(),
            outbox=tmp_path / "outbox",
        )
        return stack, database

    yield start
    for channel in channels:
        await channel.close()
    for server in reversed(servers):
        await server.stop(0)
    for database in databases:
        database.close()


def outbox_ids(outbox: Path) -> list[str]:
    ids: list[str] = []
    for path in sorted(outbox.glob("*.mbox")):
        box = mailbox.mbox(path, create=False)
        ids.extend(str(message[MESSAGE_ID_HEADER]) for message in box)
        box.close()
    return ids


BATCH = dpb.RecipientBatch(
    sequence=1, recipients=[recipient("ada@example.com", "r1"), recipient("ada@example.com", "r2")]
)


async def test_a_batch_goes_to_one_mbox_file_with_one_message_per_recipient(start_mbox: StartMbox) -> None:
    stack, _ = await start_mbox()
    await seed(stack)

    (ack,) = await send(stack, [BATCH])

    (path,) = sorted(stack.outbox.glob("*.mbox"))
    box = mailbox.mbox(path, create=False)
    assert ack.sent == 2
    assert sorted(str(m["To"]) for m in box) == ["ada@example.com", "ada@example.com"]
    assert list(stack.outbox.glob("*.eml")) == []


async def test_a_batch_replayed_after_the_ledger_lost_its_sent_marks_writes_no_message_twice(
    start_mbox: StartMbox,
) -> None:
    stack, database = await start_mbox()
    await seed(stack)
    (first,) = await send(stack, [BATCH])
    written = outbox_ids(stack.outbox)
    with database.engine.begin() as conn:  # the crash: the file is durable, the ledger still says pending
        reset = conn.execute(sa.text("UPDATE send_ledger SET status = 'pending' WHERE status = 'sent'"))

    (replay,) = await send(stack, [BATCH])

    assert (first.sent, reset.rowcount) == (2, 2)
    assert (replay.sent, replay.already_sent) == (2, 0)  # sent again as far as the ledger knows...
    assert outbox_ids(stack.outbox) == written  # ...but the outbox holds each message once
    assert len(list(stack.outbox.glob("*.mbox"))) == 1
    # The first send's ledger rows were new and durable (PostgreSQL): the pipeline told the outbox they
    # were first attempts, which it listed for their file instead of indexing them one by one; the replay
    # found them in that list. SQLite's ledger commits are not durable (synchronous=NORMAL): none is.
    with sqlite3.connect(stack.outbox / OutboxIndex.FILE_NAME) as index:
        lists = [sorted(json.loads(row[0])) for row in index.execute("SELECT message_ids FROM first_attempts")]
        one_by_one = index.execute("SELECT count(*) FROM messages").fetchone()[0]
    if database.is_postgres:
        assert (lists, one_by_one) == ([sorted(written)], 0)
    else:
        assert (lists, one_by_one) == ([], 2)
