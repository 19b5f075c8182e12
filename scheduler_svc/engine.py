"""The run executor: one claimed run's activities, through the gateways; branches run concurrently.

- **targeting** activities call audience_svc, each idempotent there per (run, activity): build
  audience (``BuildWorkingSet`` with a query, incrementally when asked), read audience (with a saved
  audience), combine, change dimension, split, deduplicate, reconcile (each a working set per output;
  a named output's working set belongs to the activity id ``{activity}--{output}``) and save audience
  (passes its population on; saves nothing in test mode). The task stores each output's working set
  and count. An enrich activity passes its population on unchanged after one cheap check (a
  one-row stream with its enrichments: audience_svc refuses unknown links and attributes, which fails
  the activity, naming the fields); its enrichments are requested by the channel activities downstream.
- **channel**: the working set of the incoming population is streamed from the task's checkpoint and
  forwarded, batch by batch, on a ``Send`` stream to the channel's delivery worker, with at most
  ``max_unacked_batches`` batches awaiting acknowledgement. Each acknowledgement's counts and the new
  checkpoint (the batch's last position) are recorded in one transaction, so a resumed run never
  streams an acknowledged row again; rows sent but not acknowledged are sent again and the worker's
  ledger reports them as ``already_sent``. The header carries the activity's rate limit and send
  window. The stream requests every enrichment of the enrich activities on the channel's input path
  since the last change of dimension (``enrichment_chain``: derived from the canvas, nothing of it is
  journalled), with the run's scheduled time as their reference time. A batch acknowledged with
  deferred recipients (outside the send window) is kept; the task then WAITS (a durable timer: the run
  is suspended without a lease) until the window's next opening and sends those batches again (the
  ledger skips the recipients already sent), until nothing is deferred or the activity's time limit
  has passed — then the deferred recipients are excluded and counted as skipped
  ``TIME_LIMIT_EXCEEDED``. An activity that asks for a confirmation first waits (task WAITING, at most
  its time limit) for ConfirmActivity; without one it sends nothing and counts every recipient as
  skipped ``NOT_CONFIRMED``.

Every activity starts once all the sources of its incoming transitions have finished, so the
branches after a fork (or any independent branches) run at the same time, each an asyncio task of
one task group. A peer that is unavailable is retried (``activity_attempts``, exponential backoff),
each attempt resuming from the checkpoint. Any other failure fails the task with its message; with
the abort (or suspend) error handling the other branches are cancelled first and only then is the run
failed (or suspended), so no progress is written after the run's final state. In test mode (a
TestCampaign run) a channel activity sends nothing: it records the population it would send to
(``targeted``) and succeeds. The engine writes progress only through :class:`RunJournal` (every write
fenced by the run's lease), so it is unit-testable with in-memory fakes; :class:`LeaseLost` and
cancellation propagate untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from carillon.type.v1 import value_pb2
from carillon_chassis.database import utcnow
from carillon_chassis.errors import CarillonError, InvalidArgument, Unavailable
from carillon_chassis.values import from_value
from scheduler_svc.gateways import (
    AudienceGateway,
    Batch,
    DeliveryGateway,
    Row,
    SendHeader,
    SendStream,
    StreamEnrichment,
    WorkingSetInfo,
)
from scheduler_svc.model import (
    POPULATION_KINDS,
    Ack,
    Activity,
    BranchTest,
    BuildAudience,
    Canvas,
    ChangeDimension,
    ChannelSend,
    ClaimedRun,
    Combine,
    Deduplicate,
    DeferredBatch,
    End,
    Enrich,
    FlowKind,
    Fork,
    Join,
    ReadAudience,
    Reconcile,
    Run,
    RunKey,
    RunState,
    RunTrigger,
    SaveAudience,
    Split,
    Task,
    TaskState,
    Transition,
    Wait,
    enrichment_chain,
    output_activity,
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

    async def record_outputs(
        self, key: RunKey, activity: str, outputs: Mapping[str, tuple[str, int]], note: str = ""
    ) -> None:
        """A targeting task built the working set of each output (``output -> (working set, count)``);
        the task SUCCEEDED."""
        ...

    async def record_ack(self, key: RunKey, activity: str, ack: Ack, after: int = 0) -> None:
        """Add an acknowledged batch's counts and move the checkpoint, atomically; keep a batch with
        deferred recipients (positions ``after`` to its sequence) to send it again."""
        ...

    async def deferred_batches(self, key: RunKey, activity: str) -> list[DeferredBatch]:
        """The channel task's batches with deferred recipients, in sequence order."""
        ...

    async def await_confirmation(self, key: RunKey, activity: str, deadline: datetime) -> None:
        """A channel task WAITS for ConfirmActivity until ``deadline``."""
        ...

    async def skip_recipients(self, key: RunKey, activity: str, reason: str, count: int) -> None:
        """Count ``count`` recipients of a channel task as skipped with ``reason``."""
        ...

    async def record_replay(self, key: RunKey, activity: str, ack: Ack) -> None:
        """Record the acknowledgement of a deferred batch sent again (see RunStore.record_replay)."""
        ...

    async def exclude_deferred(self, key: RunKey, activity: str, reason: str) -> int:
        """Skip the task's deferred recipients with ``reason``; return how many."""
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
        """A wait task (or a channel task with deferred recipients) is WAITING until ``wake``."""
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
    default_batch_size: int = 5000
    activity_attempts: int = 3
    retry_initial_s: float = 0.5
    retry_max_s: float = 10.0


