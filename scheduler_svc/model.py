"""The scheduler's domain types: the canvas, campaigns, runs and their per-activity tasks.

Plain dataclasses, independent of gRPC. Channels and categories are the chassis' lower-case names
(``email``, ``marketing``; ``""`` when unset). A build-audience activity carries its query as the
audience contract's ``AudienceQuery`` message: the scheduler does not interpret it, it forwards it.

The canvas is stored as JSON in the scheduler's own format (:func:`canvas_to_json`), not as a copy
of the API message, so the API and the table can evolve separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from google.protobuf import json_format

from carillon.audience.v1 import audience_service_pb2, query_pb2, working_set_pb2
from carillon.type.v1 import value_pb2

CANVAS_FORMAT = 1


class CampaignState(StrEnum):
    """The lifecycle state of a campaign."""

    DRAFT = "draft"
    SCHEDULED = "scheduled"
    LIVE = "live"
    COMPLETED = "completed"
    STOPPED = "stopped"
    CLOSED = "closed"
    ARCHIVED = "archived"


class RunState(StrEnum):
    """The state of a run."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    WAITING = "waiting"
    SUSPENDED = "suspended"


class RunTrigger(StrEnum):
    """What created a run."""

    SCHEDULE = "schedule"
    SIGNAL = "signal"
    # A test-mode run of a draft (TestCampaign): nothing is sent.
    TEST = "test"


