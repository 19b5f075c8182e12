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

from carillon.audience.v1 import query_pb2

CANVAS_FORMAT = 1


class CampaignState(StrEnum):
    """The lifecycle state of a campaign."""

    DRAFT = "draft"
    SCHEDULED = "scheduled"
    LIVE = "live"
    COMPLETED = "completed"
    STOPPED = "stopped"


class RunState(StrEnum):
    """The state of a run."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TaskState(StrEnum):
    """The state of one activity within a run."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class BuildAudience:
    """A targeting activity: materialize the query as the run's working set for this activity."""

    query: query_pb2.AudienceQuery = field(default_factory=query_pb2.AudienceQuery)


@dataclass
class ChannelSend:
    """A channel activity: send a message to every record of the incoming working set."""

    channel: str = ""
    category: str = ""
    template: str = ""
    batch_size: int = 0
    target_attributes: list[str] = field(default_factory=list)


ActivityKind = BuildAudience | ChannelSend


@dataclass
class Activity:
    """One activity of a canvas; ``kind`` is None when the request set none."""

    id: str
    display_name: str = ""
    kind: ActivityKind | None = None


@dataclass(frozen=True)
class Transition:
    """An edge from one activity to another, by id."""

    source: str
    target: str


@dataclass
class Schedule:
    """When a campaign runs: once, at ``start_time`` or as soon as it is published."""

    start_time: datetime | None = None
    time_zone: str = ""


@dataclass
class Canvas:
    """A campaign's activities, transitions and schedule."""

    activities: list[Activity] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    schedule: Schedule = field(default_factory=Schedule)

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


class LeaseLost(Exception):
    """This replica no longer owns the run it is executing (another claimed it); stop at once."""


@dataclass
class ClaimedRun:
    """A run claimed by a replica, with the canvas it executes."""

    run: Run
    canvas: Canvas


def canvas_to_json(canvas: Canvas) -> dict[str, Any]:
    """The stored JSON form of a canvas."""
    activities: list[dict[str, Any]] = []
    for activity in canvas.activities:
        item: dict[str, Any] = {"id": activity.id, "display_name": activity.display_name}
        kind = activity.kind
        if isinstance(kind, BuildAudience):
            item["build_audience"] = {"query": json_format.MessageToDict(kind.query, preserving_proto_field_name=True)}
        elif isinstance(kind, ChannelSend):
            item["channel"] = {
                "channel": kind.channel,
                "category": kind.category,
                "template": kind.template,
                "batch_size": kind.batch_size,
                "target_attributes": list(kind.target_attributes),
            }
        activities.append(item)
    start = canvas.schedule.start_time
    return {
        "format": CANVAS_FORMAT,
        "activities": activities,
        "transitions": [{"source": t.source, "target": t.target} for t in canvas.transitions],
        "schedule": {
            "once": {"start_time": start.isoformat() if start else None},
            "time_zone": canvas.schedule.time_zone,
        },
    }


def canvas_from_json(data: dict[str, Any]) -> Canvas:
    """The canvas of its stored JSON form."""
    activities: list[Activity] = []
    for item in data["activities"]:
        kind: ActivityKind | None = None
        if "build_audience" in item:
            query = json_format.ParseDict(item["build_audience"]["query"], query_pb2.AudienceQuery())
            kind = BuildAudience(query=query)
        elif "channel" in item:
            c = item["channel"]
            kind = ChannelSend(
                channel=c["channel"],
                category=c["category"],
                template=c["template"],
                batch_size=c["batch_size"],
                target_attributes=list(c["target_attributes"]),
            )
        activities.append(Activity(id=item["id"], display_name=item.get("display_name", ""), kind=kind))
    schedule = data.get("schedule") or {}
    start = (schedule.get("once") or {}).get("start_time")
    return Canvas(
        activities=activities,
        transitions=[Transition(t["source"], t["target"]) for t in data["transitions"]],
        schedule=Schedule(
            start_time=datetime.fromisoformat(start) if start else None,
            time_zone=schedule.get("time_zone", ""),
        ),
    )
