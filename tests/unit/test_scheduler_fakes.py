"""In-memory fakes of the scheduler engine's ports, shared by the scheduler's unit and integration tests.

This module holds no tests (it is named ``test_scheduler_*`` only to sit with the scheduler's tests):
a fake audience service with working sets of generated rows, a fake delivery worker that acknowledges
every batch (skipping identities it is told have no consent), and an in-memory run journal that
follows the run store's rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from carillon.audience.v1 import query_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.database import utcnow
from carillon_chassis.errors import CarillonError
from carillon_chassis.values import to_value
from scheduler_svc.gateways import Batch, Row, SendHeader, WorkingSetInfo
from scheduler_svc.model import (
    Ack,
    Activity,
    BuildAudience,
    Canvas,
    ChannelSend,
    ClaimedRun,
    Run,
    RunKey,
    RunState,
    Task,
    TaskState,
    Transition,
)
from scheduler_svc.validation import topological_order

KEY = RunKey("tenant", "spring", "r1")


def rows(count: int) -> list[Row]:
    """Working-set rows at positions 1..count: customer ``k{n}``, email ``p{n}@example.com``."""
    return [
        Row(
            position=n,
            entity_key=f"k{n}",
            identity=("email", f"p{n}@example.com"),
            values={"tier": to_value("gold")},
        )
        for n in range(1, count + 1)
    ]


def two_step_canvas(channel: str = "email", batch_size: int = 3) -> Canvas:
    """Build an audience of customers, then send it an email (or another channel)."""
    return Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity(
                "send",
                kind=ChannelSend(
                    channel=channel,
                    category="marketing",
                    template="templates/offer",
                    batch_size=batch_size,
                    target_attributes=["tier"],
                ),
            ),
        ],
        transitions=[Transition("audience", "send")],
    )


def claimed(canvas: Canvas, key: RunKey = KEY, tasks: list[Task] | None = None) -> ClaimedRun:
    """A freshly claimed run of ``canvas`` (every task PENDING unless ``tasks`` are given)."""
    now = utcnow()
    return ClaimedRun(
        run=Run(
            key=key,
            state=RunState.RUNNING,
            scheduled_time=now,
            create_time=now,
            start_time=now,
            tasks=tasks if tasks is not None else [Task(a) for a in topological_order(canvas)],
        ),
        canvas=canvas,
    )


@dataclass
class StreamCall:
    """One StreamWorkingSet call as the fake saw it."""

    sandbox: str
    working_set: str
    after_position: int
    batch_size: int
    attributes: list[str]


@dataclass
class FakeAudience:
    """Working sets of a given size per activity; calls are recorded; failures can be injected."""

    size: int = 10
    build_failures: list[Exception] = field(default_factory=list)
    builds: list[tuple[str, str, str, str]] = field(default_factory=list)
    streams: list[StreamCall] = field(default_factory=list)

    async def build_working_set(
        self, sandbox: str, run: str, activity: str, query: query_pb2.AudienceQuery
    ) -> WorkingSetInfo:
        self.builds.append((sandbox, run, activity, query.dimension))
        if self.build_failures:
            raise self.build_failures.pop(0)
        return WorkingSetInfo(name=f"workingSets/{activity}", count=self.size)

    async def stream_working_set(
        self, sandbox: str, working_set: str, after_position: int, batch_size: int, attributes: Sequence[str]
    ) -> AsyncGenerator[Sequence[Row], None]:
        self.streams.append(StreamCall(sandbox, working_set, after_position, batch_size, list(attributes)))
        remaining = [r for r in rows(self.size) if r.position > after_position]
        for start in range(0, len(remaining), batch_size):
            yield remaining[start : start + batch_size]


@dataclass
class FakeSendStream:
    """A send stream whose worker acknowledges each batch when the engine reads the next ack."""

    worker: FakeDelivery
    sandbox: str
    header: SendHeader
    unread: asyncio.Queue[Batch | None] = field(default_factory=asyncio.Queue)
    fails: bool = False
    written: int = 0
    acked: int = 0
    cancelled: bool = False

    async def write(self, batch: Batch) -> None:
        self.written += 1
        self.worker.max_unacked = max(self.worker.max_unacked, self.written - self.acked)
        await self.unread.put(batch)

    async def done_writing(self) -> None:
        await self.unread.put(None)

    async def read(self) -> Ack | None:
        if self.fails and self.acked >= (self.worker.fail_after or 0):
            raise self.worker.failure
        if self.worker.stall_after is not None and self.acked >= self.worker.stall_after:
            await asyncio.Event().wait()  # a worker that stopped answering (or a replica that froze)
        batch = await self.unread.get()
        if batch is None:
            return None
        self.acked += 1
        self.worker.acks += 1
        self.worker.delivered += [r.entity_key for r in batch.rows]
        no_consent = sum(r.identity[1] in self.worker.opted_out for r in batch.rows)
        return Ack(
            sequence=batch.sequence,
            sent=len(batch.rows) - no_consent,
            skipped={"NO_CONSENT": no_consent} if no_consent else {},
        )

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeDelivery:
    """A delivery worker: acknowledges every batch.

    With ``fail_after`` set, each of its first ``failing_streams`` streams fails with ``failure``
    after acknowledging that many batches. With ``stall_after`` set, every stream stops answering
    after acknowledging that many batches.
    """

    opted_out: set[str] = field(default_factory=set)
    fail_after: int | None = None
    failing_streams: int = 1_000_000
    stall_after: int | None = None
    failure: Exception = field(default_factory=lambda: CarillonError("worker crashed"))
    streams: list[FakeSendStream] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    acks: int = 0
    max_unacked: int = 0

    async def open(self, sandbox: str, header: SendHeader) -> FakeSendStream:
        fails = self.fail_after is not None and len(self.streams) < self.failing_streams
        stream = FakeSendStream(self, sandbox, header, fails=fails)
        self.streams.append(stream)
        return stream


@dataclass
class FakeJournal:
    """The run store's progress rules, in memory: one run, its tasks by activity."""

    run: Run
    notes: dict[str, str] = field(default_factory=dict)
    signals: list[tuple[str, str, dict[str, value_pb2.Value]]] = field(default_factory=list)

    @classmethod
    def of(cls, claimed_run: ClaimedRun) -> FakeJournal:
        return cls(claimed_run.run)

    def task(self, activity: str) -> Task:
        return next(t for t in self.run.tasks if t.activity == activity)

    async def start_task(self, key: RunKey, activity: str, targeted: int | None = None) -> None:
        task = self.task(activity)
        task.state = TaskState.RUNNING
        task.start_time = task.start_time or utcnow()
        if targeted is not None:
            task.targeted = targeted

    async def record_working_set(self, key: RunKey, activity: str, working_set: str, count: int) -> None:
        task = self.task(activity)
        task.state, task.working_set, task.targeted, task.end_time = TaskState.SUCCEEDED, working_set, count, utcnow()
        task.outputs = {"": count}

    async def record_ack(self, key: RunKey, activity: str, ack: Ack) -> None:
        task = self.task(activity)
        if ack.sequence <= task.checkpoint:
            return
        task.sent += ack.sent
        task.already_sent += ack.already_sent
        for reason, count in ack.skipped.items():
            task.skipped[reason] = task.skipped.get(reason, 0) + count
        for reason, count in ack.failed.items():
            task.failed[reason] = task.failed.get(reason, 0) + count
        task.checkpoint = ack.sequence

    async def finish_task(
        self, key: RunKey, activity: str, note: str = "", outputs: Mapping[str, int] | None = None
    ) -> None:
        task = self.task(activity)
        task.state, task.end_time = TaskState.SUCCEEDED, utcnow()
        if outputs is not None:
            task.outputs = dict(outputs)
        self.notes[activity] = note

    async def skip_task(self, key: RunKey, activity: str, reason: str) -> None:
        task = self.task(activity)
        task.state, task.message, task.outputs = TaskState.SKIPPED, reason, {}

    async def wait_task(self, key: RunKey, activity: str, wake: datetime) -> None:
        task = self.task(activity)
        task.state, task.wake_time = TaskState.WAITING, wake

    async def suspend_run(self, key: RunKey, wake: datetime) -> None:
        self.run.state, self.run.scheduled_time = RunState.WAITING, wake

    async def signal_campaign(
        self, key: RunKey, activity: str, campaign_id: str, parameters: Mapping[str, value_pb2.Value]
    ) -> str:
        self.signals.append((activity, campaign_id, dict(parameters)))
        return f"campaigns/{campaign_id}/runs/signalled-{len(self.signals)}"

    async def fail_task(self, key: RunKey, activity: str, message: str) -> None:
        task = self.task(activity)
        task.state, task.message = TaskState.FAILED, message

    async def suspend_failed_run(self, key: RunKey, activity: str, message: str) -> None:
        await self.fail_task(key, activity, message)
        self.run.state, self.run.error = RunState.SUSPENDED, message

    async def fail_run(self, key: RunKey, activity: str | None, message: str) -> None:
        for task in self.run.tasks:
            if task.activity == activity:
                task.state, task.message = TaskState.FAILED, message
            elif task.state in (TaskState.PENDING, TaskState.RUNNING):
                task.state = TaskState.SKIPPED
        self.run.state, self.run.error = RunState.FAILED, message

    async def succeed_run(self, key: RunKey) -> None:
        self.run.state = RunState.SUCCEEDED