class TaskState(StrEnum):
    """The state of one activity within a run."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class BuildAudience:
    """A targeting activity: materialize the query as the run's working set for this activity; with
    ``incremental`` only the records earlier runs of the activity did not produce."""

    query: query_pb2.AudienceQuery = field(default_factory=query_pb2.AudienceQuery)
    incremental: working_set_pb2.Incremental | None = None


@dataclass
class ReadAudience:
    """A targeting activity: a saved audience (``audiences/{audience}``) of ``dimension`` as the population."""

    audience: str = ""
    dimension: str = ""


COMBINE_OPERATIONS = ("union", "intersection", "exclusion")


@dataclass
class Combine:
    """A targeting activity: the populations of its incoming transitions combined by ``operation``
    (``union``, ``intersection`` or ``exclusion`` of the others from ``primary``); ``complement_output``
    names an extra output with the complement when set."""

    operation: str = ""
    primary: str = ""
    complement_output: str = ""


@dataclass
class ChangeDimension:
    """A targeting activity: follows ``link`` from each record; ``dimension`` is where the link leads."""

    link: str = ""
    dimension: str = ""


@dataclass
class SplitSubset:
    """One ordered subset of a split, passed on by its output ``output``."""

    output: str
    filter: query_pb2.Filter | None = None
    limit: int = 0
    limit_percent: float = 0.0
    # (attribute, descending) pairs.
    order_by: list[tuple[str, bool]] = field(default_factory=list)


@dataclass
class Split:
    """A targeting activity: ordered subsets, each a named output, and optionally a complement output."""

    subsets: list[SplitSubset] = field(default_factory=list)
    complement_output: str = ""
    overlap: bool = False


DEDUPLICATION_METHODS = ("random", "highest", "lowest", "non_empty", "priority")


@dataclass
class Deduplicate:
    """A targeting activity: keeps ``keep`` records per combination of ``fields`` (chosen by ``method``
    on ``attribute``); ``removed_output`` names an extra output with the removed records when set."""

    fields: list[str] = field(default_factory=list)
    keep: int = 0
    method: str = ""
    attribute: str = ""
    priority: list[value_pb2.Value] = field(default_factory=list)
    removed_output: str = ""


@dataclass
class Reconcile:
    """A targeting activity: each record matched to the ``target`` records equal on every (source,
    target) attribute pair; the single matches become the population (of the target's dimension);
    ``unreconciled_output`` names an extra output with the others (of the incoming dimension)."""

    target: str = ""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    unreconciled_output: str = ""


@dataclass
class SaveAudience:
    """A targeting activity: saves its population as the snapshot audience ``audience_id`` (creating or
    overwriting it) and passes the population on; nothing is saved in test mode."""

    audience_id: str = ""
    display_name: str = ""


@dataclass
class Enrich:
    """A targeting activity: passes its population on; the channel activities downstream (until the
    dimension changes) stream its enrichments with their rows: ``attributes`` are (alias, path) pairs
    of many-to-one attribute paths, ``aggregates`` and ``collections`` the audience contract's
    ``Enrichment`` and ``CollectionEnrichment`` messages, forwarded as they are."""

    attributes: list[tuple[str, str]] = field(default_factory=list)
    aggregates: list[audience_service_pb2.Enrichment] = field(default_factory=list)
    collections: list[audience_service_pb2.CollectionEnrichment] = field(default_factory=list)

    def aliases(self) -> list[str]:
        """Every alias it defines, in order: attributes, aggregates, collections."""
        return (
            [alias for alias, _ in self.attributes]
            + [a.alias for a in self.aggregates]
            + [c.alias for c in self.collections]
        )


@dataclass(frozen=True)
class SendWindow:
    """When a channel activity may send, in the recipient's local time (delivery's SendWindow)."""

    start_local_time: str
    end_local_time: str
    days: tuple[int, ...] = ()
    default_time_zone: str = ""


DEFAULT_TIME_LIMIT_S = 12 * 3600


@dataclass
class ChannelSend:
    """A channel activity: send a message to every record of the incoming working set.

    ``rate_limit_per_second`` (0: none of its own) and ``send_window`` travel in the send header;
    recipients still deferred ``time_limit_s`` (0: the 12-hour default) after the activity started
    are excluded. With ``confirm_before_sending`` nothing is sent before ConfirmActivity.
    """

    channel: str = ""
    category: str = ""
    template: str = ""
    batch_size: int = 0
    target_attributes: list[str] = field(default_factory=list)
    rate_limit_per_second: int = 0
    send_window: SendWindow | None = None
    time_limit_s: int = 0
    # Wait for ConfirmActivity before sending (at most the time limit).
    confirm_before_sending: bool = False

    @property
    def effective_time_limit_s(self) -> int:
        """The time limit in seconds, with the default applied."""
        return self.time_limit_s or DEFAULT_TIME_LIMIT_S


@dataclass
class Fork:
    """A flow activity: passes its population on to every outgoing transition (parallel branches)."""


@dataclass
class Join:
    """A flow activity (AND-join): waits for every incoming branch; passes on ``primary``'s population
    (the source of the first incoming transition when empty)."""

    primary: str = ""


@dataclass
class Wait:
    """A flow activity: a durable timer of ``duration_s`` seconds, or until ``until``."""

    duration_s: int = 0
    until: datetime | None = None


COMPARISONS = ("=", "!=", "<", "<=", ">", ">=")
ERROR_HANDLINGS = ("abort", "ignore", "suspend")


@dataclass
class Condition:
    """A test condition: the population count (``variable`` empty) or a variable, compared with ``value``."""

    comparison: str
    value: str
    variable: str = ""


@dataclass
class Branch:
    """A test branch: ``output`` is taken when ``condition`` holds."""

    output: str
    condition: Condition


@dataclass
class BranchTest:
    """A flow activity: the first branch whose condition holds is taken, else ``default_output``."""

    branches: list[Branch] = field(default_factory=list)
    default_output: str = "default"


@dataclass
class End:
    """A flow activity: ends its branch; signals ``signal_campaign`` (``campaigns/{campaign}``) with
    ``parameters`` when set."""

    signal_campaign: str = ""
    parameters: dict[str, value_pb2.Value] = field(default_factory=dict)


FlowKind = Fork | Join | Wait | BranchTest | End
# Targeting activities that call audience_svc (besides build_audience).
TargetingKind = ReadAudience | Combine | ChangeDimension | Split | Deduplicate | Reconcile | SaveAudience | Enrich
ActivityKind = (
    BuildAudience
    | ChannelSend
    | Fork
    | Join
    | Wait
    | BranchTest
    | End
    | ReadAudience
    | Combine
    | ChangeDimension
    | Split
    | Deduplicate
    | Reconcile
    | SaveAudience
    | Enrich
)
# The kinds that produce a population of their own (a new working set), rather than passing one on.
POPULATION_KINDS = (BuildAudience, ReadAudience, Combine, ChangeDimension, Split, Deduplicate, Reconcile)


def named_outputs(kind: object) -> list[str]:
    """The named outputs an activity declares (a test's branches and default, a split's subsets and
    complement, a combine's complement, a deduplication's removed records)."""
    if isinstance(kind, BranchTest):
        return [b.output for b in kind.branches] + [kind.default_output]
    if isinstance(kind, Split):
        return [s.output for s in kind.subsets] + ([kind.complement_output] if kind.complement_output else [])
    if isinstance(kind, Combine):
        return [kind.complement_output] if kind.complement_output else []
    if isinstance(kind, Deduplicate):
        return [kind.removed_output] if kind.removed_output else []
    if isinstance(kind, Reconcile):
        return [kind.unreconciled_output] if kind.unreconciled_output else []
    return []


def has_main_output(kind: object) -> bool:
    """Whether an activity passes a population on its unnamed output ``""`` (all but tests and splits)."""
    return not isinstance(kind, BranchTest | Split | End)


def enrichment_chain(canvas: Canvas, activity_id: str) -> list[tuple[str, Enrich]]:
    """The enrich activities on the input path of ``activity_id``, upstream first, with their ids.

    The path goes back through each activity's single incoming transition (a join's or combine's
    primary) and stops at the activity that gave the population its dimension: a build or read
    audience, a change of dimension, or a reconciliation's main output (its unreconciled output keeps
    the incoming dimension, so the path goes on through it). The canvas must be acyclic.
    """
    chain: list[tuple[str, Enrich]] = []
    current = activity_id
    seen = {current}
    while True:
        kind = (canvas.find(current) or Activity(current)).kind
        incoming = [t for t in canvas.transitions if t.target == current]
        if not incoming:
            break
        primary = kind.primary if isinstance(kind, Join | Combine) and kind.primary else ""
        chosen = next((t for t in incoming if t.source == primary), incoming[0])
        source = (canvas.find(chosen.source) or Activity(chosen.source)).kind
        if isinstance(source, Enrich):
            chain.append((chosen.source, source))
        if isinstance(source, BuildAudience | ReadAudience | ChangeDimension):
            break
        if isinstance(source, Reconcile) and not (chosen.output and chosen.output == source.unreconciled_output):
            break
        current = chosen.source
        if current in seen:  # a cycle (not a valid canvas)
            break
        seen.add(current)
    chain.reverse()
    return chain


def output_activity(activity_id: str, output: str) -> str:
    """The activity id under which audience_svc keeps the working set of a named output."""
    return f"{activity_id}--{output}" if output else activity_id


@dataclass
class Activity:
    """One activity of a canvas; ``kind`` is None when the request set none."""

    id: str
    display_name: str = ""
    kind: ActivityKind | None = None


@dataclass(frozen=True)
class Transition:
    """An edge from one activity's output (``""``: its single output; a test's branch name) to another."""

    source: str
    target: str
    output: str = ""


@dataclass(frozen=True, order=True)
class LocalTime:
    """A wall-clock time of day in the schedule's time zone."""

    hour: int
    minute: int = 0

    @property
    def minutes(self) -> int:
        """Minutes since midnight."""
        return self.hour * 60 + self.minute


