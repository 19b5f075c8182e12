"""Message logs to audience_svc: the outbox of pending log events and the task that empties it.

The ledger queues log events (a message ``sent`` or ``failed``; feedback ``delivered``, ``opened``,
``clicked``, ``bounced``) in the transaction of the ledger change they report
(:mod:`delivery_svc.ledger`), as message log batches: one row per status and event time of a change,
holding the message ids. :class:`MessageLogFlusher` runs in the worker's event loop: after every send
batch (and every ``interval_s``) it reads the due batches in the order they were queued, joins each
message with its ledger row, sends them in ``RecordMessageLogs`` calls of at most 5,000 logs, and
deletes a batch once audience_svc accepted all its logs. Nothing is lost while audience_svc is down
(the batches wait, with an exponential back-off) and nothing is logged twice: ``RecordMessageLogs`` is
idempotent on (message id, status), so a log resent (after a crash between the call and the delete, a
batch postponed half-delivered, an event queued again by a replay) is a duplicate there. A log that
audience_svc refuses as invalid is isolated (its call is retried log by log) and dropped with an error
line, so that one bad log never blocks the others. A sandbox whose logs
audience_svc cannot take in that sandbox's state (FAILED_PRECONDITION, e.g. MESSAGE_LOGS_SHADOWED, or
NOT_FOUND) waits alone, with its own back-off, while the other sandboxes' logs go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

import grpc
import sqlalchemy as sa
import structlog

from carillon.audience.v1 import audience_service_pb2, audience_service_pb2_grpc, message_log_pb2
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.bulk import pg_array
from carillon_chassis.channels import channel_value
from carillon_chassis.clients import CHANNEL_OPTIONS, call_metadata
from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import (
    CarillonError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_from_rpc,
)
from carillon_chassis.values import to_timestamp
from delivery_svc.ledger import LOGGED_COLUMNS, LoggedMessage, logged_messages
from delivery_svc.tables import LedgerRow, MessageLogBatchRow

log = structlog.get_logger("carillon.delivery.message_logs")

MAX_LOGS_PER_CALL = 5000
_LOOKUP_CHUNK = 10000  # message ids per ledger lookup
_MAX_RECONNECT_BACKOFF_MS = 3000
_STATUSES = {
    "sent": message_log_pb2.MESSAGE_STATUS_SENT,
    "delivered": message_log_pb2.MESSAGE_STATUS_DELIVERED,
    "opened": message_log_pb2.MESSAGE_STATUS_OPENED,
    "clicked": message_log_pb2.MESSAGE_STATUS_CLICKED,
    "bounced": message_log_pb2.MESSAGE_STATUS_BOUNCED,
    "failed": message_log_pb2.MESSAGE_STATUS_FAILED,
}
# Refusals about one sandbox's state (its user entity shadows message_logs: FAILED_PRECONDITION with
# reason MESSAGE_LOGS_SHADOWED; a sandbox audience_svc does not know): only that sandbox waits.
_SANDBOX_REFUSALS = (FailedPrecondition, NotFound)
# Codes that mean "audience_svc cannot take the logs now" (retried later), as opposed to a refusal.
_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,  # an audience_svc older than RecordMessageLogs: wait for it
    }
)


@dataclass(frozen=True)
class MessageLog:
    """One log event as audience_svc receives it."""

    message_id: str
    status: str
    campaign: str
    run: str
    activity: str
    channel: str
    identity_namespace: str
    identity_value: str
    profile_id: str
    entity_key: str
    event_time: datetime


class MessageLogSink(Protocol):
    """Where message logs go (audience_svc's RecordMessageLogs)."""

    async def record(self, sandbox: str, logs: Sequence[MessageLog]) -> None:
        """Record the logs (idempotent on message id and status); Unavailable to retry later,
        InvalidArgument when a log is refused."""
        ...


@dataclass
class OutboxBatch:
    """One queued message log batch, its logs joined with their ledger rows."""

    batch_id: int
    sandbox: str
    logs: list[MessageLog]


@dataclass(frozen=True)
class WaitingLog:
    """A queued log event, for inspection: its batch's attempts and when it is due."""

    sandbox: str
    message_id: str
    status: str
    attempts: int
    next_attempt_time: datetime


class MessageLogOutbox:
    """The queued message log batches: the due ones with their ledger rows, deletion and postponement."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._batches: sa.Table = MessageLogBatchRow.__table__  # type: ignore[attr-defined]
        self._ledger: sa.Table = LedgerRow.__table__  # type: ignore[attr-defined]

    def due(self, limit: int, now: datetime | None = None) -> list[OutboxBatch]:
        """Due batches in the order they were queued, up to ``limit`` logs (at least one batch, whatever
        its size), each log joined with its ledger row. An event named by two of these batches (queued
        twice) is kept in the first only.

        The due batches are found through their due-time index and read in id order; each message's
        ledger row is then looked up by its id (on PostgreSQL through a LATERAL subquery with LIMIT 1,
        which the planner cannot turn into a hash join over the whole ledger, as it did while a
        fast-growing ledger's statistics lagged)."""
        b = self._batches
        chosen: list[Any] = []
        with self.database.engine.connect() as conn:
            query = (
                sa.select(b.c.id, b.c.sandbox, b.c.status, b.c.event_time, b.c.message_ids, b.c.details, b.c.size)
                .where(b.c.next_attempt_time <= (now or utcnow()))
                .order_by(b.c.id)
            )
            total = 0
            for row in conn.execute(query.execution_options(yield_per=16)):
                if chosen and total + row.size > limit:
                    break
                chosen.append(row)
                total += row.size
            # Rows without details (moved from the per-message outbox): their ledger rows, looked up.
            wanted: dict[str, list[str]] = {}
            for row in chosen:
                if row.details is None:
                    wanted.setdefault(row.sandbox, []).extend(json.loads(row.message_ids))
            ledger = {
                sandbox: self._ledger_rows(conn, sandbox, list(dict.fromkeys(ids))) for sandbox, ids in wanted.items()
            }
        batches: list[OutboxBatch] = []
        taken: set[tuple[str, str, str]] = set()
        for row in chosen:
            ids = json.loads(row.message_ids)
            if row.details is not None:
                about: list[LoggedMessage | None] = list(logged_messages(row.details, len(ids)))
            else:
                found = ledger[row.sandbox]  # a ledger row gone (a purged run) has no log
                about = [LoggedMessage.of(found[mid]) if mid in found else None for mid in ids]
            logs: list[MessageLog] = []
            for mid, message in zip(ids, about, strict=True):
                key = (row.sandbox, mid, row.status)
                if key in taken or message is None:  # a duplicate, or nothing known about the message
                    continue
                taken.add(key)
                logs.append(_log(message, mid, row.status, row.event_time))
            batches.append(OutboxBatch(row.id, row.sandbox, logs))
        return batches

    def _ledger_rows(self, conn: sa.Connection, sandbox: str, ids: list[str]) -> dict[str, sa.RowMapping]:
        t = self._ledger
        columns = (t.c.id, *(t.c[name] for name in LOGGED_COLUMNS))
        found: dict[str, sa.RowMapping] = {}
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            if conn.dialect.name == "postgresql":
                asked = sa.select(sa.func.unnest(pg_array(chunk, t.c.id)).label("id")).subquery("k")
                match = sa.select(*columns).where(t.c.id == asked.c.id, t.c.sandbox == sandbox).limit(1).lateral("l")
                query: Any = sa.select(match).select_from(asked).join(match, sa.true())
            else:
                query = sa.select(*columns).where(t.c.sandbox == sandbox, t.c.id.in_(chunk))
            found.update({r["id"]: r for r in conn.execute(query).mappings()})
        return found

    def delete(self, batch_ids: Sequence[int]) -> None:
        """Remove batches whose logs audience_svc accepted (or refused for good)."""
        if batch_ids:
            with self.database.engine.begin() as conn:
                conn.execute(self._batches.delete().where(self._batches.c.id.in_(list(batch_ids))))

    def postpone(self, batch_ids: Sequence[int], delay_s: float) -> None:
        """Count one more failed attempt for each batch and make it due again in ``delay_s``."""
        if not batch_ids:
            return
        b = self._batches
        statement = (
            b.update()
            .where(b.c.id.in_(list(batch_ids)))
            .values(attempts=b.c.attempts + 1, next_attempt_time=utcnow() + timedelta(seconds=delay_s))
        )
        with self.database.engine.begin() as conn:
            conn.execute(statement)

    def pending(self) -> int:
        """Log events waiting (due or not; an event queued twice counts twice)."""
        with self.database.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(self._batches.c.size), 0))).scalar() or 0)

    def waiting(self) -> list[WaitingLog]:
        """Every queued event, in queue order (for inspection and tests)."""
        b = self._batches
        with self.database.engine.connect() as conn:
            rows = conn.execute(sa.select(b).order_by(b.c.id)).mappings().all()
        return [
            WaitingLog(r["sandbox"], mid, r["status"], r["attempts"], as_utc(r["next_attempt_time"]) or utcnow())
            for r in rows
            for mid in json.loads(r["message_ids"])
        ]


