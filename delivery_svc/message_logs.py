"""Message logs to audience_svc: the outbox of pending log events and the task that empties it.

The ledger queues one outbox row per log event (a message ``sent`` or ``failed``; feedback
``delivered``, ``opened``, ``clicked``, ``bounced``) in the transaction of the ledger change it
reports (:mod:`delivery_svc.ledger`). :class:`MessageLogFlusher` runs in the worker's event loop:
after every batch (and every ``interval_s``) it reads the due rows joined with their ledger rows,
sends them in ``RecordMessageLogs`` calls of at most 5,000 logs per sandbox, and deletes them once
audience_svc accepted them. Nothing is lost while audience_svc is down (the rows wait, with an
exponential back-off) and nothing is logged twice: ``RecordMessageLogs`` is idempotent on
(message id, status), so a row resent after a crash between the call and the delete is a duplicate
there. A log that audience_svc refuses as invalid is isolated (its chunk is retried log by log) and
dropped with an error line, so that one bad row never blocks the others. A sandbox whose logs
audience_svc cannot take in that sandbox's state (FAILED_PRECONDITION, e.g. MESSAGE_LOGS_SHADOWED, or
NOT_FOUND) waits alone, with its own back-off, while the other sandboxes' logs go on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

import grpc
import sqlalchemy as sa
import structlog

from carillon.audience.v1 import audience_service_pb2, audience_service_pb2_grpc, message_log_pb2
from carillon.type.v1 import channel_pb2, value_pb2
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
from delivery_svc.tables import LedgerRow, MessageLogOutboxRow

log = structlog.get_logger("carillon.delivery.message_logs")

MAX_LOGS_PER_CALL = 5000
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


class MessageLogOutbox:
    """The outbox table: due rows with their ledger rows, deletion and postponement."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._outbox: sa.Table = MessageLogOutboxRow.__table__  # type: ignore[attr-defined]
        self._ledger: sa.Table = LedgerRow.__table__  # type: ignore[attr-defined]

    def due(self, limit: int, now: datetime | None = None) -> list[tuple[str, MessageLog]]:
        """Up to ``limit`` due rows, oldest first, as (sandbox, log).

        The due rows are chosen first, then each one's ledger row is looked up by its id: on PostgreSQL
        through a LATERAL subquery with LIMIT 1 that the planner cannot turn into a hash join over the
        whole ledger (which it did while a fast-growing ledger's statistics lagged, once per batch)."""
        o, t = self._outbox, self._ledger
        due = (
            sa.select(o.c.sandbox, o.c.message_id, o.c.status, o.c.event_time, o.c.create_time)
            .where(o.c.next_attempt_time <= (now or utcnow()))
            .order_by(o.c.create_time, o.c.message_id, o.c.status)
            .limit(limit)
            .subquery("d")
        )
        ledger_columns = (
            t.c.campaign,
            t.c.run,
            t.c.activity,
            t.c.channel,
            t.c.profile_key,
            t.c.entity_key,
            t.c.identity_namespace,
            t.c.identity_value,
        )
        match = sa.and_(t.c.id == due.c.message_id, t.c.sandbox == due.c.sandbox)
        with self.database.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                ledger: Any = sa.select(*ledger_columns).where(match).limit(1).lateral("l")
                joined = sa.select(due).join(ledger, sa.true())
            else:
                ledger = t
                joined = sa.select(due).join(t, match)
            query = joined.with_only_columns(
                due.c.sandbox,
                due.c.message_id,
                due.c.status,
                due.c.event_time,
                *(ledger.c[c.name] for c in ledger_columns),
            ).order_by(due.c.create_time, due.c.message_id, due.c.status)
            return [(r["sandbox"], _log(r)) for r in conn.execute(query).mappings()]

    def _where(self) -> sa.ColumnElement[bool]:
        o = self._outbox
        return sa.and_(
            o.c.sandbox == sa.bindparam("b_sandbox"),
            o.c.message_id == sa.bindparam("b_message_id"),
            o.c.status == sa.bindparam("b_status"),
        )

    @staticmethod
    def _keys(sandbox: str, logs: Sequence[MessageLog]) -> list[dict[str, object]]:
        return [{"b_sandbox": sandbox, "b_message_id": e.message_id, "b_status": e.status} for e in logs]

    def delete(self, sandbox: str, logs: Sequence[MessageLog]) -> None:
        """Remove rows audience_svc accepted (or refused for good), in one statement."""
        if logs:
            with self.database.engine.begin() as conn:
                conn.execute(self._outbox.delete().where(self._where()), self._keys(sandbox, logs))

    def postpone(self, sandbox: str, logs: Sequence[MessageLog], delay_s: float) -> None:
        """Count one more failed attempt for each row and make it due again in ``delay_s``."""
        if not logs:
            return
        o = self._outbox
        statement = (
            o.update()
            .where(self._where())
            .values(attempts=o.c.attempts + 1, next_attempt_time=utcnow() + timedelta(seconds=delay_s))
        )
        with self.database.engine.begin() as conn:
            conn.execute(statement, self._keys(sandbox, logs))

    def pending(self) -> int:
        """Rows waiting (due or not)."""
        with self.database.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self._outbox)).scalar() or 0)


