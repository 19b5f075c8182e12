"""In-memory fakes of the scheduler engine's ports, shared by the scheduler's unit and integration tests.

This module holds no tests (it is named ``test_scheduler_*`` only to sit with the scheduler's tests):
a fake audience service with working sets of generated rows, a fake delivery worker that acknowledges
every batch (skipping identities it is told have no consent), and an in-memory run journal that
follows the run store's rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from carillon.audience.v1 import query_pb2, working_set_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.database import utcnow
from carillon_chassis.errors import CarillonError
from carillon_chassis.values import to_value
from scheduler_svc.gateways import Batch, Reconciled, Row, SendHeader, StreamEnrichment, WorkingSetInfo
from scheduler_svc.model import (
    Ack,
    Activity,
    BuildAudience,
    Canvas,
    ChannelSend,
    ClaimedRun,
    Deduplicate,
    DeferredBatch,
    Run,
    RunKey,
    RunState,
    SplitSubset,
    Task,
    TaskState,
    Transition,
)
from scheduler_svc.runs import replay_counts
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
    enrichment: StreamEnrichment | None = None


@dataclass
class FakeAudience:
    """Working sets of a given size per activity; calls are recorded; failures can be injected.

    The targeting operations work on sets of keys: a built working set holds ``k1..k{size}`` (or the
    keys given for its activity in ``members``); a saved audience's members come from ``audiences``;
    combine, split, deduplicate and change of dimension compute their results from those sets
    (``split_rules`` maps a subset's activity to a key predicate; ``duplicates`` lists keys that
    deduplication removes; ``links`` maps a link to a key mapping). The streamed rows of a working
    set are its members in order.
    """

    size: int = 10
    build_failures: list[Exception] = field(default_factory=list)
    builds: list[tuple[str, str, str, str]] = field(default_factory=list)
    streams: list[StreamCall] = field(default_factory=list)
    members: dict[str, list[str]] = field(default_factory=dict)
    dimensions: dict[str, str] = field(default_factory=dict)
    audiences: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    links: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    split_rules: dict[str, Callable[[str], bool]] = field(default_factory=dict)
    duplicates: set[str] = field(default_factory=set)
    saved: dict[str, list[str]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    # Incremental builds: the keys earlier builds produced, and the mode of each incremental build.
    produced: set[str] = field(default_factory=set)
    incremental_modes: list[str] = field(default_factory=list)
    # Reconciliation: the target keys each source key matches.
    matches: dict[str, list[str]] = field(default_factory=dict)
    # Raised by a stream that requests enrichments (audience_svc refusing a link or attribute).
    enrichment_error: Exception | None = None

    def _ws(self, activity: str, keys: list[str], dimension: str) -> WorkingSetInfo:
        name = f"workingSets/{activity}"
        self.members[name] = keys
        self.dimensions[name] = dimension
        return WorkingSetInfo(name=name, count=len(keys), dimension=dimension)

    def keys_of(self, working_set: str) -> list[str]:
        """The members of a working set (``k1..k{size}`` for one built from a query)."""
        return self.members.get(working_set, [f"k{n}" for n in range(1, self.size + 1)])

    async def build_working_set(
        self,
        sandbox: str,
        run: str,
        activity: str,
        query: query_pb2.AudienceQuery,
        incremental: working_set_pb2.Incremental | None = None,
    ) -> WorkingSetInfo:
        self.builds.append((sandbox, run, activity, query.dimension))
        if self.build_failures:
            raise self.build_failures.pop(0)
        name = f"workingSets/{activity}"
        self.dimensions.setdefault(name, query.dimension)
        keys = self.keys_of(name)
        if incremental is None:
            return WorkingSetInfo(name=name, count=len(keys), dimension=query.dimension)
        self.incremental_modes.append(incremental.WhichOneof("mode") or "")
        fresh = [k for k in keys if k not in self.produced]
        self.produced.update(fresh)
        self.members[name] = fresh
        return WorkingSetInfo(name=name, count=len(fresh), dimension=query.dimension, excluded=len(keys) - len(fresh))

    async def reconcile(
        self,
        sandbox: str,
        run: str,
        activity: str,
        working_set: str,
        target: str,
        pairs: Sequence[tuple[str, str]],
        unreconciled_activity: str,
    ) -> Reconciled:
        self.calls.append(("reconcile", activity))
        source = self.keys_of(working_set)
        matches = {k: self.matches.get(k, []) for k in source}
        single = list(dict.fromkeys(m[0] for m in matches.values() if len(m) == 1))
        others = [k for k, m in matches.items() if len(m) != 1]
        rest = None
        if unreconciled_activity:
            rest = self._ws(unreconciled_activity, others, self.dimensions.get(working_set, "entities/customers"))
        return Reconciled(
            reconciled=self._ws(activity, single, target),
            unreconciled=rest,
            matched=sum(len(m) == 1 for m in matches.values()),
            unmatched=sum(not m for m in matches.values()),
            ambiguous=sum(len(m) > 1 for m in matches.values()),
        )

    async def read_audience(self, sandbox: str, run: str, activity: str, audience: str) -> WorkingSetInfo:
        self.calls.append(("read_audience", activity))
        dimension, keys = self.audiences[audience]
        return self._ws(activity, list(keys), dimension)

    async def combine(
        self, sandbox: str, run: str, activity: str, primary: str, others: Sequence[str], operation: str
    ) -> WorkingSetInfo:
        self.calls.append(("combine", activity))
        base = self.keys_of(primary)
        rest = [set(self.keys_of(o)) for o in others]
        if operation == "union":
            keys = list(dict.fromkeys(base + [k for o in others for k in self.keys_of(o)]))
        elif operation == "intersection":
            keys = [k for k in base if all(k in r for r in rest)]
        else:
            keys = [k for k in base if not any(k in r for r in rest)]
        return self._ws(activity, keys, self.dimensions.get(primary, "entities/customers"))

    async def change_dimension(
        self, sandbox: str, run: str, activity: str, working_set: str, link: str
    ) -> tuple[WorkingSetInfo, int]:
        self.calls.append(("change_dimension", activity))
        target, mapping = self.links[link]
        source = self.keys_of(working_set)
        reached = list(dict.fromkeys(mapping[k] for k in source if k in mapping))
        return self._ws(activity, reached, target), sum(k not in mapping for k in source)

    async def split(
        self,
        sandbox: str,
        run: str,
        working_set: str,
        subsets: Sequence[tuple[str, SplitSubset]],
        complement_activity: str,
        overlap: bool,
    ) -> tuple[list[WorkingSetInfo], WorkingSetInfo | None]:
        self.calls.append(("split", ",".join(a for a, _ in subsets)))
        dimension = self.dimensions.get(working_set, "entities/customers")
        left = self.keys_of(working_set)
        built = []
        for activity, subset in subsets:
            rule = self.split_rules.get(activity, lambda _: True)
            taken = [k for k in (self.keys_of(working_set) if overlap else left) if rule(k)]
            if subset.limit:
                taken = taken[: subset.limit]
            left = [k for k in left if k not in taken]
            built.append(self._ws(activity, taken, dimension))
        rest = self._ws(complement_activity, left, dimension) if complement_activity else None
        return built, rest

    async def deduplicate(
        self, sandbox: str, run: str, activity: str, working_set: str, rule: Deduplicate, removed_activity: str
    ) -> tuple[WorkingSetInfo, WorkingSetInfo | None]:
        self.calls.append(("deduplicate", activity))
        dimension = self.dimensions.get(working_set, "entities/customers")
        keys = self.keys_of(working_set)
        kept = self._ws(activity, [k for k in keys if k not in self.duplicates], dimension)
        removed = self._ws(removed_activity, [k for k in keys if k in self.duplicates], dimension)
        return kept, removed if removed_activity else None

    async def save_audience(self, sandbox: str, audience_id: str, working_set: str, display_name: str) -> bool:
        self.calls.append(("save_audience", audience_id))
        created = audience_id not in self.saved
        self.saved[audience_id] = list(self.keys_of(working_set))
        return created

    async def stream_working_set(
        self,
        sandbox: str,
        working_set: str,
        after_position: int,
        batch_size: int,
        attributes: Sequence[str],
        enrichment: StreamEnrichment | None = None,
    ) -> AsyncGenerator[Sequence[Row], None]:
        """The members' rows; with an enrichment, each alias's value is the text ``{alias}:{key}``."""
        self.streams.append(StreamCall(sandbox, working_set, after_position, batch_size, list(attributes), enrichment))
        if enrichment is not None and self.enrichment_error is not None:
            raise self.enrichment_error
        if working_set in self.members:
            members = [
                Row(position=n, entity_key=k, identity=("email", f"{k.replace('k', 'p', 1)}@example.com"))
                for n, k in enumerate(self.members[working_set], start=1)
            ]
        else:
            members = rows(self.size)
        remaining = [r for r in members if r.position > after_position]
        if enrichment is not None:
            aliases = [a for a, _ in enrichment.paths] + [e.alias for e in enrichment.aggregates]
            aliases += [c.alias for c in enrichment.collections]
            remaining = [
                replace(r, values={**r.values, **{a: to_value(f"{a}:{r.entity_key}") for a in aliases}})
                for r in remaining
            ]
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
        if self.worker.window_opens is not None:
            return self.worker.ledger_ack(self.header.activity, batch)
        self.worker.delivered += [r.entity_key for r in batch.rows]
        self.worker.targets.update({r.entity_key: dict(r.values) for r in batch.rows})
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
    # The target values each delivered record was sent with, by key.
    targets: dict[str, dict[str, value_pb2.Value]] = field(default_factory=dict)
    acks: int = 0
    max_unacked: int = 0
    # With ``window_opens`` set, the worker keeps a ledger (an already sent recipient is counted
    # ``already_sent``, a recorded skip is reported again) and defers the identities in ``outside``
    # until ``clock()`` reaches ``window_opens``.
    window_opens: datetime | None = None
    outside: set[str] = field(default_factory=set)
    clock: Callable[[], datetime] = utcnow
    ledger: dict[tuple[str, str], str] = field(default_factory=dict)

    def ledger_ack(self, activity: str, batch: Batch) -> Ack:
        """The acknowledgement of a worker with a ledger and a send window."""
        assert self.window_opens is not None
        sent = already = deferred = 0
        skipped: dict[str, int] = {}
        for row in batch.rows:
            key = (activity, row.entity_key)
            status = self.ledger.get(key)
            if status == "sent":
                already += 1
            elif status is not None:
                skipped[status] = skipped.get(status, 0) + 1
            elif row.identity[1] in self.opted_out:
                self.ledger[key] = "NO_CONSENT"
                skipped["NO_CONSENT"] = skipped.get("NO_CONSENT", 0) + 1
            elif row.identity[1] in self.outside and self.clock() < self.window_opens:
                deferred += 1
            else:
                self.ledger[key] = "sent"
                self.delivered.append(row.entity_key)
                sent += 1
        return Ack(
            sequence=batch.sequence,
            sent=sent,
            already_sent=already,
            skipped=skipped,
            deferred=deferred,
            next_window_time=self.window_opens if deferred else None,
        )

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
    replays: list[tuple[str, int]] = field(default_factory=list)
    clock: Callable[[], datetime] = utcnow

    @classmethod
    def of(cls, claimed_run: ClaimedRun) -> FakeJournal:
        return cls(claimed_run.run)

    def task(self, activity: str) -> Task:
        return next(t for t in self.run.tasks if t.activity == activity)

    async def start_task(self, key: RunKey, activity: str, targeted: int | None = None) -> None:
        task = self.task(activity)
        task.state = TaskState.RUNNING
        task.start_time = task.start_time or self.clock()
        if targeted is not None:
            task.targeted = targeted

    async def record_working_set(self, key: RunKey, activity: str, working_set: str, count: int) -> None:
        task = self.task(activity)
        task.state, task.working_set, task.targeted, task.end_time = TaskState.SUCCEEDED, working_set, count, utcnow()
        task.outputs = {"": count}

    async def record_outputs(
        self, key: RunKey, activity: str, outputs: Mapping[str, tuple[str, int]], note: str = ""
    ) -> None:
        task = self.task(activity)
        main = outputs.get("") or next(iter(outputs.values()))
        task.state, task.working_set, task.targeted, task.end_time = TaskState.SUCCEEDED, main[0], main[1], utcnow()
        task.outputs = {o: c for o, (_, c) in outputs.items()}
        task.output_working_sets = {o: n for o, (n, _) in outputs.items()}
        self.notes[activity] = note

    async def record_ack(self, key: RunKey, activity: str, ack: Ack, after: int = 0) -> None:
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
        if ack.deferred:
            task.deferred += ack.deferred
            task.deferred_batches.append(
                DeferredBatch(
                    after,
                    ack.sequence,
                    ack.sent,
                    ack.already_sent,
                    dict(ack.skipped),
                    dict(ack.failed),
                    ack.deferred,
                    ack.next_window_time,
                )
            )

    async def await_confirmation(self, key: RunKey, activity: str, deadline: datetime) -> None:
        task = self.task(activity)
        task.state, task.wake_time, task.confirmation = TaskState.WAITING, deadline, "awaiting"

    def confirm(self, activity: str, now: datetime) -> None:
        """What ConfirmActivity does to the task (and the run's due time)."""
        task = self.task(activity)
        assert task.confirmation == "awaiting"
        task.confirmation, task.wake_time = "confirmed", now
        self.run.scheduled_time = now

    async def skip_recipients(self, key: RunKey, activity: str, reason: str, count: int) -> None:
        task = self.task(activity)
        task.skipped[reason] = task.skipped.get(reason, 0) + count

    async def deferred_batches(self, key: RunKey, activity: str) -> list[DeferredBatch]:
        return sorted((replace(b) for b in self.task(activity).deferred_batches), key=lambda b: b.sequence)

    async def record_replay(self, key: RunKey, activity: str, ack: Ack) -> None:
        task = self.task(activity)
        old = next(b for b in task.deferred_batches if b.sequence == ack.sequence)
        lost = max(0, ack.already_sent - old.sent - old.already_sent)
        task.sent += ack.sent
        task.already_sent += lost
        old.already_sent += lost
        task.skipped = replay_counts(task.skipped, old.skipped, ack.skipped)
        task.failed = replay_counts(task.failed, old.failed, ack.failed)
        task.deferred += ack.deferred - old.deferred
        old.sent += ack.sent
        old.skipped, old.failed, old.deferred = dict(ack.skipped), dict(ack.failed), ack.deferred
        old.next_window_time = ack.next_window_time
        task.deferred_batches = [b for b in task.deferred_batches if b.deferred]
        self.replays.append((activity, ack.sequence))

    async def exclude_deferred(self, key: RunKey, activity: str, reason: str) -> int:
        task = self.task(activity)
        excluded = task.deferred
        if excluded:
            task.skipped[reason] = task.skipped.get(reason, 0) + excluded
        task.deferred, task.deferred_batches, task.wake_time = 0, [], None
        return excluded

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