_DONE = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.SKIPPED)
TIME_LIMIT_EXCEEDED = "TIME_LIMIT_EXCEEDED"
NOT_CONFIRMED = "NOT_CONFIRMED"
# The shortest wait before deferred batches are sent again (when the worker says the window is open).
MIN_REPLAY_WAIT = timedelta(seconds=1)
Output = tuple[str, str]  # (activity id, output name)


class _Stop(Exception):
    """A branch ends the whole run (error handling abort or suspend): the other branches are cancelled."""

    def __init__(self, state: RunState, activity: str, message: str) -> None:
        super().__init__(message)
        self.state, self.activity, self.message = state, activity, message


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


def stream_enrichment(enrichments: list[Enrich], reference_time: datetime | None = None) -> StreamEnrichment:
    """What a stream requests for ``enrichments`` (in path order), with their relative dates' reference time."""
    return StreamEnrichment(
        paths=tuple(pair for e in enrichments for pair in e.attributes),
        aggregates=tuple(a for e in enrichments for a in e.aggregates),
        collections=tuple(c for e in enrichments for c in e.collections),
        reference_time=reference_time,
    )


_REQUEST_FIELD = re.compile(r"^(attributes|enrichments|collections)\[(\d+)\](.*)$")


def enrichment_refused(exc: InvalidArgument, activity: str, kind: Enrich | None = None) -> ActivityError:
    """The failure of an activity whose stream audience_svc refused: its reason and field violations,
    named as the enrich activity's fields when ``kind`` is the one enrichment requested."""
    problems: list[str] = []
    paths = list(dict.fromkeys(p for _, p in kind.attributes)) if kind is not None else []
    for violation in exc.violations:
        field = violation.field
        match = _REQUEST_FIELD.match(field)
        if kind is not None and match is not None:
            which, index, rest = match.group(1), int(match.group(2)), match.group(3)
            if which == "attributes" and index < len(paths):
                j = next(j for j, (_, p) in enumerate(kind.attributes) if p == paths[index])
                field = f"enrich.attributes[{j}].path{rest}"
            elif which == "enrichments":
                field = f"enrich.aggregates[{index}]{rest}"
            elif which == "collections":
                field = f"enrich.collections[{index}]{rest}"
        problems.append(f"{field}: {violation.description}")
    detail = "; ".join(problems) or exc.message
    return ActivityError(f"audience_svc refused the enrichment of {activity!r} ({exc.reason}): {detail}")


