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
fails the run. In test mode (a TestCampaign run) a channel activity sends nothing: it records the
population it would send to (``targeted``) and succeeds. The engine writes progress only through
:class:`RunJournal`, so it is unit-testable with in-memory fakes; :class:`LeaseLost` and
cancellation propagate untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from carillon.type.v1 import value_pb2
from carillon_chassis.database import utcnow
from carillon_chassis.errors import CarillonError, Unavailable
from carillon_chassis.values import from_value
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
    BranchTest,
    BuildAudience,
    Canvas,
    ChannelSend,
    ClaimedRun,
    End,
    FlowKind,
    Fork,
    Join,
    Run,
    RunKey,
    RunState,
    RunTrigger,
    Task,
    TaskState,
    Transition,
    Wait,
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

    async def finish_task(
        self, key: RunKey, activity: str, note: str = "", outputs: Mapping[str, int] | None = None
    ) -> None:
        """The task SUCCEEDED, with the records passed on by each output taken; ``note`` replaces the
        log entry's default text when given."""
        ...

    async def skip_task(self, key: RunKey, activity: str, reason: str) -> None:
        """The task is SKIPPED: no branch leading to it was taken."""
        ...

    async def wait_task(self, key: RunKey, activity: str, wake: datetime) -> None:
        """A wait task is WAITING until ``wake``."""
        ...

    async def suspend_run(self, key: RunKey, wake: datetime) -> None:
        """The run WAITS until ``wake`` without holding a lease."""
        ...

    async def fail_task(self, key: RunKey, activity: str, message: str) -> None:
        """The task FAILED; the run goes on (error handling ``ignore``)."""
        ...

    async def signal_campaign(
        self, key: RunKey, activity: str, campaign_id: str, parameters: Mapping[str, value_pb2.Value]
    ) -> str:
        """Signal another campaign once per run and activity; return the run it created (or created before)."""
        ...

    async def suspend_failed_run(self, key: RunKey, activity: str, message: str) -> None:
        """The task FAILED; the run is SUSPENDED until restarted (error handling ``suspend``)."""
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


_DONE = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.SKIPPED)