@dataclass
class Daily:
    """Run on ``days`` (ISO weekdays 1 = Monday .. 7; empty means every day) at each of ``times``."""

    days: list[int] = field(default_factory=list)
    times: list[LocalTime] = field(default_factory=list)


@dataclass
class Interval:
    """Run every ``minutes`` from ``window_start`` to ``window_end`` (inclusive) on ``days``."""

    minutes: int = 0
    days: list[int] = field(default_factory=list)
    window_start: LocalTime | None = None
    window_end: LocalTime | None = None


@dataclass
class Weekly:
    """Run every ``every`` weeks (counted from the validity start's week) on ``days`` at ``times``."""

    every: int = 1
    days: list[int] = field(default_factory=list)
    times: list[LocalTime] = field(default_factory=list)


@dataclass
class Monthly:
    """Run monthly at ``times`` on day ``day_of_month``, on the last day, or on the n-th weekday.

    Exactly one of ``day_of_month`` (1..31), ``last_day`` and ``ordinal`` (1..5 or -1 for the last,
    with ``weekday``) is set.
    """

    day_of_month: int = 0
    last_day: bool = False
    ordinal: int = 0
    weekday: int = 0
    times: list[LocalTime] = field(default_factory=list)


Recurrence = Daily | Interval | Weekly | Monthly