def _flatten(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    flat: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = list(exc.exceptions)
        else:
            flat.append(exc)
    return flat


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error of a task group (a sibling's cancellation is only its consequence)."""
    flat = _flatten(group)
    return next((e for e in flat if not isinstance(e, asyncio.CancelledError)), flat[0])


class Engine:
    """Executes claimed runs."""

    def __init__(
        self,
        audience: AudienceGateway,
        deliveries: Mapping[str, DeliveryGateway],
        journal: RunJournal,
        options: EngineOptions | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.audience = audience
        self.deliveries = deliveries
        self.journal = journal
        self.options = options or EngineOptions()
        self.clock = clock

    async def execute(self, claimed: ClaimedRun) -> RunState:
        """Run every unfinished task whose inputs are resolved; return the run's state.

        A task runs once every source of its incoming transitions has finished; independent branches
        run concurrently. A task is SKIPPED when none of its incoming transitions was taken (a test
        took another output, or the source was skipped) — for a join or a combine, when any was not
        taken. A wait that is not due (or a channel activity waiting for its send window) leaves its
        branch waiting: the other branches go on, and the run is then suspended (WAITING, no lease)
        until the earliest wake time, when a replica claims it again and resumes from the stored task
        states.
        """
        run, canvas = claimed.run, claimed.canvas
        key = run.key
        tasks = {t.activity: t for t in run.tasks}
        produced: dict[Output, WorkingSetInfo] = {}
        finished = {t.activity: asyncio.Event() for t in run.tasks}

        async def node(task: Task) -> None:
            try:
                for transition in canvas.transitions:
                    if transition.target == task.activity and transition.source in finished:
                        await finished[transition.source].wait()
                with structlog.contextvars.bound_contextvars(activity=task.activity):
                    await self._step(key, canvas, task, tasks, produced, run)
            finally:
                finished[task.activity].set()

        try:
            async with asyncio.TaskGroup() as group:
                for task in run.tasks:
                    group.create_task(node(task), name=f"{key.name}/{task.activity}")
        except BaseExceptionGroup as errors:
            flat = _flatten(errors)
            stops = [e for e in flat if isinstance(e, _Stop)]
            other = next((e for e in flat if not isinstance(e, _Stop | asyncio.CancelledError)), None)
            if other is not None or not stops:  # a lost lease or an unexpected error wins over a failed branch
                raise other or _first_error(errors) from None
            stop = stops[0]
            if stop.state == RunState.SUSPENDED:
                await self.journal.suspend_failed_run(key, stop.activity, stop.message)
            else:
                await self.journal.fail_run(key, stop.activity, stop.message)
            return stop.state
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

    async def _step(
        self,
        key: RunKey,
        canvas: Canvas,
        task: Task,
        tasks: Mapping[str, Task],
        produced: dict[Output, WorkingSetInfo],
        run: Run,
    ) -> None:
        """One task, once its sources finished: restore a finished task's outputs, skip it, or run it."""
        activity = canvas.find(task.activity)
        incoming = [t for t in canvas.transitions if t.target == task.activity]
        if any(tasks[t.source].state not in _DONE for t in incoming if t.source in tasks):
            return  # an input is still pending or waiting
        taken = [
            t
            for t in incoming
            if t.source in tasks
            and tasks[t.source].state == TaskState.SUCCEEDED
            and t.output in (tasks[t.source].outputs or {"": 0})  # stored before outputs existed
        ]
        source = self._input(activity, taken, produced)
        if task.state in _DONE:
            if task.state == TaskState.SUCCEEDED:
                self._restore(activity, task, source, produced)
            return
        try:
            if activity is None:
                raise ActivityError(f"the campaign has no activity {task.activity!r}")
            needs_all = isinstance(activity.kind, Join | Combine)
            if incoming and (not taken or (needs_all and len(taken) < len(incoming))):
                reason = "a branch into this activity was not taken" if needs_all else "no branch to it was taken"
                await self.journal.skip_task(key, task.activity, reason)
                task.state = TaskState.SKIPPED
                return
            others = [produced.get((t.source, t.output)) for t in taken]
            await self._with_retries(
                functools.partial(self._run_activity, key, canvas, activity, task, produced, source, run, others)
            )
        except (CarillonError, ActivityError) as exc:
            message = _failure_message(exc)
            log.warning("activity failed", error=message, error_handling=canvas.error_handling)
            if canvas.error_handling == "ignore":
                await self.journal.fail_task(key, task.activity, message)
                task.state = TaskState.FAILED
                return
            state = RunState.SUSPENDED if canvas.error_handling == "suspend" else RunState.FAILED
            raise _Stop(state, task.activity, message) from None

    @staticmethod
    def _input(
        activity: Activity | None, taken: list[Transition], produced: Mapping[Output, WorkingSetInfo]
    ) -> WorkingSetInfo | None:
        """The population flowing into an activity: its taken input's (a join's or combine's primary)."""
        if not taken:
            return None
        chosen = taken[0]
        primary = activity.kind.primary if activity is not None and isinstance(activity.kind, Join | Combine) else ""
        if primary:
            chosen = next((t for t in taken if t.source == primary), chosen)
        return produced.get((chosen.source, chosen.output))

    @staticmethod
    def _restore(
        activity: Activity | None, task: Task, source: WorkingSetInfo | None, produced: dict[Output, WorkingSetInfo]
    ) -> None:
        """The populations a finished activity passes on: its own working sets, or its input's."""
        kind = activity.kind if activity is not None else None
        if isinstance(kind, BuildAudience):
            produced[(task.activity, "")] = WorkingSetInfo(task.working_set, task.targeted)
        elif isinstance(kind, POPULATION_KINDS):
            for output, name in task.output_working_sets.items():
                produced[(task.activity, output)] = WorkingSetInfo(name, task.outputs.get(output, 0))
        elif not isinstance(kind, End) and source is not None:
            for output in task.outputs or {"": 0}:
                produced[(task.activity, output)] = source

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
        produced: dict[Output, WorkingSetInfo],
        source: WorkingSetInfo | None,
        run: Run,
        inputs: list[WorkingSetInfo | None],
    ) -> None:
        kind = activity.kind
        test_mode = run.trigger == RunTrigger.TEST
        if isinstance(kind, BuildAudience):
            await self.journal.start_task(key, activity.id)
            if kind.incremental is None:
                info = await self.audience.build_working_set(key.sandbox, key.name, activity.id, kind.query)
                await self.journal.record_working_set(key, activity.id, info.name, info.count)
            else:
                info = await self.audience.build_working_set(
                    key.sandbox, key.name, activity.id, kind.query, kind.incremental
                )
                note = (
                    f"working set {info.name} built incrementally: {info.count} records;"
                    f" {info.excluded} left out (produced by earlier runs)"
                )
                await self.journal.record_outputs(key, activity.id, {"": (info.name, info.count)}, note)
            produced[(activity.id, "")] = info
            task.state, task.working_set, task.targeted, task.outputs = (
                TaskState.SUCCEEDED,
                info.name,
                info.count,
                {"": info.count},
            )
            log.info("working set built", working_set=info.name, targeted=info.count)
        elif isinstance(kind, ReadAudience | Combine | ChangeDimension | Split | Deduplicate | Reconcile):
            await self._target(key, activity.id, kind, task, produced, source, inputs)
        elif isinstance(kind, SaveAudience):
            if source is None:
                raise ActivityError("the save_audience activity has no population upstream")
            await self.journal.start_task(key, activity.id, targeted=source.count)
            if test_mode:
                note = (
                    f"test mode: would save {source.count} records as audiences/{kind.audience_id}; nothing was saved"
                )
            else:
                created = await self.audience.save_audience(
                    key.sandbox, kind.audience_id, source.name, kind.display_name
                )
                verb = "created" if created else "overwrote"
                note = f"{verb} audiences/{kind.audience_id} with {source.count} records"
            await self.journal.finish_task(key, activity.id, note, {"": source.count})
            self._done(task, produced, source, {"": source.count})
        elif isinstance(kind, Enrich):
            if source is None:
                raise ActivityError("the enrich activity has no population upstream")
            await self.journal.start_task(key, activity.id, targeted=source.count)
            rows = self.audience.stream_working_set(
                key.sandbox, source.name, 0, 1, [], stream_enrichment([kind], run.scheduled_time)
            )
            try:
                async with contextlib.aclosing(rows):
                    async for _ in rows:
                        break
            except InvalidArgument as exc:
                raise enrichment_refused(exc, activity.id, kind) from None
            aliases = ", ".join(kind.aliases())
            note = f"passes on {source.count} records, enriched with {aliases}"
            await self.journal.finish_task(key, activity.id, note, {"": source.count})
            self._done(task, produced, source, {"": source.count})
        elif isinstance(kind, Fork | Join | Wait | BranchTest | End):
            await self._run_flow(key, canvas, activity, kind, task, produced, source, run)
        elif isinstance(kind, ChannelSend):
            if task.state == TaskState.WAITING and task.wake_time is not None and task.wake_time > self.clock():
                return  # waiting for the send window; the run resumes at the wake time
            await self.journal.start_task(key, activity.id, targeted=source.count if source else None)
            task.start_time = task.start_time or self.clock()
            if source is None:
                raise ActivityError("the channel activity has no population from a targeting activity upstream")
            if test_mode:
                note = f"test mode: would send to {source.count} recipients; nothing was sent"
                await self.journal.finish_task(key, activity.id, note, {"": source.count})
                self._done(task, produced, source, {"": source.count})
                log.info("channel activity simulated (test mode)", targeted=source.count)
                return
            gateway = self.deliveries.get(kind.channel)
            if gateway is None:
                raise ActivityError(f"no delivery worker is configured for channel {kind.channel!r} (delivery_targets)")
            if kind.confirm_before_sending and task.confirmation != "confirmed":
                deadline = (task.start_time or self.clock()) + timedelta(seconds=kind.effective_time_limit_s)
                if self.clock() < deadline:
                    await self.journal.await_confirmation(key, activity.id, deadline)
                    task.state, task.wake_time, task.confirmation = TaskState.WAITING, deadline, "awaiting"
                    log.info("channel activity waits for a confirmation", until=deadline.isoformat())
                    return
                if NOT_CONFIRMED not in task.skipped:  # counted before a crash: the resumed run must not add it again
                    await self.journal.skip_recipients(key, activity.id, NOT_CONFIRMED, source.count)
                    task.skipped = {**task.skipped, NOT_CONFIRMED: source.count}
                note = f"not confirmed within the time limit: nothing was sent to {source.count} recipients"
                await self.journal.finish_task(key, activity.id, note, {"": source.count})
                self._done(task, produced, source, {"": source.count})
                return
            chain = [e for _, e in enrichment_chain(canvas, activity.id)]
            enrichment = stream_enrichment(chain, run.scheduled_time) if chain else None
            try:
                await self._send(key, activity.id, kind, source, task, gateway, enrichment)
                if not await self._settle_deferred(key, activity.id, kind, source, task, gateway, enrichment):
                    return  # waiting for the send window to open
            except InvalidArgument as exc:
                if enrichment is None:
                    raise
                raise enrichment_refused(exc, activity.id) from None
            await self.journal.finish_task(key, activity.id, outputs={"": source.count})
            self._done(task, produced, source, {"": source.count})
            log.info("channel activity finished", checkpoint=task.checkpoint)
        else:
            raise ActivityError("the activity has no kind")

    async def _target(
        self,
        key: RunKey,
        activity: str,
        kind: ReadAudience | Combine | ChangeDimension | Split | Deduplicate | Reconcile,
        task: Task,
        produced: dict[Output, WorkingSetInfo],
        source: WorkingSetInfo | None,
        inputs: list[WorkingSetInfo | None],
    ) -> None:
        """A targeting activity other than build_audience: its working set per output, through audience_svc."""
        sandbox, run = key.sandbox, key.name
        outputs: dict[str, WorkingSetInfo] = {}
        note = ""
        if isinstance(kind, ReadAudience):
            await self.journal.start_task(key, activity)
            info = await self.audience.read_audience(sandbox, run, activity, kind.audience)
            if kind.dimension and info.dimension and info.dimension != kind.dimension:
                raise ActivityError(
                    f"{kind.audience} has the dimension {info.dimension}, not {kind.dimension} as the canvas says"
                )
            outputs[""] = info
        else:
            if source is None or any(i is None for i in inputs):
                raise ActivityError("the activity has no population from a targeting activity upstream")
            await self.journal.start_task(key, activity, targeted=source.count)
            if isinstance(kind, Combine):
                remaining = [i for i in inputs if i is not None]
                remaining.remove(source)  # the primary input; the others are combined with it
                others = [i.name for i in remaining]
                result = await self.audience.combine(sandbox, run, activity, source.name, others, kind.operation)
                outputs[""] = result
                if kind.complement_output:
                    base = source
                    if kind.operation == "intersection":
                        base = await self.audience.combine(
                            sandbox, run, f"{activity}--union-all", source.name, others, "union"
                        )
                    outputs[kind.complement_output] = await self.audience.combine(
                        sandbox,
                        run,
                        output_activity(activity, kind.complement_output),
                        base.name,
                        [result.name],
                        "exclusion",
                    )
            elif isinstance(kind, ChangeDimension):
                result, unmatched = await self.audience.change_dimension(sandbox, run, activity, source.name, kind.link)
                if kind.dimension and result.dimension and result.dimension != kind.dimension:
                    raise ActivityError(
                        f"the link {kind.link!r} leads to {result.dimension}, not {kind.dimension} as the canvas says"
                    )
                outputs[""] = result
                note = (
                    f"changed dimension to {kind.dimension}: {result.count} records;"
                    f" {unmatched} source records unmatched"
                )
            elif isinstance(kind, Split):
                subsets = [(output_activity(activity, s.output), s) for s in kind.subsets]
                complement = output_activity(activity, kind.complement_output) if kind.complement_output else ""
                built, rest = await self.audience.split(sandbox, run, source.name, subsets, complement, kind.overlap)
                if len(built) != len(kind.subsets) or (complement and rest is None):
                    raise ActivityError("audience_svc returned another number of subsets than requested")
                outputs.update({s.output: info for s, info in zip(kind.subsets, built, strict=True)})
                if rest is not None and kind.complement_output:
                    outputs[kind.complement_output] = rest
            elif isinstance(kind, Reconcile):
                unreconciled = output_activity(activity, kind.unreconciled_output) if kind.unreconciled_output else ""
                reconciled = await self.audience.reconcile(
                    sandbox, run, activity, source.name, kind.target, kind.pairs, unreconciled
                )
                outputs[""] = reconciled.reconciled
                if kind.unreconciled_output:
                    if reconciled.unreconciled is None:
                        raise ActivityError("audience_svc returned no working set of the unreconciled records")
                    outputs[kind.unreconciled_output] = reconciled.unreconciled
                note = (
                    f"reconciled with {kind.target}: {reconciled.matched} matched, {reconciled.unmatched} unmatched,"
                    f" {reconciled.ambiguous} ambiguous"
                )
            else:
                removed_activity = output_activity(activity, kind.removed_output) if kind.removed_output else ""
                kept, removed = await self.audience.deduplicate(
                    sandbox, run, activity, source.name, kind, removed_activity
                )
                outputs[""] = kept
                if kind.removed_output:
                    if removed is None:
                        raise ActivityError("audience_svc returned no working set of the removed records")
                    outputs[kind.removed_output] = removed
        await self.journal.record_outputs(key, activity, {o: (i.name, i.count) for o, i in outputs.items()}, note)
        for output, info in outputs.items():
            produced[(activity, output)] = info
        main = outputs.get("") or next(iter(outputs.values()))
        task.state, task.working_set, task.targeted = TaskState.SUCCEEDED, main.name, main.count
        task.outputs = {o: i.count for o, i in outputs.items()}
        task.output_working_sets = {o: i.name for o, i in outputs.items()}
        log.info("targeting activity finished", outputs=task.outputs)

    @staticmethod
    def _done(
        task: Task, produced: dict[Output, WorkingSetInfo], passed: WorkingSetInfo | None, outputs: dict[str, int]
    ) -> None:
        task.state, task.outputs = TaskState.SUCCEEDED, outputs
        if passed is not None:
            for output in outputs:
                produced[(task.activity, output)] = passed

    async def _run_flow(
        self,
        key: RunKey,
        canvas: Canvas,
        activity: Activity,
        kind: FlowKind,
        task: Task,
        produced: dict[Output, WorkingSetInfo],
        source: WorkingSetInfo | None,
        run: Run | None,
    ) -> None:
        count = source.count if source is not None else 0
        if isinstance(kind, Wait):
            now = self.clock()
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

    @staticmethod
    def _header(key: RunKey, activity: str, kind: ChannelSend) -> SendHeader:
        return SendHeader(
            campaign=key.campaign_name,
            run=key.name,
            activity=activity,
            channel=kind.channel,
            category=kind.category,
            template=kind.template,
            rate_limit_per_second=kind.rate_limit_per_second,
            send_window=kind.send_window,
        )

    async def _settle_deferred(
        self,
        key: RunKey,
        activity: str,
        kind: ChannelSend,
        source: WorkingSetInfo,
        task: Task,
        gateway: DeliveryGateway,
        enrichment: StreamEnrichment | None = None,
    ) -> bool:
        """Send the deferred batches whose window opened again; True when nothing is deferred any more
        (every recipient sent, or the time limit passed and the rest excluded), False when the task
        now waits for the window's next opening."""
        start = task.start_time or self.clock()
        deadline = start + timedelta(seconds=kind.effective_time_limit_s)
        batches = await self.journal.deferred_batches(key, activity)
        now = self.clock()
        due = [b for b in batches if b.next_window_time is None or b.next_window_time <= now]
        if due and now < deadline:
            await self._replay(key, activity, kind, source, due, gateway, enrichment)
            batches = await self.journal.deferred_batches(key, activity)
        if not batches:
            return True
        now = self.clock()
        wake = max(min(b.next_window_time or now for b in batches), now + MIN_REPLAY_WAIT)
        if wake < deadline:
            await self.journal.wait_task(key, activity, wake)
            task.state, task.wake_time = TaskState.WAITING, wake
            log.info("deferred recipients wait for the send window", until=wake.isoformat())
            return False
        excluded = await self.journal.exclude_deferred(key, activity, TIME_LIMIT_EXCEEDED)
        log.warning("time limit passed; deferred recipients excluded", excluded=excluded)
        return True

    async def _replay(
        self,
        key: RunKey,
        activity: str,
        kind: ChannelSend,
        source: WorkingSetInfo,
        batches: list[DeferredBatch],
        gateway: DeliveryGateway,
        enrichment: StreamEnrichment | None = None,
    ) -> None:
        """Send deferred batches again, one at a time, on one Send stream, recording each acknowledgement."""
        stream = await gateway.open(key.sandbox, self._header(key, activity, kind))
        try:
            for deferred in sorted(batches, key=lambda b: b.sequence):
                rows = self.audience.stream_working_set(
                    key.sandbox,
                    source.name,
                    deferred.after,
                    deferred.sequence - deferred.after,
                    kind.target_attributes,
                    enrichment,
                )
                batch_rows: list[Row] = []
                async with contextlib.aclosing(rows):
                    async for chunk in rows:
                        batch_rows = [r for r in chunk if r.position <= deferred.sequence]
                        break
                await stream.write(Batch(sequence=deferred.sequence, rows=batch_rows))
                ack = await stream.read()
                if ack is None or ack.sequence != deferred.sequence:
                    got = "none" if ack is None else ack.sequence
                    raise ActivityError(f"delivery acknowledged batch {got}; expected {deferred.sequence}")
                await self.journal.record_replay(key, activity, ack)
            await stream.done_writing()
            if await stream.read() is not None:
                raise ActivityError("delivery acknowledged a batch that was not sent")
        finally:
            stream.cancel()

    async def _send(
        self,
        key: RunKey,
        activity: str,
        kind: ChannelSend,
        source: WorkingSetInfo,
        task: Task,
        gateway: DeliveryGateway,
        enrichment: StreamEnrichment | None = None,
    ) -> None:
        """Stream the working set after the task's checkpoint to the worker, recording every ack."""
        stream = await gateway.open(key.sandbox, self._header(key, activity, kind))
        window = asyncio.Semaphore(self.options.max_unacked_batches)
        in_flight: deque[tuple[int, int]] = deque()  # (after, sequence) of each unacknowledged batch
        all_written = False

        async def produce(stream: SendStream) -> None:
            nonlocal all_written
            rows = self.audience.stream_working_set(
                key.sandbox,
                source.name,
                task.checkpoint,
                kind.batch_size or self.options.default_batch_size,
                kind.target_attributes,
                enrichment,
            )
            after = task.checkpoint
            async with contextlib.aclosing(rows):
                async for batch_rows in rows:
                    if not batch_rows:
                        continue
                    await window.acquire()
                    batch = Batch(sequence=batch_rows[-1].position, rows=batch_rows)
                    in_flight.append((after, batch.sequence))
                    after = batch.sequence
                    await stream.write(batch)
            all_written = True
            await stream.done_writing()

        async def consume(stream: SendStream) -> None:
            while (ack := await stream.read()) is not None:
                if not in_flight or ack.sequence != in_flight[0][1]:
                    expected = in_flight[0][1] if in_flight else "none"
                    raise ActivityError(f"delivery acknowledged batch {ack.sequence}; expected {expected}")
                await self.journal.record_ack(key, activity, ack, after=in_flight[0][0])
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
