"""Message logs from delivery_svc to a real gRPC AudienceService that records them.

The audience server here is a small recording implementation of RecordMessageLogs (idempotent on
message id and status, like the real one) on a real port, so that it can be down while delivery
sends and come up later. Every test runs on SQLite and on PostgreSQL (the ``start_stack`` fixture of
the server tests). The outbox and the flusher are also tested alone, with a fake sink.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
import sqlalchemy as sa

from carillon.audience.v1 import audience_service_pb2, audience_service_pb2_grpc, message_log_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.type.v1 import channel_pb2
from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import InvalidArgument, Unavailable
from delivery_svc.ledger import Ledger, LedgerEntry, LogEvent, LoggedMessage, StatusChange
from delivery_svc.message_logs import MessageLog, MessageLogFlusher, MessageLogOutbox
from delivery_svc.tables import MIGRATIONS, MessageLogBatchRow
from tests.conftest import DatabaseFactory
from tests.integration import test_delivery_server as server_tests
from tests.integration.test_delivery_server import (
    BATCH,
    HEADER,
    METADATA,
    StartStack,
    free_port,
    recipient,
    seed,
    send,
)

serving = server_tests.start_stack  # the fixture, under a name of this module
STATUS = message_log_pb2.MessageStatus


@dataclass
class RecordingAudience(audience_service_pb2_grpc.AudienceServiceServicer):
    """RecordMessageLogs only: keeps every log received (repeats too) and the set of distinct ones, each
    with the request's defaults applied, as audience_svc applies them."""

    received: list[tuple[str, message_log_pb2.MessageLog]] = field(default_factory=list)
    recorded: dict[tuple[str, int], message_log_pb2.MessageLog] = field(default_factory=dict)

    async def RecordMessageLogs(
        self, request: audience_service_pb2.RecordMessageLogsRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.RecordMessageLogsResponse:
        sandbox = dict(context.invocation_metadata() or ()).get("x-carillon-sandbox", "")
        new = 0
        for sent in request.logs:
            entry = message_log_pb2.MessageLog()
            entry.CopyFrom(request.defaults)
            entry.MergeFrom(sent)  # the fields the log sets win (proto3: the ones not left empty)
            self.received.append((str(sandbox), entry))
            if (entry.message_id, entry.status) not in self.recorded:
                self.recorded[(entry.message_id, entry.status)] = entry
                new += 1
        return audience_service_pb2.RecordMessageLogsResponse(recorded=new, duplicates=len(request.logs) - new)

    def statuses(self) -> list[tuple[str, int]]:
        return sorted(self.recorded)


@dataclass
class AudienceServer:
    """A recording audience server that can be started (again) on a fixed port."""

    port: int
    servicer: RecordingAudience = field(default_factory=RecordingAudience)
    server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = grpc.aio.server()
        audience_service_pb2_grpc.add_AudienceServiceServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(self.target)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None


@pytest.fixture
async def audience() -> AsyncIterator[AudienceServer]:
    """A recording audience server on a free port, not started."""
    server = AudienceServer(free_port())
    yield server
    await server.stop()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds (the flusher runs in the background); fail after a long while."""
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never held")


def fast(audience: AudienceServer) -> dict[str, object]:
    return {
        "audience_target": audience.target,
        "audience_timeout_s": 0.5,
        "message_log_interval_s": 0.05,
        "message_log_retry_max_s": 0.2,
    }


async def test_each_sent_message_reaches_audience_as_one_sent_log(
    serving: StartStack, audience: AudienceServer
) -> None:
    await audience.start()
    stack = await serving(**fast(audience))
    await seed(stack)

    await send(stack, [BATCH])

    await eventually(lambda: len(audience.servicer.recorded) == 1)
    ((sandbox, log),) = audience.servicer.received
    (envelope,) = stack.smtp.envelopes
    assert sandbox == "prod"
    assert log.message_id == str(envelope.message["X-Carillon-Message-Id"])
    assert (log.status, log.campaign, log.run, log.activity) == (
        STATUS.MESSAGE_STATUS_SENT,
        HEADER.campaign,
        HEADER.run,
        HEADER.activity,
    )
    assert log.channel == channel_pb2.CHANNEL_EMAIL
    assert (log.identity.namespace, log.identity.value) == ("email", "ada@example.com")
    assert (log.profile_id, log.entity_key) == ("ada", "r1")
    assert log.HasField("event_time")


async def test_feedback_reaches_audience_as_logs_and_complaints_do_not(
    serving: StartStack, audience: AudienceServer
) -> None:
    await audience.start()
    stack = await serving(**fast(audience))
    await seed(stack)
    await send(stack, [dpb.RecipientBatch(sequence=1, recipients=[recipient("ada@example.com", "r1")])])
    (envelope,) = stack.smtp.envelopes
    mid = str(envelope.message["X-Carillon-Message-Id"])
    kinds = dpb.FeedbackKind

    await stack.delivery.RecordFeedback(
        dpb.RecordFeedbackRequest(
            events=[
                dpb.FeedbackEvent(event_id=f"e{i}", message_id=mid, kind=kind)  # type: ignore[arg-type]
                for i, kind in enumerate(
                    (
                        kinds.FEEDBACK_KIND_DELIVERED,
                        kinds.FEEDBACK_KIND_OPENED,
                        kinds.FEEDBACK_KIND_CLICKED,
                        kinds.FEEDBACK_KIND_SOFT_BOUNCE,
                        kinds.FEEDBACK_KIND_HARD_BOUNCE,
                        kinds.FEEDBACK_KIND_COMPLAINT,
                    )
                )
            ]
        ),
        metadata=METADATA,
    )

    await eventually(lambda: len(audience.servicer.recorded) == 5)
    assert audience.servicer.statuses() == [
        (mid, STATUS.MESSAGE_STATUS_SENT),
        (mid, STATUS.MESSAGE_STATUS_DELIVERED),
        (mid, STATUS.MESSAGE_STATUS_OPENED),
        (mid, STATUS.MESSAGE_STATUS_CLICKED),
        (mid, STATUS.MESSAGE_STATUS_BOUNCED),
    ]


async def test_logs_queued_while_audience_is_down_arrive_once_when_it_comes_up(
    serving: StartStack, audience: AudienceServer, database_factory: DatabaseFactory
) -> None:
    url, schema = database_factory.url_and_schema("delivery_logs")
    stack = await serving(**fast(audience), database_url=url, database_schema=schema)
    await seed(stack)
    batch = dpb.RecipientBatch(
        sequence=1, recipients=[recipient("ada@example.com", "r1"), recipient("ada@example.com", "r2")]
    )
    database = Database(url, schema=schema, threads=1)
    database.migrate(MIGRATIONS)

    def attempted() -> bool:
        # A delivery failed: audience is down. (Not every batch: the flusher stops at the first batch that
        # audience_svc cannot take, and with the SMTP worker each message is a batch of its own, so which
        # batches were tried before audience comes up depends on timing.)
        return any(w.attempts > 0 for w in MessageLogOutbox(database).waiting())

    try:
        (ack,) = await send(stack, [batch])
        await eventually(attempted)
        await audience.start()
        await eventually(lambda: len(audience.servicer.recorded) == 2)
        await eventually(lambda: not _pending(database))
    finally:
        database.close()

    assert ack.sent == 2
    message_ids = sorted(str(e.message["X-Carillon-Message-Id"]) for e in stack.smtp.envelopes)
    assert audience.servicer.statuses() == [(mid, STATUS.MESSAGE_STATUS_SENT) for mid in message_ids]
    assert sorted(entry.message_id for _, entry in audience.servicer.received) == message_ids


def _pending(database: Database) -> int:
    return MessageLogOutbox(database).pending()


# -- the outbox and the flusher, with a fake sink ------------------------------------------------
@dataclass
class FakeSink:
    """Records logs per call; refuses logs of ``refused`` message ids, or everything while ``down``."""

    calls: list[list[str]] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    down: bool = False
    logs: list[MessageLog] = field(default_factory=list)  # every log accepted

    async def record(self, sandbox: str, logs: Sequence[MessageLog]) -> None:
        if self.down:
            raise Unavailable("audience down", reason="AUDIENCE_UNAVAILABLE")
        if any(entry.message_id in self.refused for entry in logs):
            raise InvalidArgument("a bad log", field="logs[0].identity")
        self.calls.append([f"{entry.message_id}:{entry.status}" for entry in logs])
        self.logs += logs


def ledger_with_sent_messages(database: Database, count: int, *, message_logs: bool = True) -> Ledger:
    """A ledger holding ``count`` sent messages m0..m{count-1}, their ``sent`` logs queued."""
    database.migrate(MIGRATIONS)
    ledger = Ledger(database, message_logs=message_logs)
    entries = [
        LedgerEntry(
            message_id=f"m{i}",
            sandbox="prod",
            campaign=HEADER.campaign,
            run=HEADER.run,
            activity=HEADER.activity,
            profile_key=f"p{i}",
            entity_key="",
            channel="email",
            status="pending",
            identity_namespace="email",
            identity_value=f"p{i}@example.com",
        )
        for i in range(count)
    ]
    ledger.write(entries)
    now = utcnow()
    ledger.mark(
        [StatusChange(f"m{i}", "sent") for i in range(count)],
        [LogEvent("prod", f"m{i}", "sent", now) for i in range(count)],
    )
    return ledger


async def test_a_log_audience_refuses_is_dropped_and_the_others_are_delivered(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    ledger_with_sent_messages(database, 3)
    sink = FakeSink(refused={"m1"})
    flusher = MessageLogFlusher(database, sink)

    delivered = await flusher.flush()

    assert delivered == 3
    assert sink.calls == [["m0:sent"], ["m2:sent"]]
    assert _pending(database) == 0


async def test_logs_are_kept_and_postponed_while_audience_is_unavailable(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    ledger_with_sent_messages(database, 2)
    sink = FakeSink(down=True)
    flusher = MessageLogFlusher(database, sink, retry_initial_s=0, retry_max_s=0)

    first = await flusher.flush()
    sink.down = False
    second = await flusher.flush()

    assert (first, second) == (0, 2)
    assert sink.calls == [["m0:sent", "m1:sent"]]
    assert _pending(database) == 0


@dataclass
class CountingSink(FakeSink):
    """A FakeSink that counts every call, failed ones too."""

    attempts: int = 0

    async def record(self, sandbox: str, logs: Sequence[MessageLog]) -> None:
        self.attempts += 1
        await super().record(sandbox, logs)


async def test_while_audience_is_unavailable_wake_ups_do_not_call_it_again_before_its_back_off(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    ledger = ledger_with_sent_messages(database, 2)
    sink = CountingSink(down=True)
    flusher = MessageLogFlusher(database, sink, interval_s=3600, retry_initial_s=600, retry_max_s=600)
    await flusher.start()
    try:
        flusher.wake()
        await eventually(lambda: sink.attempts == 1)
        for i in range(3):  # later batches queue new logs and wake the flusher
            now = utcnow()
            ledger.mark([StatusChange(f"m{i % 2}", "sent")], [LogEvent("prod", f"m{i % 2}", "opened", now)])
            flusher.wake()
            await asyncio.sleep(0.05)
    finally:
        await flusher.stop()

    assert sink.attempts == 1  # the back-off (600 s) held
    assert _pending(database) == 5  # two sent logs and three opened logs (m0's twice), all kept


async def test_a_ledger_without_message_logs_queues_nothing(make_database: Callable[[str], Database]) -> None:
    database = make_database("delivery")

    ledger_with_sent_messages(database, 2, message_logs=False)

    assert _pending(database) == 0


async def test_the_same_status_of_a_message_queued_twice_reaches_audience_once_per_flush(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    ledger = ledger_with_sent_messages(database, 2)
    ledger.mark([StatusChange("m0", "sent")], [LogEvent("prod", "m0", "sent", utcnow())])  # a replayed batch
    sink = FakeSink()

    delivered = await MessageLogFlusher(database, sink).flush()

    assert delivered == 2
    assert sink.calls == [["m0:sent", "m1:sent"]]
    assert _pending(database) == 0


async def test_a_batch_larger_than_one_call_is_sent_in_several_calls_and_deleted_once_all_are_accepted(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    ledger_with_sent_messages(database, 5)
    sink = FakeSink()

    delivered = await MessageLogFlusher(database, sink, batch_size=2).flush()

    assert delivered == 5
    assert sink.calls == [["m0:sent", "m1:sent"], ["m2:sent", "m3:sent"], ["m4:sent"]]
    assert _pending(database) == 0


@dataclass
class DownOnItsSecondCall(FakeSink):
    """A FakeSink that is unavailable for its second call only."""

    seen: int = 0

    async def record(self, sandbox: str, logs: Sequence[MessageLog]) -> None:
        self.seen += 1
        self.down = self.seen == 2
        await super().record(sandbox, logs)


async def test_a_batch_half_delivered_when_audience_went_away_is_sent_again_whole(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    ledger_with_sent_messages(database, 4)
    sink = DownOnItsSecondCall()
    flusher = MessageLogFlusher(database, sink, batch_size=2, retry_initial_s=0, retry_max_s=0)

    first = await flusher.flush()
    waiting = MessageLogOutbox(database).waiting()
    second = await flusher.flush()

    assert first == 0
    assert [(w.message_id, w.attempts) for w in waiting] == [(f"m{i}", 1) for i in range(4)]
    assert second == 4
    assert sink.calls == [["m0:sent", "m1:sent"], ["m0:sent", "m1:sent"], ["m2:sent", "m3:sent"]]
    assert _pending(database) == 0


async def test_logs_are_queued_as_one_row_per_batch_and_status(make_database: Callable[[str], Database]) -> None:
    database = make_database("delivery")
    ledger_with_sent_messages(database, 300)

    with database.engine.connect() as conn:
        rows = conn.execute(sa.select(MessageLogBatchRow.__table__)).mappings().all()  # type: ignore[attr-defined]

    assert [(r["status"], r["size"]) for r in rows] == [("sent", 300)]


async def test_logs_queued_with_their_details_are_sent_without_reading_the_ledger(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    database.migrate(MIGRATIONS)
    ledger = Ledger(database, message_logs=True)
    now = utcnow()

    def about(i: int, activity: str) -> LoggedMessage:
        run = "campaigns/c/runs/r"
        return LoggedMessage("campaigns/c", run, activity, "email", f"p{i}", f"k{i}", "email", f"{i}@x")

    # One batch of one activity (shared fields stored once), then feedback of two activities at once.
    ledger.mark([], [LogEvent("prod", f"m{i}", "sent", now, about(i, "a1")) for i in range(3)])
    opened = [LogEvent("prod", "m0", "opened", now, about(0, "a1"))]
    ledger.mark([], [*opened, LogEvent("prod", "n1", "opened", now, about(1, "a2"))])
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    sa.event.listen(database.engine, "before_cursor_execute", seen)
    try:
        sink = FakeSink()
        delivered = await MessageLogFlusher(database, sink).flush()
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", seen)

    assert delivered == 5
    assert sink.calls == [["m0:sent", "m1:sent", "m2:sent"], ["m0:opened", "n1:opened"]]
    assert not [s for s in statements if "send_ledger" in s]
    assert (sink.logs[-1].activity, sink.logs[-1].profile_id, sink.logs[-1].entity_key) == ("a2", "p1", "k1")
    assert (sink.logs[-1].identity_namespace, sink.logs[-1].identity_value) == ("email", "1@x")