def _log(message: LoggedMessage, message_id: str, status: str, event_time: datetime) -> MessageLog:
    namespace, value = message.identity_namespace, message.identity_value
    profile_key = message.profile_key
    if not namespace and ":" in profile_key:  # a ledger row written before identities were kept
        namespace, value = profile_key.split(":", 1)
    return MessageLog(
        message_id=message_id,
        status=status,
        campaign=message.campaign,
        run=message.run,
        activity=message.activity,
        channel=message.channel,
        identity_namespace=namespace,
        identity_value=value,
        profile_id="" if ":" in profile_key else profile_key,
        entity_key=message.entity_key,
        event_time=as_utc(event_time) or utcnow(),
    )


class AudienceMessageLogSink:
    """The MessageLogSink over AudienceService.RecordMessageLogs."""

    def __init__(self, target: str, *, timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s
        # Reconnect at least every few seconds: the flusher waits for audience_svc between attempts, so
        # gRPC's own back-off (up to two minutes) would only delay the logs once it is back.
        self._channel = grpc.aio.insecure_channel(
            target, options=[*CHANNEL_OPTIONS, ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS)]
        )
        self._stub = audience_service_pb2_grpc.AudienceServiceStub(self._channel)

    async def record(self, sandbox: str, logs: Sequence[MessageLog]) -> None:
        """One RecordMessageLogs call."""
        request = to_request(logs)
        try:
            await self._stub.RecordMessageLogs(request, metadata=call_metadata(sandbox), timeout=self.timeout_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            if code in _RETRY_CODES:
                raise Unavailable(
                    f"audience service RecordMessageLogs: {code.name}", reason="AUDIENCE_UNAVAILABLE"
                ) from err
            raise error_from_rpc(err) from err

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


def to_request(logs: Sequence[MessageLog]) -> audience_service_pb2.RecordMessageLogsRequest:
    """The RecordMessageLogs request of ``logs``: when they share their status, campaign, run, activity,
    channel and event time (a batch's logs), those travel once, in ``defaults``."""
    shared = {(e.status, e.campaign, e.run, e.activity, e.channel, e.event_time) for e in logs}
    if len(shared) != 1:
        return audience_service_pb2.RecordMessageLogsRequest(logs=[to_proto(entry) for entry in logs])
    first = logs[0]
    request = audience_service_pb2.RecordMessageLogsRequest(
        defaults=message_log_pb2.MessageLog(
            status=_STATUSES[first.status],
            campaign=first.campaign,
            run=first.run,
            activity=first.activity,
            channel=cast(channel_pb2.Channel.ValueType, channel_value(first.channel)),
            event_time=to_timestamp(first.event_time),
        )
    )
    add = request.logs.add
    for entry in logs:
        log = add(message_id=entry.message_id, profile_id=entry.profile_id, entity_key=entry.entity_key)
        log.identity.namespace = entry.identity_namespace
        log.identity.value = entry.identity_value
    return request


def to_proto(entry: MessageLog) -> message_log_pb2.MessageLog:
    """The MessageLog message of a log event."""
    return message_log_pb2.MessageLog(
        message_id=entry.message_id,
        status=_STATUSES[entry.status],
        campaign=entry.campaign,
        run=entry.run,
        activity=entry.activity,
        channel=cast(channel_pb2.Channel.ValueType, channel_value(entry.channel)),
        identity=value_pb2.Identity(namespace=entry.identity_namespace, value=entry.identity_value),
        profile_id=entry.profile_id,
        entity_key=entry.entity_key,
        event_time=to_timestamp(entry.event_time),
    )


class MessageLogFlusher:
    """Empties the outbox into a sink: on :meth:`wake` (after a batch or feedback) and every
    ``interval_s``. While the sink is unavailable, the rows it could not take wait ``retry_initial_s``,
    doubling with each failure in a row up to ``retry_max_s``."""

    def __init__(
        self,
        database: Database,
        sink: MessageLogSink,
        *,
        interval_s: float = 1.0,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        batch_size: int = MAX_LOGS_PER_CALL,
    ) -> None:
        self.database = database
        self.outbox = MessageLogOutbox(database)
        self.sink = sink
        self.interval_s = interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.batch_size = min(batch_size, MAX_LOGS_PER_CALL)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0  # failed deliveries in a row, for the back-off
        self._paused_until = 0.0  # loop time before which audience_svc, found unavailable, is left alone
        # Refusals in a row per sandbox (FAILED_PRECONDITION, e.g. MESSAGE_LOGS_SHADOWED): that sandbox's
        # logs back off on their own, and other sandboxes' successes do not reset its back-off.
        self._sandbox_failures: dict[str, int] = {}

    def wake(self) -> None:
        """Ask for a flush now (cheap; coalesces)."""
        self._wake.set()

    async def flush(self) -> int:
        """Send every due batch once; returns how many logs audience_svc accepted (or refused for good).
        Stops at the first batch that cannot be delivered because audience_svc is unavailable
        (postponed); a batch refused for its sandbox's state is postponed and the others go on."""
        done = 0
        while True:
            due = await self.database.run(self.outbox.due, self.batch_size)
            if not due:
                return done
            for batch in due:
                delivered = await self._deliver(batch)
                if delivered is None:
                    return done
                done += delivered

    async def _deliver(self, batch: OutboxBatch) -> int | None:
        """Deliver one batch, in calls of at most ``batch_size`` logs, then delete it; None when
        audience_svc is unavailable (the batch is postponed whole: the logs it already accepted are sent
        again later, which RecordMessageLogs ignores). A batch whose sandbox audience_svc cannot take in
        its current state (FAILED_PRECONDITION, NOT_FOUND) is postponed with its sandbox's own back-off,
        and the other sandboxes' batches go on."""
        sandbox, logs = batch.sandbox, batch.logs
        try:
            for start in range(0, len(logs), self.batch_size):
                await self._record(sandbox, logs[start : start + self.batch_size])
        except _SANDBOX_REFUSALS as exc:
            await self._postpone_sandbox(batch, exc)
            return 0
        except CarillonError as exc:
            await self._postpone(batch, exc)
            return None
        self._failures = 0
        self._paused_until = 0.0
        self._sandbox_failures.pop(sandbox, None)
        await self.database.run(self.outbox.delete, [batch.batch_id])
        return len(logs)

    async def _record(self, sandbox: str, logs: list[MessageLog]) -> None:
        """One call; when audience_svc refuses a log as invalid, each log is sent alone and a refused
        one is dropped with an error line, so that one bad log never holds back the others."""
        try:
            await self.sink.record(sandbox, logs)
        except InvalidArgument:
            if len(logs) == 1:
                log.error("message log refused by audience; dropped", message_id=logs[0].message_id)
                return
            for entry in logs:
                try:
                    await self.sink.record(sandbox, [entry])
                except InvalidArgument as exc:
                    log.error("message log refused by audience; dropped", message_id=entry.message_id, error=str(exc))

    async def _postpone(self, batch: OutboxBatch, exc: CarillonError) -> None:
        delay = min(self.retry_max_s, self.retry_initial_s * 2**self._failures)
        self._failures += 1
        self._paused_until = asyncio.get_running_loop().time() + delay
        log.warning(
            "message logs not delivered; retrying later", count=len(batch.logs), retry_in_s=delay, error=str(exc)
        )
        await self.database.run(self.outbox.postpone, [batch.batch_id], delay)

    async def _postpone_sandbox(self, batch: OutboxBatch, exc: CarillonError) -> None:
        failures = self._sandbox_failures.get(batch.sandbox, 0)
        delay = min(self.retry_max_s, self.retry_initial_s * 2**failures)
        self._sandbox_failures[batch.sandbox] = failures + 1
        log.warning(
            "message logs of a sandbox refused by audience; retrying later",
            sandbox=batch.sandbox,
            count=len(batch.logs),
            retry_in_s=delay,
            reason=exc.reason,
            error=str(exc),
        )
        await self.database.run(self.outbox.postpone, [batch.batch_id], delay)

    async def run(self) -> None:
        """Flush on every wake-up and every ``interval_s`` until cancelled. While audience_svc is
        unavailable, its back-off holds whatever wakes the flusher: the logs queued meanwhile wait in the
        outbox instead of each batch's flush reading the growing outbox and calling in vain."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            paused = self._paused_until - loop.time()
            if paused > 0:
                await asyncio.sleep(paused)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive a database hiccup (logged)
                log.exception("message log flush failed")

    async def start(self) -> None:
        """Start the background task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        """Stop the background task (pending rows stay in the outbox for the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
