"""The run executor: one claimed run's activities, in execution order, through the gateways.

- **build_audience**: audience ``BuildWorkingSet(run, activity, query)`` (idempotent there); the task
  stores the working set and its count (``targeted``) and succeeds.
- **channel**: the working set of the incoming build_audience task is streamed from the task's
  checkpoint and forwarded, batch by batch, on a ``Send`` stream to the channel's delivery worker,
  with at most ``max_unacked_batches`` batches awaiting acknowledgement. Each acknowledgement's counts
  and the new checkpoint (the batch's last position) are recorded in one transaction, so a resumed run
  never streams an acknowledged row again; rows sent but not acknowledged are sent again and the
  worker's ledger reports them as ``already_sent``.

A peer that is unavailable is retried (``activity_attempts``, exponential backoff), each attempt
resuming from the checkpoint. Any other failure — an error status from a peer, a channel without a
delivery worker, a broken stream — fails the task with its message, skips the remaining tasks and
fails the run. The engine writes progress only through :class:`RunJournal`, so it is unit-testable
with in-memory fakes; :class:`LeaseLost` and cancellation propagate untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from carillon_chassis.errors import CarillonError, Unavailable
from scheduler_svc.gateways import (
    AudienceGateway,
    Batch,
    DeliveryGateway,
    SendHeader,
    SendStream,
    WorkingSetInfo,
)
from scheduler_svc.model import (
    Ack,
    Activity,
    BuildAudience,
    Canvas,
    ChannelSend,
    ClaimedRun,
    RunKey,
    RunState,
    Task,
    TaskState,
)

log = structlog.get_logger("carillon.scheduler.engine")


class ActivityError(Exception):
    """An activity cannot complete for a reason found by the scheduler itself (not a peer's status)."""


class RunJournal(Protocol):
    """Where the engine records a run's progress (the run store, bound to this replica's lease)."""

    async def start_task(self, key: RunKey, activity: str, targeted: int | None = None) -> None:
        """The task is RUNNING; ``targeted`` is set when given."""
        ...

    async def record_working_set(self, key: RunKey, activity: str, working_set: str, count: int) -> None:
        """A targeting task built its working set; the task SUCCEEDED."""
        ...

    async def record_ack(self, key: RunKey, activity: str, ack: Ack) -> None:
        """Add an acknowledged batch's counts and move the checkpoint, atomically."""
        ...

    async def finish_task(self, key: RunKey, activity: str) -> None:
        """The task SUCCEEDED."""
        ...

    async def fail_run(self, key: RunKey, activity: str | None, message: str) -> None:
        """The task FAILED with ``message``; unfinished tasks SKIPPED; the run FAILED."""
        ...

    async def succeed_run(self, key: RunKey) -> None:
        """Every task finished; the run SUCCEEDED."""
        ...


@dataclass(frozen=True)
class EngineOptions:
    """How the engine paces and retries."""

    max_unacked_batches: int = 4
    default_batch_size: int = 500
    activity_attempts: int = 3
    retry_initial_s: float = 0.5
    retry_max_s: float = 10.0


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, CarillonError):
        return exc.message
    return str(exc) or type(exc).__name__


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error of a task group (a sibling's cancellation is only its consequence)."""
    flat: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = list(exc.exceptions)
        else:
            flat.append(exc)
    return next((e for e in flat if not isinstance(e, asyncio.CancelledError)), flat[0])


class Engine:
    """Executes claimed runs."""

    def __init__(
        self,
        audience: AudienceGateway,
        deliveries: Mapping[str, DeliveryGateway],
        journal: RunJournal,
        options: EngineOptions | None = None,
    ) -> None:
        self.audience = audience
        self.deliveries = deliveries
        self.journal = journal
        self.options = options or EngineOptions()

    async def execute(self, claimed: ClaimedRun) -> RunState:
        """Run every unfinished task in order; return the run's final state."""
        run, canvas = claimed.run, claimed.canvas
        key = run.key
        produced: dict[str, WorkingSetInfo] = {
            t.activity: WorkingSetInfo(t.working_set, t.targeted)
            for t in run.tasks
            if t.state == TaskState.SUCCEEDED and t.working_set
        }
        for task in run.tasks:
            if task.state != TaskState.PENDING and task.state != TaskState.RUNNING:
                continue
            with structlog.contextvars.bound_contextvars(activity=task.activity):
                activity = canvas.find(task.activity)
                try:
                    if activity is None:
                        raise ActivityError(f"the campaign has no activity {task.activity!r}")
                    await self._with_retries(
                        functools.partial(self._run_activity, key, canvas, activity, task, produced)
                    )
                except (CarillonError, ActivityError) as exc:
                    message = _failure_message(exc)
                    log.warning("activity failed", error=message)
                    await self.journal.fail_run(key, task.activity, message)
                    return RunState.FAILED
        await self.journal.succeed_run(key)
        log.info("run succeeded")
        return RunState.SUCCEEDED

    async def _with_retries(self, attempt: Callable[[], Awaitable[None]]) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.options.activity_attempts),
            wait=wait_exponential(multiplier=self.options.retry_initial_s, max=self.options.retry_max_s),
            retry=retry_if_exception_type(Unavailable),
            reraise=True,
        )
        async for trial in retrying:
            with trial:
                if trial.retry_state.attempt_number > 1:
                    log.info("retrying activity", attempt=trial.retry_state.attempt_number)
                await attempt()

    async def _run_activity(
        self, key: RunKey, canvas: Canvas, activity: Activity, task: Task, produced: dict[str, WorkingSetInfo]
    ) -> None:
        kind = activity.kind
        if isinstance(kind, BuildAudience):
            await self.journal.start_task(key, activity.id)
            info = await self.audience.build_working_set(key.sandbox, key.name, activity.id, kind.query)
            await self.journal.record_working_set(key, activity.id, info.name, info.count)
            produced[activity.id] = info
            log.info("working set built", working_set=info.name, targeted=info.count)
        elif isinstance(kind, ChannelSend):
            sources = canvas.sources_of(activity.id)
            source = produced.get(sources[0]) if len(sources) == 1 else None
            await self.journal.start_task(key, activity.id, targeted=source.count if source else None)
            if source is None:
                raise ActivityError("the channel activity has no working set from an incoming build_audience activity")
            gateway = self.deliveries.get(kind.channel)
            if gateway is None:
                raise ActivityError(f"no delivery worker is configured for channel {kind.channel!r} (delivery_targets)")
            await self._send(key, activity.id, kind, source, task, gateway)
            await self.journal.finish_task(key, activity.id)
            log.info("channel activity finished", checkpoint=task.checkpoint)
        else:
            raise ActivityError("the activity has no kind")

    async def _send(
        self,
        key: RunKey,
        activity: str,
        kind: ChannelSend,
        source: WorkingSetInfo,
        task: Task,
        gateway: DeliveryGateway,
    ) -> None:
        """Stream the working set after the task's checkpoint to the worker, recording every ack."""
        header = SendHeader(
            campaign=key.campaign_name,
            run=key.name,
            activity=activity,
            channel=kind.channel,
            category=kind.category,
            template=kind.template,
        )
        stream = await gateway.open(key.sandbox, header)
        window = asyncio.Semaphore(self.options.max_unacked_batches)
        in_flight: deque[int] = deque()
        all_written = False

        async def produce(stream: SendStream) -> None:
            nonlocal all_written
            rows = self.audience.stream_working_set(
                key.sandbox,
                source.name,
                task.checkpoint,
                kind.batch_size or self.options.default_batch_size,
                kind.target_attributes,
            )
            async with contextlib.aclosing(rows):
                async for batch_rows in rows:
                    if not batch_rows:
                        continue
                    await window.acquire()
                    batch = Batch(sequence=batch_rows[-1].position, rows=batch_rows)
                    in_flight.append(batch.sequence)
                    await stream.write(batch)
            all_written = True
            await stream.done_writing()

        async def consume(stream: SendStream) -> None:
            while (ack := await stream.read()) is not None:
                if not in_flight or ack.sequence != in_flight[0]:
                    expected = in_flight[0] if in_flight else "none"
                    raise ActivityError(f"delivery acknowledged batch {ack.sequence}; expected {expected}")
                await self.journal.record_ack(key, activity, ack)
                in_flight.popleft()
                task.checkpoint = ack.sequence
                window.release()
            if not all_written or in_flight:
                raise ActivityError(
                    f"delivery closed the send stream early, with {len(in_flight)} batches unacknowledged"
                )

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(produce(stream))
                group.create_task(consume(stream))
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from None
        finally:
            stream.cancel()