@dataclass
class Schedule:
    """When a campaign runs: once (``recurrence`` None) at ``start_time`` or as soon as it is published,
    or at the launch times of ``recurrence`` in ``time_zone`` within the validity window; or, when
    ``signal`` is set, only when signalled (SignalCampaign)."""

    start_time: datetime | None = None
    time_zone: str = ""
    recurrence: Recurrence | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    signal: bool = False


@dataclass
class Canvas:
    """A campaign's activities, transitions and schedule."""

    activities: list[Activity] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    schedule: Schedule = field(default_factory=Schedule)
    variables: dict[str, str] = field(default_factory=dict)
    # What a run does when an activity fails: "abort", "ignore" or "suspend".
    error_handling: str = "abort"

    def find(self, activity_id: str) -> Activity | None:
        """The activity with this id, if there is one."""
        return next((a for a in self.activities if a.id == activity_id), None)

    def sources_of(self, activity_id: str) -> list[str]:
        """The ids of the activities with a transition into ``activity_id``, in transition order."""
        return [t.source for t in self.transitions if t.target == activity_id]


@dataclass
class Campaign:
    """A stored campaign."""

    campaign_id: str
    display_name: str
    state: CampaignState
    canvas: Canvas
    create_time: datetime
    update_time: datetime
    publish_time: datetime | None = None
    next_run_time: datetime | None = None

    @property
    def name(self) -> str:
        """The resource name, ``campaigns/{campaign}``."""
        return f"campaigns/{self.campaign_id}"


@dataclass(frozen=True)
class RunKey:
    """Identifies a run: its sandbox, campaign and id."""

    sandbox: str
    campaign_id: str
    run_id: str

    @property
    def campaign_name(self) -> str:
        """The campaign's resource name."""
        return f"campaigns/{self.campaign_id}"

    @property
    def name(self) -> str:
        """The run's resource name, ``campaigns/{campaign}/runs/{run}``."""
        return f"campaigns/{self.campaign_id}/runs/{self.run_id}"


@dataclass
class Task:
    """The progress and counts of one activity in a run."""

    activity: str
    state: TaskState = TaskState.PENDING
    targeted: int = 0
    sent: int = 0
    already_sent: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    working_set: str = ""
    checkpoint: int = 0
    message: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    outputs: dict[str, int] = field(default_factory=dict)
    wake_time: datetime | None = None
    # The working set of each output of a targeting activity ("" is the main output).
    output_working_sets: dict[str, str] = field(default_factory=dict)
    # Recipients of a channel activity deferred to the next opening of its send window.
    deferred: int = 0
    # The batches of a channel activity with deferred recipients, to send again when the window opens.
    deferred_batches: list[DeferredBatch] = field(default_factory=list)
    # A channel activity's confirmation: "" (none asked), "awaiting" or "confirmed".
    confirmation: str = ""