def _compare(left: float | str, comparison: str, right: float | str) -> bool:
    if isinstance(left, str) or isinstance(right, str):
        return {"=": left == right, "!=": left != right}.get(comparison, False)
    return {
        "=": left == right,
        "!=": left != right,
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }[comparison]


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def choose_output(
    test: BranchTest, population: int, parameters: Mapping[str, value_pb2.Value], variables: Mapping[str, str]
) -> str:
    """The output a test takes: the first branch whose condition holds, else the default output."""
    for branch in test.branches:
        condition = branch.condition
        left: float | str
        if condition.variable:
            if condition.variable in parameters:
                left = _number_or_text(str(from_value(parameters[condition.variable])))
            elif condition.variable in variables:
                left = _number_or_text(variables[condition.variable])
            else:
                continue
        else:
            left = float(population)
        if _compare(left, condition.comparison, _number_or_text(condition.value)):
            return branch.output
    return test.default_output


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
        """Run every unfinished task whose inputs are resolved, in execution order; return the run's state.

        A task runs once every source of its incoming transitions has finished. It is SKIPPED when
        none of its incoming transitions was taken (a test took another output, or the source was
        skipped) — for a join, when any was not taken. A wait that is not due leaves its branch
        waiting: the other branches go on, and the run is then suspended (WAITING, no lease) until the
        earliest wake time, when a replica claims it again and resumes from the stored task states.
        """
        run, canvas = claimed.run, claimed.canvas
        key = run.key
        test_mode = run.trigger == RunTrigger.TEST
        tasks = {t.activity: t for t in run.tasks}
        produced: dict[str, WorkingSetInfo] = {}
        for task in run.tasks:
            with structlog.contextvars.bound_contextvars(activity=task.activity):
                activity = canvas.find(task.activity)
                incoming = [t for t in canvas.transitions if t.target == task.activity]
                if any(tasks[t.source].state not in _DONE for t in incoming if t.source in tasks):
                    continue  # an input is still pending or waiting
                taken = [
                    t
                    for t in incoming
                    if t.source in tasks
                    and tasks[t.source].state == TaskState.SUCCEEDED
                    and t.output in (tasks[t.source].outputs or {"": 0})  # stored before outputs existed
                ]
                source = self._input(activity, incoming, taken, produced)
                if task.state in _DONE:
                    if task.state == TaskState.SUCCEEDED:
                        info = self._output_of(activity, task, source)
                        if info is not None:
                            produced[task.activity] = info
                    continue
                try:
                    if activity is None:
                        raise ActivityError(f"the campaign has no activity {task.activity!r}")
                    is_join = isinstance(activity.kind, Join)
                    if incoming and (not taken or (is_join and len(taken) < len(incoming))):
                        reason = "a branch into this join was not taken" if is_join else "no branch to it was taken"
                        await self.journal.skip_task(key, task.activity, reason)
                        task.state = TaskState.SKIPPED
                        continue
                    await self._with_retries(
                        functools.partial(
                            self._run_activity, key, canvas, activity, task, produced, test_mode, source, run
                        )
                    )
                except (CarillonError, ActivityError) as exc:
                    message = _failure_message(exc)
                    log.warning("activity failed", error=message, error_handling=canvas.error_handling)
                    if canvas.error_handling == "ignore":
                        await self.journal.fail_task(key, task.activity, message)
                        task.state = TaskState.FAILED
                        continue
                    if canvas.error_handling == "suspend":
                        await self.journal.suspend_failed_run(key, task.activity, message)
                        return RunState.SUSPENDED
                    await self.journal.fail_run(key, task.activity, message)
                    return RunState.FAILED
        waiting = [t.wake_time for t in run.tasks if t.state == TaskState.WAITING and t.wake_time is not None]
        if waiting:
            wake = min(waiting)
            await self.journal.suspend_run(key, wake)
            log.info("run waits", until=wake.isoformat())
            return RunState.WAITING
        unfinished = [t.activity for t in run.tasks if t.state not in _DONE]
        if unfinished:
            await self.journal.fail_run(key, None, f"activities {unfinished} could not run")
            return RunState.FAILED
        failed = [t.activity for t in run.tasks if t.state == TaskState.FAILED]
        if failed:  # error handling "ignore": the other branches ran; the run still failed
            await self.journal.fail_run(key, None, f"activities {failed} failed; the other branches ran")
            return RunState.FAILED
        await self.journal.succeed_run(key)
        log.info("run succeeded")
        return RunState.SUCCEEDED

    @staticmethod
    def _input(
        activity: Activity | None,
        incoming: list[Transition],
        taken: list[Transition],
        produced: Mapping[str, WorkingSetInfo],
    ) -> WorkingSetInfo | None:
        """The population flowing into an activity: its taken input's (a join's primary input)."""
        if not taken:
            return None
        chosen = taken[0]
        if activity is not None and isinstance(activity.kind, Join) and activity.kind.primary:
            chosen = next((t for t in taken if t.source == activity.kind.primary), chosen)
        return produced.get(chosen.source)

    @staticmethod
    def _output_of(activity: Activity | None, task: Task, source: WorkingSetInfo | None) -> WorkingSetInfo | None:
        """The population a finished activity passes on: its own working set, or its input's."""
        if activity is not None and isinstance(activity.kind, BuildAudience):
            return WorkingSetInfo(task.working_set, task.targeted)
        if activity is not None and isinstance(activity.kind, End):
            return None
        return source

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
        self,
        key: RunKey,
        canvas: Canvas,
        activity: Activity,
        task: Task,
        produced: dict[str, WorkingSetInfo],
        test_mode: bool = False,
        source: WorkingSetInfo | None = None,
        run: Run | None = None,
    ) -> None:
        kind = activity.kind
        if isinstance(kind, BuildAudience):
            await self.journal.start_task(key, activity.id)
            info = await self.audience.build_working_set(key.sandbox, key.name, activity.id, kind.query)
            await self.journal.record_working_set(key, activity.id, info.name, info.count)
            produced[activity.id] = info
            task.state, task.working_set, task.targeted, task.outputs = (
                TaskState.SUCCEEDED,
                info.name,
                info.count,
                {"": info.count},
            )
            log.info("working set built", working_set=info.name, targeted=info.count)
        elif isinstance(kind, Fork | Join | Wait | BranchTest | End):
            await self._run_flow(key, canvas, activity, kind, task, produced, source, run)
        elif isinstance(kind, ChannelSend):
            await self.journal.start_task(key, activity.id, targeted=source.count if source else None)
            if source is None:
                raise ActivityError("the channel activity has no population from a build_audience activity upstream")
            if test_mode:
                note = f"test mode: would send to {source.count} recipients; nothing was sent"
                await self.journal.finish_task(key, activity.id, note, {"": source.count})
                self._done(task, produced, source, {"": source.count})
                log.info("channel activity simulated (test mode)", targeted=source.count)
                return
            gateway = self.deliveries.get(kind.channel)
            if gateway is None:
                raise ActivityError(f"no delivery worker is configured for channel {kind.channel!r} (delivery_targets)")
            await self._send(key, activity.id, kind, source, task, gateway)
            await self.journal.finish_task(key, activity.id, outputs={"": source.count})
            self._done(task, produced, source, {"": source.count})
            log.info("channel activity finished", checkpoint=task.checkpoint)
        else:
            raise ActivityError("the activity has no kind")

    @staticmethod
    def _done(
        task: Task, produced: dict[str, WorkingSetInfo], passed: WorkingSetInfo | None, outputs: dict[str, int]
    ) -> None:
        task.state, task.outputs = TaskState.SUCCEEDED, outputs
        if passed is not None:
            produced[task.activity] = passed

    async def _run_flow(
        self,
        key: RunKey,
        canvas: Canvas,
        activity: Activity,
        kind: FlowKind,
        task: Task,
        produced: dict[str, WorkingSetInfo],
        source: WorkingSetInfo | None,
        run: Run | None,
    ) -> None:
        count = source.count if source is not None else 0
        if isinstance(kind, Wait):
            now = utcnow()
            wake = task.wake_time
            if wake is None:
                wake = kind.until if kind.until is not None else now + timedelta(seconds=kind.duration_s)
            if wake > now:
                if task.state != TaskState.WAITING:
                    await self.journal.wait_task(key, activity.id, wake)
                    task.state, task.wake_time = TaskState.WAITING, wake
                return
            note = f"waited until {wake.isoformat()}; passes on {count} records"
            await self.journal.finish_task(key, activity.id, note, {"": count})
            self._done(task, produced, source, {"": count})
            return
        await self.journal.start_task(key, activity.id, targeted=count)
        if isinstance(kind, End):
            note = "branch ended"
            target = kind.signal_campaign
            if target and run is not None and run.trigger == RunTrigger.TEST:
                note = f"branch ended; test mode: would signal {target}"
            elif target:
                campaign_id = target.removeprefix("campaigns/")
                signalled = await self.journal.signal_campaign(key, activity.id, campaign_id, kind.parameters)
                note = f"branch ended; signalled {target}: {signalled}"
            await self.journal.finish_task(key, activity.id, note, {})
            self._done(task, produced, None, {})
            return
        if isinstance(kind, BranchTest):
            parameters = run.parameters if run is not None else {}
            output = choose_output(kind, count, parameters, canvas.variables)
            note = f"took output {output!r} with {count} records"
            await self.journal.finish_task(key, activity.id, note, {output: count})
            self._done(task, produced, source, {output: count})
            return
        # fork and join pass their (primary) input on
        await self.journal.finish_task(key, activity.id, outputs={"": count})
        self._done(task, produced, source, {"": count})

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