def _log(row: sa.RowMapping) -> MessageLog:
    namespace, value = row["identity_namespace"], row["identity_value"]
    profile_key: str = row["profile_key"]
    if not namespace and ":" in profile_key:  # a ledger row written before identities were kept
        namespace, value = profile_key.split(":", 1)
    return MessageLog(
        message_id=row["message_id"],
        status=row["status"],
        campaign=row["campaign"],
        run=row["run"],
        activity=row["activity"],
        channel=row["channel"],
        identity_namespace=namespace,
        identity_value=value,
        profile_id="" if ":" in profile_key else profile_key,
        entity_key=row["entity_key"],
        event_time=as_utc(row["event_time"]) or utcnow(),
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
        request = audience_service_pb2.RecordMessageLogsRequest(logs=[to_proto(entry) for entry in logs])
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
        """Send every due row once; returns how many audience_svc accepted (or refused for good).
        Stops at the first chunk that cannot be delivered because audience_svc is unavailable (postponed);
        a chunk refused for its sandbox's state is postponed and the other sandboxes go on."""
        done = 0
        while True:
            due = await self.database.run(self.outbox.due, self.batch_size)
            if not due:
                return done
            by_sandbox: dict[str, list[MessageLog]] = {}
            for sandbox, entry in due:
                by_sandbox.setdefault(sandbox, []).append(entry)
            for sandbox, logs in by_sandbox.items():
                delivered = await self._deliver(sandbox, logs)
                if delivered is None:
                    return done
                done += delivered
            if len(due) < self.batch_size:
                return done

    async def _deliver(self, sandbox: str, logs: list[MessageLog]) -> int | None:
        """Deliver one chunk; None when audience_svc is unavailable (the chunk is postponed). A sandbox
        whose logs audience_svc cannot take in its current state (FAILED_PRECONDITION, NOT_FOUND) is postponed
        alone, with its own back-off, and the other sandboxes' logs go on."""
        try:
            await self.sink.record(sandbox, logs)
        except InvalidArgument:
            return await self._one_by_one(sandbox, logs)
        except _SANDBOX_REFUSALS as exc:
            await self._postpone_sandbox(sandbox, logs, exc)
            return 0
        except CarillonError as exc:
            await self._postpone(sandbox, logs, exc)
            return None
        self._failures = 0
        self._paused_until = 0.0
        self._sandbox_failures.pop(sandbox, None)
        await self.database.run(self.outbox.delete, sandbox, logs)
        return len(logs)

    async def _postpone(self, sandbox: str, logs: list[MessageLog], exc: CarillonError) -> None:
        delay = min(self.retry_max_s, self.retry_initial_s * 2**self._failures)
        self._failures += 1
        self._paused_until = asyncio.get_running_loop().time() + delay
        log.warning("message logs not delivered; retrying later", count=len(logs), retry_in_s=delay, error=str(exc))
        await self.database.run(self.outbox.postpone, sandbox, logs, delay)

    async def _postpone_sandbox(self, sandbox: str, logs: list[MessageLog], exc: CarillonError) -> None:
        failures = self._sandbox_failures.get(sandbox, 0)
        delay = min(self.retry_max_s, self.retry_initial_s * 2**failures)
        self._sandbox_failures[sandbox] = failures + 1
        log.warning(
            "message logs of a sandbox refused by audience; retrying later",
            sandbox=sandbox,
            count=len(logs),
            retry_in_s=delay,
            reason=exc.reason,
            error=str(exc),
        )
        await self.database.run(self.outbox.postpone, sandbox, logs, delay)

    async def _one_by_one(self, sandbox: str, logs: list[MessageLog]) -> int | None:
        """Isolate refused logs: each is sent alone; a refused one is dropped with an error line."""
        for index, entry in enumerate(logs):
            try:
                await self.sink.record(sandbox, [entry])
            except InvalidArgument as exc:
                log.error("message log refused by audience; dropped", message_id=entry.message_id, error=str(exc))
            except _SANDBOX_REFUSALS as exc:
                await self._postpone_sandbox(sandbox, logs[index:], exc)
                return index
            except CarillonError as exc:
                await self._postpone(sandbox, [entry], exc)
                return None
            await self.database.run(self.outbox.delete, sandbox, [entry])
        self._sandbox_failures.pop(sandbox, None)
        return len(logs)

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