@dataclass
class DeferredBatch:
    """A send batch with deferred recipients: its positions ``(after, sequence]``, the counts last
    acknowledged for it, and when its window next opens."""

    after: int
    sequence: int
    sent: int = 0
    already_sent: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    deferred: int = 0
    next_window_time: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The stored JSON form."""
        return {
            "after": self.after,
            "sequence": self.sequence,
            "sent": self.sent,
            "already_sent": self.already_sent,
            "skipped": dict(self.skipped),
            "failed": dict(self.failed),
            "deferred": self.deferred,
            "next_window_time": _iso(self.next_window_time),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeferredBatch:
        """The deferred batch of its stored JSON form."""
        return cls(
            after=data["after"],
            sequence=data["sequence"],
            sent=data.get("sent", 0),
            already_sent=data.get("already_sent", 0),
            skipped=dict(data.get("skipped") or {}),
            failed=dict(data.get("failed") or {}),
            deferred=data.get("deferred", 0),
            next_window_time=_when(data.get("next_window_time")),
        )


@dataclass(frozen=True)
class TransitionCount:
    """Records that passed along one transition in a run (0 and not taken when its output was not)."""

    source: str
    target: str
    output: str
    taken: bool
    count: int


def transition_counts(canvas: Canvas, tasks: list[Task]) -> list[TransitionCount]:
    """The count of every transition of ``canvas`` from the outputs its source tasks took."""
    by_activity = {t.activity: t for t in tasks}
    counts: list[TransitionCount] = []
    for transition in canvas.transitions:
        task = by_activity.get(transition.source)
        taken = task is not None and task.state == TaskState.SUCCEEDED and transition.output in task.outputs
        count = task.outputs[transition.output] if taken and task is not None else 0
        counts.append(TransitionCount(transition.source, transition.target, transition.output, taken, count))
    return counts


@dataclass
class Run:
    """One execution of a campaign, with one task per activity in execution order."""

    key: RunKey
    state: RunState
    scheduled_time: datetime
    create_time: datetime
    tasks: list[Task] = field(default_factory=list)
    start_time: datetime | None = None
    end_time: datetime | None = None
    error: str = ""
    lease_owner: str | None = None
    lease_expires: datetime | None = None
    trigger: RunTrigger = RunTrigger.SCHEDULE
    # The signal's parameters, as the shared contract's Value messages.
    parameters: dict[str, value_pb2.Value] = field(default_factory=dict)
    # Per-transition counts (filled by reads of the run store, from the campaign's canvas).
    transitions: list[TransitionCount] = field(default_factory=list)


class LogLevel(StrEnum):
    """How notable a run log entry is."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class LogEntry:
    """One entry of a run's log; ``sequence`` orders the entries of a run (increasing, not dense)."""

    sequence: int
    time: datetime
    level: LogLevel
    activity: str
    message: str


@dataclass(frozen=True)
class Ack:
    """A delivery worker's acknowledgement of one send batch, with the batch's outcome counts.

    ``sequence`` is the batch's last working-set position: the new checkpoint once it is recorded.
    """

    sequence: int
    sent: int = 0
    already_sent: int = 0
    skipped: Mapping[str, int] = field(default_factory=dict)
    failed: Mapping[str, int] = field(default_factory=dict)
    # Recipients outside the send window, and the earliest next opening among them.
    deferred: int = 0
    next_window_time: datetime | None = None


class LeaseLost(Exception):
    """This replica no longer owns the run it is executing (another claimed it); stop at once."""


@dataclass
class ClaimedRun:
    """A run claimed by a replica, with the canvas it executes and the claim's fencing token (the
    run's claim counter: writes of this execution carry it, and fail once the run is claimed again)."""

    run: Run
    canvas: Canvas
    fencing_token: int = 0


def canvas_to_json(canvas: Canvas) -> dict[str, Any]:
    """The stored JSON form of a canvas."""
    activities: list[dict[str, Any]] = []
    for activity in canvas.activities:
        item: dict[str, Any] = {"id": activity.id, "display_name": activity.display_name}
        kind = activity.kind
        if isinstance(kind, BuildAudience):
            item["build_audience"] = {"query": json_format.MessageToDict(kind.query, preserving_proto_field_name=True)}
            if kind.incremental is not None:
                item["build_audience"]["incremental"] = json_format.MessageToDict(
                    kind.incremental, preserving_proto_field_name=True
                )
        elif isinstance(kind, Fork):
            item["fork"] = {}
        elif isinstance(kind, Join):
            item["join"] = {"primary": kind.primary}
        elif isinstance(kind, Wait):
            item["wait"] = {"duration_s": kind.duration_s, "until": _iso(kind.until)}
        elif isinstance(kind, BranchTest):
            item["test"] = {
                "default_output": kind.default_output,
                "branches": [
                    {
                        "output": b.output,
                        "comparison": b.condition.comparison,
                        "value": b.condition.value,
                        "variable": b.condition.variable,
                    }
                    for b in kind.branches
                ],
            }
        elif isinstance(kind, End):
            item["end"] = {"signal_campaign": kind.signal_campaign, "parameters": parameters_to_json(kind.parameters)}
        elif isinstance(kind, ChannelSend):
            window = kind.send_window
            item["channel"] = {
                "channel": kind.channel,
                "category": kind.category,
                "template": kind.template,
                "batch_size": kind.batch_size,
                "target_attributes": list(kind.target_attributes),
                "rate_limit_per_second": kind.rate_limit_per_second,
                "send_window": None
                if window is None
                else {
                    "start": window.start_local_time,
                    "end": window.end_local_time,
                    "days": list(window.days),
                    "time_zone": window.default_time_zone,
                },
                "time_limit_s": kind.time_limit_s,
                "confirm_before_sending": kind.confirm_before_sending,
            }
        else:
            _targeting_to_json(item, kind)
        activities.append(item)
    return {
        "format": CANVAS_FORMAT,
        "activities": activities,
        "transitions": [
            {"source": t.source, "target": t.target, **({"output": t.output} if t.output else {})}
            for t in canvas.transitions
        ],
        "schedule": schedule_to_json(canvas.schedule),
        "variables": dict(canvas.variables),
        "error_handling": canvas.error_handling,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _times_json(times: list[LocalTime]) -> list[list[int]]:
    return [[t.hour, t.minute] for t in times]


def _times(data: list[list[int]]) -> list[LocalTime]:
    return [LocalTime(h, m) for h, m in data]


def _time(data: list[int] | None) -> LocalTime | None:
    return LocalTime(data[0], data[1]) if data else None


def schedule_to_json(schedule: Schedule) -> dict[str, Any]:
    """The stored JSON form of a schedule."""
    data: dict[str, Any] = {"time_zone": schedule.time_zone}
    r = schedule.recurrence
    if isinstance(r, Daily):
        data["daily"] = {"days": list(r.days), "times": _times_json(r.times)}
    elif isinstance(r, Interval):
        data["interval"] = {
            "minutes": r.minutes,
            "days": list(r.days),
            "window_start": [r.window_start.hour, r.window_start.minute] if r.window_start else None,
            "window_end": [r.window_end.hour, r.window_end.minute] if r.window_end else None,
        }
    elif isinstance(r, Weekly):
        data["weekly"] = {"every": r.every, "days": list(r.days), "times": _times_json(r.times)}
    elif isinstance(r, Monthly):
        data["monthly"] = {
            "day_of_month": r.day_of_month,
            "last_day": r.last_day,
            "ordinal": r.ordinal,
            "weekday": r.weekday,
            "times": _times_json(r.times),
        }
    elif schedule.signal:
        data["signal"] = {}
    else:
        data["once"] = {"start_time": _iso(schedule.start_time)}
    data["valid_from"] = _iso(schedule.valid_from)
    data["valid_until"] = _iso(schedule.valid_until)
    return data


def schedule_from_json(data: dict[str, Any]) -> Schedule:
    """The schedule of its stored JSON form (a canvas stored before recurrences is a once schedule)."""
    recurrence: Recurrence | None = None
    if "daily" in data:
        d = data["daily"]
        recurrence = Daily(days=list(d["days"]), times=_times(d["times"]))
    elif "interval" in data:
        d = data["interval"]
        recurrence = Interval(
            minutes=d["minutes"],
            days=list(d["days"]),
            window_start=_time(d.get("window_start")),
            window_end=_time(d.get("window_end")),
        )
    elif "weekly" in data:
        d = data["weekly"]
        recurrence = Weekly(every=d["every"], days=list(d["days"]), times=_times(d["times"]))
    elif "monthly" in data:
        d = data["monthly"]
        recurrence = Monthly(
            day_of_month=d["day_of_month"],
            last_day=d["last_day"],
            ordinal=d["ordinal"],
            weekday=d["weekday"],
            times=_times(d["times"]),
        )
    return Schedule(
        start_time=_when((data.get("once") or {}).get("start_time")),
        time_zone=data.get("time_zone", ""),
        recurrence=recurrence,
        valid_from=_when(data.get("valid_from")),
        valid_until=_when(data.get("valid_until")),
        signal="signal" in data,
    )


def canvas_from_json(data: dict[str, Any]) -> Canvas:
    """The canvas of its stored JSON form."""
    activities: list[Activity] = []
    for item in data["activities"]:
        kind: ActivityKind | None = None
        if "build_audience" in item:
            query = json_format.ParseDict(item["build_audience"]["query"], query_pb2.AudienceQuery())
            stored = item["build_audience"].get("incremental")
            incremental = None if stored is None else json_format.ParseDict(stored, working_set_pb2.Incremental())
            kind = BuildAudience(query=query, incremental=incremental)
        elif "channel" in item:
            c = item["channel"]
            w = c.get("send_window")
            kind = ChannelSend(
                channel=c["channel"],
                category=c["category"],
                template=c["template"],
                batch_size=c["batch_size"],
                target_attributes=list(c["target_attributes"]),
                rate_limit_per_second=c.get("rate_limit_per_second", 0),
                send_window=None if not w else SendWindow(w["start"], w["end"], tuple(w["days"]), w["time_zone"]),
                time_limit_s=c.get("time_limit_s", 0),
                confirm_before_sending=c.get("confirm_before_sending", False),
            )
        elif "fork" in item:
            kind = Fork()
        elif "join" in item:
            kind = Join(primary=item["join"]["primary"])
        elif "wait" in item:
            kind = Wait(duration_s=item["wait"]["duration_s"], until=_when(item["wait"]["until"]))
        elif "test" in item:
            t = item["test"]
            kind = BranchTest(
                branches=[
                    Branch(b["output"], Condition(b["comparison"], b["value"], b["variable"])) for b in t["branches"]
                ],
                default_output=t["default_output"],
            )
        elif "end" in item:
            end = item["end"]
            kind = End(end.get("signal_campaign", ""), parameters_from_json(end.get("parameters")))
        else:
            kind = _targeting_from_json(item)
        activities.append(Activity(id=item["id"], display_name=item.get("display_name", ""), kind=kind))
    return Canvas(
        activities=activities,
        transitions=[Transition(t["source"], t["target"], t.get("output", "")) for t in data["transitions"]],
        schedule=schedule_from_json(data.get("schedule") or {}),
        variables=dict(data.get("variables") or {}),
        error_handling=data.get("error_handling", "abort"),
    )


def parameters_to_json(parameters: Mapping[str, value_pb2.Value]) -> dict[str, Any]:
    """The stored JSON form of signal parameters."""
    return {name: json_format.MessageToDict(value) for name, value in parameters.items()}


def parameters_from_json(data: Mapping[str, Any] | None) -> dict[str, value_pb2.Value]:
    """Signal parameters of their stored JSON form."""
    return {name: json_format.ParseDict(value, value_pb2.Value()) for name, value in (data or {}).items()}


def _filter_json(value: query_pb2.Filter | None) -> dict[str, Any] | None:
    return None if value is None else json_format.MessageToDict(value, preserving_proto_field_name=True)


def _targeting_to_json(item: dict[str, Any], kind: ActivityKind | None) -> None:
    """Add the stored form of a targeting activity (other than build_audience) to ``item``."""
    if isinstance(kind, ReadAudience):
        item["read_audience"] = {"audience": kind.audience, "dimension": kind.dimension}
    elif isinstance(kind, Combine):
        item["combine"] = {
            "operation": kind.operation,
            "primary": kind.primary,
            "complement_output": kind.complement_output,
        }
    elif isinstance(kind, ChangeDimension):
        item["change_dimension"] = {"link": kind.link, "dimension": kind.dimension}
    elif isinstance(kind, Split):
        item["split"] = {
            "complement_output": kind.complement_output,
            "overlap": kind.overlap,
            "subsets": [
                {
                    "output": s.output,
                    "filter": _filter_json(s.filter),
                    "limit": s.limit,
                    "limit_percent": s.limit_percent,
                    "order_by": [[a, d] for a, d in s.order_by],
                }
                for s in kind.subsets
            ],
        }
    elif isinstance(kind, Deduplicate):
        item["deduplicate"] = {
            "fields": list(kind.fields),
            "keep": kind.keep,
            "method": kind.method,
            "attribute": kind.attribute,
            "priority": [json_format.MessageToDict(v) for v in kind.priority],
            "removed_output": kind.removed_output,
        }
    elif isinstance(kind, Reconcile):
        item["reconcile"] = {
            "target": kind.target,
            "pairs": [[a, b] for a, b in kind.pairs],
            "unreconciled_output": kind.unreconciled_output,
        }
    elif isinstance(kind, SaveAudience):
        item["save_audience"] = {"audience_id": kind.audience_id, "display_name": kind.display_name}
    elif isinstance(kind, Enrich):
        item["enrich"] = {
            "attributes": [[alias, path] for alias, path in kind.attributes],
            "aggregates": [json_format.MessageToDict(a, preserving_proto_field_name=True) for a in kind.aggregates],
            "collections": [json_format.MessageToDict(c, preserving_proto_field_name=True) for c in kind.collections],
        }


def _targeting_from_json(item: Mapping[str, Any]) -> ActivityKind | None:
    """The targeting activity (other than build_audience) of its stored form; None when it is none."""
    if "read_audience" in item:
        r = item["read_audience"]
        return ReadAudience(r["audience"], r["dimension"])
    if "combine" in item:
        c = item["combine"]
        return Combine(c["operation"], c["primary"], c["complement_output"])
    if "change_dimension" in item:
        d = item["change_dimension"]
        return ChangeDimension(d["link"], d["dimension"])
    if "split" in item:
        s = item["split"]
        return Split(
            subsets=[
                SplitSubset(
                    output=x["output"],
                    filter=None if x["filter"] is None else json_format.ParseDict(x["filter"], query_pb2.Filter()),
                    limit=x["limit"],
                    limit_percent=x["limit_percent"],
                    order_by=[(a, bool(d)) for a, d in x["order_by"]],
                )
                for x in s["subsets"]
            ],
            complement_output=s["complement_output"],
            overlap=s["overlap"],
        )
    if "deduplicate" in item:
        d = item["deduplicate"]
        return Deduplicate(
            fields=list(d["fields"]),
            keep=d["keep"],
            method=d["method"],
            attribute=d["attribute"],
            priority=[json_format.ParseDict(v, value_pb2.Value()) for v in d["priority"]],
            removed_output=d["removed_output"],
        )
    if "reconcile" in item:
        r = item["reconcile"]
        return Reconcile(r["target"], [(a, b) for a, b in r["pairs"]], r["unreconciled_output"])
    if "save_audience" in item:
        a = item["save_audience"]
        return SaveAudience(a["audience_id"], a["display_name"])
    if "enrich" in item:
        e = item["enrich"]
        return Enrich(
            attributes=[(alias, path) for alias, path in e["attributes"]],
            aggregates=[json_format.ParseDict(a, audience_service_pb2.Enrichment()) for a in e["aggregates"]],
            collections=[
                json_format.ParseDict(c, audience_service_pb2.CollectionEnrichment()) for c in e["collections"]
            ],
        )
    return None
